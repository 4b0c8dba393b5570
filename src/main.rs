//! The `tandem` binary: parse the command line, then call the library.

use std::process::ExitCode;

use clap::Parser;
use tandem::cli::{
    BenchCommand, CertsCommand, Cli, Command, ConfigCommand, CoordinatorArgs, DataCommand,
    PredictArgs, TokenizeArgs, TokenizerCommand, WorkerArgs,
};

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

/// Ends the process with a job's exit code when it is not 0.
fn exit_with(code: i32) {
    if code != 0 {
        std::process::exit(code);
    }
}

/// `tandem launch`: the job's exit code.
fn launch(
    config: std::path::PathBuf,
    corpus: Vec<String>,
    resume: Option<std::path::PathBuf>,
    run: tandem::cli::RunArgs,
) -> anyhow::Result<i32> {
    let config = match &resume {
        Some(dir) => dir.join("job.toml"),
        None => config,
    };
    if !config.exists() {
        anyhow::bail!(
            "{}: no such config file (run from the repository root for the bundled job, or pass a config)",
            config.display()
        );
    }
    let mut opts = tandem::launch::LaunchOptions::new(config, run);
    opts.corpus = corpus;
    opts.resume = resume.is_some();
    runtime()?.block_on(tandem::launch::run(opts, shutdown_signal()))
}

/// `tandem coordinator`: runs the job; an error unless it completed.
fn coordinator(a: CoordinatorArgs, resume: tandem::coordinator::Resume) -> anyhow::Result<()> {
    let print_summary = !a.no_summary;
    let security = tandem::tls::Security::from_args(
        a.tls.tls_dir.as_deref(),
        a.tls.insecure,
        tandem::tls::Role::Coordinator,
    )?;
    let cfg = tandem::config::JobConfig::load(&a.config, &a.sets)?;
    cfg.check_paths()?;
    let token = tandem::coordinator::resolve_token(&cfg)?;
    let opts = tandem::coordinator::CoordinatorOptions {
        listen: a.listen,
        addr_file: a.addr_file,
        token,
        security,
        health_listen: a.health_listen,
        resume,
    };
    let state_dir = cfg.job.state_dir.clone();
    let summary = runtime()?.block_on(tandem::coordinator::run(cfg, opts, shutdown_signal()))?;
    if print_summary {
        eprintln!(
            "{}",
            tandem::coordinator::human_summary(&summary, &state_dir)
        );
    }
    anyhow::ensure!(
        summary.status == tandem::coordinator::JobStatus::Completed,
        "job {}: {}",
        summary.status,
        summary.reason
    );
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Launch {
            config,
            corpus,
            resume,
            run,
        } => exit_with(launch(config, corpus, resume, run)?),
        Command::Finetune { job, run } => exit_with(
            runtime()?.block_on(tandem::finetune_job::run(job, run, shutdown_signal()))?,
        ),
        Command::Coordinator(a) => coordinator_cmd(a)?,
        Command::Summary { state_dir } => {
            println!("{}", tandem::coordinator::summary_of(&state_dir)?);
        }
        Command::Worker(a) => worker(a)?,
        Command::EvalBatch {
            checkpoint,
            batch,
            grads,
        } => {
            let r = tandem::eval::eval_batch_files(&checkpoint, &batch, grads)?;
            println!("{}", serde_json::to_string(&r)?);
        }
        Command::Predict(a) => predict(a)?,
        Command::Tokenize(a) => tokenize(a)?,
        Command::Tokenizer(t) => tokenizer(t)?,
        Command::Data(d) => data(d)?,
        Command::Config(c) => config(c)?,
        Command::Bench(b) => bench(b)?,
        Command::Certs(c) => certs(c)?,
    }
    Ok(())
}

/// `tandem certs`: prints the files written.
fn certs(c: CertsCommand) -> anyhow::Result<()> {
    use tandem::tls::certs;
    let written = match c {
        CertsCommand::Init {
            dir,
            names,
            days,
            force,
        } => certs::init(&certs::InitOptions {
            dir,
            coordinator_names: names,
            days,
            force,
        })?,
        CertsCommand::Issue {
            ca_dir,
            role,
            names,
            out,
            stem,
            days,
        } => certs::issue(&certs::IssueOptions {
            ca_dir,
            role,
            names,
            out_dir: out,
            stem,
            days,
        })?,
    };
    for f in written {
        println!("{}", f.display());
    }
    Ok(())
}

/// `tandem coordinator`.
fn coordinator_cmd(a: CoordinatorArgs) -> anyhow::Result<()> {
    let resume = if a.resume_if_present {
        tandem::coordinator::Resume::IfPresent
    } else if a.resume {
        tandem::coordinator::Resume::Required
    } else {
        tandem::coordinator::Resume::Never
    };
    coordinator(a, resume)
}

/// `tandem worker`: runs until the job ends or a signal.
fn worker(a: WorkerArgs) -> anyhow::Result<()> {
    if a.device != "cpu" && std::env::var_os("NCCL_RUNTIME_CONNECT").is_none() {
        // NCCL connects peers inside the (bounded) communicator set-up instead of lazily in
        // the first all-reduce (src/comm/nccl.rs). Set before any thread.
        std::env::set_var("NCCL_RUNTIME_CONNECT", "0");
    }
    tandem::util::set_threads(a.threads);
    let token = std::env::var("TANDEM_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .ok_or_else(|| anyhow::anyhow!("set TANDEM_TOKEN to the job token"))?;
    let security = tandem::tls::Security::from_args(
        a.tls.tls_dir.as_deref(),
        a.tls.insecure,
        tandem::tls::Role::Worker,
    )?;
    security.warn_if_insecure("worker");
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".into());
    let opts = tandem::worker::WorkerOptions {
        coordinator: a.coordinator,
        access: tandem::worker::Access {
            token,
            security,
            server_name: a.tls_server_name,
        },
        worker_id: a
            .worker_id
            .unwrap_or_else(|| format!("{host}-{}", std::process::id())),
        ring_listen: a.ring_listen,
        advertise_host: a.advertise_host,
        threads: a.threads,
        device: a.device,
        connect_timeout: std::time::Duration::from_secs(a.connect_timeout_s),
    };
    runtime()?.block_on(tandem::worker::run(opts, shutdown_signal()))
}

/// `tandem predict`.
fn predict(a: PredictArgs) -> anyhow::Result<()> {
    tandem::predict::run(&tandem::predict::PredictOptions {
        checkpoint: a.checkpoint,
        input: a.input,
        output: a.output,
        batch_size: a.batch_size,
        max_seq_length: a.max_seq_length,
        doc_stride: a.doc_stride,
    })?;
    Ok(())
}

/// `tandem tokenize`.
fn tokenize(a: TokenizeArgs) -> anyhow::Result<()> {
    let tok = tandem::data::tokenizer::Tokenizer::load(&a.tokenizer)?;
    let (ids, tokens) = tok.encode_with_specials(&a.text)?;
    if a.json {
        println!("{}", serde_json::json!({ "ids": ids, "tokens": tokens }));
    } else {
        for (i, t) in ids.iter().zip(&tokens) {
            println!("{i}\t{t}");
        }
    }
    Ok(())
}

/// `tandem tokenizer …`.
fn tokenizer(c: TokenizerCommand) -> anyhow::Result<()> {
    match c {
        TokenizerCommand::Train {
            corpus,
            vocab_size,
            out,
            cased,
            min_frequency,
        } => {
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
    }
    Ok(())
}

/// `tandem data …`.
fn data(c: DataCommand) -> anyhow::Result<()> {
    match c {
        DataCommand::Shard {
            corpus,
            shard_size,
            out,
            skip_bad_lines,
        } => {
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
    }
    Ok(())
}

/// `tandem config …`.
fn config(c: ConfigCommand) -> anyhow::Result<()> {
    match c {
        ConfigCommand::Check {
            config,
            sets,
            skip_inputs,
        } => {
            let cfg = tandem::config::JobConfig::load(&config, &sets)?;
            if !skip_inputs {
                cfg.check_paths()?;
            }
            println!("{}", serde_json::to_string_pretty(&cfg)?);
            let inputs = if skip_inputs {
                "inputs not checked"
            } else {
                "every input exists"
            };
            eprintln!(
                "{}: valid; {inputs} (relative paths in the file are relative to its directory)",
                config.display()
            );
        }
    }
    Ok(())
}

/// `tandem bench …`.
fn bench(c: BenchCommand) -> anyhow::Result<()> {
    match c {
        BenchCommand::Allreduce {
            world,
            sizes,
            iters,
            chunk_bytes,
            transport,
            encryption,
            rank,
            ports,
        } => {
            let sizes = sizes
                .iter()
                .map(|s| {
                    tandem::config::parse_bytes(s)
                        .map(|b| b as usize)
                        .ok_or_else(|| anyhow::anyhow!("--sizes: cannot read {s:?}"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let bench = tandem::bench::AllreduceBench {
                sizes,
                iters,
                chunk_bytes,
                transport,
                encryption,
            };
            match rank {
                Some(r) => bench.run_rank(r, &ports)?,
                None => bench.run(world)?,
            }
        }
        BenchCommand::Scaling(o) => {
            let r = runtime()?.block_on(tandem::bench::scaling(o))?;
            println!("{}", serde_json::to_string(&r)?);
        }
        BenchCommand::Data {
            corpus,
            tokenizer,
            vocab_size,
            seq,
        } => {
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
        BenchCommand::Step(o) => {
            tandem::util::set_threads(o.threads);
            let r = tandem::bench::bench_step(&o)?;
            println!("{}", serde_json::to_string(&r)?);
        }
    }
    Ok(())
}
