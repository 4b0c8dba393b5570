//! The data feed of one epoch on one rank: a thread that fetches this rank's shards from the
//! coordinator, parses, tokenizes and turns them into pre-training instances, so data
//! preparation overlaps training. It first counts the epoch's instances (so all ranks can
//! agree on the epoch's step count before the first step), then streams them in order.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

use crate::data::instances::{instances_for_shard, Instance, InstanceOptions, VocabInfo};
use crate::data::shard::ShardIndex;
use crate::data::tokenizer::Tokenizer;

/// Shard bytes are kept between the counting pass and the training pass up to this size;
/// beyond it they are fetched again.
const CACHE_BYTES: usize = 256 << 20;

pub enum FeedMsg {
    /// Instances and documents in this rank's shards for the epoch (sent first).
    Count {
        instances: u64,
        documents: u64,
    },
    Instance(Instance),
    Error(String),
}

pub struct FeedSpec {
    pub shards: Vec<u32>,
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
) -> anyhow::Result<(Vec<Instance>, u64)> {
    let docs = spec.index.parse_shard(id, bytes)?;
    let tokenized = spec.tokenizer.encode_documents(&docs)?;
    let inst = instances_for_shard(
        &tokenized,
        &spec.instances,
        vocab,
        spec.seed,
        spec.epoch,
        id,
    );
    Ok((inst, docs.len() as u64))
}

fn run(
    spec: &FeedSpec,
    mut fetch: impl FnMut(u32) -> anyhow::Result<Vec<u8>>,
    tx: &std::sync::mpsc::SyncSender<FeedMsg>,
) -> anyhow::Result<()> {
    let vocab = VocabInfo::from_tokenizer(&spec.tokenizer);
    let mut cache: Vec<Option<Vec<u8>>> = vec![];
    let mut cached = 0usize;
    let (mut instances, mut documents) = (0u64, 0u64);
    for &id in &spec.shards {
        let bytes = fetch(id)?;
        let (inst, docs) = shard_instances(spec, &vocab, id, &bytes)?;
        instances += inst.len() as u64;
        documents += docs;
        if cached + bytes.len() <= CACHE_BYTES {
            cached += bytes.len();
            cache.push(Some(bytes));
        } else {
            cache.push(None);
        }
    }
    if tx
        .send(FeedMsg::Count {
            instances,
            documents,
        })
        .is_err()
    {
        return Ok(());
    }
    for (k, &id) in spec.shards.iter().enumerate() {
        let bytes = match cache[k].take() {
            Some(b) => b,
            None => fetch(id)?,
        };
        let (inst, _) = shard_instances(spec, &vocab, id, &bytes)?;
        for i in inst {
            if tx.send(FeedMsg::Instance(i)).is_err() {
                return Ok(());
            }
        }
    }
    Ok(())
}
