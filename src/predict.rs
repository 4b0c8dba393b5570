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
use serde_json::{json, Map, Value};

use crate::data::batch::TaskLabels;
use crate::data::finetune::qa::char_slice;
use crate::data::finetune::{
    collate_classification, collate_qa, collate_tokens, dataset_err, featurize_qa, line_at,
    read_lines, ClassificationExample, ClassificationSet, Padding, QaExample, QaFeature,
    QaOptions, QaSet, TokenExample, TokenFeature, TokenSet,
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
            p.predict(&inputs, opts, &bar, |v| write_line(&mut out, &v, Path::new("stdout")))?;
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

fn write_line(out: &mut impl Write, v: &Value, path: &Path) -> Result<()> {
    writeln!(out, "{v}").map_err(|e| Error::io(path, e))
}

/// A bar on stderr when it is a terminal; hidden otherwise.
fn progress_bar(len: u64) -> ProgressBar {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(len);
    b.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} · ETA {eta}")
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
            TaskHead::TokenClassification { .. } if jsonl => Inputs::Tokens(read_token_texts(path)?),
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
        mut emit: impl FnMut(Value) -> Result<()>,
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
            tracing::info!("max_seq_length {want} exceeds the model's {limit} positions: using {limit}");
        }
        want.min(limit)
    }

    fn pad(&self) -> u32 {
        self.tokenizer.pad_id()
    }

    fn classify(&self, xs: &[TextInput], max_len: usize) -> Result<Vec<Value>> {
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
                let best = argmax(&p);
                let probs: Map<String, Value> = (self.labels.iter().zip(&p))
                    .map(|(n, p)| (n.clone(), json!(p)))
                    .collect();
                with_id(
                    &x.id,
                    json!({"label": self.labels[best], "probabilities": ordered(probs, &self.labels)}),
                )
            })
            .collect())
    }

    fn tag(&self, xs: &[TokenInput], max_len: usize) -> Result<Vec<Value>> {
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
            let tokens: Vec<Value> = (spans.iter().zip(&preds))
                .map(|(&(a, b), p)| {
                    let label = p.map(|(k, _)| self.labels[k].as_str());
                    json!({"word": char_slice(&x.text, a, b), "label": label})
                })
                .collect();
            let ents = decode_entities(&x.text, spans, &tags, &scores);
            let mut v = json!({"entities": ents, "tokens": tokens});
            if x.words.is_some() {
                v["text"] = Value::from(x.text.as_str());
            }
            out.push(with_id(&x.id, v));
        }
        Ok(out)
    }

    /// A raw text: words and their character spans as the tokenizer's pre-tokenizer splits
    /// them, the sub-tokens of the first `max_len - 2` tokens.
    fn featurize_text(&self, text: &str, max_len: usize) -> Result<(Vec<(usize, usize)>, TokenFeature)> {
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
        let kept = word_ids.iter().flatten().max().map_or(0, |w| *w as usize + 1);
        let feature = TokenFeature {
            input_ids,
            labels: None,
            word_ids,
            truncated_words: spans.len() - kept,
        };
        Ok((spans, feature))
    }

    /// Given words (CoNLL): featurised as in training, spans into the words joined by spaces.
    fn featurize_words(&self, words: &[String], max_len: usize) -> Result<(Vec<(usize, usize)>, TokenFeature)> {
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
    ) -> Result<Vec<Value>> {
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
                let mut v = json!({
                    "id": id, "answer": e.context_chars(start, end), "start": start, "end": end,
                    "score": score,
                });
                if let Some(d) = diff {
                    v["null_score_diff"] = json!(d);
                }
                v
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
pub fn decode_entities(text: &str, spans: &[(usize, usize)], tags: &[&str], scores: &[f32]) -> Vec<Value> {
    entities(tags)
        .into_iter()
        .map(|e| {
            let (start, end) = (spans[e.start].0, spans[e.end].1);
            let s = &scores[e.start..=e.end];
            let score = s.iter().sum::<f32>() / s.len() as f32;
            json!({"type": e.kind, "text": char_slice(text, start, end), "start": start,
                   "end": end, "score": score})
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
fn qa_options(max_len: usize, doc_stride: usize) -> Result<QaOptions> {
    if max_len < 6 {
        return Err(Error::Data(format!(
            "max_seq_length {max_len} is too short for question answering (at least 6)"
        )));
    }
    let max_query_length = ((max_len - 3) / 2).min(64);
    let window = max_len - max_query_length - 3;
    let doc_stride = if doc_stride >= window {
        tracing::info!("doc_stride {doc_stride} does not fit windows of {window} context tokens: using {}", window / 2);
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

/// `probs` with its keys in `order` (serde_json's map sorts by key; JSON keeps any order).
fn ordered(probs: Map<String, Value>, order: &[String]) -> Value {
    let body: Vec<String> = order
        .iter()
        .filter_map(|k| probs.get(k).map(|v| format!("{}:{v}", Value::from(k.as_str()))))
        .collect();
    serde_json::from_str(&format!("{{{}}}", body.join(","))).unwrap_or(Value::Object(probs))
}

fn with_id(id: &Option<Value>, v: Value) -> Value {
    match id {
        Some(id) => {
            let mut m = Map::new();
            m.insert("id".into(), id.clone());
            if let Value::Object(o) = v {
                m.extend(o);
            }
            Value::Object(m)
        }
        None => v,
    }
}
