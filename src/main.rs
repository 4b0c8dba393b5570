//! The `tandem` binary: parse the command line, then call the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tandem::model::Preset;

#[derive(Parser)]
#[command(
    name = "tandem",
    version,
    about = "Distributed data-parallel BERT training"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a job on this machine: one coordinator and N workers as child processes on
    /// 127.0.0.1 (the default runs the bundled job, configs/local.toml).
    Launch {
        /// Job configuration (TOML).
        #[arg(default_value = "configs/local.toml")]
        config: PathBuf,
        /// Number of worker processes (sets cluster.min_workers and max_workers).
        #[arg(long)]
        workers: Option<usize>,
        /// Corpus files, directories or globs (replaces data.corpus; a vocabulary is then
        /// trained on it unless the config names a tokenizer).
        #[arg(long, num_args = 1..)]
        corpus: Vec<String>,
        /// Stop every stage after this many optimiser steps.
        #[arg(long)]
        max_steps: Option<u64>,
        /// Where the job keeps its state (replaces job.state_dir).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Override any config key, e.g. --set stages[0].lr=5e-4 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// CPU threads per worker.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Print plain log lines instead of a progress bar.
        #[arg(long)]
        no_progress: bool,
    },
    /// Run the coordinator of a job (the job token comes from TANDEM_TOKEN or job.token_file).
    Coordinator {
        #[arg(long)]
        config: PathBuf,
        /// Address to serve gRPC on.
        #[arg(long, default_value = "0.0.0.0:50051")]
        listen: std::net::SocketAddr,
        /// Write the bound address to this file once listening.
        #[arg(long)]
        addr_file: Option<PathBuf>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
    /// Run a worker: join the coordinator and train what it assigns.
    Worker {
        /// Coordinator URL, e.g. http://127.0.0.1:50051.
        #[arg(long, env = "TANDEM_COORDINATOR")]
        coordinator: String,
        /// cpu (cuda:N needs a build with the `cuda` feature).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// CPU threads for this worker's kernels.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Stable worker id (defaults to host-pid).
        #[arg(long, env = "TANDEM_WORKER_ID")]
        worker_id: Option<String>,
        /// Address the ring listener binds.
        #[arg(long, default_value = "127.0.0.1:0")]
        ring_listen: std::net::SocketAddr,
        /// Host name peers use to reach the ring listener (default: the bound IP).
        #[arg(long, env = "TANDEM_ADVERTISE_HOST")]
        advertise_host: Option<String>,
        /// Keep trying to reach the coordinator this long (seconds).
        #[arg(long, default_value_t = 300)]
        connect_timeout_s: u64,
    },
    /// Losses (and gradient norms) of an HF checkpoint on one JSON batch, as transformers
    /// reports them.
    EvalBatch {
        /// HF checkpoint directory (config.json + model.safetensors).
        #[arg(long)]
        checkpoint: PathBuf,
        /// JSON batch with HF field names (input_ids, token_type_ids, attention_mask,
        /// labels, next_sentence_label).
        #[arg(long)]
        batch: PathBuf,
        /// Also print the gradient of `loss`: global L2 norm and per-tensor norms.
        #[arg(long)]
        grads: bool,
    },
    /// Benchmarks that print one JSON line per measurement.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Print the WordPiece ids and tokens of a text (special tokens included).
    Tokenize {
        /// Directory with tokenizer.json or vocab.txt (or the file).
        #[arg(long)]
        tokenizer: PathBuf,
        #[arg(long)]
        text: String,
        /// One JSON object with `ids` and `tokens`.
        #[arg(long)]
        json: bool,
    },
    /// Tokenizer tools.
    #[command(subcommand)]
    Tokenizer(TokenizerCommand),
    /// Corpus tools.
    #[command(subcommand)]
    Data(DataCommand),
    /// Configuration tools.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Subcommand)]
enum TokenizerCommand {
    /// Train a BERT WordPiece vocabulary ([PAD] [UNK] [CLS] [SEP] [MASK] = ids 0–4).
    Train {
        #[arg(long, num_args = 1.., required = true)]
        corpus: Vec<String>,
        #[arg(long, default_value_t = 8192)]
        vocab_size: usize,
        #[arg(long)]
        out: PathBuf,
        /// Keep case (cased BERT).
        #[arg(long)]
        cased: bool,
        /// Minimum frequency of a merged piece.
        #[arg(long, default_value_t = 2)]
        min_frequency: u64,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Cut a corpus into document-aligned shards and write the shard index (shards.json).
    Shard {
        #[arg(long, num_args = 1.., required = true)]
        corpus: Vec<String>,
        /// Target shard size, e.g. 64MiB.
        #[arg(long, default_value = "64MiB")]
        shard_size: String,
        #[arg(long)]
        out: PathBuf,
        /// Skip (and count) bad lines instead of failing.
        #[arg(long)]
        skip_bad_lines: bool,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Load and validate a job configuration; print it as JSON.
    Check {
        config: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Full pre-training steps (forward, backward, AdamW) on synthetic data.
    Step {
        #[arg(long, value_enum, default_value = "tiny")]
        preset: Preset,
        #[arg(long, default_value_t = 32)]
        batch: usize,
        #[arg(long, default_value_t = 128)]
        seq: usize,
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Timed steps (the median is reported).
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Untimed steps first.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
    },
    /// The data pipeline on one thread (parse, tokenize, instances, collate): tokens/s and
    /// instances/s.
    Data {
        #[arg(long, num_args = 1.., default_value = "configs/data/corpus")]
        corpus: Vec<String>,
        /// Tokenizer directory or file (default: train one on the corpus first).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        #[arg(long, default_value_t = 8192)]
        vocab_size: usize,
        #[arg(long, default_value_t = 128)]
        seq: usize,
    },
}

fn main() -> ExitCode {
    tandem::util::tune_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on ctrl-c or SIGTERM (Kubernetes stops pods with SIGTERM).
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Launch {
            config,
            workers,
            corpus,
            max_steps,
            state_dir,
            sets,
            threads,
            no_progress,
        } => {
            if !config.exists() {
                anyhow::bail!(
                    "{}: no such config file (run from the repository root for the bundled job, or pass a config)",
                    config.display()
                );
            }
            let opts = tandem::launch::LaunchOptions {
                config,
                workers,
                corpus,
                max_steps,
                state_dir,
                sets,
                threads,
                no_progress,
            };
            let code = runtime()?.block_on(tandem::launch::run(opts, shutdown_signal()))?;
            if code != 0 {
                std::process::exit(code);
            }
        }
        Command::Coordinator {
            config,
            listen,
            addr_file,
            sets,
        } => {
            let cfg = tandem::config::JobConfig::load(&config, &sets)?;
            let token = tandem::coordinator::resolve_token(&cfg)?;
            let opts = tandem::coordinator::CoordinatorOptions {
                listen,
                addr_file,
                token,
            };
            let summary =
                runtime()?.block_on(tandem::coordinator::run(cfg, opts, shutdown_signal()))?;
            if summary.status != "completed" {
                anyhow::bail!("job {}: {}", summary.status, summary.reason);
            }
        }
        Command::Worker {
            coordinator,
            device,
            threads,
            worker_id,
            ring_listen,
            advertise_host,
            connect_timeout_s,
        } => {
            tandem::util::set_threads(threads);
            let token = std::env::var("TANDEM_TOKEN")
                .ok()
                .filter(|t| !t.is_empty())
                .ok_or_else(|| anyhow::anyhow!("set TANDEM_TOKEN to the job token"))?;
            let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".into());
            let opts = tandem::worker::WorkerOptions {
                coordinator,
                token,
                worker_id: worker_id.unwrap_or_else(|| format!("{host}-{}", std::process::id())),
                ring_listen,
                advertise_host,
                threads,
                device,
                connect_timeout: std::time::Duration::from_secs(connect_timeout_s),
            };
            runtime()?.block_on(tandem::worker::run(opts, shutdown_signal()))?;
        }
        Command::EvalBatch {
            checkpoint,
            batch,
            grads,
        } => {
            let r = tandem::eval::eval_batch_files(&checkpoint, &batch, grads)?;
            println!("{}", serde_json::to_string(&r)?);
        }
        Command::Tokenize {
            tokenizer,
            text,
            json,
        } => {
            let tok = tandem::data::tokenizer::Tokenizer::load(&tokenizer)?;
            let (ids, tokens) = tok.encode_with_specials(&text)?;
            if json {
                println!("{}", serde_json::json!({ "ids": ids, "tokens": tokens }));
            } else {
                for (i, t) in ids.iter().zip(&tokens) {
                    println!("{i}\t{t}");
                }
            }
        }
        Command::Tokenizer(TokenizerCommand::Train {
            corpus,
            vocab_size,
            out,
            cased,
            min_frequency,
        }) => {
            let files = tandem::data::corpus::resolve_inputs(&corpus)?;
            eprintln!(
                "training a WordPiece vocabulary of up to {vocab_size} on {} file(s)…",
                files.len()
            );
            let tok = tandem::data::tokenizer::train_wordpiece(
                &files,
                vocab_size,
                !cased,
                None,
                min_frequency,
            )?;
            tok.save(&out)?;
            eprintln!("{} tokens written to {}", tok.vocab_size(), out.display());
        }
        Command::Data(DataCommand::Shard {
            corpus,
            shard_size,
            out,
            skip_bad_lines,
        }) => {
            let bytes = tandem::config::parse_bytes(&shard_size).ok_or_else(|| {
                anyhow::anyhow!("--shard-size {shard_size:?}: expected e.g. 64MiB")
            })?;
            let files = tandem::data::corpus::resolve_inputs(&corpus)?;
            let opts = tandem::data::corpus::CorpusOptions {
                on_error: if skip_bad_lines {
                    tandem::data::corpus::ErrorPolicy::Skip
                } else {
                    tandem::data::corpus::ErrorPolicy::Fail
                },
                ..Default::default()
            };
            let index = tandem::data::shard::build_index(&files, bytes, &opts)?;
            std::fs::create_dir_all(&out)?;
            let path = out.join("shards.json");
            index.save(&path)?;
            println!(
                "{}",
                serde_json::json!({
                    "index": path, "files": index.files.len(), "shards": index.shards.len(),
                    "documents": index.total_documents(), "stats": index.stats,
                })
            );
        }
        Command::Config(ConfigCommand::Check { config, sets }) => {
            let cfg = tandem::config::JobConfig::load(&config, &sets)?;
            println!("{}", serde_json::to_string_pretty(&cfg)?);
        }
        Command::Bench(BenchCommand::Data {
            corpus,
            tokenizer,
            vocab_size,
            seq,
        }) => {
            let files = tandem::data::corpus::resolve_inputs(&corpus)?;
            let tok = match tokenizer {
                Some(t) => tandem::data::tokenizer::Tokenizer::load(&t)?,
                None => {
                    tandem::data::tokenizer::train_wordpiece(&files, vocab_size, true, None, 2)?
                }
            };
            tandem::util::set_threads(1);
            let mut opts = tandem::data::instances::BenchDataOptions::default();
            opts.instances.max_seq_length = seq;
            let r = tandem::data::instances::bench_data(&files, &tok, &opts)?;
            println!("{}", serde_json::to_string(&r)?);
        }
        Command::Bench(BenchCommand::Step {
            preset,
            batch,
            seq,
            threads,
            steps,
            warmup,
        }) => {
            anyhow::ensure!(steps > 0, "--steps must be at least 1");
            tandem::util::set_threads(threads);
            let r = tandem::bench::bench_step(preset, threads, batch, seq, steps, warmup)?;
            println!("{}", serde_json::to_string(&r)?);
        }
    }
    Ok(())
}
