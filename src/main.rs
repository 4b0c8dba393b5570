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
}

fn main() -> ExitCode {
    tandem::util::tune_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::EvalBatch {
            checkpoint,
            batch,
            grads,
        } => {
            let r = tandem::eval::eval_batch_files(&checkpoint, &batch, grads)?;
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
