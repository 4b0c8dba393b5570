//! A padded pre-training batch on the host, in HF field names.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::model::BertConfig;

/// Label value that excludes a position from the MLM loss (as PyTorch's `ignore_index`).
pub const IGNORE: i64 = -100;

/// `batch × seq` row-major arrays, as `BertForPreTraining` takes them.
#[derive(Debug, Clone, PartialEq)]
pub struct PretrainBatch {
    /// Sequences in the batch.
    pub batch: usize,
    /// Positions per sequence (padded length).
    pub seq: usize,
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// Segment ids: 0 for the first sentence, 1 for the second.
    pub token_type_ids: Vec<u32>,
    /// 1 for real tokens, 0 for padding.
    pub attention_mask: Vec<u32>,
    /// Original token at masked positions, [`IGNORE`] elsewhere. Empty: no MLM labels.
    pub mlm_labels: Vec<i64>,
    /// 0 = IsNext, 1 = NotNext (HF convention). Empty: no NSP labels.
    pub nsp_labels: Vec<u32>,
}

/// Labels of a fine-tuning batch, by task.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskLabels {
    /// No labels (prediction).
    None,
    /// One class id per example (sequence and pair classification).
    Classes(Vec<u32>),
    /// One label per position, [`IGNORE`] where no loss applies (token classification:
    /// label on the first sub-token of a word, -100 on the rest and on special tokens).
    Tokens(Vec<i64>),
    /// Answer start and end token positions per example (extractive QA); unanswerable
    /// examples point at `[CLS]` (position 0).
    Spans {
        /// Answer start token position, one per example.
        start: Vec<u32>,
        /// Answer end token position (inclusive), one per example.
        end: Vec<u32>,
    },
}

/// A padded fine-tuning batch (`batch × seq`, row-major), in HF field names.
#[derive(Debug, Clone, PartialEq)]
pub struct FinetuneBatch {
    /// Sequences in the batch.
    pub batch: usize,
    /// Positions per sequence (padded length).
    pub seq: usize,
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// Segment ids: 0 for the first sentence, 1 for the second.
    pub token_type_ids: Vec<u32>,
    /// 1 for real tokens, 0 for padding.
    pub attention_mask: Vec<u32>,
    /// The task's labels for the batch.
    pub labels: TaskLabels,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonBatch {
    input_ids: Vec<Vec<i64>>,
    token_type_ids: Option<Vec<Vec<i64>>>,
    attention_mask: Option<Vec<Vec<i64>>>,
    labels: Option<Vec<Vec<i64>>>,
    next_sentence_label: Option<Vec<i64>>,
}

impl PretrainBatch {
    /// Reads a JSON batch with HF field names (`input_ids`, `token_type_ids`,
    /// `attention_mask`, `labels`, `next_sentence_label`; lists of lists of integers).
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let j: JsonBatch = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.into(),
            source,
        })?;
        Self::from_rows(j).map_err(|e| Error::Batch(format!("{}: {e}", path.display())))
    }

    fn from_rows(j: JsonBatch) -> std::result::Result<Self, String> {
        let batch = j.input_ids.len();
        if batch == 0 {
            return Err("input_ids is empty".into());
        }
        let seq = j.input_ids[0].len();
        if seq == 0 {
            return Err("input_ids[0] is empty".into());
        }
        let flat =
            |name: &str, rows: &[Vec<i64>], lo: i64| -> std::result::Result<Vec<i64>, String> {
                if rows.len() != batch {
                    return Err(format!(
                        "{name} has {} rows, input_ids has {batch}",
                        rows.len()
                    ));
                }
                let mut out = Vec::with_capacity(batch * seq);
                for (i, r) in rows.iter().enumerate() {
                    if r.len() != seq {
                        return Err(format!(
                            "{name}[{i}] has {} entries, expected {seq}",
                            r.len()
                        ));
                    }
                    if let Some((j, v)) = r.iter().enumerate().find(|(_, v)| **v < lo) {
                        return Err(format!("{name}[{i}][{j}] = {v} is negative"));
                    }
                    out.extend_from_slice(r);
                }
                Ok(out)
            };
        let u32s = |v: Vec<i64>| v.into_iter().map(|x| x as u32).collect::<Vec<_>>();
        let input_ids = u32s(flat("input_ids", &j.input_ids, 0)?);
        let token_type_ids = match &j.token_type_ids {
            Some(r) => u32s(flat("token_type_ids", r, 0)?),
            None => vec![0; batch * seq],
        };
        let attention_mask = match &j.attention_mask {
            Some(r) => u32s(flat("attention_mask", r, 0)?),
            None => vec![1; batch * seq],
        };
        if let Some(v) = attention_mask.iter().find(|v| **v > 1) {
            return Err(format!("attention_mask holds {v}; expected 0 or 1"));
        }
        let mlm_labels = match &j.labels {
            Some(r) => {
                let l = flat("labels", r, IGNORE)?;
                if let Some((i, v)) = l.iter().enumerate().find(|(_, v)| **v < 0 && **v != IGNORE) {
                    return Err(format!(
                        "labels[{}][{}] = {v}; expected a token id or -100",
                        i / seq,
                        i % seq
                    ));
                }
                l
            }
            None => vec![],
        };
        let nsp_labels = match j.next_sentence_label {
            Some(v) => {
                if v.len() != batch {
                    return Err(format!(
                        "next_sentence_label has {} entries, expected {batch}",
                        v.len()
                    ));
                }
                if let Some(x) = v.iter().find(|x| !(0..=1).contains(*x)) {
                    return Err(format!("next_sentence_label holds {x}; expected 0 or 1"));
                }
                u32s(v)
            }
            None => vec![],
        };
        Ok(PretrainBatch {
            batch,
            seq,
            input_ids,
            token_type_ids,
            attention_mask,
            mlm_labels,
            nsp_labels,
        })
    }

    /// Checks ids against the model's sizes; the message names the field and position.
    pub fn validate(&self, cfg: &BertConfig) -> Result<()> {
        let n = self.batch * self.seq;
        let bad = |m: String| Err(Error::Batch(m));
        if self.input_ids.len() != n
            || self.token_type_ids.len() != n
            || self.attention_mask.len() != n
        {
            return bad(format!("arrays must hold batch × seq = {n} entries"));
        }
        if self.seq > cfg.max_position_embeddings {
            return bad(format!(
                "sequence length {} exceeds max_position_embeddings {}",
                self.seq, cfg.max_position_embeddings
            ));
        }
        let pos = |i: usize| (i / self.seq, i % self.seq);
        if let Some((i, v)) = self
            .input_ids
            .iter()
            .enumerate()
            .find(|(_, v)| **v as usize >= cfg.vocab_size)
        {
            return bad(format!(
                "input_ids{:?} = {v} is outside the vocabulary of {}",
                pos(i),
                cfg.vocab_size
            ));
        }
        if let Some((i, v)) = self
            .token_type_ids
            .iter()
            .enumerate()
            .find(|(_, v)| **v as usize >= cfg.type_vocab_size)
        {
            return bad(format!(
                "token_type_ids{:?} = {v} exceeds type_vocab_size {}",
                pos(i),
                cfg.type_vocab_size
            ));
        }
        if !self.mlm_labels.is_empty() {
            if self.mlm_labels.len() != n {
                return bad(format!("labels must hold {n} entries"));
            }
            if let Some((i, v)) = self
                .mlm_labels
                .iter()
                .enumerate()
                .find(|(_, v)| **v >= cfg.vocab_size as i64)
            {
                return bad(format!(
                    "labels{:?} = {v} is outside the vocabulary of {}",
                    pos(i),
                    cfg.vocab_size
                ));
            }
        }
        if !self.nsp_labels.is_empty() && self.nsp_labels.len() != self.batch {
            return bad(format!(
                "next_sentence_label must hold {} entries",
                self.batch
            ));
        }
        if let Some(b) = (0..self.batch).find(|b| self.attention_mask[b * self.seq] == 0) {
            return bad(format!(
                "attention_mask[{b}][0] is 0: every sequence must attend to its first token"
            ));
        }
        Ok(())
    }

    /// The examples `rows` of this batch, as a batch of their own.
    pub fn rows(&self, rows: std::ops::Range<usize>) -> PretrainBatch {
        let t = self.seq;
        let span = rows.start * t..rows.end * t;
        PretrainBatch {
            batch: rows.len(),
            seq: t,
            input_ids: self.input_ids[span.clone()].to_vec(),
            token_type_ids: self.token_type_ids[span.clone()].to_vec(),
            attention_mask: self.attention_mask[span.clone()].to_vec(),
            mlm_labels: if self.mlm_labels.is_empty() {
                vec![]
            } else {
                self.mlm_labels[span].to_vec()
            },
            nsp_labels: if self.nsp_labels.is_empty() {
                vec![]
            } else {
                self.nsp_labels[rows].to_vec()
            },
        }
    }

    /// Number of MLM-labelled positions (the MLM loss's normaliser).
    pub fn mlm_count(&self) -> usize {
        self.mlm_labels.iter().filter(|l| **l != IGNORE).count()
    }

    /// Number of NSP-labelled examples.
    pub fn nsp_count(&self) -> usize {
        self.nsp_labels.len()
    }

    /// Tokens that are not padding (`[CLS]` and `[SEP]` included, as google-research/bert
    /// counts the sequence its 15 % are taken of).
    pub fn token_count(&self) -> usize {
        self.attention_mask.iter().filter(|m| **m != 0).count()
    }

    /// Examples whose second segment really follows the first (NSP label 0, IsNext).
    pub fn is_next_count(&self) -> usize {
        self.nsp_labels.iter().filter(|l| **l == 0).count()
    }
}

impl FinetuneBatch {
    /// Examples (positions, for token classification) that carry a loss: the task loss's
    /// normaliser.
    pub fn labelled(&self) -> usize {
        match &self.labels {
            TaskLabels::Classes(c) => c.len(),
            TaskLabels::Tokens(t) => t.iter().filter(|l| **l != IGNORE).count(),
            TaskLabels::Spans { start, .. } => start.len(),
            TaskLabels::None => 0,
        }
    }

    /// The examples `rows` of this batch, as a batch of their own (labels cut to match).
    pub fn rows(&self, rows: std::ops::Range<usize>) -> FinetuneBatch {
        let t = self.seq;
        let span = rows.start * t..rows.end * t;
        let labels = match &self.labels {
            TaskLabels::None => TaskLabels::None,
            TaskLabels::Classes(c) => TaskLabels::Classes(c[rows.clone()].to_vec()),
            TaskLabels::Tokens(l) => TaskLabels::Tokens(l[span.clone()].to_vec()),
            TaskLabels::Spans { start, end } => TaskLabels::Spans {
                start: start[rows.clone()].to_vec(),
                end: end[rows.clone()].to_vec(),
            },
        };
        FinetuneBatch {
            batch: rows.len(),
            seq: t,
            input_ids: self.input_ids[span.clone()].to_vec(),
            token_type_ids: self.token_type_ids[span.clone()].to_vec(),
            attention_mask: self.attention_mask[span].to_vec(),
            labels,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> std::result::Result<PretrainBatch, String> {
        PretrainBatch::from_rows(serde_json::from_str(s).unwrap())
    }

    #[test]
    fn parses_and_defaults_optional_fields() {
        let b = parse(r#"{"input_ids": [[2, 5, 3], [2, 6, 3]], "labels": [[-100, 7, -100], [-100, -100, -100]]}"#).unwrap();
        assert_eq!((b.batch, b.seq), (2, 3));
        assert_eq!(b.attention_mask, vec![1; 6]);
        assert_eq!(b.mlm_count(), 1);
        assert_eq!(b.nsp_count(), 0);
    }

    #[test]
    fn ragged_and_out_of_range_input_is_named() {
        let e = parse(r#"{"input_ids": [[2, 5, 3], [2, 6]]}"#).unwrap_err();
        assert!(e.contains("input_ids[1] has 2 entries"), "{e}");
        let e = parse(r#"{"input_ids": [[2, 5]], "labels": [[-1, 4]]}"#).unwrap_err();
        assert!(e.contains("labels[0][0] = -1"), "{e}");
        let e = parse(r#"{"input_ids": [[2, 5]], "next_sentence_label": [2]}"#).unwrap_err();
        assert!(e.contains("next_sentence_label holds 2"), "{e}");
        let cfg = BertConfig::new(10, 4, 1, 1, 8);
        let b = parse(r#"{"input_ids": [[2, 50]]}"#).unwrap();
        let e = b.validate(&cfg).unwrap_err().to_string();
        assert!(e.contains("input_ids(0, 1) = 50"), "{e}");
    }
}
