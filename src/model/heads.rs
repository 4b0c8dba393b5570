//! Fine-tuning heads with HF names: `BertForSequenceClassification`,
//! `BertForTokenClassification` and `BertForQuestionAnswering`.
//!
//! Follows transformers' `models/bert/modeling_bert.py`: sequence classification is
//! dropout(pooled `[CLS]`) → `classifier`; token classification is dropout(hidden) →
//! `classifier` at every position (built without a pooler, `add_pooling_layer=False`);
//! question answering is `qa_outputs` at every position, split into start and end logits (no
//! dropout, no pooler). Losses are sums with their counts, so data-parallel ranks can divide
//! by global counts; `loss_sum / count` is transformers' `loss`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::bert::{dropout, encoder_specs, linear_specs, BertModel, DropoutRng, Inputs, Linear};
use super::hf::{self, LoadReport};
use super::kernels::ops;
use super::{BertConfig, ParamSpec, ParamStore};
use crate::data::batch::{FinetuneBatch, PretrainBatch, TaskLabels, IGNORE};
use crate::error::{Error, Result};

/// Which task head sits on the encoder. Serialises as e.g.
/// `{"kind": "sequence_classification", "num_labels": 3}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum TaskHead {
    /// One class per example from the pooled `[CLS]` (single-label, cross-entropy).
    SequenceClassification {
        /// Number of classes (at least 2).
        num_labels: usize,
    },
    /// One class per position; positions labelled -100 carry no loss.
    TokenClassification {
        /// Number of tags (at least 1).
        num_labels: usize,
    },
    /// Extractive QA: start and end logits per position.
    QuestionAnswering,
}

impl TaskHead {
    /// The HF class name, as written to `config.json`'s `architectures`.
    pub fn architecture(&self) -> &'static str {
        match self {
            TaskHead::SequenceClassification { .. } => "BertForSequenceClassification",
            TaskHead::TokenClassification { .. } => "BertForTokenClassification",
            TaskHead::QuestionAnswering => "BertForQuestionAnswering",
        }
    }

    /// HF name of the output layer.
    pub fn layer_name(&self) -> &'static str {
        match self {
            TaskHead::QuestionAnswering => "qa_outputs",
            _ => "classifier",
        }
    }

    /// Width of the output layer: the number of labels, or 2 (start, end) for QA.
    pub fn num_outputs(&self) -> usize {
        match *self {
            TaskHead::SequenceClassification { num_labels }
            | TaskHead::TokenClassification { num_labels } => num_labels,
            TaskHead::QuestionAnswering => 2,
        }
    }

    /// Only sequence classification has a pooler (as in transformers).
    pub fn uses_pooler(&self) -> bool {
        matches!(self, TaskHead::SequenceClassification { .. })
    }

    /// Refuses label counts the head cannot train on; the message names the count.
    pub(crate) fn validate(&self) -> Result<()> {
        match *self {
            TaskHead::SequenceClassification { num_labels } if num_labels < 2 => {
                Err(Error::Config(format!(
                    "sequence classification with num_labels = {num_labels}: expected at least 2 \
                     (transformers treats 1 label as regression, which tandem does not train)"
                )))
            }
            TaskHead::TokenClassification { num_labels: 0 } => Err(Error::Config(
                "token classification with num_labels = 0".into(),
            )),
            _ => Ok(()),
        }
    }

    /// The head of an HF task checkpoint's config: `architectures[0]`, and the number of
    /// labels from `id2label` (or `num_labels`; transformers' default is 2).
    pub fn from_config(cfg: &BertConfig) -> Result<Self> {
        let arch = cfg
            .extra
            .get("architectures")
            .and_then(|v| v.as_array())
            .and_then(|a| a.first())
            .and_then(|v| v.as_str())
            .ok_or_else(|| {
                Error::Config("config has no `architectures`: cannot tell the task head".into())
            })?;
        let head = match arch {
            "BertForSequenceClassification" => {
                if let Some(p) = cfg.extra.get("problem_type").and_then(|v| v.as_str()) {
                    if p != "single_label_classification" {
                        return Err(Error::Config(format!(
                            "problem_type = {p:?}: tandem trains single-label classification only"
                        )));
                    }
                }
                TaskHead::SequenceClassification {
                    num_labels: config_num_labels(cfg)?,
                }
            }
            "BertForTokenClassification" => TaskHead::TokenClassification {
                num_labels: config_num_labels(cfg)?,
            },
            "BertForQuestionAnswering" => TaskHead::QuestionAnswering,
            other => {
                return Err(Error::Config(format!(
                    "architectures = [{other:?}] is not a task head (expected \
                     BertForSequenceClassification, BertForTokenClassification or \
                     BertForQuestionAnswering); start a task from a pre-training checkpoint with \
                     TaskModel::from_pretrained_encoder"
                )))
            }
        };
        head.validate()?;
        Ok(head)
    }
}

/// `id2label` as a list (keys must be "0".."n-1").
fn parse_id2label(v: &Value) -> Result<Vec<String>> {
    let bad = |m: String| Error::Config(format!("id2label: {m}"));
    let map = v
        .as_object()
        .ok_or_else(|| bad("expected an object".into()))?;
    let mut out = vec![None; map.len()];
    for (k, name) in map {
        let i: usize = k
            .parse()
            .ok()
            .filter(|i| *i < map.len())
            .ok_or_else(|| bad(format!("key {k:?} is not an id in 0..{}", map.len())))?;
        let name = name
            .as_str()
            .ok_or_else(|| bad(format!("label of {k:?} is not a string")))?;
        out[i] = Some(name.to_string());
    }
    Ok(out.into_iter().map(|n| n.expect("keys distinct")).collect())
}

fn config_num_labels(cfg: &BertConfig) -> Result<usize> {
    let from_map = cfg.extra.get("id2label").map(parse_id2label).transpose()?;
    let explicit = match cfg.extra.get("num_labels") {
        None => None,
        Some(v) => Some(v.as_u64().ok_or_else(|| {
            Error::Config(format!("num_labels = {v}: expected a positive integer"))
        })? as usize),
    };
    match (from_map.map(|m| m.len()), explicit) {
        (Some(a), Some(b)) if a != b => Err(Error::Config(format!(
            "num_labels = {b} but id2label has {a} entries"
        ))),
        (Some(n), _) | (None, Some(n)) => Ok(n),
        (None, None) => Ok(2),
    }
}

/// The trainable parameters of a task model: the encoder under `bert.` (with the pooler only
/// for sequence classification) and the output layer. Every one receives a gradient.
pub fn task_specs(cfg: &BertConfig, head: TaskHead) -> Vec<ParamSpec> {
    let mut v = encoder_specs(cfg, "bert.", head.uses_pooler());
    v.extend(linear_specs(
        head.layer_name(),
        cfg.hidden_size,
        head.num_outputs(),
    ));
    v
}

/// Loss sum and count of one forward pass (the caller divides by the global count).
pub struct TaskOutput {
    /// Σ cross-entropy over labelled examples or positions (scalar, in the graph); for QA
    /// (Σ CE(start) + Σ CE(end)) / 2.
    pub loss_sum: Tensor,
    /// Labelled examples (sequence classification, QA) or positions (token classification).
    pub count: usize,
    /// How many of those the argmax gets right (QA: start and end both).
    pub correct: usize,
    /// `[batch, num_labels]`, `[batch, seq, num_labels]` or `[batch, seq, 2]` (start, end).
    pub logits: Tensor,
}

/// A task model: encoder, head, configuration and parameter store.
pub struct TaskModel {
    /// The encoder's configuration (with the head's `architectures`).
    pub cfg: BertConfig,
    /// The task head on the encoder.
    pub head: TaskHead,
    /// Every trainable parameter, encoder and head.
    pub store: ParamStore,
    bert: BertModel,
    out: Linear,
    dropout: f32,
}

impl TaskModel {
    /// A freshly initialised model (BERT's initialisation, seeded). `cfg.extra` is brought in
    /// line with the head (`architectures`; a stale `id2label` is dropped).
    pub fn new(cfg: &BertConfig, head: TaskHead, seed: u64, device: &Device) -> Result<Self> {
        cfg.validate()?;
        head.validate()?;
        let mut cfg = cfg.clone();
        cfg.extra.insert(
            "architectures".into(),
            Value::from(vec![head.architecture()]),
        );
        let labels_match = matches!(config_num_labels(&cfg), Ok(n) if n == head.num_outputs());
        if head == TaskHead::QuestionAnswering || !labels_match {
            for k in ["id2label", "label2id", "num_labels"] {
                cfg.extra.remove(k);
            }
        }
        let dropout = match cfg.extra.get("classifier_dropout") {
            Some(v) if !v.is_null() => {
                v.as_f64()
                    .filter(|p| (0.0..1.0).contains(p))
                    .ok_or_else(|| {
                        Error::Config(format!("classifier_dropout = {v}: expected a probability"))
                    })? as f32
            }
            _ => cfg.hidden_dropout_prob,
        };
        let store = ParamStore::init(task_specs(&cfg, head), cfg.initializer_range, seed, device)?;
        let bert = BertModel::load(&store, &cfg, "bert.", head.uses_pooler())?;
        let out = Linear::load(&store, head.layer_name())?;
        Ok(TaskModel {
            cfg,
            head,
            store,
            bert,
            out,
            dropout,
        })
    }

    /// Loads an HF checkpoint of a task architecture (head from `architectures`). A pooler
    /// that a pooler-less head does not use (old transformers wrote one) is ignored.
    pub fn load(dir: &Path, seed: u64, device: &Device) -> Result<(Self, LoadReport)> {
        let cfg = BertConfig::load(&dir.join(hf::CONFIG_FILE))?;
        let head = TaskHead::from_config(&cfg).map_err(|e| match e {
            Error::Config(m) => Error::Config(format!("{}: {m}", dir.display())),
            e => e,
        })?;
        let m = Self::new(&cfg, head, seed, device)?;
        let mut tensors = hf::read_tensors(dir)?;
        let mut dropped = Vec::new();
        if !head.uses_pooler() {
            tensors.retain(|k, _| keep(is_pooler(k), k, &mut dropped));
        }
        let report = m.load_tensors(tensors, dir, seed, dropped)?;
        Ok((m, report))
    }

    /// Starts a task from a pre-training (`BertForPreTraining` or `BertModel`) checkpoint
    /// directory: see [`Self::from_encoder_tensors`].
    pub fn from_pretrained_encoder(
        dir: &Path,
        head: TaskHead,
        seed: u64,
        device: &Device,
    ) -> Result<(Self, LoadReport)> {
        let cfg = BertConfig::load(&dir.join(hf::CONFIG_FILE))?;
        Self::from_encoder_tensors(&cfg, hf::read_tensors(dir)?, dir, head, seed, device)
    }

    /// Starts a task from the parameters of a model in memory (e.g. a `PretrainModel`'s).
    pub fn from_pretrain_store(
        cfg: &BertConfig,
        store: &ParamStore,
        head: TaskHead,
        seed: u64,
    ) -> Result<(Self, LoadReport)> {
        let tensors = store.tensors().into_iter().collect();
        let origin = Path::new("<pre-training model>");
        Self::from_encoder_tensors(cfg, tensors, origin, head, seed, store.device())
    }

    /// Copies the encoder (`bert.*`, or unprefixed `BertModel` names) from `tensors`, drops
    /// the pre-training heads (`cls.*`), any other task head, and the pooler when `head` does
    /// not use it, and initialises the new head from `seed`. The report lists the
    /// initialised parameters and, under `ignored`, everything dropped.
    pub fn from_encoder_tensors(
        cfg: &BertConfig,
        mut tensors: HashMap<String, Tensor>,
        origin: &Path,
        head: TaskHead,
        seed: u64,
        device: &Device,
    ) -> Result<(Self, LoadReport)> {
        let m = Self::new(cfg, head, seed, device)?;
        let mut dropped = Vec::new();
        tensors.retain(|k, _| {
            let foreign_head = ["cls.", "classifier.", "qa_outputs."]
                .iter()
                .any(|p| k.starts_with(p));
            keep(
                foreign_head || (!head.uses_pooler() && is_pooler(k)),
                k,
                &mut dropped,
            )
        });
        let report = m.load_tensors(tensors, origin, seed, dropped)?;
        Ok((m, report))
    }

    fn load_tensors(
        &self,
        tensors: HashMap<String, Tensor>,
        origin: &Path,
        seed: u64,
        dropped: Vec<String>,
    ) -> Result<LoadReport> {
        let init_std = self.cfg.initializer_range;
        let mut report = hf::load_weights(&self.store, tensors, origin, init_std, seed)?;
        report.ignored.extend(dropped);
        report.ignored.sort();
        Ok(report)
    }

    /// The label names: `id2label` of the configuration, or transformers' `LABEL_i`.
    pub fn labels(&self) -> Vec<String> {
        match self.cfg.extra.get("id2label").map(parse_id2label) {
            Some(Ok(l)) if l.len() == self.head.num_outputs() => l,
            _ if self.head == TaskHead::QuestionAnswering => vec![],
            _ => (0..self.head.num_outputs())
                .map(|i| format!("LABEL_{i}"))
                .collect(),
        }
    }

    /// Saves an HF checkpoint directory that transformers loads as `head.architecture()`:
    /// `config.json` (with `id2label`, `label2id`, `num_labels` for the classification heads)
    /// and `model.safetensors`. `id2label` empty keeps [`Self::labels`].
    pub fn save(&self, dir: &Path, id2label: &[String]) -> Result<()> {
        let cfg = self.hf_config(id2label)?;
        hf::save_checkpoint(dir, &cfg, &self.store, self.head.architecture())
    }

    /// The config this model is saved with: the encoder's plus `id2label`, `label2id` and
    /// `num_labels` (empty `id2label` keeps [`Self::labels`]).
    pub fn hf_config(&self, id2label: &[String]) -> Result<BertConfig> {
        let mut cfg = self.cfg.clone();
        for k in ["id2label", "label2id", "num_labels"] {
            cfg.extra.remove(k);
        }
        let names = if id2label.is_empty() {
            self.labels()
        } else {
            id2label.to_vec()
        };
        if self.head == TaskHead::QuestionAnswering {
            if !names.is_empty() {
                return Err(Error::Config(
                    "question answering has no labels: pass an empty id2label".into(),
                ));
            }
        } else {
            let n = self.head.num_outputs();
            if names.len() != n {
                return Err(Error::Config(format!(
                    "id2label has {} names, the head has {n} labels",
                    names.len()
                )));
            }
            let mut label2id = serde_json::Map::new();
            let mut map = serde_json::Map::new();
            for (i, name) in names.iter().enumerate() {
                if label2id.insert(name.clone(), Value::from(i)).is_some() {
                    return Err(Error::Config(format!("label {name:?} appears twice")));
                }
                map.insert(i.to_string(), Value::from(name.as_str()));
            }
            cfg.extra.insert("id2label".into(), Value::Object(map));
            cfg.extra.insert("label2id".into(), Value::Object(label2id));
            cfg.extra.insert("num_labels".into(), Value::from(n));
        }
        Ok(cfg)
    }

    /// Logits in evaluation mode (no dropout); see [`TaskOutput::logits`].
    pub fn logits(&self, b: &FinetuneBatch) -> Result<Tensor> {
        self.check_inputs(b)?;
        Ok(self.run(b, &mut None)?.0)
    }

    /// Forward pass with the loss as a sum plus its count. `rng = None` is evaluation mode.
    pub fn forward(&self, b: &FinetuneBatch, rng: &mut DropoutRng) -> Result<TaskOutput> {
        self.check_inputs(b)?;
        self.check_labels(b)?;
        let (logits, rows) = self.run(b, rng)?;
        let dev = logits.device();
        let (n, t) = (b.batch, b.seq);
        // No labels: a zero that still reaches every parameter, so each gets a gradient. (Not
        // `x * 0.0`: candle's backward prunes an affine op whose factor is 0.)
        let zero = || -> Result<Tensor> {
            let z = Tensor::zeros((), logits.dtype(), dev)?;
            Ok(logits.sum_all()?.mul(&z)?)
        };
        let (loss_sum, count, correct) = match &b.labels {
            TaskLabels::None => (zero()?, 0, 0),
            TaskLabels::Classes(l) => {
                let c = argmax_hits(&logits, l)?;
                (ops::cross_entropy_sum(&logits, l)?, n, c)
            }
            TaskLabels::Tokens(l) => {
                let (idx, labels): (Vec<u32>, Vec<u32>) = l
                    .iter()
                    .enumerate()
                    .filter(|(_, l)| **l != IGNORE)
                    .map(|(i, l)| (i as u32, *l as u32))
                    .unzip();
                if idx.is_empty() {
                    (zero()?, 0, 0)
                } else {
                    let sel = rows.index_select(&Tensor::from_slice(&idx, idx.len(), dev)?, 0)?;
                    let c = argmax_hits(&sel, &labels)?;
                    (ops::cross_entropy_sum(&sel, &labels)?, idx.len(), c)
                }
            }
            TaskLabels::Spans { start, end } => {
                let s = logits.narrow(2, 0, 1)?.reshape((n, t))?;
                let e = logits.narrow(2, 1, 1)?.reshape((n, t))?;
                let loss = ((ops::cross_entropy_sum(&s, start)?
                    + ops::cross_entropy_sum(&e, end)?)?
                    * 0.5)?;
                let (ps, pe) = (
                    s.argmax(1)?.to_vec1::<u32>()?,
                    e.argmax(1)?.to_vec1::<u32>()?,
                );
                let c = (0..n).filter(|&i| ps[i] == start[i] && pe[i] == end[i]);
                (loss, n, c.count())
            }
        };
        Ok(TaskOutput {
            loss_sum,
            count,
            correct,
            logits,
        })
    }

    /// The head's logits (shaped as in [`TaskOutput`]) and, for the per-position heads, the
    /// same as rows `[batch·seq, outputs]`.
    fn run(&self, b: &FinetuneBatch, rng: &mut DropoutRng) -> Result<(Tensor, Tensor)> {
        let dev = self.store.device();
        let x = Inputs::from_arrays(
            b.batch,
            b.seq,
            &b.input_ids,
            &b.token_type_ids,
            &b.attention_mask,
            dev,
        )?;
        let h = self.bert.forward(&x, rng)?;
        let k = self.head.num_outputs();
        // Logits and everything after them (losses, argmax) in f32, whatever the precision.
        let f32 = |t: Tensor| t.to_dtype(candle_core::DType::F32);
        Ok(match self.head {
            TaskHead::SequenceClassification { .. } => {
                let pooled = dropout(&self.bert.pool(&h, &x)?, self.dropout, rng)?;
                let l = f32(self.out.forward(&pooled)?)?;
                (l.clone(), l)
            }
            TaskHead::TokenClassification { .. } => {
                let rows = f32(self.out.forward(&dropout(&h, self.dropout, rng)?)?)?;
                (rows.reshape((b.batch, b.seq, k))?, rows)
            }
            TaskHead::QuestionAnswering => {
                let rows = f32(self.out.forward(&h)?)?;
                (rows.reshape((b.batch, b.seq, k))?, rows)
            }
        })
    }

    /// Runs the encoder and head in `p` from now on (see [`super::Precision`]).
    pub fn set_precision(&mut self, p: super::Precision) {
        self.bert.set_precision(p);
    }

    fn check_inputs(&self, b: &FinetuneBatch) -> Result<()> {
        if b.batch == 0 || b.seq == 0 {
            return Err(Error::Batch(format!(
                "empty batch ({} × {})",
                b.batch, b.seq
            )));
        }
        PretrainBatch {
            batch: b.batch,
            seq: b.seq,
            input_ids: b.input_ids.clone(),
            token_type_ids: b.token_type_ids.clone(),
            attention_mask: b.attention_mask.clone(),
            mlm_labels: vec![],
            nsp_labels: vec![],
        }
        .validate(&self.cfg)
    }

    fn check_labels(&self, b: &FinetuneBatch) -> Result<()> {
        let bad = |m: String| Err(Error::Batch(m));
        let (n, t, k) = (b.batch, b.seq, self.head.num_outputs());
        let arch = self.head.architecture();
        match (&b.labels, self.head) {
            (TaskLabels::None, _) => Ok(()),
            (TaskLabels::Classes(l), TaskHead::SequenceClassification { .. }) => {
                if l.len() != n {
                    return bad(format!("{} class labels for {n} examples", l.len()));
                }
                match l.iter().position(|&c| c as usize >= k) {
                    Some(i) => bad(format!("labels[{i}] = {} is not one of {k} classes", l[i])),
                    None => Ok(()),
                }
            }
            (TaskLabels::Tokens(l), TaskHead::TokenClassification { .. }) => {
                if l.len() != n * t {
                    return bad(format!(
                        "{} token labels, expected batch × seq = {}",
                        l.len(),
                        n * t
                    ));
                }
                match l
                    .iter()
                    .position(|&c| c != IGNORE && !(0..k as i64).contains(&c))
                {
                    Some(i) => bad(format!(
                        "labels({}, {}) = {}: expected a class below {k} or -100",
                        i / t,
                        i % t,
                        l[i]
                    )),
                    None => Ok(()),
                }
            }
            (TaskLabels::Spans { start, end }, TaskHead::QuestionAnswering) => {
                for (name, v) in [("start_positions", start), ("end_positions", end)] {
                    if v.len() != n {
                        return bad(format!("{name} has {} entries for {n} examples", v.len()));
                    }
                    if let Some(i) = v.iter().position(|&p| p as usize >= t) {
                        return bad(format!(
                            "{name}[{i}] = {} is outside the sequence of {t}",
                            v[i]
                        ));
                    }
                }
                Ok(())
            }
            (l, _) => bad(format!("{arch} cannot train on labels {}", label_kind(l))),
        }
    }
}

fn label_kind(l: &TaskLabels) -> &'static str {
    match l {
        TaskLabels::None => "None",
        TaskLabels::Classes(_) => "Classes (one per example)",
        TaskLabels::Tokens(_) => "Tokens (one per position)",
        TaskLabels::Spans { .. } => "Spans (answer start and end)",
    }
}

fn is_pooler(name: &str) -> bool {
    name.strip_prefix("bert.")
        .unwrap_or(name)
        .starts_with("pooler.")
}

/// `retain` helper: keeps `name` unless `drop`, recording what it drops.
fn keep(drop: bool, name: &str, dropped: &mut Vec<String>) -> bool {
    if drop {
        dropped.push(name.to_string());
    }
    !drop
}

fn argmax_hits(logits: &Tensor, labels: &[u32]) -> Result<usize> {
    let pred = logits.argmax(1)?.to_vec1::<u32>()?;
    Ok(pred.iter().zip(labels).filter(|(p, l)| p == l).count())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg_with(extra: Value) -> BertConfig {
        let mut c = BertConfig::new(20, 8, 1, 2, 16);
        c.extra = extra.as_object().unwrap().clone();
        c
    }

    #[test]
    fn head_from_config_reads_architecture_and_labels() {
        let c = cfg_with(
            serde_json::json!({"architectures": ["BertForTokenClassification"],
            "id2label": {"1": "B", "0": "O", "2": "I"}}),
        );
        let h = TaskHead::from_config(&c).unwrap();
        assert_eq!(h, TaskHead::TokenClassification { num_labels: 3 });
        let m = TaskModel::new(&c, h, 0, &Device::Cpu).unwrap();
        assert_eq!(m.labels(), ["O", "B", "I"]);
        let c = cfg_with(serde_json::json!({"architectures": ["BertForSequenceClassification"]}));
        let h = TaskHead::from_config(&c).unwrap();
        assert_eq!(h, TaskHead::SequenceClassification { num_labels: 2 });
        let c = cfg_with(serde_json::json!({"architectures": ["BertForPreTraining"]}));
        let e = TaskHead::from_config(&c).unwrap_err().to_string();
        assert!(e.contains("BertForPreTraining") && e.contains("from_pretrained_encoder"));
        let c = cfg_with(
            serde_json::json!({"architectures": ["BertForSequenceClassification"],
            "problem_type": "regression"}),
        );
        assert!(TaskHead::from_config(&c).is_err());
        let c = cfg_with(
            serde_json::json!({"architectures": ["BertForSequenceClassification"],
            "id2label": {"0": "a", "5": "b"}}),
        );
        let e = TaskHead::from_config(&c).unwrap_err().to_string();
        assert!(e.contains("\"5\""), "{e}");
    }

    #[test]
    fn head_serialises_with_a_kind_tag() {
        let h = TaskHead::SequenceClassification { num_labels: 3 };
        let s = serde_json::to_string(&h).unwrap();
        assert_eq!(s, r#"{"kind":"sequence_classification","num_labels":3}"#);
        assert_eq!(serde_json::from_str::<TaskHead>(&s).unwrap(), h);
        let qa: TaskHead = serde_json::from_str(r#"{"kind":"question_answering"}"#).unwrap();
        assert_eq!(qa, TaskHead::QuestionAnswering);
    }

    #[test]
    fn specs_have_a_pooler_only_for_sequence_classification() {
        let c = BertConfig::new(20, 8, 1, 2, 16);
        for (h, pooler, out) in [
            (
                TaskHead::SequenceClassification { num_labels: 3 },
                true,
                "classifier.weight",
            ),
            (
                TaskHead::TokenClassification { num_labels: 4 },
                false,
                "classifier.weight",
            ),
            (TaskHead::QuestionAnswering, false, "qa_outputs.weight"),
        ] {
            let s = task_specs(&c, h);
            assert_eq!(s.iter().any(|p| p.name.contains("pooler")), pooler);
            let w = s.iter().find(|p| p.name == out).unwrap();
            assert_eq!(w.shape, [h.num_outputs(), 8]);
            assert!(s
                .iter()
                .all(|p| p.name.starts_with("bert.") || p.name.starts_with(h.layer_name())));
        }
    }
}
