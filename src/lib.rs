//! tandem: distributed data-parallel BERT training.
//!
//! # Layout
//! - [`model`]: BERT on candle — config, fused CPU kernels with backward, parameter store,
//!   encoder and heads, HuggingFace checkpoint I/O.
//! - [`train`]: AdamW over flat buffers, learning-rate schedules, the exact data-parallel step.
//! - [`comm`]: collectives (the data plane): the trait and its backends.
//! - [`data`]: batches and, later, corpora, shards, tokenizer and pre-training instances.
//! - [`eval`]: `tandem eval-batch`, a checkpoint checked on one batch.
//! - [`bench`]: the `tandem bench` measurements.
//! - [`util`]: atomic writes, stable hashes, seeded RNGs, process tuning.

pub mod bench;
pub mod comm;
pub mod data;
pub mod error;
pub mod eval;
pub mod model;
pub mod train;
pub mod util;

pub use error::{Error, Result};
