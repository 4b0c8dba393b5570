//! The command line, in the library so tests can check that the arguments the deployment
//! manifests give the binary are accepted (`Cli::try_parse_from`).

#![warn(missing_docs)]

use std::path::PathBuf;

use clap::{Parser, Subcommand};

pub use crate::launch::RunArgs;

fn tandem_default_chunk() -> usize {
    crate::comm::ring::DEFAULT_CHUNK_BYTES
}

/// The `tandem` command line.
#[derive(Parser)]
#[command(
    name = "tandem",
    version,
    about = "Distributed data-parallel BERT training"
)]
pub struct Cli {
    /// The subcommand to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The `tandem` subcommands.
#[derive(Subcommand)]
pub enum Command {
    /// Run a job on this machine: one coordinator and N workers as child processes on
    /// 127.0.0.1 (the default runs the bundled job, configs/local.toml).
    Launch {
        /// Job configuration (TOML).
        #[arg(default_value = "configs/local.toml")]
        config: PathBuf,
        /// Corpus files, directories or globs (replaces data.corpus; a WordPiece vocabulary is
        /// then trained on it and kept in the state dir, unless data.tokenizer names one).
        #[arg(long, num_args = 1..)]
        corpus: Vec<String>,
        /// Continue the stopped job in STATE_DIR (its job.toml; other config arguments are
        /// ignored). A finished job says so instead of retraining.
        #[arg(long, value_name = "STATE_DIR")]
        resume: Option<PathBuf>,
        /// The run options `launch` and `finetune` share.
        #[command(flatten)]
        run: RunArgs,
    },
    /// Fine-tune a checkpoint (tandem or HuggingFace) on one task, on this machine: writes the
    /// equivalent job config into the state dir (finetune.toml), then runs it as `launch` does.
    Finetune {
        /// What to fine-tune, on which task and data.
        #[command(flatten)]
        job: crate::finetune_job::FinetuneJob,
        /// The run options `launch` and `finetune` share.
        #[command(flatten)]
        run: RunArgs,
    },
    /// Run the coordinator of a job (the job token comes from TANDEM_TOKEN or job.token_file).
    Coordinator(CoordinatorArgs),
    /// Print the summary of a job from its state dir (as `launch` prints it at the end; also
    /// for a state dir copied off a cluster).
    Summary {
        /// The job's state directory.
        state_dir: PathBuf,
    },
    /// Run a worker: join the coordinator and train what it assigns. The job token comes
    /// from the TANDEM_TOKEN environment variable (the coordinator's TANDEM_TOKEN or
    /// job.token_file).
    Worker(WorkerArgs),
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
    /// Batch inference with a fine-tuned head: one JSON line per input, in input order.
    Predict(PredictArgs),
    /// Benchmarks that print one JSON line per measurement.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Print the WordPiece ids and tokens of a text (special tokens included).
    Tokenize(TokenizeArgs),
    /// Tokenizer tools.
    #[command(subcommand)]
    Tokenizer(TokenizerCommand),
    /// Corpus tools.
    #[command(subcommand)]
    Data(DataCommand),
    /// Configuration tools.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// The job's certificates for mutual TLS on the control plane.
    #[command(subcommand)]
    Certs(CertsCommand),
}

/// `tandem certs` subcommands.
#[derive(Subcommand)]
pub enum CertsCommand {
    /// Make a new job CA in DIR (ca.pem, ca.key) and sign a coordinator certificate
    /// (coordinator.pem/.key, for tandem-coordinator, localhost, 127.0.0.1, ::1 and every
    /// --name) and a worker certificate (worker.pem/.key) with it.
    Init {
        /// Directory to write into (created 0700; keys are 0600).
        #[arg(long)]
        dir: PathBuf,
        /// More DNS names or IP addresses the coordinator is reached by (repeatable), e.g.
        /// tandem-coordinator.ml.svc.cluster.local or 10.0.0.5.
        #[arg(long = "name")]
        names: Vec<String>,
        /// Validity of the certificates, in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Replace an existing CA and certificates in DIR.
        #[arg(long)]
        force: bool,
    },
    /// Sign one more certificate with the CA in --ca-dir (e.g. a coordinator certificate with
    /// more names, or one worker certificate per host).
    Issue {
        /// Directory holding ca.pem and ca.key.
        #[arg(long)]
        ca_dir: PathBuf,
        /// coordinator (TLS server) or worker (TLS client).
        #[arg(long)]
        role: crate::tls::Role,
        /// DNS names or IP addresses the certificate carries (repeatable).
        #[arg(long = "name")]
        names: Vec<String>,
        /// Directory to write STEM.pem and STEM.key into.
        #[arg(long)]
        out: PathBuf,
        /// File stem (default: the role).
        #[arg(long)]
        stem: Option<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

/// How a process secures the control plane: the job's certificates, or plaintext.
#[derive(clap::Args, Debug, Clone)]
pub struct TlsArgs {
    /// Directory with the job's CA and this process's certificate and key (`tandem certs
    /// init` output, or a mounted Kubernetes TLS Secret: ca.crt, tls.crt, tls.key).
    #[arg(long, env = "TANDEM_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Plaintext control plane: the job token and all traffic travel in clear. Only on a
    /// network you trust; logged as a warning on every start.
    #[arg(long, env = "TANDEM_INSECURE")]
    pub insecure: bool,
}

/// `tandem tokenizer` subcommands.
#[derive(Subcommand)]
pub enum TokenizerCommand {
    /// Train a BERT WordPiece vocabulary ([PAD] [UNK] [CLS] [SEP] [MASK] = ids 0–4).
    Train {
        /// Corpus files, directories or globs to train on.
        #[arg(long, num_args = 1.., required = true)]
        corpus: Vec<String>,
        /// Largest vocabulary size, in tokens.
        #[arg(long, default_value_t = 8192)]
        vocab_size: usize,
        /// Output directory (tokenizer.json, vocab.txt, tokenizer_config.json).
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

/// `tandem data` subcommands.
#[derive(Subcommand)]
pub enum DataCommand {
    /// Cut a corpus into document-aligned shards and write the shard index (shards.json).
    Shard {
        /// Corpus files, directories or globs.
        #[arg(long, num_args = 1.., required = true)]
        corpus: Vec<String>,
        /// Target shard size, e.g. 64MiB.
        #[arg(long, default_value = "64MiB")]
        shard_size: String,
        /// Output directory for the shard index (shards.json).
        #[arg(long)]
        out: PathBuf,
        /// Skip (and count) bad lines instead of failing.
        #[arg(long)]
        skip_bad_lines: bool,
    },
}

/// `tandem config` subcommands.
#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Load and validate a job configuration; print it as JSON.
    Check {
        /// Job configuration (TOML).
        config: PathBuf,
        /// Override any config key, e.g. --set stages[0].lr=5e-4 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Do not check that the inputs exist (they live elsewhere, e.g. in a pod's volume).
        #[arg(long)]
        skip_inputs: bool,
    },
}

/// `tandem bench` subcommands.
#[derive(Subcommand)]
pub enum BenchCommand {
    /// Full pre-training steps (forward, backward, AdamW) on synthetic data.
    Step(crate::bench::StepBenchOptions),
    /// Ring all-reduce between N local processes on 127.0.0.1: one JSON line per size with
    /// bytes, median_ms and busbw_gbps (2(n−1)/n · bytes / time).
    Allreduce {
        /// Number of rank processes.
        #[arg(long, default_value_t = 2)]
        world: usize,
        /// Buffer sizes, e.g. 4MiB,16MiB,64MiB.
        #[arg(long, default_value = "4MiB,16MiB,64MiB", value_delimiter = ',')]
        sizes: Vec<String>,
        /// Timed all-reduces per size (the median is reported).
        #[arg(long, default_value_t = 15)]
        iters: usize,
        /// Pipelining chunk in bytes.
        #[arg(long, default_value_t = tandem_default_chunk())]
        chunk_bytes: usize,
        /// auto (local sockets between processes on one machine, as workers use) or tcp.
        #[arg(long, default_value = "auto")]
        transport: crate::comm::ring::Transport,
        /// Which connections are sealed with AES-256-GCM: tcp (as workers do by default),
        /// all, or off (plaintext). `transport` in the output ends in "+sealed" when sealed.
        #[arg(long, default_value = "tcp")]
        encryption: crate::comm::ring::Encryption,
        /// Internal: run as one rank (set by the parent process).
        #[arg(long, hide = true)]
        rank: Option<usize>,
        /// Internal: every rank's port.
        #[arg(long, hide = true, value_delimiter = ',')]
        ports: Vec<u16>,
    },
    /// The same short pre-training through the real runtime with N workers and with 1 worker
    /// (1 thread each): samples/s and scaling efficiency; then `bench step` alone and N
    /// independent copies at once, for the machine's own ceiling (`machine_efficiency`).
    Scaling(crate::bench::ScalingOptions),
    /// The data pipeline on one thread (parse, tokenize, instances, collate): tokens/s and
    /// instances/s.
    Data {
        /// Corpus files, directories or globs.
        #[arg(long, num_args = 1.., default_value = "configs/data/corpus")]
        corpus: Vec<String>,
        /// Tokenizer directory or file (default: train one on the corpus first).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Vocabulary size of the tokenizer trained when none is given.
        #[arg(long, default_value_t = 8192)]
        vocab_size: usize,
        /// Sequence length of the instances, in tokens.
        #[arg(long, default_value_t = 128)]
        seq: usize,
    },
}

/// `tandem coordinator`.
#[derive(clap::Args)]
pub struct CoordinatorArgs {
    /// Job configuration (TOML).
    #[arg(long)]
    pub config: PathBuf,
    /// Address to serve gRPC on.
    #[arg(long, default_value = "0.0.0.0:50051")]
    pub listen: std::net::SocketAddr,
    /// Write the bound address to this file once listening.
    #[arg(long)]
    pub addr_file: Option<PathBuf>,
    /// Continue the job recorded in the config's state_dir (from its last good checkpoint).
    #[arg(long)]
    pub resume: bool,
    /// Resume if the state_dir holds a job, start it otherwise (for pods that restart with
    /// the same arguments).
    #[arg(long, conflicts_with = "resume")]
    pub resume_if_present: bool,
    /// Override any config key, e.g. --set stages[0].lr=5e-4 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Print no human summary at the end (`launch` prints its own).
    #[arg(long)]
    pub no_summary: bool,
    /// TLS certificates or --insecure.
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Also serve gRPC health checks (and nothing else) in plaintext on this address, for
    /// probes that cannot show a client certificate (the kubelet's `grpc` probe).
    #[arg(long)]
    pub health_listen: Option<std::net::SocketAddr>,
}

/// `tandem worker`.
#[derive(clap::Args)]
pub struct WorkerArgs {
    /// Coordinator URL, e.g. https://127.0.0.1:50051 (http:// with --insecure).
    #[arg(long, env = "TANDEM_COORDINATOR")]
    pub coordinator: String,
    /// TLS certificates or --insecure.
    #[command(flatten)]
    pub tls: TlsArgs,
    /// The name the coordinator's certificate must carry, when it is not the URL's host.
    #[arg(long, env = "TANDEM_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,
    /// cpu, cuda or cuda:N (a CUDA device needs a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// CPU threads for this worker's kernels.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Stable worker id (defaults to host-pid).
    #[arg(long, env = "TANDEM_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Address the ring listener binds.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub ring_listen: std::net::SocketAddr,
    /// Host name peers use to reach the ring listener (default: the bound IP).
    #[arg(long, env = "TANDEM_ADVERTISE_HOST")]
    pub advertise_host: Option<String>,
    /// Keep trying to reach the coordinator this long (seconds).
    #[arg(long, default_value_t = 300)]
    pub connect_timeout_s: u64,
}

/// `tandem predict`.
#[derive(clap::Args)]
pub struct PredictArgs {
    /// Fine-tuned checkpoint directory (config.json with a task `architectures`,
    /// model.safetensors, and tokenizer.json or vocab.txt), or a tandem state_dir.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// JSONL (`text`, `text_a`/`text_b`, or `question`/`context`), or a classification
    /// TSV, CoNLL file or SQuAD JSON.
    #[arg(long)]
    pub input: PathBuf,
    /// Write the JSONL here instead of stdout.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Sequences (QA: context windows) per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Longest sequence in tokens (capped at the model's max_position_embeddings).
    /// Default: the tokenizer's model_max_length, as transformers truncates, else 128.
    #[arg(long)]
    pub max_seq_length: Option<usize>,
    /// QA: tokens shared by consecutive windows of a long context (reduced to fit).
    #[arg(long, default_value_t = 128)]
    pub doc_stride: usize,
}

/// `tandem tokenize`.
#[derive(clap::Args)]
pub struct TokenizeArgs {
    /// Directory with tokenizer.json or vocab.txt (or the file).
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// The text to tokenize.
    #[arg(long)]
    pub text: String,
    /// One JSON object with `ids` and `tokens`.
    #[arg(long)]
    pub json: bool,
}
