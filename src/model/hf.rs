//! HuggingFace checkpoint directories: `config.json` + `model.safetensors` with HF names.
//!
//! Loading accepts what HF and sentence-transformers write: `BertForPreTraining` names,
//! `BertModel`-only names with or without the `bert.` prefix, old TF-converted LayerNorm
//! names (`gamma`/`beta`), the tied decoder weight and the `position_ids` buffer (both
//! ignored), half-precision tensors (converted to f32) and sharded files
//! (`model.safetensors.index.json`). Heads that the checkpoint lacks are initialised afresh
//! and listed in the report; a tensor the model does not have, or of the wrong shape, is an
//! error naming it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::params::ParamStore;
use super::BertConfig;
use crate::error::{Error, Result};
use crate::util;

/// The weights' file name in a checkpoint directory.
pub(crate) const WEIGHTS_FILE: &str = "model.safetensors";
/// The configuration's file name in a checkpoint directory.
pub(crate) const CONFIG_FILE: &str = "config.json";

/// What [`load_weights`] did beyond copying matching tensors.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct LoadReport {
    /// Parameters absent from the checkpoint, freshly initialised.
    pub initialised: Vec<String>,
    /// Checkpoint entries skipped on purpose (tied copies, buffers).
    pub ignored: Vec<String>,
}

/// Reads every tensor of a checkpoint directory (single or sharded safetensors) as f32.
pub fn read_tensors(dir: &Path) -> Result<HashMap<String, Tensor>> {
    let ck = |msg: String| Error::Checkpoint {
        path: dir.into(),
        msg,
    };
    let single = dir.join(WEIGHTS_FILE);
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if single.exists() {
        vec![single]
    } else if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: index.clone(),
            source,
        })?;
        let map = v["weight_map"]
            .as_object()
            .ok_or_else(|| ck("model.safetensors.index.json has no weight_map".into()))?;
        // Shards are files of this directory: an entry such as `../x` or `/x` is refused.
        for (tensor, file) in map {
            if !file.as_str().is_some_and(crate::util::plain_file_name) {
                return Err(ck(format!(
                    "model.safetensors.index.json: weight_map[{tensor:?}] = {file}: expected \
                     the name of a file in this directory"
                )));
            }
        }
        let mut f: Vec<PathBuf> = map
            .values()
            .filter_map(|s| s.as_str())
            .map(|s| dir.join(s))
            .collect();
        f.sort();
        f.dedup();
        f
    } else if dir.join("pytorch_model.bin").exists() {
        return Err(ck(
            "only pytorch_model.bin found: tandem reads safetensors; convert it with transformers \
             (`AutoModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`)"
                .into(),
        ));
    } else {
        return Err(ck(format!(
            "no {WEIGHTS_FILE} (or sharded index) in this directory"
        )));
    };
    let mut out = HashMap::new();
    for f in files {
        let t =
            candle_core::safetensors::load(&f, &Device::Cpu).map_err(|e| Error::Checkpoint {
                path: f.clone(),
                msg: format!("cannot read safetensors: {e}"),
            })?;
        for (k, v) in t {
            let v = if v.dtype() == DType::F32 {
                v
            } else {
                v.to_dtype(DType::F32)?
            };
            out.insert(k, v);
        }
    }
    Ok(out)
}

/// Maps a checkpoint name onto the store's naming, or `None` if it is to be ignored.
fn canonical_name(store: &ParamStore, name: &str) -> Option<String> {
    if name.ends_with("position_ids") || name == "cls.predictions.decoder.weight" {
        return None;
    }
    let mut n = name.to_string();
    if n == "cls.predictions.decoder.bias" {
        n = "cls.predictions.bias".into();
    }
    for (old, new) in [(".gamma", ".weight"), (".beta", ".bias")] {
        if n.contains("LayerNorm") && n.ends_with(old) {
            n = format!("{}{new}", &n[..n.len() - old.len()]);
        }
    }
    if !store.contains(&n) && store.contains(&format!("bert.{n}")) {
        n = format!("bert.{n}");
    }
    if !store.contains(&n) {
        if let Some(stripped) = n.strip_prefix("bert.") {
            if store.contains(stripped) {
                n = stripped.to_string();
            }
        }
    }
    Some(n)
}

/// Whether a parameter may be missing from a checkpoint and initialised instead: task and
/// pre-training heads and the pooler, never the encoder.
fn may_initialise(name: &str) -> bool {
    !name.contains("embeddings.") && !name.contains("encoder.")
}

/// Copies checkpoint tensors into `store`. `path` is only used in messages.
pub fn load_weights(
    store: &ParamStore,
    tensors: HashMap<String, Tensor>,
    path: &Path,
    init_std: f32,
    seed: u64,
) -> Result<LoadReport> {
    let ck = |msg: String| Error::Checkpoint {
        path: path.into(),
        msg,
    };
    let mut report = LoadReport::default();
    let mut found: BTreeMap<String, (String, Tensor)> = BTreeMap::new();
    let mut names: Vec<_> = tensors.keys().cloned().collect();
    names.sort();
    let mut tensors = tensors;
    for name in names {
        let t = tensors.remove(&name).expect("key listed");
        let Some(canon) = canonical_name(store, &name) else {
            report.ignored.push(name);
            continue;
        };
        if !store.contains(&canon) {
            return Err(ck(format!(
                "tensor `{name}` {:?} is not a parameter of this model (a checkpoint of another \
                 architecture or task head?)",
                t.dims()
            )));
        }
        if name == "cls.predictions.decoder.bias" && found.contains_key(&canon) {
            report.ignored.push(name);
            continue;
        }
        if let Some((prev, _)) = found.get(&canon) {
            if prev != "cls.predictions.decoder.bias" {
                return Err(ck(format!(
                    "tensors `{prev}` and `{name}` both map to `{canon}`"
                )));
            }
            report.ignored.push(prev.clone());
        }
        found.insert(canon, (name, t));
    }
    for (i, spec) in store.specs().iter().enumerate() {
        let _ = i;
        match found.get(&spec.name) {
            Some((orig, t)) => {
                if t.dims() != spec.shape.as_slice() {
                    return Err(Error::ShapeMismatch {
                        name: orig.clone(),
                        expected: spec.shape.clone(),
                        found: t.dims().to_vec(),
                    });
                }
                store.set(&spec.name, t)?;
            }
            None if may_initialise(&spec.name) => {
                store.reinit(&spec.name, init_std, seed)?;
                report.initialised.push(spec.name.clone());
            }
            None => {
                return Err(ck(format!(
                    "missing tensor `{}` {:?}: the checkpoint does not hold this model's encoder",
                    spec.name, spec.shape
                )))
            }
        }
    }
    Ok(report)
}

/// Serialises named tensors as safetensors bytes with the `format = pt` metadata that
/// transformers requires.
pub fn safetensors_bytes(tensors: &BTreeMap<String, Tensor>) -> Result<Vec<u8>> {
    let tensors: BTreeMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(&tensors, Some(meta)).map_err(|e| Error::Checkpoint {
        path: WEIGHTS_FILE.into(),
        msg: format!("cannot serialise safetensors: {e}"),
    })
}

/// Saves `store` as an HF checkpoint directory (`config.json` + `model.safetensors`), each
/// file written atomically.
pub fn save_checkpoint(
    dir: &Path,
    cfg: &BertConfig,
    store: &ParamStore,
    architecture: &str,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    util::write_atomic(
        &dir.join(WEIGHTS_FILE),
        &safetensors_bytes(&store.tensors())?,
    )?;
    cfg.save(&dir.join(CONFIG_FILE), architecture)
}

/// Reads safetensors bytes (as f32 tensors on the CPU).
pub fn tensors_from_bytes(bytes: &[u8], origin: &str) -> Result<HashMap<String, Tensor>> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| Error::Checkpoint {
        path: origin.into(),
        msg: format!("cannot read safetensors: {e}"),
    })?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let bad = |e: candle_core::Error| Error::Checkpoint {
            path: origin.into(),
            msg: format!("tensor `{name}`: {e}"),
        };
        let t = candle_core::safetensors::Load::load(&view, &Device::Cpu).map_err(bad)?;
        let t = if t.dtype() == DType::F32 {
            t
        } else {
            t.to_dtype(DType::F32).map_err(bad)?
        };
        out.insert(name, t);
    }
    Ok(out)
}
