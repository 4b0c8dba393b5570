//! tandem: distributed data-parallel BERT training.
//!
//! # Layout
//! - [`config`]: the job configuration (TOML, environment, `--set`), validated once.
//! - [`coordinator`]: the control plane's server: membership, generations, data plan,
//!   checkpoints, summary.
//! - [`worker`]: joins a coordinator and trains its assignments on a dedicated thread.
//! - [`launch`]: `tandem launch`, a coordinator and N workers on one machine.
//! - [`finetune_job`]: `tandem finetune`, one checkpoint fine-tuned on one task (a short job
//!   config written into the state dir, then launched).
//! - [`proto`]: the gRPC protocol (generated from `proto/tandem/v1`).
//! - [`tls`]: mutual TLS on the control plane and the job's certificates.
//! - [`model`]: BERT on candle — config, fused CPU kernels with backward, parameter store,
//!   encoder and heads, HuggingFace checkpoint I/O.
//! - [`train`]: AdamW over flat buffers, learning-rate schedules, the exact data-parallel step.
//! - [`comm`]: collectives (the data plane): the trait and its backends.
//! - [`data`]: corpora, shards, WordPiece, pre-training instances, fine-tuning datasets,
//!   batches.
//! - [`metrics`]: dev metrics as counts that ranks all-reduce (accuracy, macro-F1, seqeval
//!   entity F1, SQuAD EM/F1) and QA post-processing.
//! - [`eval`]: `tandem eval-batch`, a checkpoint checked on one batch.
//! - [`predict`]: `tandem predict`, batch inference with a fine-tuned head (JSONL out).
//! - [`cli`]: the `tandem` command line (parsed by `main.rs`).
//! - [`bench`]: the `tandem bench` measurements.
//! - [`util`]: atomic writes, stable hashes, seeded RNGs, process tuning.

pub mod bench;
pub mod cli;
pub mod comm;
pub mod config;
pub mod coordinator;
pub mod data;
pub mod error;
pub mod eval;
pub mod finetune_job;
pub mod launch;
pub mod metrics;
pub mod model;
pub mod predict;
pub mod proto;
pub mod tls;
pub mod train;
pub mod util;
pub mod worker;

pub use error::{Error, Result};
