//! `tandem predict`: batch inference with a fine-tuned head, one JSON line per input.
//!
//! The checkpoint is an HF task directory (`config.json` + `model.safetensors`): the head
//! comes from `architectures`, the label names from `id2label`, and the tokenizer from
//! `tokenizer.json` / `vocab.txt` beside it (or, for a checkpoint inside a tandem state_dir,
//! the job's `tokenizer/`). A state_dir itself means its exported `final/` model.
//!
//! Inputs are JSONL (`text`, or `text_a` + `text_b`, for classification; `text` for token
//! classification; `question` + `context` for QA; an `id` is passed through, other keys are
//! ignored) or what the fine-tuning readers accept: classification TSV, CoNLL, SQuAD JSON.
//! Outputs, in input order:
//!
//! - classification: `{"label", "probabilities": {name: p}}` (softmax, names in id order);
//! - token classification: `{"entities": [{"type", "text", "start", "end", "score"}],
//!   "tokens": [{"word", "label"}]}`: each word's label is the argmax at its first sub-token
//!   (as the model was trained), entities are decoded from the word tags as seqeval does, and
//!   `start`/`end` are character offsets (Unicode scalars, end exclusive) into the text; a
//!   word cut off by `max_seq_length` gets `"label": null`;
//! - QA: `{"id", "answer", "start", "end", "score"}` from [`postprocess_qa`] over all windows
//!   of the context; `score` is the start + end logit, and an unanswered question (SQuAD v2.0
//!   style) has the empty answer at 0..0.
//!
//! Two optional `config.json` keys refine what the model expects: `"text_pairs": true|false`
//! (a classifier of sentence pairs or of single texts; without it the first input decides)
//! and `"version_2_with_negative": true` (the null answer can win; a SQuAD v2.0 input file
//! also turns it on).

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Serialize, Serializer};
use serde_json::Value;

use crate::data::batch::TaskLabels;
use crate::data::finetune::qa::char_slice;
use crate::data::finetune::{
    collate_classification, collate_qa, collate_tokens, dataset_err, featurize_qa, line_at,
    read_lines, ClassificationExample, ClassificationSet, Padding, QaExample, QaFeature, QaOptions,
    QaSet, TokenExample, TokenFeature, TokenSet,
};
use crate::data::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use crate::metrics::{argmax, entities, postprocess_qa, QaPostprocess};
use crate::model::hf::CONFIG_FILE;
use crate::model::{BertConfig, TaskHead, TaskModel};

/// What `tandem predict` does.
#[derive(Clone, Debug)]
pub struct PredictOptions {
    pub checkpoint: PathBuf,
    pub input: PathBuf,
    /// JSONL output file (written whole, then renamed into place); `None` is stdout.
    pub output: Option<PathBuf>,
    /// Sequences (QA: windows) per forward pass.
    pub batch_size: usize,
    /// Longest sequence in tokens (at most the model's `max_position_embeddings`).
    pub max_seq_length: usize,
    /// QA: tokens shared by consecutive windows of a long context.
    pub doc_stride: usize,
}

/// `tandem predict`: loads the checkpoint, reads the input and writes one line per input.
pub fn run(opts: &PredictOptions) -> Result<()> {
    let device = Device::cuda_if_available(0)?;
    let p = Predictor::load(&opts.checkpoint, &device)?;
    let inputs = p.read_inputs(&opts.input)?;
    let bar = progress_bar(inputs.len() as u64);
    match &opts.output {
        None => {
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            p.predict(&inputs, opts, &bar, |v| {
                write_line(&mut out, &v, Path::new("stdout"))
            })?;
            out.flush().map_err(|e| Error::io("stdout", e))?;
        }
        Some(path) => {
            let tmp = path.with_extension("tmp");
            let file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
            let mut out = std::io::BufWriter::new(file);
            let written = p
                .predict(&inputs, opts, &bar, |v| write_line(&mut out, &v, &tmp))
                .and_then(|()| out.flush().map_err(|e| Error::io(&tmp, e)));
            if let Err(e) = written {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
            std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
        }
    }
    bar.finish_and_clear();
    Ok(())
}

fn write_line(out: &mut impl Write, p: &Prediction, path: &Path) -> Result<()> {
    let line = serde_json::to_string(p).map_err(|source| Error::Json {
        path: path.into(),
        source,
    })?;
    writeln!(out, "{line}").map_err(|e| Error::io(path, e))
}

/// A bar on stderr when it is a terminal; hidden otherwise.
fn progress_bar(len: u64) -> ProgressBar {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(len);
    b.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} · ETA {eta}",
        )
        .expect("template"),
    );
    b
}

/// One classification input: a text or a pair of texts.
#[derive(Clone, Debug, PartialEq)]
pub struct TextInput {
    pub id: Option<Value>,
    pub text_a: String,
    pub text_b: Option<String>,
}

/// One token-classification input: a raw text, or (CoNLL) words joined by single spaces.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenInput {
    pub id: Option<Value>,
    pub text: String,
    /// The given words (CoNLL input); `None` splits `text` as the tokenizer does.
    pub words: Option<Vec<String>>,
}

/// The inputs of one run, in order, as the head takes them.
#[derive(Clone, Debug)]
pub enum Inputs {
    Classification(Vec<TextInput>),
    Tokens(Vec<TokenInput>),
    Qa {
        examples: Vec<QaExample>,
        /// The `id` printed for each example.
        ids: Vec<Value>,
        /// The input file is SQuAD v2.0.
        version_2: bool,
    },
}

impl Inputs {
    pub fn len(&self) -> usize {
        match self {
            Inputs::Classification(v) => v.len(),
            Inputs::Tokens(v) => v.len(),
            Inputs::Qa { examples, .. } => examples.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One input's result; serialises as one JSON line (see the module comment).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Prediction {
    Class(ClassPrediction),
    Tokens(TokenPrediction),
    Answer(AnswerPrediction),
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClassPrediction {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
    /// The most probable label.
    pub label: String,
    /// Softmax over the labels, in id order.
    #[serde(serialize_with = "in_order")]
    pub probabilities: Vec<(String, f32)>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TokenPrediction {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
    /// The text the spans refer to, when it was built from given words (CoNLL input).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    pub entities: Vec<EntitySpan>,
    pub tokens: Vec<WordLabel>,
}

/// An entity of a text: its type, text and character span `start..end`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EntitySpan {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: String,
    pub start: usize,
    pub end: usize,
    /// Mean probability of the entity's word tags.
    pub score: f32,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WordLabel {
    pub word: String,
    /// `None` for a word cut off by `max_seq_length`.
    pub label: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AnswerPrediction {
    pub id: Value,
    /// The answer, `context[start..end]` in characters; empty for no answer (at 0..0).
    pub answer: String,
    pub start: usize,
    pub end: usize,
    /// Start + end logit of the answer (`None` for no answer).
    pub score: Option<f32>,
    /// SQuAD v2.0 mode: null score minus the best span's score.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub null_score_diff: Option<f32>,
}

/// A list of pairs as a JSON object, keeping the list's order.
fn in_order<S: Serializer>(v: &[(String, f32)], s: S) -> std::result::Result<S::Ok, S::Error> {
    s.collect_map(v.iter().map(|(k, p)| (k, p)))
}

/// A loaded task model with its tokenizer and label names.
pub struct Predictor {
    pub model: TaskModel,
    pub tokenizer: Tokenizer,
    /// Names in id order (empty for QA).
    pub labels: Vec<String>,
    /// The model directory actually loaded.
    pub dir: PathBuf,
    text_pairs: Option<bool>,
    version_2_with_negative: bool,
}

impl Predictor {
    /// Loads a fine-tuned checkpoint directory (see the module comment) and its tokenizer.
    pub fn load(checkpoint: &Path, device: &Device) -> Result<Self> {
        let dir = model_dir(checkpoint)?;
        let cfg = BertConfig::load(&dir.join(CONFIG_FILE))?;
        check_task_head(&dir, &cfg)?;
        let (model, report) = TaskModel::load(&dir, 0, device)?;
        if !report.initialised.is_empty() {
            return Err(Error::Checkpoint {
                path: dir,
                msg: format!(
                    "lacks the trained head ({}): not a fine-tuned checkpoint",
                    report.initialised.join(", ")
                ),
            });
        }
        let tokenizer = Tokenizer::load(&tokenizer_dir(&dir)?)?;
        if tokenizer.vocab_size() > model.cfg.vocab_size {
            return Err(Error::Config(format!(
                "{}: the tokenizer has {} tokens but the model's vocab_size is {}: they do not \
                 belong together",
                dir.display(),
                tokenizer.vocab_size(),
                model.cfg.vocab_size
            )));
        }
        let flag = |k: &str| model.cfg.extra.get(k).and_then(Value::as_bool);
        Ok(Predictor {
            labels: model.labels(),
            text_pairs: flag("text_pairs"),
            version_2_with_negative: flag("version_2_with_negative").unwrap_or(false),
            dir,
            model,
            tokenizer,
        })
    }

    /// Reads the inputs for this head: JSONL (`.jsonl`, or `.json` that is not SQuAD), or
    /// classification TSV (`.tsv`, `.txt`), CoNLL (any other extension, for token
    /// classification), SQuAD JSON (`.json` with `data`, for QA).
    pub fn read_inputs(&self, path: &Path) -> Result<Inputs> {
        let ext = path.extension().and_then(|e| e.to_str());
        let ext = ext.map(str::to_ascii_lowercase).unwrap_or_default();
        let jsonl = ext == "jsonl" || ext == "json" && !is_squad(path)?;
        let inputs = match self.model.head {
            TaskHead::SequenceClassification { .. } if jsonl => {
                Inputs::Classification(read_texts(path, self.text_pairs)?)
            }
            TaskHead::SequenceClassification { .. } if ext == "tsv" || ext == "txt" => {
                let set = ClassificationSet::read(path)?;
                if let (Some(want), Some(e)) = (self.text_pairs, set.examples.first()) {
                    check_pairs(path, e.line, want, set.pairs)?;
                }
                let texts = set.examples.into_iter().map(|e| TextInput {
                    id: None,
                    text_a: e.text_a,
                    text_b: e.text_b,
                });
                Inputs::Classification(texts.collect())
            }
            TaskHead::SequenceClassification { .. } => {
                return Err(Error::Data(format!(
                    "{}: unknown input format for a classifier; expected .jsonl, .json, .tsv or \
                     .txt",
                    path.display()
                )))
            }
            TaskHead::TokenClassification { .. } if jsonl => {
                Inputs::Tokens(read_token_texts(path)?)
            }
            TaskHead::TokenClassification { .. } => {
                let set = TokenSet::read(path)?;
                let texts = set.examples.into_iter().map(|e| TokenInput {
                    id: None,
                    text: e.words.join(" "),
                    words: Some(e.words),
                });
                Inputs::Tokens(texts.collect())
            }
            TaskHead::QuestionAnswering if jsonl => {
                let (examples, ids) = read_questions(path)?;
                Inputs::Qa {
                    examples,
                    ids,
                    version_2: false,
                }
            }
            TaskHead::QuestionAnswering if ext == "json" => {
                let set = QaSet::read(path)?;
                let v2 = set
                    .version
                    .as_deref()
                    .is_some_and(|v| v.trim_start_matches('v').starts_with('2'));
                let ids = set.examples.iter().map(|e| Value::from(e.id.as_str()));
                Inputs::Qa {
                    ids: ids.collect(),
                    examples: set.examples,
                    version_2: v2,
                }
            }
            TaskHead::QuestionAnswering => {
                return Err(Error::Data(format!(
                    "{}: unknown input format for question answering; expected .jsonl (question, \
                     context) or SQuAD .json",
                    path.display()
                )))
            }
        };
        if inputs.is_empty() {
            return Err(dataset_err(path, "end of file", "the file holds no inputs"));
        }
        Ok(inputs)
    }

    /// Runs the model over `inputs` in batches (evaluation mode) and hands each input's JSON
    /// result to `emit`, in input order.
    pub fn predict(
        &self,
        inputs: &Inputs,
        opts: &PredictOptions,
        bar: &ProgressBar,
        mut emit: impl FnMut(Prediction) -> Result<()>,
    ) -> Result<()> {
        if opts.batch_size == 0 {
            return Err(Error::Data("--batch-size must be at least 1".into()));
        }
        let max_len = self.max_seq_length(opts.max_seq_length);
        match inputs {
            Inputs::Classification(xs) => {
                for chunk in xs.chunks(opts.batch_size) {
                    for v in self.classify(chunk, max_len)? {
                        emit(v)?;
                    }
                    bar.inc(chunk.len() as u64);
                }
            }
            Inputs::Tokens(xs) => {
                for chunk in xs.chunks(opts.batch_size) {
                    for v in self.tag(chunk, max_len)? {
                        emit(v)?;
                    }
                    bar.inc(chunk.len() as u64);
                }
            }
            Inputs::Qa {
                examples,
                ids,
                version_2,
            } => {
                let v2 = *version_2 || self.version_2_with_negative;
                let qa = qa_options(max_len, opts.doc_stride)?;
                for v in self.answer(examples, ids, &qa, v2, opts.batch_size, bar)? {
                    emit(v)?;
                }
            }
        }
        Ok(())
    }

    /// `max_seq_length`, at most the model's positions.
    fn max_seq_length(&self, want: usize) -> usize {
        let limit = self.model.cfg.max_position_embeddings;
        if want > limit {
            tracing::info!(
                "max_seq_length {want} exceeds the model's {limit} positions: using {limit}"
            );
        }
        want.min(limit)
    }

    fn pad(&self) -> u32 {
        self.tokenizer.pad_id()
    }

    fn classify(&self, xs: &[TextInput], max_len: usize) -> Result<Vec<Prediction>> {
        let set = ClassificationSet {
            path: PathBuf::new(),
            pairs: xs.iter().any(|x| x.text_b.is_some()),
            labelled: false,
            examples: (xs.iter())
                .map(|x| ClassificationExample {
                    text_a: x.text_a.clone(),
                    text_b: x.text_b.clone(),
                    label: None,
                    line: 0,
                })
                .collect(),
        };
        let features = set.featurize(&self.tokenizer, None, max_len)?;
        let batch = collate_classification(&features, self.pad(), Padding::Longest)?;
        let logits = self.model.logits(&batch)?.to_vec2::<f32>()?;
        Ok(xs
            .iter()
            .zip(&logits)
            .map(|(x, row)| {
                let p = softmax(row);
                Prediction::Class(ClassPrediction {
                    id: x.id.clone(),
                    label: self.labels[argmax(&p)].clone(),
                    probabilities: self.labels.iter().cloned().zip(p).collect(),
                })
            })
            .collect())
    }

    fn tag(&self, xs: &[TokenInput], max_len: usize) -> Result<Vec<Prediction>> {
        let mut spans = Vec::with_capacity(xs.len());
        let mut features = Vec::with_capacity(xs.len());
        for x in xs {
            let (s, f) = match &x.words {
                Some(words) => self.featurize_words(words, max_len)?,
                None => self.featurize_text(&x.text, max_len)?,
            };
            spans.push(s);
            features.push(f);
        }
        let batch = collate_tokens(&features, self.pad(), Padding::Longest)?;
        let logits = self.model.logits(&batch)?.to_vec3::<f32>()?;
        let mut out = Vec::with_capacity(xs.len());
        for (((x, spans), f), rows) in xs.iter().zip(&spans).zip(&features).zip(&logits) {
            // Each word's prediction is its first sub-token's.
            let mut preds: Vec<Option<(usize, f32)>> = vec![None; spans.len()];
            for (p, w) in f.word_ids.iter().enumerate() {
                if let Some(w) = w.map(|w| w as usize).filter(|w| preds[*w].is_none()) {
                    let probs = softmax(&rows[p]);
                    let k = argmax(&probs);
                    preds[w] = Some((k, probs[k]));
                }
            }
            let tags: Vec<&str> = preds
                .iter()
                .map_while(|p| p.map(|(k, _)| self.labels[k].as_str()))
                .collect();
            let scores: Vec<f32> = preds.iter().map_while(|p| p.map(|(_, s)| s)).collect();
            let tokens = (spans.iter().zip(&preds))
                .map(|(&(a, b), p)| WordLabel {
                    word: char_slice(&x.text, a, b).to_string(),
                    label: p.map(|(k, _)| self.labels[k].clone()),
                })
                .collect();
            out.push(Prediction::Tokens(TokenPrediction {
                id: x.id.clone(),
                text: x.words.is_some().then(|| x.text.clone()),
                entities: decode_entities(&x.text, spans, &tags, &scores),
                tokens,
            }));
        }
        Ok(out)
    }

    /// A raw text: words and their character spans as the tokenizer's pre-tokenizer splits
    /// them, the sub-tokens of the first `max_len - 2` tokens.
    fn featurize_text(
        &self,
        text: &str,
        max_len: usize,
    ) -> Result<(Vec<(usize, usize)>, TokenFeature)> {
        let tok = &self.tokenizer;
        let enc = tok
            .inner()
            .encode_char_offsets(text, false)
            .map_err(|e| Error::Data(format!("tokenizing `{text}`: {e}")))?;
        let mut spans: Vec<(usize, usize)> = Vec::new();
        let mut last = None;
        let mut word_ids = vec![None];
        let mut input_ids = vec![tok.cls_id()];
        let budget = max_len.saturating_sub(2);
        for (i, (&id, &(a, b))) in enc.get_ids().iter().zip(enc.get_offsets()).enumerate() {
            let w = enc.get_word_ids()[i];
            if w != last || w.is_none() {
                spans.push((a, b));
            } else if let Some(s) = spans.last_mut() {
                s.1 = b;
            }
            last = w;
            if input_ids.len() - 1 < budget {
                input_ids.push(id);
                word_ids.push(Some(spans.len() as u32 - 1));
            }
        }
        input_ids.push(tok.sep_id());
        word_ids.push(None);
        let kept = word_ids
            .iter()
            .flatten()
            .max()
            .map_or(0, |w| *w as usize + 1);
        let feature = TokenFeature {
            input_ids,
            labels: None,
            word_ids,
            truncated_words: spans.len() - kept,
        };
        Ok((spans, feature))
    }

    /// Given words (CoNLL): featurised as in training, spans into the words joined by spaces.
    fn featurize_words(
        &self,
        words: &[String],
        max_len: usize,
    ) -> Result<(Vec<(usize, usize)>, TokenFeature)> {
        let set = TokenSet {
            path: PathBuf::new(),
            examples: vec![TokenExample {
                words: words.to_vec(),
                labels: vec![],
                line: 0,
            }],
        };
        let feature = set.featurize(&self.tokenizer, None, max_len)?.remove(0);
        let mut spans = Vec::with_capacity(words.len());
        let mut at = 0;
        for w in words {
            let n = w.chars().count();
            spans.push((at, at + n));
            at += n + 1;
        }
        Ok((spans, feature))
    }

    fn answer(
        &self,
        examples: &[QaExample],
        ids: &[Value],
        qa: &QaOptions,
        v2: bool,
        batch_size: usize,
        bar: &ProgressBar,
    ) -> Result<Vec<Prediction>> {
        let features = featurize_qa(examples, &self.tokenizer, qa)?;
        bar.set_length(features.len() as u64);
        let (mut starts, mut ends) = (Vec::new(), Vec::new());
        for chunk in features.chunks(batch_size) {
            let mut batch = collate_qa(chunk, self.pad(), Padding::Longest)?;
            batch.labels = TaskLabels::None;
            for rows in self.model.logits(&batch)?.to_vec3::<f32>()? {
                starts.push(rows.iter().map(|r| r[0]).collect());
                ends.push(rows.iter().map(|r| r[1]).collect());
            }
            bar.inc(chunk.len() as u64);
        }
        let pp = QaPostprocess {
            version_2_with_negative: v2,
            ..QaPostprocess::default()
        };
        let spans = answer_spans(examples, &features, &starts, &ends, &pp)?;
        Ok((examples.iter().zip(ids).zip(spans))
            .map(|((e, id), (start, end, score, diff))| {
                Prediction::Answer(AnswerPrediction {
                    id: id.clone(),
                    answer: e.context_chars(start, end).to_string(),
                    start,
                    end,
                    score,
                    null_score_diff: diff,
                })
            })
            .collect())
    }
}

/// Softmax in f32 (max subtracted first).
pub fn softmax(x: &[f32]) -> Vec<f32> {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = x.iter().map(|v| (v - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

/// Entities of one text from its word tags (seqeval's decoding, see
/// [`crate::metrics::entities`]): type, text, character span `start..end` (from the first
/// word's start to the last word's end) and the mean of the words' probabilities. `spans[i]`
/// is word `i`'s character span; `tags` and `scores` may cover a prefix of the words.
pub fn decode_entities<S: AsRef<str>>(
    text: &str,
    spans: &[(usize, usize)],
    tags: &[S],
    scores: &[f32],
) -> Vec<EntitySpan> {
    entities(tags)
        .into_iter()
        .map(|e| {
            let (start, end) = (spans[e.start].0, spans[e.end].1);
            let s = &scores[e.start..=e.end];
            EntitySpan {
                kind: e.kind,
                text: char_slice(text, start, end).to_string(),
                start,
                end,
                score: s.iter().sum::<f32>() / s.len() as f32,
            }
        })
        .collect()
}

/// Per example: the answer's character span, score and null-score difference.
type AnswerSpan = (usize, usize, Option<f32>, Option<f32>);

/// First scalar of the stand-in contexts of [`answer_spans`] (no surrogates above it).
const STAND_IN_BASE: u32 = 0x1_0000;

/// [`postprocess_qa`]'s choices as character spans. It reports an answer's text, not where
/// it stands; run on stand-in examples whose context's i-th character is `U+10000 + i`, the
/// text it picks spells its own span (a context too long for that is searched for the text).
fn answer_spans(
    examples: &[QaExample],
    features: &[QaFeature],
    starts: &[Vec<f32>],
    ends: &[Vec<f32>],
    pp: &QaPostprocess,
) -> Result<Vec<AnswerSpan>> {
    let limit = (char::MAX as u32 - STAND_IN_BASE) as usize;
    let stand_ins: Vec<QaExample> = (examples.iter())
        .map(|e| {
            let n = e.context.chars().count();
            let context = if n <= limit {
                (0..n as u32)
                    .filter_map(|i| char::from_u32(STAND_IN_BASE + i))
                    .collect()
            } else {
                e.context.clone()
            };
            QaExample {
                context,
                ..e.clone()
            }
        })
        .collect();
    let preds = postprocess_qa(&stand_ins, features, starts, ends, pp)?;
    Ok((examples.iter().zip(&stand_ins).zip(preds))
        .map(|((e, s), p)| {
            let at = |c: char| (c as u32 - STAND_IN_BASE) as usize;
            let (start, end) = match (p.text.chars().next(), p.text.chars().last()) {
                (Some(a), Some(b)) if s.context != e.context => (at(a), at(b) + 1),
                (Some(_), _) => e.context.find(&p.text).map_or((0, 0), |b| {
                    let a = e.context[..b].chars().count();
                    (a, a + p.text.chars().count())
                }),
                _ => (0, 0),
            };
            let score = if start < end { p.score } else { None };
            (start, end, score, p.null_score_diff)
        })
        .collect())
}

/// The QA windows for `max_len`: questions cut to at most half the room (64 at most), and a
/// `doc_stride` too large for the window halved to fit.
pub fn qa_options(max_len: usize, doc_stride: usize) -> Result<QaOptions> {
    if max_len < 6 {
        return Err(Error::Data(format!(
            "max_seq_length {max_len} is too short for question answering (at least 6)"
        )));
    }
    let max_query_length = ((max_len - 3) / 2).min(64);
    let window = max_len - max_query_length - 3;
    let doc_stride = if doc_stride >= window {
        tracing::info!(
            "doc_stride {doc_stride} does not fit windows of {window} context tokens: using {}",
            window / 2
        );
        window / 2
    } else {
        doc_stride
    };
    let o = QaOptions {
        max_seq_length: max_len,
        doc_stride,
        max_query_length,
    };
    o.validate()?;
    Ok(o)
}

/// The model directory of `checkpoint`: itself, or a state_dir's exported `final/`.
fn model_dir(checkpoint: &Path) -> Result<PathBuf> {
    let err = |msg: &str| Error::Checkpoint {
        path: checkpoint.into(),
        msg: msg.into(),
    };
    if checkpoint.join(CONFIG_FILE).is_file() {
        return Ok(checkpoint.into());
    }
    let exported = checkpoint.join("final");
    if exported.join(CONFIG_FILE).is_file() {
        return Ok(exported);
    }
    if !checkpoint.is_dir() {
        return Err(err("no such directory"));
    }
    Err(err(
        "no config.json: expected a checkpoint directory (config.json, model.safetensors) or a \
         tandem state_dir with an exported final/",
    ))
}

/// Refuses a configuration that is not one of the three task heads, before loading weights.
fn check_task_head(dir: &Path, cfg: &BertConfig) -> Result<()> {
    let heads = [
        TaskHead::SequenceClassification { num_labels: 2 },
        TaskHead::TokenClassification { num_labels: 2 },
        TaskHead::QuestionAnswering,
    ]
    .map(|h| h.architecture());
    let arch = (cfg.extra.get("architectures"))
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(Value::as_str);
    let found = match arch {
        Some(a) if heads.contains(&a) => return Ok(()),
        Some(a) => format!("architectures = [{a:?}]"),
        None => "config.json has no `architectures`, so it".into(),
    };
    Err(Error::Checkpoint {
        path: dir.into(),
        msg: format!(
            "{found} is not a fine-tuned head (expected {}): fine-tune a task on it first",
            heads.join(", ")
        ),
    })
}

/// Where the tokenizer of `dir` is: beside it, or a state_dir's `tokenizer/` for a
/// checkpoint in `state_dir/checkpoints/NAME`.
fn tokenizer_dir(dir: &Path) -> Result<PathBuf> {
    let has = |d: &Path| d.join("tokenizer.json").is_file() || d.join("vocab.txt").is_file();
    let state_dir = dir.parent().and_then(Path::parent);
    let job = state_dir.map(|s| s.join("tokenizer"));
    if has(dir) {
        return Ok(dir.into());
    }
    match job {
        Some(j) if has(&j) => Ok(j),
        _ => Err(Error::Checkpoint {
            path: dir.into(),
            msg: "no tokenizer.json or vocab.txt beside the model: save the fine-tuning \
                  tokenizer into this directory"
                .into(),
        }),
    }
}

/// Whether a `.json` file is one SQuAD document (an object with `data`) rather than JSONL.
fn is_squad(path: &Path) -> Result<bool> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    Ok(serde_json::from_str::<Value>(text).is_ok_and(|v| v.get("data").is_some()))
}

/// The objects of a JSONL file with their line numbers; blank lines are skipped.
fn read_records(path: &Path) -> Result<Vec<(u64, serde_json::Map<String, Value>)>> {
    let mut out = Vec::new();
    for (n, line) in read_lines(path)? {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(&line)
            .map_err(|e| dataset_err(path, &line_at(n), format!("invalid JSON: {e}")))?;
        let Value::Object(obj) = v else {
            return Err(dataset_err(path, &line_at(n), "expected a JSON object"));
        };
        out.push((n, obj));
    }
    Ok(out)
}

/// A string field of a record: `None` when absent or null; empty or not a string fails.
fn text_field(
    path: &Path,
    line: u64,
    obj: &serde_json::Map<String, Value>,
    key: &str,
) -> Result<Option<String>> {
    let err = |msg: String| dataset_err(path, &line_at(line), msg);
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Err(err(format!("empty `{key}`"))),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(err(format!("`{key}` must be a string, found {other}"))),
    }
}

/// A pair model given single texts, or the reverse, fails at the record's line.
fn check_pairs(path: &Path, line: u64, want: bool, found: bool) -> Result<()> {
    let msg = match (want, found) {
        (true, false) => {
            "the model classifies sentence pairs: expected `text_a` and `text_b`, \
                          found `text` only"
        }
        (false, true) => {
            "the model classifies single texts: expected `text`, found `text_a` \
                          and `text_b`"
        }
        _ => return Ok(()),
    };
    Err(dataset_err(path, &line_at(line), msg))
}

/// Classification records: `text`, or `text_a` and `text_b`, the same in every record
/// (and as the model's `text_pairs`, when it says).
fn read_texts(path: &Path, want_pairs: Option<bool>) -> Result<Vec<TextInput>> {
    let mut first: Option<(bool, u64)> = None;
    let mut out = Vec::new();
    for (n, obj) in read_records(path)? {
        let field = |k: &str| text_field(path, n, &obj, k);
        let (text_a, text_b) = match (field("text")?, field("text_a")?, field("text_b")?) {
            (Some(t), None, None) => (t.trim().to_string(), None),
            (None, Some(a), Some(b)) => (a.trim().to_string(), Some(b.trim().to_string())),
            _ => {
                let want = match want_pairs {
                    Some(true) => "strings `text_a` and `text_b` (the model classifies pairs)",
                    Some(false) => "a string `text` (the model classifies single texts)",
                    None => "a string `text`, or strings `text_a` and `text_b`",
                };
                return Err(dataset_err(path, &line_at(n), format!("expected {want}")));
            }
        };
        let pairs = text_b.is_some();
        match (want_pairs, first) {
            (Some(want), _) => check_pairs(path, n, want, pairs)?,
            (None, Some((p, line))) if p != pairs => {
                let (has, other) = if pairs {
                    ("`text_a` and `text_b`", "`text`")
                } else {
                    ("`text`", "`text_a` and `text_b`")
                };
                return Err(dataset_err(
                    path,
                    &line_at(n),
                    format!(
                        "has {has} but line {line} has {other}: every record needs the same fields"
                    ),
                ));
            }
            (None, None) => first = Some((pairs, n)),
            _ => {}
        }
        out.push(TextInput {
            id: obj.get("id").cloned(),
            text_a,
            text_b,
        });
    }
    Ok(out)
}

/// Token-classification records: a string `text` each.
fn read_token_texts(path: &Path) -> Result<Vec<TokenInput>> {
    let mut out = Vec::new();
    for (n, obj) in read_records(path)? {
        let text = text_field(path, n, &obj, "text")?
            .ok_or_else(|| dataset_err(path, &line_at(n), "expected a string `text`"))?;
        out.push(TokenInput {
            id: obj.get("id").cloned(),
            text,
            words: None,
        });
    }
    Ok(out)
}

/// QA records: strings `question` and `context`; the printed id is `id`, else the line.
fn read_questions(path: &Path) -> Result<(Vec<QaExample>, Vec<Value>)> {
    let (mut examples, mut ids) = (Vec::new(), Vec::new());
    for (n, obj) in read_records(path)? {
        let field = |k: &str| text_field(path, n, &obj, k);
        let (Some(question), Some(context)) = (field("question")?, field("context")?) else {
            return Err(dataset_err(
                path,
                &line_at(n),
                "expected strings `question` and `context`",
            ));
        };
        ids.push(obj.get("id").cloned().unwrap_or(Value::from(n)));
        examples.push(QaExample {
            id: format!("line {n}"),
            question,
            context,
            answers: vec![],
            is_impossible: false,
        });
    }
    Ok((examples, ids))
}
