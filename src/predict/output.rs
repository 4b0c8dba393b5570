//! What `tandem predict` writes, and the decoding helpers (softmax, BIO entities, QA spans).

use super::*;

/// One input's result; serialises as one JSON line (see the module comment).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Prediction {
    /// A classifier's result.
    Class(ClassPrediction),
    /// A token classifier's result.
    Tokens(TokenPrediction),
    /// A QA model's result.
    Answer(AnswerPrediction),
}

/// A classifier's result for one input: the label and every label's probability.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClassPrediction {
    /// The input's `id`, if it had one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
    /// The most probable label.
    pub label: String,
    /// Softmax over the labels, in id order.
    #[serde(serialize_with = "in_order")]
    pub probabilities: Vec<(String, f32)>,
}

/// A token classifier's result for one text: its entities and each word's label.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TokenPrediction {
    /// The input's `id`, if it had one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
    /// The text the spans refer to, when it was built from given words (CoNLL input).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// The entities decoded from the word labels, in text order.
    pub entities: Vec<EntitySpan>,
    /// Each word and its label, in text order.
    pub tokens: Vec<WordLabel>,
}

/// An entity of a text: its type, text and character span `start..end`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EntitySpan {
    /// The entity type (`PER` for `B-PER` tags).
    #[serde(rename = "type")]
    pub kind: String,
    /// The entity's text: characters `start..end` of the input text.
    pub text: String,
    /// First character of the entity (Unicode scalars).
    pub start: usize,
    /// One past the entity's last character.
    pub end: usize,
    /// Mean probability of the entity's word tags.
    pub score: f32,
}

/// One word of a token-classification input and its predicted label.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WordLabel {
    /// The word as the text spells it.
    pub word: String,
    /// `None` for a word cut off by `max_seq_length`.
    pub label: Option<String>,
}

/// A QA model's answer to one question.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AnswerPrediction {
    /// The question's id.
    pub id: Value,
    /// The answer, `context[start..end]` in characters; empty for no answer (at 0..0).
    pub answer: String,
    /// First character of the answer in the context (Unicode scalars).
    pub start: usize,
    /// One past the answer's last character.
    pub end: usize,
    /// Start + end logit of the answer (`None` for no answer).
    pub score: Option<f32>,
    /// SQuAD v2.0 mode: null score minus the best span's score.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub null_score_diff: Option<f32>,
}

/// A list of pairs as a JSON object, keeping the list's order.
pub(super) fn in_order<S: Serializer>(
    v: &[(String, f32)],
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.collect_map(v.iter().map(|(k, p)| (k, p)))
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
pub(super) fn answer_spans(
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
