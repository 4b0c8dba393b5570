//! Extractive QA: the official SQuAD v2.0 evaluation (normalisation, exact match, token F1)
//! and HF `postprocess_qa_predictions` (logits → answer text).

use std::collections::HashMap;

use super::ratio;
use crate::data::finetune::{QaExample, QaFeature};
use crate::error::{Error, Result};

/// Per-question F1 is summed in millionths (an exact, reducible count).
pub const F1_SCALE: f64 = 1e6;

/// Python's `str.isspace` (Rust's `is_whitespace` plus the separators U+001C..U+001F).
fn is_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `re` `\w` on `str` (Unicode alphanumerics and `_`).
fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The official `normalize_answer`: lower-case, drop ASCII punctuation (`string.punctuation`),
/// replace the words `a`, `an`, `the` by a space (`\b(a|an|the)\b`), collapse whitespace.
pub fn normalize_answer(s: &str) -> String {
    let lowered: String = s
        .to_lowercase()
        .chars()
        .filter(|c| !c.is_ascii_punctuation())
        .collect();
    // Runs of word characters are the only places `\b(a|an|the)\b` can match, whole.
    let mut no_articles = String::with_capacity(lowered.len());
    let mut rest = lowered.as_str();
    while let Some(c) = rest.chars().next() {
        let w = is_word(c);
        let n = rest.find(|x: char| is_word(x) != w).unwrap_or(rest.len());
        let (run, tail) = rest.split_at(n);
        no_articles.push_str(if w && matches!(run, "a" | "an" | "the") {
            " "
        } else {
            run
        });
        rest = tail;
    }
    no_articles
        .split(is_space)
        .filter(|t| !t.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

fn tokens(s: &str) -> Vec<String> {
    normalize_answer(s)
        .split(' ')
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

/// `compute_exact`: the normalised answers are equal.
pub fn exact_match(gold: &str, predicted: &str) -> bool {
    normalize_answer(gold) == normalize_answer(predicted)
}

/// `compute_f1`: F1 of the normalised tokens as multisets; when either side is empty, 1 if
/// both are and 0 otherwise.
pub fn token_f1(gold: &str, predicted: &str) -> f64 {
    let (g, p) = (tokens(gold), tokens(predicted));
    if g.is_empty() || p.is_empty() {
        return f64::from(u8::from(g == p));
    }
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for t in &g {
        *counts.entry(t).or_default() += 1;
    }
    let mut same = 0usize;
    for t in &p {
        if let Some(c) = counts.get_mut(t.as_str()).filter(|c| **c > 0) {
            *c -= 1;
            same += 1;
        }
    }
    if same == 0 {
        return 0.0;
    }
    let (precision, recall) = (same as f64 / p.len() as f64, same as f64 / g.len() as f64);
    2.0 * precision * recall / (precision + recall)
}

/// Sums over questions (exact matches, F1 in millionths, count), with the questions that
/// have gold answers counted apart (`HasAns`; `NoAns` is the rest).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SquadCounts {
    /// Questions whose prediction matches a gold answer exactly (after normalisation).
    pub exact: u64,
    /// Σ per-question F1, in millionths ([`F1_SCALE`]).
    pub f1_micros: u64,
    /// Questions scored.
    pub total: u64,
    /// `exact` over the questions with gold answers.
    pub has_ans_exact: u64,
    /// `f1_micros` over the questions with gold answers.
    pub has_ans_f1_micros: u64,
    /// Questions with gold answers.
    pub has_ans_total: u64,
}

impl SquadCounts {
    /// Scores one question as `get_raw_scores`: the best over the gold answers that do not
    /// normalise to nothing; with none, the only correct prediction is the empty string.
    pub fn add<S: AsRef<str>>(&mut self, gold_answers: &[S], predicted: &str) {
        let mut golds: Vec<&str> = gold_answers
            .iter()
            .map(|a| a.as_ref())
            .filter(|a| !normalize_answer(a).is_empty())
            .collect();
        if golds.is_empty() {
            golds.push("");
        }
        let exact = golds.iter().any(|g| exact_match(g, predicted));
        let f1 = golds
            .iter()
            .map(|g| token_f1(g, predicted))
            .fold(0.0, f64::max);
        let f1 = (f1 * F1_SCALE).round() as u64;
        self.exact += u64::from(exact);
        self.f1_micros += f1;
        self.total += 1;
        if !gold_answers.is_empty() {
            self.has_ans_exact += u64::from(exact);
            self.has_ans_f1_micros += f1;
            self.has_ans_total += 1;
        }
    }

    /// Scores a prediction of `example`.
    pub fn add_example(&mut self, example: &QaExample, predicted: &str) {
        let golds: Vec<&str> = example.answers.iter().map(|(t, _)| t.as_str()).collect();
        self.add(&golds, predicted);
    }

    /// Scores predictions of `examples`, matched by id; every example needs one.
    pub fn add_predictions(
        &mut self,
        examples: &[QaExample],
        predictions: &[QaPrediction],
    ) -> Result<()> {
        let by_id: HashMap<&str, &str> = predictions
            .iter()
            .map(|p| (p.id.as_str(), p.text.as_str()))
            .collect();
        for e in examples {
            let p = by_id
                .get(e.id.as_str())
                .ok_or_else(|| Error::Metrics(format!("no prediction for question `{}`", e.id)))?;
            self.add_example(e, p);
        }
        Ok(())
    }

    pub(crate) fn merge(&mut self, o: &SquadCounts) {
        self.exact += o.exact;
        self.f1_micros += o.f1_micros;
        self.total += o.total;
        self.has_ans_exact += o.has_ans_exact;
        self.has_ans_f1_micros += o.has_ans_f1_micros;
        self.has_ans_total += o.has_ans_total;
    }

    pub(crate) fn to_counts(&self) -> [u64; 6] {
        [
            self.exact,
            self.f1_micros,
            self.total,
            self.has_ans_exact,
            self.has_ans_f1_micros,
            self.has_ans_total,
        ]
    }

    pub(crate) fn from_counts(c: &[u64]) -> Self {
        SquadCounts {
            exact: c[0],
            f1_micros: c[1],
            total: c[2],
            has_ans_exact: c[3],
            has_ans_f1_micros: c[4],
            has_ans_total: c[5],
        }
    }

    /// Exact matches / questions (0 for no questions).
    pub fn exact_match(&self) -> f64 {
        ratio(self.exact as f64, self.total as f64)
    }

    /// Mean per-question F1 (0 for no questions).
    pub fn f1(&self) -> f64 {
        ratio(self.f1_micros as f64 / F1_SCALE, self.total as f64)
    }

    /// Exact match over the questions with gold answers.
    pub fn has_ans_exact_match(&self) -> f64 {
        ratio(self.has_ans_exact as f64, self.has_ans_total as f64)
    }

    /// Mean F1 over the questions with gold answers.
    pub fn has_ans_f1(&self) -> f64 {
        ratio(
            self.has_ans_f1_micros as f64 / F1_SCALE,
            self.has_ans_total as f64,
        )
    }

    /// Questions without gold answers (unanswerable).
    pub fn no_ans_total(&self) -> u64 {
        self.total.saturating_sub(self.has_ans_total)
    }

    /// For unanswerable questions exact match and F1 agree (empty prediction or not).
    pub fn no_ans_exact_match(&self) -> f64 {
        ratio(
            self.exact.saturating_sub(self.has_ans_exact) as f64,
            self.no_ans_total() as f64,
        )
    }
}

/// Settings of [`postprocess_qa`] (HF `run_qa.py` defaults).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QaPostprocess {
    /// Start and end candidates per window, and answers kept per example (20).
    pub n_best_size: usize,
    /// Longest answer in tokens (30).
    pub max_answer_length: usize,
    /// SQuAD v2.0: the `[CLS]` score is a null answer that can win.
    pub version_2_with_negative: bool,
    /// Predict no answer when `null score - best span score` exceeds this (0).
    pub null_score_diff_threshold: f32,
}

impl Default for QaPostprocess {
    fn default() -> Self {
        QaPostprocess {
            n_best_size: 20,
            max_answer_length: 30,
            version_2_with_negative: false,
            null_score_diff_threshold: 0.0,
        }
    }
}

/// The answer to one question.
#[derive(Clone, Debug, PartialEq)]
pub struct QaPrediction {
    /// The question's id, as in its example.
    pub id: String,
    /// The answer text from the context; empty for no answer.
    pub text: String,
    /// Start + end logit of the best span, if any span was valid.
    pub score: Option<f32>,
    /// v2.0: the minimum `[CLS]` score over the windows minus `score` (`None` without a span).
    pub null_score_diff: Option<f32>,
}

/// Indices of the `n` largest values, largest first (lower index first on a tie).
fn top_n(x: &[f32], n: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_by(|a, b| {
        x[*b]
            .partial_cmp(&x[*a])
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    idx.truncate(n);
    idx
}

/// Picks each example's answer from its windows' logits (`start_logits[i]`, `end_logits[i]`
/// belong to `features[i]`; positions past the feature's length are ignored), as HF
/// `postprocess_qa_predictions`: the `n_best_size` best starts × ends of each window, kept
/// when both are context tokens, `start ≤ end` and the span is at most `max_answer_length`
/// tokens; the best score over all windows wins. In v2.0 mode the null score is the smallest
/// `[CLS]` start + end over the windows, and wins when it beats the best span by more than the
/// threshold.
///
/// Ours: with no valid span the answer is empty (HF answers the text `"empty"`).
pub fn postprocess_qa(
    examples: &[QaExample],
    features: &[QaFeature],
    start_logits: &[Vec<f32>],
    end_logits: &[Vec<f32>],
    opts: &QaPostprocess,
) -> Result<Vec<QaPrediction>> {
    if start_logits.len() != features.len() || end_logits.len() != features.len() {
        return Err(Error::Metrics(format!(
            "{} features but {} start and {} end logit rows",
            features.len(),
            start_logits.len(),
            end_logits.len()
        )));
    }
    let mut windows: Vec<Vec<usize>> = vec![Vec::new(); examples.len()];
    for (i, f) in features.iter().enumerate() {
        let w = windows.get_mut(f.example_index).ok_or_else(|| {
            Error::Metrics(format!(
                "feature {i} belongs to example {}, but there are {} examples",
                f.example_index,
                examples.len()
            ))
        })?;
        w.push(i);
    }
    let mut out = Vec::with_capacity(examples.len());
    for (e, window) in examples.iter().zip(&windows) {
        let mut null: Option<f32> = None;
        // (score, first char, end char), in HF's order of discovery.
        let mut spans: Vec<(f32, usize, usize)> = Vec::new();
        for &i in window {
            let (f, s, t) = (&features[i], &start_logits[i], &end_logits[i]);
            let n = f.input_ids.len();
            if s.len() < n || t.len() < n || f.offsets.len() != n {
                return Err(Error::Metrics(format!(
                    "feature {i} has {n} tokens, {} offsets, {} start and {} end logits",
                    f.offsets.len(),
                    s.len(),
                    t.len()
                )));
            }
            let cls = s[0] + t[0];
            null = Some(null.map_or(cls, |x| x.min(cls)));
            let ends = top_n(&t[..n], opts.n_best_size);
            for a in top_n(&s[..n], opts.n_best_size) {
                for &b in &ends {
                    let (Some(oa), Some(ob)) = (f.offsets[a], f.offsets[b]) else {
                        continue;
                    };
                    if b < a || b - a + 1 > opts.max_answer_length {
                        continue;
                    }
                    spans.push((s[a] + t[b], oa.0, ob.1));
                }
            }
        }
        // Stable: equal scores keep their order of discovery, as Python's `sorted`.
        spans.sort_by(|x, y| y.0.partial_cmp(&x.0).unwrap_or(std::cmp::Ordering::Equal));
        spans.truncate(opts.n_best_size);
        let best = spans
            .iter()
            .map(|(score, a, b)| (*score, e.context_chars(*a, *b)))
            .find(|(_, text)| !text.is_empty());
        let (text, score, diff) = match (best, opts.version_2_with_negative) {
            (None, _) => (String::new(), None, None),
            (Some((score, text)), false) => (text.to_string(), Some(score), None),
            (Some((score, text)), true) => {
                let diff = null.unwrap_or(f32::NEG_INFINITY) - score;
                let text = if diff > opts.null_score_diff_threshold {
                    ""
                } else {
                    text
                };
                (text.to_string(), Some(score), Some(diff))
            }
        };
        out.push(QaPrediction {
            id: e.id.clone(),
            text,
            score,
            null_score_diff: diff,
        });
    }
    Ok(out)
}
