//! The data feed of one epoch on one rank: a thread that fetches shards from the coordinator,
//! parses, tokenizes and turns them into pre-training instances, so data preparation overlaps
//! training.
//!
//! It first counts the instances of this rank's run of the epoch's shards (the plan's
//! contiguous byte-balanced cut) and sends the counts; the training thread all-reduces them
//! into every shard's count, lays the epoch out as one sequence (`data::epoch`) and sends back
//! the ranges of it this rank trains on. The feed then streams those instances in order. A
//! shard's instances depend only on (seed, epoch, shard), so they are the same on any rank.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;

use crate::data::epoch::EpochLayout;
use crate::data::instances::{instances_for_shard, Instance, InstanceOptions, VocabInfo};
use crate::data::shard::ShardIndex;
use crate::data::tokenizer::Tokenizer;

/// Shard bytes are kept between the counting pass and the training pass up to this size;
/// beyond it they are fetched again.
const CACHE_BYTES: usize = 256 << 20;

/// The instances of the first counted shards are kept (up to this many), so the stream,
/// which mostly starts where the counting began, does not make them again at the epoch's
/// start while every rank waits for its first batch.
const KEEP_INSTANCES: usize = 4096;

/// A range of the epoch's instance sequence that this rank trains on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub id: u32,
    /// First position still to train on (the partition's start plus what a checkpoint's
    /// cursor says was consumed).
    pub start: u64,
    pub end: u64,
}

pub enum FeedMsg {
    /// Instances per shard of this rank's counting run, in order (sent first).
    Count {
        counts: Vec<u64>,
    },
    /// The next instance and the partition it belongs to.
    Instance(u32, Instance),
    Error(String),
}

/// What to stream, once the counts are all known.
pub struct Stream {
    pub layout: Arc<EpochLayout>,
    pub partitions: Vec<Partition>,
}

pub struct FeedSpec {
    /// Shards whose instances this rank counts, in order.
    pub count: Vec<u32>,
    pub index: Arc<ShardIndex>,
    pub tokenizer: Arc<Tokenizer>,
    pub instances: InstanceOptions,
    pub seed: u64,
    pub epoch: u64,
}

/// `fetch(shard_id)` returns the shard's bytes (checksum verified). The returned sender takes
/// the stream plan; dropping it ends the feed after the count.
pub fn spawn(
    spec: FeedSpec,
    fetch: impl FnMut(u32) -> anyhow::Result<Vec<u8>> + Send + 'static,
) -> (Receiver<FeedMsg>, SyncSender<Stream>) {
    let (tx, rx) = sync_channel(1024);
    let (plan_tx, plan_rx) = sync_channel(1);
    std::thread::Builder::new()
        .name(format!("feed-e{}", spec.epoch))
        .spawn(move || {
            if let Err(e) = run(&spec, fetch, &tx, &plan_rx) {
                let _ = tx.send(FeedMsg::Error(format!("{e:#}")));
            }
        })
        .expect("spawn feed thread");
    (rx, plan_tx)
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
    tx: &SyncSender<FeedMsg>,
    plan: &Receiver<Stream>,
) -> anyhow::Result<()> {
    let vocab = VocabInfo::from_tokenizer(&spec.tokenizer);
    let mut cache: std::collections::HashMap<u32, Vec<u8>> = Default::default();
    let mut cached = 0usize;
    let mut kept: std::collections::HashMap<u32, Vec<Instance>> = Default::default();
    let mut kept_n = 0usize;
    let mut counts = Vec::with_capacity(spec.count.len());
    for &id in &spec.count {
        let bytes = fetch(id)?;
        let inst = shard_instances(spec, &vocab, id, &bytes)?;
        counts.push(inst.len() as u64);
        if kept_n + inst.len() <= KEEP_INSTANCES {
            kept_n += inst.len();
            kept.insert(id, inst);
        }
        if cached + bytes.len() <= CACHE_BYTES {
            cached += bytes.len();
            cache.insert(id, bytes);
        }
    }
    if tx.send(FeedMsg::Count { counts }).is_err() {
        return Ok(());
    }
    let Ok(Stream { layout, partitions }) = plan.recv() else {
        return Ok(());
    };
    // What to stream: (partition, piece of a shard), in order.
    let pieces: Vec<_> = partitions
        .iter()
        .flat_map(|p| layout.pieces(p.start, p.end).into_iter().map(|x| (p.id, x)))
        .collect();
    // Kept instances of shards outside this rank's partitions are not needed.
    let wanted: std::collections::HashSet<u32> = pieces.iter().map(|(_, x)| x.shard).collect();
    kept.retain(|id, _| wanted.contains(id));
    for (id, piece) in pieces {
        let inst = match kept.remove(&piece.shard) {
            Some(inst) => inst,
            None if cache.contains_key(&piece.shard) => {
                shard_instances(spec, &vocab, piece.shard, &cache[&piece.shard])?
            }
            None => shard_instances(spec, &vocab, piece.shard, &fetch(piece.shard)?)?,
        };
        anyhow::ensure!(
            inst.len() >= piece.to,
            "shard {} yielded {} instances, {} were counted",
            piece.shard,
            inst.len(),
            piece.to
        );
        for i in inst.into_iter().take(piece.to).skip(piece.from) {
            if tx.send(FeedMsg::Instance(id, i)).is_err() {
                return Ok(());
            }
        }
    }
    Ok(())
}
