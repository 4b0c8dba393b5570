//! Sentence and sentence-pair classification: TSV or JSONL with labels by name.
//!
//! - TSV (`*.tsv`, `*.txt`): a header row naming the columns `text` or `text_a` + `text_b`,
//!   and optionally `label` (other columns are ignored); then one example per row, split on
//!   tabs without quoting, every row with the header's column count.
//! - JSONL (`*.jsonl`, `*.json`): one object per line with the same keys (other keys are
//!   ignored); `label` is a string or an integer (taken as its decimal name). Blank lines are
//!   skipped.
//!
//! Either every example has a label or none has (a prediction set).

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{
    dataset_err, line_at, pad_rows, read_lines, truncate_pair, with_specials, LabelMap, Padding,
};
use crate::data::batch::{FinetuneBatch, TaskLabels};
use crate::data::tokenizer::Tokenizer;
use crate::error::{Error, Result};

/// One example: a text or a pair of texts, and its label's name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassificationExample {
    /// The text (or the pair's first text).
    pub text_a: String,
    /// The pair's second text; `None` for single texts.
    pub text_b: Option<String>,
    /// The label's name; `None` in an unlabelled file.
    pub label: Option<String>,
    /// Line of the example in its file (1-based; 0 when not read from a file).
    pub line: u64,
}

/// A classification file, read and checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassificationSet {
    /// The file the examples were read from.
    pub path: PathBuf,
    /// Whether the examples are sentence pairs (`text_a` + `text_b`).
    pub pairs: bool,
    /// Whether the examples carry labels.
    pub labelled: bool,
    /// The examples, in file order.
    pub examples: Vec<ClassificationExample>,
}

/// One featurised example.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassificationFeature {
    /// `[CLS] A [SEP]` or `[CLS] A [SEP] B [SEP]` token ids, unpadded.
    pub input_ids: Vec<u32>,
    /// Segment ids: 0 for `[CLS] A [SEP]`, 1 for `B [SEP]`.
    pub token_type_ids: Vec<u32>,
    /// The label's id; `None` for an unlabelled set.
    pub label: Option<u32>,
    /// Whether tokens were cut to fit `max_seq_length`.
    pub truncated: bool,
}

/// Which columns a file has.
struct Schema {
    pairs: bool,
    labelled: bool,
}

impl ClassificationSet {
    /// Reads TSV (`.tsv`, `.txt`) or JSONL (`.jsonl`, `.json`), chosen by extension.
    pub fn read(path: &Path) -> Result<Self> {
        let ext = path.extension().and_then(|e| e.to_str());
        let (schema, examples) = match ext.map(|e| e.to_ascii_lowercase()).as_deref() {
            Some("tsv") | Some("txt") => read_tsv(path)?,
            Some("jsonl") | Some("json") => read_jsonl(path)?,
            _ => {
                return Err(Error::Data(format!(
                "{}: unknown classification format; expected a .tsv, .txt, .jsonl or .json file",
                path.display()
            )))
            }
        };
        if examples.is_empty() {
            return Err(dataset_err(
                path,
                "end of file",
                "the file holds no examples",
            ));
        }
        Ok(ClassificationSet {
            path: path.to_path_buf(),
            pairs: schema.pairs,
            labelled: schema.labelled,
            examples,
        })
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// Whether the set has no examples.
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// The label map of a training set: its distinct labels sorted by name.
    pub fn label_map(&self) -> Result<LabelMap> {
        self.require_labels()?;
        LabelMap::from_names(self.examples.iter().filter_map(|e| e.label.as_deref()))
    }

    /// The label id of every example; an unknown label fails at its line, listing the known
    /// labels.
    pub fn label_ids(&self, labels: &LabelMap) -> Result<Vec<u32>> {
        self.require_labels()?;
        self.examples
            .iter()
            .map(|e| {
                let name = e.label.as_deref().unwrap_or_default();
                labels.id_at(name, &self.path, &line_at(e.line))
            })
            .collect()
    }

    fn require_labels(&self) -> Result<()> {
        match self.examples.iter().find(|e| e.label.is_none()) {
            Some(e) => Err(dataset_err(
                &self.path,
                &line_at(e.line),
                "missing label: the file has no `label` column or key",
            )),
            None => Ok(()),
        }
    }

    /// Tokenizes every example into `[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]`, at most
    /// `max_seq_length` tokens (a pair loses tokens from its longer side). With `labels`,
    /// every example must have a known label; without, features carry none.
    pub fn featurize(
        &self,
        tok: &Tokenizer,
        labels: Option<&LabelMap>,
        max_seq_length: usize,
    ) -> Result<Vec<ClassificationFeature>> {
        let specials = if self.pairs { 3 } else { 2 };
        if max_seq_length <= specials {
            return Err(Error::Data(format!(
                "max_seq_length {max_seq_length} leaves no room for text besides the {specials} special tokens"
            )));
        }
        let ids = match labels {
            Some(m) => Some(self.label_ids(m)?),
            None => None,
        };
        let budget = max_seq_length - specials;
        let mut out = Vec::with_capacity(self.examples.len());
        for (i, e) in self.examples.iter().enumerate() {
            let mut a = tok.encode(&e.text_a)?;
            let (input_ids, token_type_ids, truncated) = match &e.text_b {
                Some(b) => {
                    let mut b = tok.encode(b)?;
                    let cut = truncate_pair(&mut a, &mut b, budget);
                    let (ids, types) = with_specials(tok.cls_id(), tok.sep_id(), &a, Some(&b));
                    (ids, types, cut)
                }
                None => {
                    let cut = a.len() > budget;
                    a.truncate(budget);
                    let (ids, types) = with_specials(tok.cls_id(), tok.sep_id(), &a, None);
                    (ids, types, cut)
                }
            };
            out.push(ClassificationFeature {
                input_ids,
                token_type_ids,
                label: ids.as_ref().map(|v| v[i]),
                truncated,
            });
        }
        Ok(out)
    }
}

/// Pads features into a batch; labels are [`TaskLabels::Classes`] when every feature has one,
/// [`TaskLabels::None`] when none has.
pub fn collate_classification(
    features: &[ClassificationFeature],
    pad_id: u32,
    padding: Padding,
) -> Result<FinetuneBatch> {
    let rows = features
        .iter()
        .map(|f| (f.input_ids.as_slice(), f.token_type_ids.as_slice()));
    let mut batch = pad_rows(rows, pad_id, padding)?;
    let labels: Option<Vec<u32>> = features.iter().map(|f| f.label).collect();
    let labels = match labels {
        Some(l) => TaskLabels::Classes(l),
        None if features.iter().all(|f| f.label.is_none()) => TaskLabels::None,
        None => {
            return Err(Error::Batch(
                "some features have a label and others none".into(),
            ))
        }
    };
    batch.labels = labels;
    Ok(batch)
}

fn read_tsv(path: &Path) -> Result<(Schema, Vec<ClassificationExample>)> {
    let lines = read_lines(path)?;
    let Some((hline, header)) = lines.first() else {
        return Err(dataset_err(
            path,
            "line 1",
            "empty file: expected a header row",
        ));
    };
    let cols: Vec<&str> = header.split('\t').map(str::trim).collect();
    let find = |name: &str| cols.iter().position(|c| *c == name);
    let (text, text_a, text_b, label) =
        (find("text"), find("text_a"), find("text_b"), find("label"));
    let texts = match (text, text_a, text_b) {
        (Some(t), None, None) => (t, None),
        (None, Some(a), Some(b)) => (a, Some(b)),
        _ => {
            return Err(dataset_err(
                path,
                &line_at(*hline),
                format!(
                    "header row `{}`: expected the columns `text` or `text_a` and `text_b`, \
                     and optionally `label`, separated by tabs",
                    header.replace('\t', "\\t")
                ),
            ))
        }
    };
    let schema = Schema {
        pairs: texts.1.is_some(),
        labelled: label.is_some(),
    };
    let mut out = Vec::new();
    for (n, row) in &lines[1..] {
        if row.trim().is_empty() {
            continue;
        }
        let at = line_at(*n);
        let fields: Vec<&str> = row.split('\t').collect();
        if fields.len() != cols.len() {
            return Err(dataset_err(
                path,
                &at,
                format!(
                    "{} tab-separated columns, expected {} as in the header ({})",
                    fields.len(),
                    cols.len(),
                    cols.join(", ")
                ),
            ));
        }
        let text_of = |i: usize, name: &str| -> Result<String> {
            let t = fields[i].trim();
            if t.is_empty() {
                return Err(dataset_err(path, &at, format!("empty `{name}`")));
            }
            Ok(t.to_string())
        };
        let (name_a, name_b) = if schema.pairs {
            ("text_a", "text_b")
        } else {
            ("text", "")
        };
        out.push(ClassificationExample {
            text_a: text_of(texts.0, name_a)?,
            text_b: texts.1.map(|b| text_of(b, name_b)).transpose()?,
            label: label.map(|l| text_of(l, "label")).transpose()?,
            line: *n,
        });
    }
    Ok((schema, out))
}

fn read_jsonl(path: &Path) -> Result<(Schema, Vec<ClassificationExample>)> {
    let mut schema: Option<(Schema, u64)> = None;
    let mut out = Vec::new();
    for (n, line) in read_lines(path)? {
        if line.trim().is_empty() {
            continue;
        }
        let at = line_at(n);
        let err = |msg: String| dataset_err(path, &at, msg);
        let v: Value =
            serde_json::from_str(&line).map_err(|e| err(format!("invalid JSON: {e}")))?;
        let Value::Object(obj) = v else {
            return Err(err("expected a JSON object".into()));
        };
        let text = |key: &str| -> Result<Option<String>> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if s.trim().is_empty() => Err(err(format!("empty `{key}`"))),
                Some(Value::String(s)) => Ok(Some(s.trim().to_string())),
                Some(other) => Err(err(format!("`{key}` must be a string, found {other}"))),
            }
        };
        let (t, a, b) = (text("text")?, text("text_a")?, text("text_b")?);
        let (text_a, text_b) = match (t, a, b) {
            (Some(t), None, None) => (t, None),
            (None, Some(a), Some(b)) => (a, Some(b)),
            _ => {
                return Err(err(
                    "expected a string `text`, or strings `text_a` and `text_b`".into(),
                ))
            }
        };
        let label = match obj.get("label") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.trim().is_empty() => {
                return Err(err("empty `label`".into()))
            }
            Some(Value::String(s)) => Some(s.trim().to_string()),
            Some(Value::Number(x)) if x.is_i64() || x.is_u64() => Some(x.to_string()),
            Some(other) => {
                return Err(err(format!(
                    "`label` must be a string or an integer, found {other}"
                )))
            }
        };
        let here = Schema {
            pairs: text_b.is_some(),
            labelled: label.is_some(),
        };
        match &schema {
            None => schema = Some((here, n)),
            Some((first, first_line)) => {
                if first.pairs != here.pairs {
                    let (want, found) = if first.pairs {
                        ("`text_a` and `text_b`", "`text`")
                    } else {
                        ("`text`", "`text_a` and `text_b`")
                    };
                    return Err(err(format!(
                        "has {found} but line {first_line} has {want}: all records must have the same fields"
                    )));
                }
                if first.labelled && !here.labelled {
                    return Err(err(format!(
                        "missing `label` (line {first_line} has one: either every record has a label or none has)"
                    )));
                }
                if !first.labelled && here.labelled {
                    return Err(err(format!(
                        "has a `label` but line {first_line} has none: either every record has a label or none has"
                    )));
                }
            }
        }
        out.push(ClassificationExample {
            text_a,
            text_b,
            label,
            line: n,
        });
    }
    let schema = schema.map(|(s, _)| s).unwrap_or(Schema {
        pairs: false,
        labelled: false,
    });
    Ok((schema, out))
}
