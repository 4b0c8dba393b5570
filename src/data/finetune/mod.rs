//! Fine-tuning data sets: readers, label maps, featurisation and collation into
//! [`FinetuneBatch`]es.
//!
//! - [`classification`]: sentence and sentence-pair classification, TSV or JSONL, labels by
//!   name → [`TaskLabels::Classes`].
//! - [`tokens`]: token classification (NER), CoNLL-2003 columns → [`TaskLabels::Tokens`]
//!   with the label on the first sub-token of each word and [`IGNORE`] elsewhere.
//! - [`qa`]: extractive QA, SQuAD v1.1 / v2.0 JSON → sliding windows over the context with
//!   answer token positions ([`TaskLabels::Spans`]), as HF `run_qa.py`.
//!
//! Every reader checks its input and fails with the file and the line (or question id) and
//! what was expected there. Sequences are `[CLS] A [SEP]` or `[CLS] A [SEP] B [SEP]` with
//! segment ids 0 / 1, at most `max_seq_length` tokens.

pub mod classification;
pub mod qa;
pub mod tokens;

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::data::batch::{FinetuneBatch, TaskLabels, IGNORE};
use crate::error::{Error, Result};

pub use classification::{
    collate_classification, ClassificationExample, ClassificationFeature, ClassificationSet,
};
pub use qa::{collate_qa, featurize_qa, QaExample, QaFeature, QaOptions, QaSet};
pub use tokens::{collate_tokens, TokenExample, TokenFeature, TokenSet};

/// Label names ↔ ids (the id is the position in the list). Built from a training set sorted
/// by name (as HF `run_glue.py` / `run_ner.py`), or given; saved beside a checkpoint so that
/// evaluation and prediction use the same ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelMap {
    names: Vec<String>,
    ids: HashMap<String, u32>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LabelFile {
    labels: Vec<String>,
}

impl LabelMap {
    /// A map with ids in the given order; names must be non-empty and distinct.
    pub fn new(names: Vec<String>) -> Result<Self> {
        if names.is_empty() {
            return Err(Error::Data("a label map needs at least one label".into()));
        }
        let mut ids = HashMap::with_capacity(names.len());
        for (i, n) in names.iter().enumerate() {
            if n.is_empty() {
                return Err(Error::Data(format!("label {i} is an empty name")));
            }
            if ids.insert(n.clone(), i as u32).is_some() {
                return Err(Error::Data(format!("label `{n}` appears twice")));
            }
        }
        Ok(LabelMap { names, ids })
    }

    /// The distinct names, sorted (byte order, as Python's `sorted`).
    pub fn from_names<I, S>(names: I) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut v: Vec<String> = names.into_iter().map(|s| s.as_ref().to_string()).collect();
        v.sort();
        v.dedup();
        Self::new(v)
    }

    /// Number of labels.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether the map has no labels.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Names in id order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The id of label `name`, if it is one.
    pub fn id(&self, name: &str) -> Option<u32> {
        self.ids.get(name).copied()
    }

    /// The name of label `id`, if there is one.
    pub(crate) fn name(&self, id: u32) -> Option<&str> {
        self.names.get(id as usize).map(|s| s.as_str())
    }

    /// The id of `name`, or an error at `path`/`at` that lists the known labels.
    pub(crate) fn id_at(&self, name: &str, path: &Path, at: &str) -> Result<u32> {
        self.id(name).ok_or_else(|| {
            dataset_err(
                path,
                at,
                format!(
                    "unknown label `{name}`; known labels: {}",
                    self.names.join(", ")
                ),
            )
        })
    }

    /// Writes `{"labels": [...]}` atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(&LabelFile {
            labels: self.names.clone(),
        })
        .map_err(|source| Error::Json {
            path: path.into(),
            source,
        })?;
        crate::util::write_atomic(path, text.as_bytes())
    }

    /// Reads a file written by [`LabelMap::save`].
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let f: LabelFile = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.into(),
            source,
        })?;
        Self::new(f.labels).map_err(|e| dataset_err(path, "`labels`", e.to_string()))
    }
}

/// How [`collate`](classification::collate_classification) pads a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Padding {
    /// To the longest sequence of the batch.
    #[default]
    Longest,
    /// To this length (a longer sequence is an error).
    Fixed(usize),
}

pub(crate) fn dataset_err(path: &Path, at: &str, msg: impl Into<String>) -> Error {
    Error::Dataset {
        path: path.to_path_buf(),
        at: at.to_string(),
        msg: msg.into(),
    }
}

pub(crate) fn line_at(line: u64) -> String {
    format!("line {line}")
}

/// The lines of a file, numbered from 1, without line ends (LF or CRLF) or a leading BOM;
/// invalid UTF-8 fails at its line.
pub(crate) fn read_lines(path: &Path) -> Result<Vec<(u64, String)>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(&bytes);
    let mut out = Vec::new();
    let mut parts = bytes.split(|b| *b == b'\n').peekable();
    let mut n = 0u64;
    while let Some(raw) = parts.next() {
        n += 1;
        if raw.is_empty() && parts.peek().is_none() {
            break; // the end of a file that ends with a newline
        }
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let s = std::str::from_utf8(raw)
            .map_err(|e| dataset_err(path, &line_at(n), format!("invalid UTF-8: {e}")))?;
        out.push((n, s.to_string()));
    }
    Ok(out)
}

/// `[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]` with segment ids 0 / 1.
pub(crate) fn with_specials(
    cls: u32,
    sep: u32,
    a: &[u32],
    b: Option<&[u32]>,
) -> (Vec<u32>, Vec<u32>) {
    let n = a.len() + b.map_or(0, |b| b.len() + 1) + 2;
    let mut ids = Vec::with_capacity(n);
    let mut types = Vec::with_capacity(n);
    ids.push(cls);
    ids.extend_from_slice(a);
    ids.push(sep);
    types.resize(ids.len(), 0);
    if let Some(b) = b {
        ids.extend_from_slice(b);
        ids.push(sep);
        types.resize(ids.len(), 1);
    }
    (ids, types)
}

/// Shortens a pair to at most `budget` tokens in all, one token at a time from the end of
/// the longer side (of `b` on a tie), as google-research/bert's `_truncate_seq_pair`.
/// Returns whether anything was cut.
pub(crate) fn truncate_pair(a: &mut Vec<u32>, b: &mut Vec<u32>, budget: usize) -> bool {
    let total = a.len() + b.len();
    if total <= budget {
        return false;
    }
    // transformers' `longest_first` (tokenizers' closed form): the shorter side (`a` on a
    // tie) keeps min(len, budget / 2), the other the rest. Google's one-token-at-a-time
    // loop differs by one token when both sides are cut, so this is what HF models saw.
    let (la, lb) = (a.len(), b.len());
    let (ka, kb) = if la <= lb {
        let ka = la.min(budget / 2);
        (ka, budget - ka)
    } else {
        let kb = lb.min(budget / 2);
        (budget - kb, kb)
    };
    a.truncate(ka);
    b.truncate(kb);
    true
}

/// Pads `rows` of (input ids, segment ids) into a batch, without labels yet.
pub(crate) fn pad_rows<'a>(
    rows: impl ExactSizeIterator<Item = (&'a [u32], &'a [u32])> + Clone,
    pad_id: u32,
    padding: Padding,
) -> Result<FinetuneBatch> {
    let batch = rows.len();
    if batch == 0 {
        return Err(Error::Batch(
            "cannot collate an empty list of features".into(),
        ));
    }
    let longest = rows.clone().map(|(ids, _)| ids.len()).max().unwrap_or(0);
    let seq = match padding {
        Padding::Longest => longest,
        Padding::Fixed(n) if n >= longest => n,
        Padding::Fixed(n) => {
            return Err(Error::Batch(format!(
                "a feature has {longest} tokens, more than the fixed length {n}"
            )))
        }
    };
    let mut ids = Vec::with_capacity(batch * seq);
    let mut types = Vec::with_capacity(batch * seq);
    let mut mask = Vec::with_capacity(batch * seq);
    for (i, t) in rows {
        if t.len() != i.len() {
            return Err(Error::Batch(format!(
                "a feature has {} input ids but {} segment ids",
                i.len(),
                t.len()
            )));
        }
        ids.extend_from_slice(i);
        ids.resize(ids.len() + seq - i.len(), pad_id);
        types.extend_from_slice(t);
        types.resize(types.len() + seq - t.len(), 0);
        mask.resize(mask.len() + i.len(), 1);
        mask.resize(mask.len() + seq - i.len(), 0);
    }
    Ok(FinetuneBatch {
        batch,
        seq,
        input_ids: ids,
        token_type_ids: types,
        attention_mask: mask,
        labels: TaskLabels::None,
    })
}

/// Pads per-position labels with [`IGNORE`] to `seq`.
pub(crate) fn pad_labels(rows: &[&[i64]], seq: usize) -> Vec<i64> {
    let mut out = Vec::with_capacity(rows.len() * seq);
    for r in rows {
        out.extend_from_slice(r);
        out.resize(out.len() + seq - r.len(), IGNORE);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_pair_is_transformers_longest_first() {
        // (len a, len b, budget) -> kept, as transformers 5.24 / tokenizers 0.23 keep them.
        for (la, lb, budget, want) in [
            (11, 12, 21, (10, 11)),
            (12, 11, 21, (11, 10)),
            (11, 11, 21, (10, 11)),
            (8, 20, 21, (8, 13)),
            (20, 8, 21, (13, 8)),
            (30, 30, 20, (10, 10)),
            (3, 3, 10, (3, 3)),
            (0, 30, 5, (0, 5)),
        ] {
            let (mut a, mut b) = (vec![7; la], vec![8; lb]);
            let cut = truncate_pair(&mut a, &mut b, budget);
            assert_eq!((a.len(), b.len()), want, "{la} {lb} {budget}");
            assert_eq!(cut, la + lb > budget);
        }
    }

    #[test]
    fn label_map_round_trips_and_rejects_duplicates() {
        let m = LabelMap::from_names(["pos", "neg", "pos"]).unwrap();
        assert_eq!(m.names(), ["neg", "pos"]);
        assert_eq!((m.id("pos"), m.name(0)), (Some(1), Some("neg")));
        assert!(LabelMap::new(vec!["a".into(), "a".into()]).is_err());
        let dir = std::env::temp_dir().join(format!("tandem-labelmap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("labels.json");
        m.save(&p).unwrap();
        assert_eq!(LabelMap::load(&p).unwrap(), m);
        std::fs::write(&p, r#"{"labels": ["x", "x"]}"#).unwrap();
        let e = LabelMap::load(&p).unwrap_err().to_string();
        assert!(e.contains("`x` appears twice"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn pads_to_longest_or_fixed() {
        let rows: [(&[u32], &[u32]); 2] = [(&[2, 5, 3], &[0, 0, 0]), (&[2, 3], &[0, 0])];
        let b = pad_rows(rows.iter().copied(), 0, Padding::Longest).unwrap();
        assert_eq!((b.batch, b.seq), (2, 3));
        assert_eq!(b.input_ids, [2, 5, 3, 2, 3, 0]);
        assert_eq!(b.attention_mask, [1, 1, 1, 1, 1, 0]);
        assert!(pad_rows(rows.iter().copied(), 0, Padding::Fixed(2)).is_err());
        let b = pad_rows(rows.iter().copied(), 0, Padding::Fixed(5)).unwrap();
        assert_eq!(b.seq, 5);
    }
}
