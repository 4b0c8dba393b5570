//! Checkpoints: what a replica saves and restores — the model in HF layout, the optimiser
//! moments, and the trainer's state ([`state`]: step, schedule, data cursor and ledger
//! ([`cursor`])). How the coordinator keeps them on disk is `coordinator::store`.

mod cursor;
mod state;

pub use cursor::{epoch_ledgers, DataCursor, EpochLedger, LedgerRange};
pub use state::{checkpoint_name, BestEpoch, StageTotals, TrainerState};

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor};
use sha2::{Digest, Sha256};

use super::kind::StageModel;
use super::optim::AdamW;
use super::step::Trainer;
use crate::error::{Error, Result};
use crate::model::hf;
use crate::model::ParamStore;

/// A checkpoint's files: (file name, bytes).
pub type Files = Vec<(String, Vec<u8>)>;

pub(crate) const MANIFEST: &str = "MANIFEST.json";
pub(crate) const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub(crate) const STATE_FILE: &str = "trainer_state.json";

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
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
            if t.dims() != spec.shape.as_slice() {
                return Err(Error::Checkpoint {
                    path: OPTIMIZER_FILE.into(),
                    msg: format!(
                        "`{key}` has shape {:?}, its parameter {:?}",
                        t.dims(),
                        spec.shape
                    ),
                });
            }
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
