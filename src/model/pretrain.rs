//! A `BertForPreTraining` together with its configuration and parameter store.

use std::path::Path;

use candle_core::Device;

use super::bert::{pretraining_specs, BertForPreTraining};
use super::hf::{self, LoadReport};
use super::{BertConfig, ParamStore};
use crate::error::Result;

/// The HF class name written to `config.json`'s `architectures`.
pub(crate) const ARCHITECTURE: &str = "BertForPreTraining";

/// A pre-training model: configuration, parameter store and the network over it.
pub struct PretrainModel {
    /// The model's configuration.
    pub cfg: BertConfig,
    /// Every trainable parameter.
    pub store: ParamStore,
    /// The network, reading its parameters from `store`.
    pub model: BertForPreTraining,
}

impl PretrainModel {
    /// A freshly initialised model (BERT's initialisation, seeded).
    pub fn new(cfg: &BertConfig, seed: u64, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let store = ParamStore::init(pretraining_specs(cfg), cfg.initializer_range, seed, device)?;
        let model = BertForPreTraining::load(&store, cfg)?;
        Ok(PretrainModel {
            cfg: cfg.clone(),
            store,
            model,
        })
    }

    /// Loads an HF checkpoint directory; heads it lacks are initialised from `seed`.
    pub fn load(dir: &Path, seed: u64, device: &Device) -> Result<(Self, LoadReport)> {
        let cfg = BertConfig::load(&dir.join(hf::CONFIG_FILE))?;
        let m = Self::new(&cfg, seed, device)?;
        let tensors = hf::read_tensors(dir)?;
        let report = hf::load_weights(&m.store, tensors, dir, cfg.initializer_range, seed)?;
        Ok((m, report))
    }

    /// Runs the model in `p` from now on (see [`super::Precision`]).
    pub fn set_precision(&mut self, p: super::Precision) {
        self.model.bert.set_precision(p);
    }

    /// Writes an HF checkpoint directory (`config.json` and `model.safetensors`).
    pub fn save(&self, dir: &Path) -> Result<()> {
        hf::save_checkpoint(dir, &self.cfg, &self.store, ARCHITECTURE)
    }
}
