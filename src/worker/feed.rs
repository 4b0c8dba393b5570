//! The data feed of one epoch on one rank: a thread that fetches the shards of this rank's
//! data partitions from the coordinator, parses, tokenizes and turns them into pre-training
//! instances, so data preparation overlaps training.
//!
//! It first counts every partition's instances (so all ranks can agree on the epoch's step
//! count and the ledger's totals before the first step), then streams the instances in order,
//! skipping those a checkpoint's cursor says were already consumed. A partition's instance
//! stream depends only on (seed, epoch, shards), so it is the same on any rank.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

use crate::data::instances::{instances_for_shard, Instance, InstanceOptions, VocabInfo};
use crate::data::shard::ShardIndex;
use crate::data::tokenizer::Tokenizer;

/// Shard bytes are kept between the counting pass and the training pass up to this size;
/// beyond it they are fetched again.
const CACHE_BYTES: usize = 256 << 20;

/// One data partition of the epoch owned by this rank.
#[derive(Debug, Clone)]
pub struct Partition {
    pub id: u32,
    pub shards: Vec<u32>,
    /// Instances already consumed (from the checkpoint's cursor).
    pub skip: u64,
}

pub enum FeedMsg {
    /// Total instances per partition, in `partitions` order (sent first).
    Count {
        totals: Vec<u64>,
    },
    /// The next instance and the partition it belongs to.
    Instance(u32, Instance),
    Error(String),
}

pub struct FeedSpec {
    pub partitions: Vec<Partition>,
    pub index: Arc<ShardIndex>,
    pub tokenizer: Arc<Tokenizer>,
    pub instances: InstanceOptions,
    pub seed: u64,
    pub epoch: u64,
}

/// `fetch(shard_id)` returns the shard's bytes (checksum verified).
pub fn spawn(
    spec: FeedSpec,
    fetch: impl FnMut(u32) -> anyhow::Result<Vec<u8>> + Send + 'static,
) -> Receiver<FeedMsg> {
    let (tx, rx) = sync_channel(1024);
    std::thread::Builder::new()
        .name(format!("feed-e{}", spec.epoch))
        .spawn(move || {
            if let Err(e) = run(&spec, fetch, &tx) {
                let _ = tx.send(FeedMsg::Error(format!("{e:#}")));
            }
        })
        .expect("spawn feed thread");
    rx
}

fn shard_instances(
    spec: &FeedSpec,
    vocab: &VocabInfo,
    id: u32,
    bytes: &[u8],
) -> anyhow::Result<Vec<Instance>> {
    let docs = spec.index.parse_shard(id, bytes)?;
    let tokenized = spec.tokenizer.encode_documents(&docs)?;
    Ok(instances_for_shard(
        &tokenized,
        &spec.instances,
        vocab,
        spec.seed,
        spec.epoch,
        id,
    ))
}

fn run(
    spec: &FeedSpec,
    mut fetch: impl FnMut(u32) -> anyhow::Result<Vec<u8>>,
    tx: &std::sync::mpsc::SyncSender<FeedMsg>,
) -> anyhow::Result<()> {
    let vocab = VocabInfo::from_tokenizer(&spec.tokenizer);
    let mut cache: std::collections::HashMap<u32, Vec<u8>> = Default::default();
    let mut cached = 0usize;
    let mut totals = vec![];
    for p in &spec.partitions {
        let mut total = 0u64;
        for &id in &p.shards {
            let bytes = fetch(id)?;
            let inst = shard_instances(spec, &vocab, id, &bytes)?;
            total += inst.len() as u64;
            if cached + bytes.len() <= CACHE_BYTES {
                cached += bytes.len();
                cache.insert(id, bytes);
            }
        }
        totals.push(total);
    }
    if tx.send(FeedMsg::Count { totals }).is_err() {
        return Ok(());
    }
    for p in &spec.partitions {
        let mut index = 0u64;
        for &id in &p.shards {
            let bytes = match cache.remove(&id) {
                Some(b) => b,
                None => fetch(id)?,
            };
            let inst = shard_instances(spec, &vocab, id, &bytes)?;
            for i in inst {
                if index >= p.skip && tx.send(FeedMsg::Instance(p.id, i)).is_err() {
                    return Ok(());
                }
                index += 1;
            }
        }
    }
    Ok(())
}
