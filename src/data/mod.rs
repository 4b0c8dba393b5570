//! Data: batches (and, to come, corpora, shards, tokenizer and pre-training instances).

pub mod batch;
pub mod corpus;
pub mod finetune;
pub mod instances;
pub mod shard;
pub mod tokenizer;
