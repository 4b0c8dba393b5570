//! Data: batches (and, to come, corpora, shards, tokenizer and pre-training instances).

pub mod batch;
