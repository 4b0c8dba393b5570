//! `BertConfig`, read from and written to HuggingFace `config.json`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The fields of HF `BertConfig` that define the network. Other keys of a `config.json`
/// (`architectures`, `id2label`, `transformers_version`, …) are kept in `extra` and written back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    /// Rows of the word embedding (and columns of the MLM logits).
    pub vocab_size: usize,
    /// Width of the embeddings and of every layer's output.
    pub hidden_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer; they split `hidden_size` evenly.
    pub num_attention_heads: usize,
    /// Width of the feed-forward block's inner layer.
    pub intermediate_size: usize,
    /// The feed-forward activation: only erf GELU (`"gelu"`, or `"gelu_python"`) is supported.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Longest sequence the position embedding covers.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Segment (token type) ids the model knows.
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// LayerNorm's epsilon.
    #[serde(default = "default_ln_eps")]
    pub layer_norm_eps: f64,
    /// Dropout probability on the embeddings and the layers' outputs.
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f32,
    /// Dropout probability on the attention weights.
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f32,
    /// Standard deviation of the normal initialisation.
    #[serde(default = "default_init_range")]
    pub initializer_range: f32,
    /// The padding token's id (its embedding row starts at zero and gets no lookup gradient).
    #[serde(default, deserialize_with = "null_as_zero")]
    pub pad_token_id: usize,
    /// The kind of position embedding: only `"absolute"` (or none given) is supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position_embedding_type: Option<String>,
    /// The other keys of `config.json`, kept to be written back.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// HF writes `"pad_token_id": null` in some configs; BERT's padding id is then 0.
fn null_as_zero<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<usize, D::Error> {
    Ok(Option::<usize>::deserialize(d)?.unwrap_or(0))
}

fn default_act() -> String {
    "gelu".into()
}
fn default_max_pos() -> usize {
    512
}
fn default_type_vocab() -> usize {
    2
}
fn default_ln_eps() -> f64 {
    1e-12
}
fn default_dropout() -> f32 {
    0.1
}
fn default_init_range() -> f32 {
    0.02
}

/// Named sizes used by `tandem bench step` and the bundled configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// hidden 128, 2 layers, 2 heads, FFN 512, vocab 8192
    Tiny,
    /// hidden 256, 4 layers, 4 heads, FFN 1024, vocab 8192
    Mini,
    /// BERT-base: hidden 768, 12 layers, 12 heads, FFN 3072, vocab 30522
    Base,
}

impl BertConfig {
    /// A configuration with BERT's defaults for everything but the sizes.
    pub fn new(
        vocab_size: usize,
        hidden_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
        intermediate_size: usize,
    ) -> Self {
        BertConfig {
            vocab_size,
            hidden_size,
            num_hidden_layers,
            num_attention_heads,
            intermediate_size,
            hidden_act: default_act(),
            max_position_embeddings: default_max_pos(),
            type_vocab_size: default_type_vocab(),
            layer_norm_eps: default_ln_eps(),
            hidden_dropout_prob: default_dropout(),
            attention_probs_dropout_prob: default_dropout(),
            initializer_range: default_init_range(),
            pad_token_id: 0,
            position_embedding_type: None,
            extra: Default::default(),
        }
    }

    /// The sizes of preset `p`, with BERT's defaults for the rest.
    pub(crate) fn preset(p: Preset) -> Self {
        match p {
            Preset::Tiny => Self::new(8192, 128, 2, 2, 512),
            Preset::Mini => Self::new(8192, 256, 4, 4, 1024),
            Preset::Base => Self::new(30522, 768, 12, 12, 3072),
        }
    }

    /// Width of one attention head.
    pub(crate) fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Checks what this implementation supports; the message names the key.
    pub fn validate(&self) -> Result<()> {
        let err = |m: String| Err(Error::Config(m));
        if !matches!(self.hidden_act.as_str(), "gelu" | "gelu_python") {
            return err(format!(
                "hidden_act = {:?}: only \"gelu\" (erf GELU, as BERT) is supported",
                self.hidden_act
            ));
        }
        if let Some(p) = &self.position_embedding_type {
            if p != "absolute" {
                return err(format!(
                    "position_embedding_type = {p:?}: only \"absolute\" is supported"
                ));
            }
        }
        for (k, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
        ] {
            if v == 0 {
                return err(format!("{k} must be positive"));
            }
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        for (k, v) in [
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            (
                "attention_probs_dropout_prob",
                self.attention_probs_dropout_prob,
            ),
        ] {
            if !(0.0..1.0).contains(&v) {
                return err(format!("{k} = {v}: expected a probability in [0, 1)"));
            }
        }
        // Written back (checkpoints, the workers' copy) as JSON, which has no infinity: a value
        // past f32 (`1e300`) would load here and nowhere else.
        if !(self.initializer_range.is_finite() && self.initializer_range >= 0.0) {
            return err(format!(
                "initializer_range = {}: expected a finite standard deviation",
                self.initializer_range
            ));
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return err(format!(
                "layer_norm_eps = {}: expected a small positive number",
                self.layer_norm_eps
            ));
        }
        if self.pad_token_id >= self.vocab_size {
            return err(format!(
                "pad_token_id {} is outside the vocabulary of {}",
                self.pad_token_id, self.vocab_size
            ));
        }
        Ok(())
    }

    /// Reads and validates a `config.json`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cfg: BertConfig = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.into(),
            source,
        })?;
        if let Some(mt) = cfg.extra.get("model_type").and_then(|v| v.as_str()) {
            if mt != "bert" {
                return Err(Error::Config(format!(
                    "{}: model_type = {mt:?}, expected \"bert\"",
                    path.display()
                )));
            }
        }
        cfg.validate()
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        Ok(cfg)
    }

    /// Writes `config.json` with `model_type` and `architectures` set, as transformers expects.
    pub fn save(&self, path: &Path, architecture: &str) -> Result<()> {
        crate::util::write_atomic(path, &self.to_hf_json(architecture))
    }

    /// The `config.json` bytes, with `model_type` and `architectures` set.
    pub fn to_hf_json(&self, architecture: &str) -> Vec<u8> {
        let mut cfg = self.clone();
        cfg.extra
            .insert("model_type".into(), serde_json::Value::from("bert"));
        cfg.extra.insert(
            "architectures".into(),
            serde_json::Value::from(vec![architecture.to_string()]),
        );
        serde_json::to_vec_pretty(&cfg).expect("config serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_hf_config_and_keeps_unknown_keys() {
        let json = r#"{"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12,
            "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu",
            "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
            "model_type": "bert", "transformers_version": "4.6.0.dev0", "use_cache": true}"#;
        let cfg: BertConfig = serde_json::from_str(json).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg, BertConfig::preset(Preset::Base).with_extra(&cfg.extra));
        let back = serde_json::to_value(&cfg).unwrap();
        assert_eq!(back["use_cache"], serde_json::Value::Bool(true));
        assert_eq!(back["hidden_size"], 768);
    }

    #[test]
    fn rejects_unsupported_settings_naming_the_key() {
        let mut cfg = BertConfig::preset(Preset::Tiny);
        cfg.hidden_act = "relu".into();
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("hidden_act"));
        let mut cfg = BertConfig::preset(Preset::Tiny);
        cfg.num_attention_heads = 3;
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("num_attention_heads"));
    }

    impl BertConfig {
        fn with_extra(mut self, extra: &serde_json::Map<String, serde_json::Value>) -> Self {
            self.extra = extra.clone();
            self
        }
    }
}
