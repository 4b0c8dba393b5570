//! Token classification (NER): CoNLL-2003 style files.
//!
//! One token per line, whitespace-separated columns, the word first and the label last (any
//! columns between, such as POS and chunk tags, are ignored); blank lines separate sentences;
//! `-DOCSTART-` lines are skipped.
//!
//! Featurisation follows HF `run_ner.py` (`label_all_tokens = False`): each word is split
//! into sub-tokens, the word's label goes on its first sub-token and [`IGNORE`] on the others
//! and on `[CLS]` / `[SEP]`. Words that do not fit in `max_seq_length` are cut and counted.

use std::path::{Path, PathBuf};

use super::{dataset_err, line_at, pad_labels, pad_rows, read_lines, LabelMap, Padding};
use crate::data::batch::{FinetuneBatch, TaskLabels, IGNORE};
use crate::data::tokenizer::Tokenizer;
use crate::error::{Error, Result};

/// One sentence: its words and their labels (as many).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenExample {
    /// The sentence's words.
    pub words: Vec<String>,
    /// Each word's label name (CoNLL tag, e.g. `B-PER`).
    pub labels: Vec<String>,
    /// Line of the sentence's first word (1-based; 0 when not read from a file).
    pub line: u64,
}

/// A CoNLL file, read and checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenSet {
    /// The file the sentences were read from.
    pub path: PathBuf,
    /// The sentences, in file order.
    pub examples: Vec<TokenExample>,
}

/// One featurised sentence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenFeature {
    /// `[CLS] sub-tokens [SEP]` token ids, unpadded.
    pub input_ids: Vec<u32>,
    /// Per position: the label id on a word's first sub-token, [`IGNORE`] elsewhere.
    /// `None` when featurised without a label map.
    pub labels: Option<Vec<i64>>,
    /// Per position: the index of the word the token comes from (`None` for specials).
    pub word_ids: Vec<Option<u32>>,
    /// Words of the sentence that did not fit (they get no prediction).
    pub truncated_words: usize,
}

impl TokenFeature {
    /// All zeros: a single segment.
    pub fn token_type_ids(&self) -> Vec<u32> {
        vec![0; self.input_ids.len()]
    }
}

impl TokenSet {
    /// Reads a CoNLL file (see the module doc); fails on a line with one column or a file
    /// without sentences.
    pub fn read(path: &Path) -> Result<Self> {
        let mut examples = Vec::new();
        let mut cur = TokenExample {
            words: vec![],
            labels: vec![],
            line: 0,
        };
        for (n, line) in read_lines(path)? {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // A blank line, or a document start, ends the sentence.
            let boundary = cols.first().is_none_or(|c| *c == "-DOCSTART-");
            if boundary {
                if !cur.words.is_empty() {
                    examples.push(std::mem::replace(
                        &mut cur,
                        TokenExample {
                            words: vec![],
                            labels: vec![],
                            line: 0,
                        },
                    ));
                }
                continue;
            }
            if cols.len() < 2 {
                return Err(dataset_err(
                    path,
                    &line_at(n),
                    format!(
                        "`{line}` has 1 column; expected the word and its label separated by whitespace"
                    ),
                ));
            }
            if cur.words.is_empty() {
                cur.line = n;
            }
            cur.words.push(cols[0].to_string());
            cur.labels.push(cols[cols.len() - 1].to_string());
        }
        if !cur.words.is_empty() {
            examples.push(cur);
        }
        if examples.is_empty() {
            return Err(dataset_err(
                path,
                "end of file",
                "the file holds no sentences",
            ));
        }
        Ok(TokenSet {
            path: path.to_path_buf(),
            examples,
        })
    }

    /// Number of sentences.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// Whether the set has no sentences.
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// Number of words over all sentences.
    pub fn num_words(&self) -> usize {
        self.examples.iter().map(|e| e.words.len()).sum()
    }

    /// The label map of a training set: its distinct labels sorted by name (as `run_ner.py`).
    pub fn label_map(&self) -> Result<LabelMap> {
        LabelMap::from_names(self.examples.iter().flat_map(|e| e.labels.iter()))
    }

    /// Label ids per sentence; an unknown label fails at its line, listing the known ones.
    pub fn label_ids(&self, labels: &LabelMap) -> Result<Vec<Vec<u32>>> {
        self.examples
            .iter()
            .map(|e| {
                (e.labels.iter().enumerate())
                    .map(|(i, l)| labels.id_at(l, &self.path, &line_at(e.line + i as u64)))
                    .collect()
            })
            .collect()
    }

    /// Tokenizes every sentence word by word into `[CLS] pieces… [SEP]`, at most
    /// `max_seq_length` tokens. With `labels`, each word's label id goes on its first
    /// sub-token; without, features carry no labels.
    ///
    /// Ours: a word that normalises to nothing (control characters only) becomes `[UNK]` so
    /// that it keeps its label and prediction (HF drops it).
    pub fn featurize(
        &self,
        tok: &Tokenizer,
        labels: Option<&LabelMap>,
        max_seq_length: usize,
    ) -> Result<Vec<TokenFeature>> {
        if max_seq_length <= 2 {
            return Err(Error::Data(format!(
                "max_seq_length {max_seq_length} leaves no room for words besides [CLS] and [SEP]"
            )));
        }
        let ids = labels.map(|m| self.label_ids(m)).transpose()?;
        let budget = max_seq_length - 2;
        let mut out = Vec::with_capacity(self.examples.len());
        for (s, e) in self.examples.iter().enumerate() {
            let mut input_ids = vec![tok.cls_id()];
            let mut word_ids = vec![None];
            let mut lab = vec![IGNORE];
            let mut truncated_words = 0;
            for (w, word) in e.words.iter().enumerate() {
                let mut pieces = tok.encode(word)?;
                if pieces.is_empty() {
                    pieces.push(tok.unk_id());
                }
                if input_ids.len() - 1 + pieces.len() > budget {
                    // HF truncates inside the word; a cut word keeps its first pieces.
                    let room = budget - (input_ids.len() - 1);
                    pieces.truncate(room);
                    truncated_words = e.words.len() - w - usize::from(!pieces.is_empty());
                }
                for (k, p) in pieces.iter().enumerate() {
                    input_ids.push(*p);
                    word_ids.push(Some(w as u32));
                    lab.push(match (&ids, k) {
                        (Some(ids), 0) => ids[s][w] as i64,
                        _ => IGNORE,
                    });
                }
                if truncated_words > 0 {
                    break;
                }
            }
            input_ids.push(tok.sep_id());
            word_ids.push(None);
            lab.push(IGNORE);
            out.push(TokenFeature {
                input_ids,
                labels: ids.is_some().then_some(lab),
                word_ids,
                truncated_words,
            });
        }
        Ok(out)
    }
}

/// Pads features into a batch; labels are [`TaskLabels::Tokens`] (padding [`IGNORE`]) when
/// every feature has them, [`TaskLabels::None`] when none has.
pub fn collate_tokens(
    features: &[TokenFeature],
    pad_id: u32,
    padding: Padding,
) -> Result<FinetuneBatch> {
    let types: Vec<Vec<u32>> = features.iter().map(|f| f.token_type_ids()).collect();
    let rows = features
        .iter()
        .zip(&types)
        .map(|(f, t)| (f.input_ids.as_slice(), t.as_slice()));
    let mut batch = pad_rows(rows, pad_id, padding)?;
    let seq = batch.seq;
    let labels: Option<Vec<&[i64]>> = features.iter().map(|f| f.labels.as_deref()).collect();
    let labels = match labels {
        Some(rows) => {
            if let Some(r) = rows
                .iter()
                .zip(features)
                .find(|(r, f)| r.len() != f.input_ids.len())
            {
                return Err(Error::Batch(format!(
                    "a feature has {} labels for {} tokens",
                    r.0.len(),
                    r.1.input_ids.len()
                )));
            }
            TaskLabels::Tokens(pad_labels(&rows, seq))
        }
        None if features.iter().all(|f| f.labels.is_none()) => TaskLabels::None,
        None => {
            return Err(Error::Batch(
                "some features have labels and others none".into(),
            ))
        }
    };
    batch.labels = labels;
    Ok(batch)
}
