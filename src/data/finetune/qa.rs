//! Extractive QA: SQuAD v1.1 / v2.0 JSON, and sliding windows over the context.
//!
//! Featurisation follows HF `run_qa.py` (`prepare_train_features`, fast tokenizer with
//! `truncation="only_second"`, `return_overflowing_tokens`, `return_offsets_mapping`): each
//! example becomes `[CLS] question [SEP] window [SEP]` for windows of the context that
//! overlap by `doc_stride` tokens; the answer's start and end token positions are labelled in
//! a window that holds the whole answer, and both point at `[CLS]` (0) otherwise or when the
//! question has no answer. As the legacy `run_squad.py`, the question is first cut to
//! `max_query_length` tokens.
//!
//! Offsets are in characters (Unicode scalar values), as Python `str` indices and SQuAD's
//! `answer_start`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{dataset_err, pad_rows, Padding};
use crate::data::batch::{FinetuneBatch, TaskLabels};
use crate::data::tokenizer::Tokenizer;
use crate::error::{Error, Result};

/// One question on a context.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QaExample {
    /// The question's id (SQuAD `id`).
    pub id: String,
    /// The question text.
    pub question: String,
    /// The context the answer is taken from.
    pub context: String,
    /// Gold answers: text and its start in `context`, in characters. Empty when unanswerable.
    pub answers: Vec<(String, usize)>,
    /// Whether the question has no answer in the context (SQuAD v2.0).
    pub is_impossible: bool,
}

impl QaExample {
    /// The characters `start..end` of the context (clamped to its length).
    pub fn context_chars(&self, start: usize, end: usize) -> &str {
        char_slice(&self.context, start, end)
    }
}

/// The characters `start..end` of `s` (clamped to its length).
pub fn char_slice(s: &str, start: usize, end: usize) -> &str {
    let byte = |c: usize| s.char_indices().nth(c).map_or(s.len(), |(b, _)| b);
    let (b0, b1) = (byte(start), byte(end.max(start)));
    &s[b0..b1]
}

/// A SQuAD file, read and checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QaSet {
    /// The file the questions were read from.
    pub path: PathBuf,
    /// The file's `version` field, if any (`"1.1"`, `"v2.0"`).
    pub version: Option<String>,
    /// The questions, in file order.
    pub examples: Vec<QaExample>,
}

/// Window settings (HF `run_qa.py` / `run_squad.py` defaults).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QaOptions {
    /// Longest sequence, `[CLS] question [SEP] window [SEP]` (384).
    pub max_seq_length: usize,
    /// Tokens shared by consecutive windows of a long context (128).
    pub doc_stride: usize,
    /// Longest question in tokens; longer ones are cut (64).
    pub max_query_length: usize,
}

impl Default for QaOptions {
    fn default() -> Self {
        QaOptions {
            max_seq_length: 384,
            doc_stride: 128,
            max_query_length: 64,
        }
    }
}

impl QaOptions {
    /// The context window must be longer than the overlap, whatever the question's length.
    pub fn validate(&self) -> Result<()> {
        let window = self
            .max_seq_length
            .saturating_sub(self.max_query_length.saturating_add(3));
        if self.max_query_length == 0 || window <= self.doc_stride {
            return Err(Error::Data(format!(
                "QA windows: max_seq_length {} - max_query_length {} - 3 special tokens leaves \
                 {window} context tokens; it must exceed doc_stride {} (and max_query_length be \
                 at least 1)",
                self.max_seq_length, self.max_query_length, self.doc_stride
            )));
        }
        Ok(())
    }
}

/// One window of one example.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QaFeature {
    /// Index of the example in the featurised list.
    pub example_index: usize,
    /// `[CLS] question [SEP] window [SEP]` token ids, unpadded.
    pub input_ids: Vec<u32>,
    /// Segment ids: 0 for `[CLS] question [SEP]`, 1 for the window and its `[SEP]`.
    pub token_type_ids: Vec<u32>,
    /// Per position: the token's character span in the example's context, for the context
    /// tokens of this window; `None` for the question, specials and padding.
    pub offsets: Vec<Option<(usize, usize)>>,
    /// Answer start and end token positions in this window; 0 and 0 (`[CLS]`) when the
    /// window does not hold the whole (first) answer or the question has no answer.
    pub start_position: u32,
    /// The answer's end token position (inclusive); see `start_position`.
    pub end_position: u32,
}

#[derive(Deserialize)]
struct SquadFile {
    version: Option<String>,
    data: Vec<Article>,
}

#[derive(Deserialize)]
struct Article {
    paragraphs: Vec<Paragraph>,
}

#[derive(Deserialize)]
struct Paragraph {
    context: String,
    qas: Vec<Question>,
}

#[derive(Deserialize)]
struct Question {
    id: String,
    question: String,
    #[serde(default)]
    answers: Vec<Answer>,
    #[serde(default)]
    is_impossible: bool,
}

#[derive(Deserialize)]
struct Answer {
    text: String,
    answer_start: usize,
}

impl QaSet {
    /// Reads SQuAD JSON; every answer must stand at its `answer_start` (in characters).
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        let file: SquadFile = serde_json::from_str(text).map_err(|source| Error::Json {
            path: path.into(),
            source,
        })?;
        let mut seen = HashSet::new();
        let mut examples = Vec::new();
        for p in file.data.into_iter().flat_map(|a| a.paragraphs) {
            let chars: Vec<usize> = p.context.char_indices().map(|(b, _)| b).collect();
            for q in p.qas {
                let at = format!("question `{}`", q.id);
                let err = |msg: String| dataset_err(path, &at, msg);
                if !seen.insert(q.id.clone()) {
                    return Err(err("the id appears twice".into()));
                }
                if q.question.trim().is_empty() {
                    return Err(err("empty `question`".into()));
                }
                if p.context.trim().is_empty() {
                    return Err(err("empty `context`".into()));
                }
                if q.is_impossible && !q.answers.is_empty() {
                    return Err(err(
                        "`is_impossible` is true but `answers` is not empty".into()
                    ));
                }
                if !q.is_impossible && q.answers.is_empty() {
                    return Err(err(
                        "no `answers` (an unanswerable question needs `\"is_impossible\": true`)"
                            .into(),
                    ));
                }
                let mut answers = Vec::with_capacity(q.answers.len());
                for a in q.answers {
                    if a.text.is_empty() {
                        return Err(err("empty answer `text`".into()));
                    }
                    let Some(&b) = chars.get(a.answer_start) else {
                        return Err(err(format!(
                            "answer_start {} is past the end of the context ({} characters)",
                            a.answer_start,
                            chars.len()
                        )));
                    };
                    if !p.context[b..].starts_with(&a.text) {
                        let n = a.text.chars().count();
                        return Err(err(format!(
                            "answer `{}` is not at character {} of the context, which holds `{}` there",
                            a.text,
                            a.answer_start,
                            char_slice(&p.context[b..], 0, n)
                        )));
                    }
                    answers.push((a.text, a.answer_start));
                }
                examples.push(QaExample {
                    id: q.id,
                    question: q.question,
                    context: p.context.clone(),
                    answers,
                    is_impossible: q.is_impossible,
                });
            }
        }
        if examples.is_empty() {
            return Err(dataset_err(path, "`data`", "the file holds no questions"));
        }
        Ok(QaSet {
            path: path.to_path_buf(),
            version: file.version,
            examples,
        })
    }

    /// Number of questions.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// Whether the set has no questions.
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// Number of unanswerable questions.
    pub fn num_impossible(&self) -> usize {
        self.examples.iter().filter(|e| e.is_impossible).count()
    }

    /// [`featurize_qa`] over the whole set.
    pub fn featurize(&self, tok: &Tokenizer, opts: &QaOptions) -> Result<Vec<QaFeature>> {
        featurize_qa(&self.examples, tok, opts)
    }
}

/// Splits every example into windows (see the module comment); `example_index` refers to
/// `examples`. The features of one example are consecutive.
pub fn featurize_qa(
    examples: &[QaExample],
    tok: &Tokenizer,
    opts: &QaOptions,
) -> Result<Vec<QaFeature>> {
    opts.validate()?;
    let mut out = Vec::new();
    for (ei, e) in examples.iter().enumerate() {
        let tok_err = |what: &str, err: tokenizers::Error| {
            Error::Data(format!(
                "tokenizing the {what} of question `{}`: {err}",
                e.id
            ))
        };
        // run_qa.py strips the question's leading whitespace (it can waste the window).
        let mut q = tok.encode(e.question.trim_start())?;
        q.truncate(opts.max_query_length);
        let ctx = tok
            .inner()
            .encode_char_offsets(e.context.as_str(), false)
            .map_err(|err| tok_err("context", err))?;
        let (ctx_ids, ctx_off) = (ctx.get_ids(), ctx.get_offsets());
        let window = opts.max_seq_length - q.len() - 3;
        let step = window - opts.doc_stride;
        let answer = match e.answers.first() {
            Some((text, start)) if !e.is_impossible => Some((*start, start + text.chars().count())),
            _ => None,
        };
        // Windows start at 0, step, 2·step, … until one reaches the end (as HF tokenizers).
        let mut start = 0;
        loop {
            let end = (start + window).min(ctx_ids.len());
            let first = q.len() + 2; // position of the window's first token
            let mut input_ids = Vec::with_capacity(first + end - start + 1);
            input_ids.push(tok.cls_id());
            input_ids.extend_from_slice(&q);
            input_ids.push(tok.sep_id());
            input_ids.extend_from_slice(&ctx_ids[start..end]);
            input_ids.push(tok.sep_id());
            let mut token_type_ids = vec![0u32; first];
            token_type_ids.resize(input_ids.len(), 1);
            let mut offsets = vec![None; first];
            offsets.extend(ctx_off[start..end].iter().map(|o| Some(*o)));
            offsets.push(None);
            let (s, t) = match answer {
                Some(a) if end > start => label_span(&ctx_off[start..end], a)
                    .map_or((0, 0), |(s, t)| ((first + s) as u32, (first + t) as u32)),
                _ => (0, 0),
            };
            out.push(QaFeature {
                example_index: ei,
                input_ids,
                token_type_ids,
                offsets,
                start_position: s,
                end_position: t,
            });
            if end == ctx_ids.len() {
                break;
            }
            start += step;
        }
    }
    Ok(out)
}

/// The first and last tokens of `window` (character offsets) covering the answer's characters
/// `[a0, a1)`, or `None` when the window does not hold the whole answer (`run_qa.py`).
fn label_span(window: &[(usize, usize)], (a0, a1): (usize, usize)) -> Option<(usize, usize)> {
    let (first, last) = (window.first()?, window.last()?);
    if !(first.0 <= a0 && last.1 >= a1) {
        return None;
    }
    let s = window.iter().rposition(|o| o.0 <= a0)?;
    let t = window.iter().position(|o| o.1 >= a1)?;
    Some((s, t.max(s)))
}

/// Pads features into a batch with [`TaskLabels::Spans`].
pub fn collate_qa(features: &[QaFeature], pad_id: u32, padding: Padding) -> Result<FinetuneBatch> {
    let rows = features
        .iter()
        .map(|f| (f.input_ids.as_slice(), f.token_type_ids.as_slice()));
    let mut batch = pad_rows(rows, pad_id, padding)?;
    let labels = TaskLabels::Spans {
        start: features.iter().map(|f| f.start_position).collect(),
        end: features.iter().map(|f| f.end_position).collect(),
    };
    batch.labels = labels;
    Ok(batch)
}
