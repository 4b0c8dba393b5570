//! The job configuration: TOML file, then environment (`TANDEM__<SECTION>__<KEY>`, e.g.
//! `TANDEM__JOB__SEED=7`; other `TANDEM_*` variables such as `TANDEM_TOKEN` are not config), then
//! `--set key=value` overrides, layered with the `config` crate and validated once.
//!
//! Every field is documented here; this file is the reference for `configs/*.toml`.

#![warn(missing_docs)]

mod check;
mod load;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::instances::InstanceOptions;
use crate::model::Preset;
use crate::train::Decay;

/// Why a job configuration could not be loaded or is not valid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file (or serialised config) cannot be read or parsed, or the layered sources do
    /// not deserialise.
    #[error("{path}: {msg}")]
    Load {
        /// The file, or a placeholder such as `<string>` for text not read from a file.
        path: PathBuf,
        /// What went wrong, with the line and column where known.
        msg: String,
    },
    /// A `--set` argument without `=`.
    #[error("--set {0:?}: expected key=value")]
    BadOverride(String),
    /// A `--set` override names an unknown key or gives a value of the wrong type.
    #[error("--set {arg}: {msg}")]
    Override {
        /// The `--set` argument as given.
        arg: String,
        /// What is wrong with it.
        msg: String,
    },
    /// Input files or directories the config names do not exist.
    #[error("missing inputs: {}", .0.join("; "))]
    Missing(Vec<String>),
    /// A value is out of range or inconsistent with another.
    #[error("invalid configuration: {key}: {msg}")]
    Invalid {
        /// The offending key, e.g. `stages[0].lr`.
        key: String,
        /// What was expected.
        msg: String,
    },
}

/// The largest number of seconds (and MiB) a setting may give: about 31 years, far from where
/// `Instant + Duration` overflows.
const MAX_SECONDS: f64 = 1e9;

fn invalid(key: &str, msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        msg: msg.into(),
    }
}

/// A job: cluster, model, data, checkpoints and the stages to run, as `configs/*.toml` give it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    /// Job id, seed and state directory.
    pub job: JobSection,
    /// Membership, collectives, progress reporting and restarts.
    #[serde(default)]
    pub cluster: ClusterSection,
    /// Optional when no stage pre-trains: the model then comes from `init_from`.
    #[serde(default)]
    pub model: ModelSection,
    /// Optional when no stage pre-trains (no corpus is scanned then).
    #[serde(default)]
    pub data: DataSection,
    /// How often checkpoints are saved and how many are kept.
    #[serde(default)]
    pub checkpoint: CheckpointSection,
    /// The stages, run in order.
    pub stages: Vec<StageConfig>,
}

/// `[job]`: what identifies the job and where it keeps its state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobSection {
    /// Job id: workers must present it; also names logs.
    pub name: String,
    /// Seed of initialisation, data order, masking and dropout.
    #[serde(default = "d_seed")]
    pub seed: u64,
    /// Where the coordinator keeps the job's state: shard index, tokenizer, checkpoints,
    /// summary.json. A relative path in the file is relative to the file's directory.
    pub state_dir: PathBuf,
    /// File holding the job token (the `TANDEM_TOKEN` environment variable wins).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

/// `[cluster]`: workers, timeouts, collectives and restarts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// Training starts once this many workers have joined.
    #[serde(default = "d_one")]
    pub min_workers: usize,
    /// At most this many workers take part; more joiners wait.
    #[serde(default = "d_one")]
    pub max_workers: usize,
    /// After `min_workers` joined, wait this long for more (up to `max_workers`).
    #[serde(default = "d_join_window")]
    pub join_window_s: f64,
    /// Give up if `min_workers` have not joined within this time.
    #[serde(default = "d_join_timeout")]
    pub join_timeout_s: f64,
    /// A worker silent for this long is considered lost.
    #[serde(default = "d_heartbeat")]
    pub heartbeat_timeout_s: f64,
    /// Bound on every collective socket operation.
    #[serde(default = "d_collective_timeout")]
    pub collective_timeout_s: f64,
    /// How ring peers connect: `auto` (default: a Unix-domain socket to peers at a loopback
    /// address, i.e. workers on the same machine, about twice TCP's bandwidth there; TCP to
    /// every other peer) or `tcp` (always TCP).
    #[serde(default)]
    pub ring_transport: crate::comm::ring::Transport,
    /// Which ring connections are sealed with AES-256-GCM (keys from the job token and the
    /// handshake): `tcp` (default: every TCP connection; a local socket between workers of one
    /// host is not, as it only accepts a process of the same user), `all`, or `off` (gradients
    /// and weights in clear; a warning on every start).
    #[serde(default)]
    pub ring_encryption: crate::comm::ring::Encryption,
    /// How workers on GPUs sum gradients: `nccl` (default: on the GPUs, through NCCL; each
    /// worker needs a GPU of its own) or `ring` (through the host and the ring, for workers
    /// sharing a GPU). Workers on CPUs always use the ring.
    #[serde(default)]
    pub gpu_collective: GpuCollective,
    /// Gradient bucket size for the all-reduce, in MiB (PyTorch DDP's default is 25).
    #[serde(default = "d_bucket")]
    pub bucket_mib: f64,
    /// Pre-training on CPU workers: shard the optimiser step over the ranks (ZeRO stage 1).
    /// The gradient is reduce-scattered, each rank clips and applies AdamW to its own part
    /// of the parameters only, and the new parameters are all-gathered: the same bytes on
    /// the wire as an all-reduce, 1/N of the optimiser's work per rank. `false`: every rank
    /// updates all parameters. GPU workers (NCCL all-reduce) always do the latter.
    #[serde(default = "d_true")]
    pub shard_optimizer: bool,
    /// Workers report progress every this many steps; rank 0 also logs those steps to
    /// state_dir/metrics.jsonl.
    #[serde(default = "d_one_u64")]
    pub progress_every: u64,
    /// The coordinator logs a progress line (stage, step, loss, samples/s, ETA, generation,
    /// workers) every this many seconds while a stage trains; 0 turns it off.
    #[serde(default = "d_progress_log")]
    pub progress_log_s: f64,
    /// Generations that may fail (worker lost, stalled or failed) before the job fails.
    #[serde(default = "d_restarts")]
    pub max_restarts: u32,
    /// When the world size changes on a restart: `keep_global_batch` (default: each step
    /// still consumes batch_size × grad_accum × the initial world size examples, split over
    /// the ranks, with more micro-batches where needed; the trajectory is unchanged up to
    /// float rounding) or `keep_per_worker_batch` (each rank keeps its batch; the global
    /// batch and the learning rate scale with the world size, linearly).
    #[serde(default)]
    pub resize_policy: ResizePolicy,
}

/// How workers on GPUs sum gradients (`cluster.gpu_collective`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum GpuCollective {
    /// On the GPUs, through NCCL (each worker needs a GPU of its own).
    #[default]
    Nccl,
    /// Through the host and the ring (for workers sharing a GPU).
    Ring,
}

/// What a restart with a different world size keeps (`cluster.resize_policy`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ResizePolicy {
    /// The global batch: the ranks split it, with more micro-batches where needed.
    #[default]
    KeepGlobalBatch,
    /// Each rank's batch: the global batch and the learning rate scale with the world size.
    KeepPerWorkerBatch,
}

impl Default for ClusterSection {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

/// `[model]`: the encoder's sizes and numerics.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Sizes: tiny, mini or base (vocab_size always follows the tokenizer).
    #[serde(default)]
    pub preset: Option<Preset>,
    /// An HF `config.json` to take the sizes from instead of a preset.
    #[serde(default)]
    pub config: Option<PathBuf>,
    /// Dropout probabilities (hidden and attention), overriding the preset's 0.1.
    #[serde(default)]
    pub dropout: Option<f32>,
    /// Maximum positions (default 512, or the config file's).
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
    /// `f32` (default) or `bf16`: mixed precision for GPUs — matmuls and activations in bf16,
    /// LayerNorm, softmax and losses in f32, f32 master weights, gradients, all-reduce and
    /// AdamW. On the CPU bf16 runs candle's composed ops (no bf16 gemm there): slower than f32.
    #[serde(default)]
    pub precision: crate::model::Precision,
    /// GPUs: f32 matmuls on TF32 tensor cores (inputs rounded to a 10-bit mantissa, f32
    /// accumulation), as PyTorch's `allow_tf32`. Off by default, so that an f32 run on a GPU
    /// follows the CPU's within rounding; no effect on the CPU or on bf16 matmuls.
    #[serde(default)]
    pub tf32: bool,
}

/// `[data]`: the pre-training corpus, its shards, the tokenizer and instance creation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Corpus files, directories or globs (google-research/bert text or JSONL); required
    /// when a stage pre-trains.
    #[serde(default)]
    pub corpus: Vec<String>,
    /// Target shard size, e.g. "256KiB", "64MiB".
    #[serde(default = "d_shard_size")]
    pub shard_size: String,
    /// Longest accepted line in bytes.
    #[serde(default = "d_max_line")]
    pub max_line_bytes: usize,
    /// Bad input lines: "fail" (default) or "skip" (skipped and counted).
    #[serde(default = "d_on_error")]
    pub on_error: String,
    /// A tokenizer (directory with tokenizer.json or vocab.txt, or the file). Without one, a
    /// WordPiece vocabulary is trained on the corpus and kept in the state dir.
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// Vocabulary size when training a tokenizer.
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    /// Lower-case text (BERT uncased).
    #[serde(default = "d_true")]
    pub lowercase: bool,
    /// Pre-training instance creation (sequence length, masking, NSP).
    #[serde(default)]
    pub instances: InstanceOptions,
}

/// `[checkpoint]`: how often checkpoints are saved and how many are kept.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSection {
    /// Save every this many optimiser steps (0: only at the end of each stage).
    #[serde(default)]
    pub every_steps: u64,
    /// Keep this many most recent checkpoints.
    #[serde(default = "d_keep")]
    pub keep: usize,
}

impl Default for DataSection {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

impl Default for CheckpointSection {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

/// What a stage trains: pre-training or one fine-tuning task.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StageKind {
    /// MLM + NSP pre-training on the corpus.
    Pretrain,
    /// Single-sentence classification.
    SequenceClassification,
    /// Sentence-pair classification.
    PairClassification,
    /// Token classification (NER).
    TokenClassification,
    /// Extractive question answering (SQuAD).
    QuestionAnswering,
}

impl StageKind {
    /// The kind as the config spells it (`sequence_classification`).
    pub fn name(self) -> String {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::String(s)) => s,
            _ => unreachable!("a unit variant serialises as a string"),
        }
    }
}

/// `[[stages]]`: one stage of the job (pre-training or a fine-tuning task).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    /// Stage name, for logs, metrics.jsonl and the summary.
    pub name: String,
    /// What the stage trains.
    pub kind: StageKind,
    /// Passes over the training data.
    #[serde(default = "d_one_u32")]
    pub epochs: u32,
    /// Stop the stage after this many optimiser steps.
    #[serde(default)]
    pub max_steps: Option<u64>,
    /// Examples per worker per micro-batch.
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    /// Micro-batches accumulated per optimiser step.
    #[serde(default = "d_one")]
    pub grad_accum: usize,
    /// Peak learning rate.
    pub lr: f32,
    /// Fraction of the stage's steps spent warming up linearly.
    #[serde(default = "d_warmup")]
    pub warmup_fraction: f32,
    /// Decay after warm-up: linear, cosine or constant.
    #[serde(default = "d_decay")]
    pub decay: Decay,
    /// AdamW decoupled weight decay (not applied to biases and LayerNorm weights).
    #[serde(default = "d_wd")]
    pub weight_decay: f32,
    /// Global-norm gradient clipping (0: off).
    #[serde(default = "d_clip")]
    pub max_grad_norm: f32,
    /// Fine-tuning: training data (classification TSV/JSONL, CoNLL, SQuAD JSON).
    #[serde(default)]
    pub train: Option<PathBuf>,
    /// Fine-tuning: dev data, evaluated at the end of every epoch across workers.
    #[serde(default)]
    pub dev: Option<PathBuf>,
    /// Fine-tuning: where the encoder comes from: "previous" (the preceding stage's final
    /// checkpoint; the default after a first stage) or a checkpoint directory (tandem or HF,
    /// with config.json + model.safetensors; its tokenizer is used when it has one).
    #[serde(default)]
    pub init_from: Option<String>,
    /// Fine-tuning: sequence length of the features.
    #[serde(default = "d_ft_seq")]
    pub max_seq_length: usize,
    /// QA: overlap between context windows.
    #[serde(default = "d_stride")]
    pub doc_stride: usize,
    /// QA: questions are cut to this many tokens.
    #[serde(default = "d_query")]
    pub max_query_length: usize,
    /// Fine-tuning: dev metric that selects the best checkpoint (default: accuracy for
    /// classification, f1 for token classification and QA).
    #[serde(default)]
    pub metric: Option<String>,
}

impl StageConfig {
    /// The dev metric that picks the best checkpoint.
    pub fn best_metric(&self) -> &str {
        match (&self.metric, self.kind) {
            (Some(m), _) => m,
            (None, StageKind::SequenceClassification | StageKind::PairClassification) => "accuracy",
            (None, _) => "f1",
        }
    }

    /// Checks one stage (`i` names it in errors).
    fn validate(&self, i: usize) -> Result<(), ConfigError> {
        let s = self;
        let k = |f: &str| format!("stages[{i}].{f}");
        if s.kind == StageKind::Pretrain {
            if s.train.is_some() || s.dev.is_some() || s.init_from.is_some() {
                return Err(invalid(
                    &k("train"),
                    "pretrain stages read data.corpus; train/dev/init_from are for fine-tuning",
                ));
            }
        } else {
            for (f, v) in [("train", &s.train), ("dev", &s.dev)] {
                if v.is_none() {
                    return Err(invalid(
                        &k(f),
                        format!("a {:?} stage needs a {f} file", s.kind),
                    ));
                }
            }
            if i == 0 && s.init_from.as_deref().unwrap_or("previous") == "previous" {
                return Err(invalid(
                    &k("init_from"),
                    "the first stage has no previous stage: name a checkpoint directory",
                ));
            }
            if !matches!(
                s.best_metric(),
                "accuracy" | "macro_f1" | "f1" | "precision" | "recall" | "exact_match"
            ) {
                return Err(invalid(
                    &k("metric"),
                    format!(
                        "{:?}: expected accuracy, macro_f1, f1, precision, recall or exact_match",
                        s.best_metric()
                    ),
                ));
            }
            if s.max_seq_length < 8 {
                return Err(invalid(&k("max_seq_length"), "must be at least 8"));
            }
        }
        if s.epochs == 0 {
            return Err(invalid(&k("epochs"), "must be at least 1"));
        }
        if s.batch_size == 0 {
            return Err(invalid(&k("batch_size"), "must be at least 1"));
        }
        if s.grad_accum == 0 {
            return Err(invalid(&k("grad_accum"), "must be at least 1"));
        }
        if !(s.lr > 0.0 && s.lr.is_finite()) {
            return Err(invalid(&k("lr"), format!("{}: must be positive", s.lr)));
        }
        if !(0.0..=1.0).contains(&s.warmup_fraction) {
            return Err(invalid(
                &k("warmup_fraction"),
                "expected a fraction in [0, 1]",
            ));
        }
        for (f, v) in [
            ("weight_decay", s.weight_decay),
            ("max_grad_norm", s.max_grad_norm),
        ] {
            if !v.is_finite() {
                return Err(invalid(&k(f), format!("{v}: must be a finite number")));
            }
        }
        if s.max_steps == Some(0) {
            return Err(invalid(&k("max_steps"), "must be at least 1 when set"));
        }
        Ok(())
    }
}

fn d_seed() -> u64 {
    42
}
fn d_one() -> usize {
    1
}
fn d_one_u64() -> u64 {
    1
}
fn d_one_u32() -> u32 {
    1
}
fn d_progress_log() -> f64 {
    10.0
}
fn d_restarts() -> u32 {
    3
}
fn d_join_window() -> f64 {
    2.0
}
fn d_join_timeout() -> f64 {
    300.0
}
fn d_heartbeat() -> f64 {
    30.0
}
fn d_collective_timeout() -> f64 {
    120.0
}
fn d_bucket() -> f64 {
    25.0
}
fn d_shard_size() -> String {
    "64MiB".into()
}
fn d_max_line() -> usize {
    1 << 20
}
fn d_on_error() -> String {
    "fail".into()
}
fn d_vocab() -> usize {
    8192
}
fn d_true() -> bool {
    true
}
fn d_keep() -> usize {
    3
}
fn d_batch() -> usize {
    16
}
fn d_warmup() -> f32 {
    0.1
}
fn d_decay() -> Decay {
    Decay::Linear
}
fn d_wd() -> f32 {
    0.01
}
fn d_clip() -> f32 {
    1.0
}
fn d_ft_seq() -> usize {
    128
}
fn d_stride() -> usize {
    128
}
fn d_query() -> usize {
    64
}

/// Parses sizes such as `"512"`, `"256KiB"`, `"64MiB"`, `"1GiB"`, `"10MB"`.
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kib" | "k" => 1024.0,
        "mib" | "m" => 1024.0 * 1024.0,
        "gib" | "g" => 1024.0 * 1024.0 * 1024.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        _ => return None,
    };
    let v = n * mult;
    (v >= 1.0).then_some(v as u64)
}

impl JobConfig {
    /// Loads `path`, applies `TANDEM__…` environment variables and `--set` overrides, and
    /// validates. Relative paths inside the file are relative to the file's directory (those
    /// given by `--set` or the environment, to the working directory). Errors name their
    /// source: the file with line and column, the `--set` argument, or the environment.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        let cfg = load::load(path, overrides)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses TOML text (no environment, no overrides) and validates.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let cfg: JobConfig = toml::from_str(text).map_err(|e| ConfigError::Load {
            path: "<string>".into(),
            msg: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.job.name.is_empty() {
            return Err(invalid("job.name", "must not be empty"));
        }
        let c = &self.cluster;
        if c.min_workers == 0 {
            return Err(invalid("cluster.min_workers", "must be at least 1"));
        }
        if c.max_workers < c.min_workers {
            return Err(invalid(
                "cluster.max_workers",
                format!("{} is below min_workers {}", c.max_workers, c.min_workers),
            ));
        }
        // Seconds become deadlines (`Instant + d`), and the config reaches workers as JSON,
        // which has no NaN or infinity: every number must be finite and in range.
        for (k, v) in [
            ("cluster.join_timeout_s", c.join_timeout_s),
            ("cluster.heartbeat_timeout_s", c.heartbeat_timeout_s),
            ("cluster.collective_timeout_s", c.collective_timeout_s),
            ("cluster.bucket_mib", c.bucket_mib),
        ] {
            if !(v > 0.0 && v <= MAX_SECONDS) {
                return Err(invalid(k, format!("{v}: must be positive, at most 1e9")));
            }
        }
        let w = c.join_window_s;
        if !(0.0..=MAX_SECONDS).contains(&w) {
            return Err(invalid(
                "cluster.join_window_s",
                format!("{w}: must be 0 or more seconds, at most 1e9"),
            ));
        }
        let p = c.progress_log_s;
        if !(p == 0.0 || (0.1..=MAX_SECONDS).contains(&p)) {
            return Err(invalid(
                "cluster.progress_log_s",
                format!("{p}: must be 0 (off) or at least 0.1 seconds"),
            ));
        }
        if c.progress_every == 0 {
            return Err(invalid("cluster.progress_every", "must be at least 1"));
        }
        let both = self.model.preset.is_some() && self.model.config.is_some();
        if both || self.pretrains() && self.model.preset.is_none() && self.model.config.is_none() {
            return Err(invalid("model", "set exactly one of `preset` and `config`"));
        }
        if let Some(p) = self.model.dropout {
            if !(0.0..1.0).contains(&p) {
                return Err(invalid(
                    "model.dropout",
                    format!("{p}: expected a probability in [0, 1)"),
                ));
            }
        }
        if self.pretrains() && self.data.corpus.is_empty() {
            return Err(invalid(
                "data.corpus",
                "list at least one file, directory or glob",
            ));
        }
        if parse_bytes(&self.data.shard_size).is_none() {
            return Err(invalid(
                "data.shard_size",
                format!(
                    "{:?}: expected a size such as \"256KiB\" or \"64MiB\"",
                    self.data.shard_size
                ),
            ));
        }
        if !matches!(self.data.on_error.as_str(), "fail" | "skip") {
            return Err(invalid(
                "data.on_error",
                format!("{:?}: expected \"fail\" or \"skip\"", self.data.on_error),
            ));
        }
        if self.data.vocab_size < 16 {
            return Err(invalid("data.vocab_size", "must be at least 16"));
        }
        if let Err(e) = self.data.instances.validate() {
            return Err(invalid("data.instances", e.to_string()));
        }
        if self.stages.is_empty() {
            return Err(invalid("stages", "define at least one [[stages]] entry"));
        }
        for (i, s) in self.stages.iter().enumerate() {
            s.validate(i)?;
        }
        Ok(())
    }

    /// Some stage pre-trains (so the job needs a corpus and a model shape of its own).
    pub fn pretrains(&self) -> bool {
        self.stages.iter().any(|s| s.kind == StageKind::Pretrain)
    }

    pub(crate) fn shard_bytes(&self) -> u64 {
        parse_bytes(&self.data.shard_size).expect("validated")
    }

    pub(crate) fn to_json(&self) -> String {
        serde_json::to_string(self).expect("config serialises")
    }

    pub(crate) fn from_json(s: &str) -> Result<Self, ConfigError> {
        let cfg: JobConfig = serde_json::from_str(s).map_err(|e| ConfigError::Load {
            path: "<assignment>".into(),
            msg: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
        [job]
        name = "t"
        state_dir = "s"
        [model]
        preset = "tiny"
        [data]
        corpus = ["c.txt"]
        [[stages]]
        name = "pretrain"
        kind = "pretrain"
        lr = 1e-3
    "#;

    #[test]
    fn defaults_fill_in() {
        let c = JobConfig::from_toml(MIN).unwrap();
        assert_eq!(c.cluster.min_workers, 1);
        assert_eq!(c.stages[0].batch_size, 16);
        assert_eq!(c.checkpoint.keep, 3);
        assert_eq!(c.shard_bytes(), 64 << 20);
        let back = JobConfig::from_json(&c.to_json()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn errors_name_the_key() {
        let e = JobConfig::from_toml(&MIN.replace("lr = 1e-3", "lr = -1.0")).unwrap_err();
        assert!(e.to_string().contains("stages[0].lr"), "{e}");
        let e = JobConfig::from_toml(&format!(
            "{MIN}\n[cluster]\nmin_workers = 3\nmax_workers = 2\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("cluster.max_workers"), "{e}");
        let e = JobConfig::from_toml(&MIN.replace("name = \"t\"", "name = \"t\"\nbogus = 1"))
            .unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
    }

    #[test]
    fn file_env_and_overrides_layer() {
        let dir = std::env::temp_dir().join(format!("tandem-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("job.toml");
        std::fs::write(&p, MIN).unwrap();
        let c =
            JobConfig::load(&p, &["stages[0].batch_size=4".into(), "job.seed=7".into()]).unwrap();
        assert_eq!(c.stages[0].batch_size, 4);
        assert_eq!(c.job.seed, 7);
        let e = JobConfig::load(&p, &["stages[0].batch_size=x".into()]).unwrap_err();
        assert!(e.to_string().contains("batch_size"), "{e}");
        let e = JobConfig::load(&p, &["nokey".into()]).unwrap_err();
        assert!(matches!(e, ConfigError::BadOverride(_)));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_fine_tuning_only_job_needs_no_data_or_model() {
        let ft = r#"
            [job]
            name = "t"
            state_dir = "s"
            [[stages]]
            name = "cls"
            kind = "sequence_classification"
            init_from = "ckpt"
            train = "t.jsonl"
            dev = "d.jsonl"
            lr = 2e-5
        "#;
        let c = JobConfig::from_toml(ft).unwrap();
        assert!(!c.pretrains() && c.data.corpus.is_empty());
        let e = JobConfig::from_toml(&MIN.replace("[model]\n        preset = \"tiny\"", ""))
            .unwrap_err();
        assert!(e.to_string().contains("model"), "{e}");
        let e = JobConfig::from_toml(&MIN.replace("corpus = [\"c.txt\"]", "")).unwrap_err();
        assert!(e.to_string().contains("data.corpus"), "{e}");
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_bytes("256KiB"), Some(256 * 1024));
        assert_eq!(parse_bytes("10MB"), Some(10_000_000));
        assert_eq!(parse_bytes("1.5k"), Some(1536));
        assert_eq!(parse_bytes("12 parsecs"), None);
    }
}
