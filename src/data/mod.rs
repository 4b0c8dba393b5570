//! Data: corpora, shards, WordPiece, pre-training instances, fine-tuning datasets, batches
//! (see README.md in this folder).

#![warn(missing_docs)]

pub mod batch;
pub mod corpus;
pub mod epoch;
pub mod finetune;
pub mod instances;
pub mod shard;
pub mod tokenizer;
pub(crate) mod tokenizer_config;
pub mod vocab;
