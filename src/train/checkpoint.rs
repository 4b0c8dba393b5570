//! Checkpoints: what a replica saves (model in HF layout, optimiser moments, trainer state)
//! and how the coordinator stores them (temporary directory, per-file SHA-256 manifest,
//! fsync, atomic rename, keep the last N, fall back past a corrupt one).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::kind::StageModel;
use super::optim::AdamW;
use super::step::Trainer;
use crate::error::{Error, Result};
use crate::model::hf;
use crate::model::ParamStore;
use crate::util;

/// A checkpoint's files: (file name, bytes).
pub type Files = Vec<(String, Vec<u8>)>;

pub const MANIFEST: &str = "MANIFEST.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "trainer_state.json";

/// Where training stood when a checkpoint was taken: enough to resume exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub stage_index: u32,
    pub stage_name: String,
    /// Optimiser steps taken in this stage.
    pub step: u64,
    /// The schedule's total steps (fixed when the stage started).
    pub total_steps: u64,
    /// World size when the stage started (the global batch policy refers to it).
    pub initial_world_size: u32,
    pub world_size: u32,
    pub generation: u64,
    /// Data position: epoch in progress and, per data partition, instances consumed.
    pub cursor: DataCursor,
    /// Every instance range consumed in committed steps since the stage started.
    pub ledger: Vec<LedgerRange>,
    /// Instances planned per epoch started so far: (epoch, total).
    pub planned: Vec<(u32, u64)>,
    /// Set on the checkpoint written when the stage finished.
    pub stage_done: bool,
    /// What the committed steps of the stage consumed, over all ranks.
    #[serde(default)]
    pub totals: StageTotals,
    /// Fine-tuning: the last dev evaluation's metrics, and the best epoch so far by the
    /// stage's metric (kept across a resume, so a worse later epoch never replaces it).
    #[serde(default)]
    pub dev_metrics: BTreeMap<String, f64>,
    #[serde(default)]
    pub best: Option<BestEpoch>,
}

/// A fine-tuning stage's best epoch by its metric.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BestEpoch {
    pub score: f64,
    pub epoch: u32,
}

/// Running totals of a stage's committed steps, over all ranks (for summary.json).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct StageTotals {
    /// Non-padding tokens.
    pub tokens: u64,
    /// MLM-labelled (masked) positions.
    pub masked: u64,
    /// Examples.
    pub examples: u64,
    /// Examples labelled IsNext.
    pub is_next: u64,
}

impl StageTotals {
    /// Adds one committed fine-tuning step's global counts (its examples).
    pub fn add_task(&mut self, s: &crate::train::TaskStats) {
        self.examples += s.examples;
    }

    /// Adds one committed pre-training step's global counts.
    pub fn add(&mut self, s: &crate::train::StepStats) {
        self.tokens += s.tokens;
        self.masked += s.mlm_tokens;
        self.examples += s.examples;
        self.is_next += s.is_next;
    }

    /// Masked positions per non-padding token (`None` before any token).
    pub fn masked_fraction(&self) -> Option<f64> {
        (self.tokens > 0).then(|| self.masked as f64 / self.tokens as f64)
    }

    /// IsNext examples per example (`None` before any example).
    pub fn is_next_fraction(&self) -> Option<f64> {
        (self.examples > 0).then(|| self.is_next as f64 / self.examples as f64)
    }
}

/// Name of a stage's checkpoint: `stageN-final` once the stage is done (pinned, the next stage
/// starts from it), else `stageN-stepNNNNNN`.
pub fn checkpoint_name(state: &TrainerState) -> String {
    if state.stage_done {
        format!("stage{}-final", state.stage_index)
    } else {
        format!("stage{}-step{:06}", state.stage_index, state.step)
    }
}

impl TrainerState {
    /// The state of a stage that starts now with `world_size` ranks.
    pub fn start(stage_index: u32, stage_name: &str, world_size: u32, generation: u64) -> Self {
        TrainerState {
            stage_index,
            stage_name: stage_name.into(),
            step: 0,
            total_steps: 0,
            initial_world_size: world_size,
            world_size,
            generation,
            cursor: DataCursor::default(),
            ledger: vec![],
            planned: vec![],
            stage_done: false,
            totals: StageTotals::default(),
            dev_metrics: BTreeMap::new(),
            best: None,
        }
    }
}

/// The data position of a stage. An epoch's instances form one sequence (`data::epoch`),
/// split into contiguous partitions (balanced for the world size at the epoch's start); each
/// is consumed in order, so a count per partition is an exact cursor, whatever world size
/// resumes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DataCursor {
    pub epoch: u32,
    /// Instances consumed per partition (empty: the epoch has not started).
    pub consumed: Vec<u64>,
    /// Where each partition starts in the epoch's sequence, and the sequence's end (one more
    /// entry than `consumed`; empty when the epoch has not started). Cursors written before
    /// partitions were ranges of the sequence have none (and a `partitions` count, ignored).
    #[serde(default)]
    pub bounds: Vec<u64>,
}

/// Instances `[start, end)` of one partition of one epoch, consumed in committed steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerRange {
    pub epoch: u32,
    pub partitions: u32,
    pub partition: u32,
    pub start: u64,
    pub end: u64,
}

/// Per epoch: instances planned, consumed (union of committed ranges) and consumed more
/// than once — the proof that every instance of an epoch was used exactly once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochLedger {
    pub epoch: u32,
    pub instances_planned: u64,
    pub instances_consumed: u64,
    pub instances_repeated: u64,
}

/// Summarises ledger ranges per epoch; `planned` gives each epoch's instance total.
pub fn epoch_ledgers(ranges: &[LedgerRange], planned: &BTreeMap<u32, u64>) -> Vec<EpochLedger> {
    let mut by_stream: BTreeMap<(u32, u32, u32), Vec<(u64, u64)>> = BTreeMap::new();
    for r in ranges {
        by_stream
            .entry((r.epoch, r.partitions, r.partition))
            .or_default()
            .push((r.start, r.end));
    }
    let mut out: BTreeMap<u32, EpochLedger> = planned
        .iter()
        .map(|(&e, &p)| {
            (
                e,
                EpochLedger {
                    epoch: e,
                    instances_planned: p,
                    instances_consumed: 0,
                    instances_repeated: 0,
                },
            )
        })
        .collect();
    for ((epoch, _, _), mut v) in by_stream {
        v.sort();
        let e = out.entry(epoch).or_insert(EpochLedger {
            epoch,
            instances_planned: 0,
            instances_consumed: 0,
            instances_repeated: 0,
        });
        let mut covered_to = 0u64;
        for (s, t) in v {
            let total = t.saturating_sub(s);
            let overlap = covered_to.saturating_sub(s).min(total);
            e.instances_repeated += overlap;
            e.instances_consumed += total - overlap;
            covered_to = covered_to.max(t);
        }
    }
    out.into_values().collect()
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// The files of a checkpoint of `trainer`, as (file name, bytes).
pub fn checkpoint_files<M: StageModel>(
    trainer: &Trainer<M>,
    state: &TrainerState,
) -> Result<Files> {
    let m = &trainer.model;
    store_files(m.store(), m.config_json()?, &*trainer.adamw()?, state)
}

/// The files of a checkpoint of any model: weights (HF names), its `config.json`, the
/// optimiser's moments and the trainer state.
pub fn store_files(
    store: &ParamStore,
    config_json: Vec<u8>,
    adam: &AdamW,
    state: &TrainerState,
) -> Result<Files> {
    let mut opt = BTreeMap::new();
    for (i, spec) in store.specs().iter().enumerate() {
        let r = store.range(i);
        let shape = spec.shape.as_slice();
        opt.insert(
            format!("{}.exp_avg", spec.name),
            Tensor::from_slice(&adam.m[r.clone()], shape, &Device::Cpu)?,
        );
        opt.insert(
            format!("{}.exp_avg_sq", spec.name),
            Tensor::from_slice(&adam.v[r], shape, &Device::Cpu)?,
        );
    }
    let mut st = serde_json::to_value(state).expect("state serialises");
    st["optimizer_t"] = adam.t.into();
    Ok(vec![
        (
            hf::WEIGHTS_FILE.into(),
            hf::safetensors_bytes(&store.tensors())?,
        ),
        (hf::CONFIG_FILE.into(), config_json),
        (OPTIMIZER_FILE.into(), hf::safetensors_bytes(&opt)?),
        (
            STATE_FILE.into(),
            serde_json::to_vec_pretty(&st).expect("json"),
        ),
    ])
}

/// Restores weights, optimiser moments and step counters from checkpoint files.
pub fn restore<M: StageModel>(
    trainer: &mut Trainer<M>,
    files: &HashMap<String, Vec<u8>>,
) -> Result<TrainerState> {
    let init_std = trainer.model.init_std();
    // restore_store replaces every moment and the step count: start from a blank state.
    let mut adam = AdamW::new(trainer.options.adamw, trainer.model.store());
    let state = restore_store(trainer.model.store(), &mut adam, init_std, files)?;
    trainer.set_adamw(adam)?;
    trainer.step = state.step;
    trainer.reload_params()?;
    trainer.options.schedule.total_steps = state.total_steps.max(1);
    Ok(state)
}

/// Loads a checkpoint's weights into `store` and its moments into `adam`.
pub fn restore_store(
    store: &ParamStore,
    adam: &mut AdamW,
    init_std: f32,
    files: &HashMap<String, Vec<u8>>,
) -> Result<TrainerState> {
    let get = |f: &str| {
        files.get(f).ok_or_else(|| Error::Checkpoint {
            path: f.into(),
            msg: "missing from the checkpoint".into(),
        })
    };
    let tensors = hf::tensors_from_bytes(get(hf::WEIGHTS_FILE)?, hf::WEIGHTS_FILE)?;
    let report = hf::load_weights(store, tensors, Path::new(hf::WEIGHTS_FILE), init_std, 0)?;
    if !report.initialised.is_empty() {
        return Err(Error::Checkpoint {
            path: hf::WEIGHTS_FILE.into(),
            msg: format!("lacks {}", report.initialised.join(", ")),
        });
    }
    let opt = hf::tensors_from_bytes(get(OPTIMIZER_FILE)?, OPTIMIZER_FILE)?;
    let mut m_flat = vec![0f32; store.numel()];
    let mut v_flat = vec![0f32; store.numel()];
    for (i, spec) in store.specs().iter().enumerate() {
        for (suffix, dst) in [("exp_avg", &mut m_flat), ("exp_avg_sq", &mut v_flat)] {
            let key = format!("{}.{suffix}", spec.name);
            let t = opt.get(&key).ok_or_else(|| Error::Checkpoint {
                path: OPTIMIZER_FILE.into(),
                msg: format!("missing `{key}`"),
            })?;
            dst[store.range(i)].copy_from_slice(&t.flatten_all()?.to_vec1::<f32>()?);
        }
    }
    let st: serde_json::Value =
        serde_json::from_slice(get(STATE_FILE)?).map_err(|source| Error::Json {
            path: STATE_FILE.into(),
            source,
        })?;
    let state: TrainerState = serde_json::from_value(st.clone()).map_err(|source| Error::Json {
        path: STATE_FILE.into(),
        source,
    })?;
    adam.m = m_flat;
    adam.v = v_flat;
    adam.t = st["optimizer_t"].as_u64().unwrap_or(state.step);
    Ok(state)
}

/// Checkpoints on the coordinator's disk: `root/<name>/{files…, MANIFEST.json}`.
pub struct CheckpointStore {
    root: PathBuf,
    keep: usize,
}

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    name: String,
    /// file → (bytes, sha256)
    files: BTreeMap<String, (u64, String)>,
    /// Commit order: one more than the newest checkpoint present when this one was written.
    seq: u64,
    created_unix_s: u64,
}

impl CheckpointStore {
    pub fn new(root: PathBuf, keep: usize) -> Result<Self> {
        std::fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
        Ok(CheckpointStore {
            root,
            keep: keep.max(1),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Writes a checkpoint atomically: files into `.tmp-<name>`, each fsynced, a manifest of
    /// checksums, then one rename. Older checkpoints beyond `keep` are removed.
    pub fn commit(&self, name: &str, files: &[(String, Vec<u8>)]) -> Result<PathBuf> {
        let hashes: Vec<String> = files.iter().map(|(_, b)| sha256_hex(b)).collect();
        self.commit_hashed(name, files, &hashes)
    }

    /// [`Self::commit`] with each file's SHA-256 already known (verified on arrival), so the
    /// manifest does not hash the bytes again.
    pub fn commit_hashed(
        &self,
        name: &str,
        files: &[(String, Vec<u8>)],
        hashes: &[String],
    ) -> Result<PathBuf> {
        if hashes.len() != files.len() {
            return Err(Error::Checkpoint {
                path: self.root.clone(),
                msg: format!("{} hashes for {} files", hashes.len(), files.len()),
            });
        }
        if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
            return Err(Error::Checkpoint {
                path: self.root.clone(),
                msg: format!("invalid checkpoint name {name:?}"),
            });
        }
        let tmp = self.root.join(format!(".tmp-{name}"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let seq = self.list_with_seq().last().map(|(s, _)| s + 1).unwrap_or(0);
        let mut manifest = Manifest {
            name: name.into(),
            files: BTreeMap::new(),
            seq,
            created_unix_s: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        for ((f, bytes), sha) in files.iter().zip(hashes) {
            if f.contains(['/', '\\']) || f.starts_with('.') || f == MANIFEST {
                return Err(Error::Checkpoint {
                    path: tmp.clone(),
                    msg: format!("invalid file name {f:?}"),
                });
            }
            util::write_atomic(&tmp.join(f), bytes)?;
            manifest
                .files
                .insert(f.clone(), (bytes.len() as u64, sha.clone()));
        }
        util::write_atomic(
            &tmp.join(MANIFEST),
            &serde_json::to_vec_pretty(&manifest).expect("json"),
        )?;
        let dst = self.root.join(name);
        let _ = std::fs::remove_dir_all(&dst);
        std::fs::rename(&tmp, &dst).map_err(|e| Error::io(&dst, e))?;
        if let Ok(d) = std::fs::File::open(&self.root) {
            let _ = d.sync_all();
        }
        self.prune()?;
        Ok(dst)
    }

    /// Committed checkpoints, oldest first.
    pub fn list(&self) -> Vec<String> {
        self.list_with_seq().into_iter().map(|(_, n)| n).collect()
    }

    fn list_with_seq(&self) -> Vec<(u64, String)> {
        let mut v: Vec<(u64, String)> = std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    return None;
                }
                let m: Manifest =
                    serde_json::from_slice(&std::fs::read(e.path().join(MANIFEST)).ok()?).ok()?;
                Some((m.seq, name))
            })
            .collect();
        v.sort();
        v
    }

    /// Removes the oldest checkpoints beyond `keep`; pinned ones (`*-final`, `*-best`,
    /// `*-init`) are kept and not counted.
    fn prune(&self) -> Result<()> {
        let pinned =
            |n: &String| n.ends_with("-final") || n.ends_with("-best") || n.ends_with("-init");
        let all: Vec<String> = self.list().into_iter().filter(|n| !pinned(n)).collect();
        if all.len() > self.keep {
            for old in &all[..all.len() - self.keep] {
                let p = self.root.join(old);
                std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
            }
        }
        Ok(())
    }

    /// Reads a checkpoint, verifying every file against the manifest.
    pub fn read(&self, name: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let dir = self.root.join(name);
        let mpath = dir.join(MANIFEST);
        let bytes = std::fs::read(&mpath).map_err(|e| Error::io(&mpath, e))?;
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|source| Error::Json {
            path: mpath.clone(),
            source,
        })?;
        let mut out = vec![];
        for (f, (len, sha)) in &m.files {
            let p = dir.join(f);
            let b = std::fs::read(&p).map_err(|e| Error::io(&p, e))?;
            if b.len() as u64 != *len || &sha256_hex(&b) != sha {
                return Err(Error::Checkpoint {
                    path: p,
                    msg: format!("checksum mismatch (expected {len} bytes with SHA-256 {sha})"),
                });
            }
            out.push((f.clone(), b));
        }
        Ok(out)
    }

    /// The newest checkpoint whose files all verify; corrupt newer ones are reported and
    /// skipped.
    pub fn latest_good(&self) -> Option<(String, Files)> {
        for name in self.list().into_iter().rev() {
            match self.read(&name) {
                Ok(files) => return Some((name, files)),
                Err(e) => tracing::warn!(
                    "checkpoint {name} is unusable, falling back to an older one: {e}"
                ),
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ledger_counts_union_and_repeats() {
        let r = |partition, start, end| LedgerRange {
            epoch: 0,
            partitions: 2,
            partition,
            start,
            end,
        };
        let planned = BTreeMap::from([(0, 30), (1, 10)]);
        let l = epoch_ledgers(
            &[r(0, 0, 10), r(1, 0, 5), r(0, 10, 20), r(1, 5, 10)],
            &planned,
        );
        assert_eq!(
            l[0],
            EpochLedger {
                epoch: 0,
                instances_planned: 30,
                instances_consumed: 30,
                instances_repeated: 0
            }
        );
        assert_eq!(l[1].instances_consumed, 0);
        // A resume from an older cursor than the committed one shows up as a repeat.
        let l = epoch_ledgers(&[r(0, 0, 10), r(0, 6, 12)], &planned);
        assert_eq!((l[0].instances_consumed, l[0].instances_repeated), (12, 4));
    }

    #[test]
    fn store_commits_prunes_and_skips_corrupt() {
        let root = std::env::temp_dir().join(format!("tandem-ckpt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let s = CheckpointStore::new(root.clone(), 2).unwrap();
        for i in 0..3 {
            s.commit(&format!("c{i}"), &[("a.bin".into(), vec![i as u8; 10])])
                .unwrap();
        }
        assert_eq!(s.list(), ["c1", "c2"]);
        assert_eq!(s.latest_good().unwrap().0, "c2");
        std::fs::write(root.join("c2/a.bin"), [9u8; 10]).unwrap();
        assert!(s
            .read("c2")
            .unwrap_err()
            .to_string()
            .contains("checksum mismatch"));
        let (name, files) = s.latest_good().unwrap();
        assert_eq!(name, "c1");
        assert_eq!(files[0].1, vec![1u8; 10]);
        assert!(s.commit("../x", &[]).is_err());
        std::fs::remove_dir_all(root).unwrap();
    }
}
