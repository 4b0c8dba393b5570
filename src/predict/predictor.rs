//! A loaded task model with its tokenizer and labels, predicting batches of inputs.

use super::inputs::{check_pairs, is_squad, read_questions, read_texts, read_token_texts};
use super::output::answer_spans;
use super::*;

/// A loaded task model with its tokenizer and label names.
pub struct Predictor {
    /// The fine-tuned model (encoder and task head).
    pub model: TaskModel,
    /// The tokenizer the model was trained with.
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

    /// `max_seq_length` (given, or the tokenizer's model_max_length as transformers would
    /// truncate), at most the model's positions.
    fn max_seq_length(&self, want: Option<usize>) -> usize {
        let want = match want {
            Some(n) => {
                self.tokenizer.warn_beyond_max_length(n, "--max-seq-length");
                n
            }
            None => (self.tokenizer.model_max_length()).unwrap_or(super::DEFAULT_MAX_SEQ_LENGTH),
        };
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
