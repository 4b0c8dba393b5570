//! Evaluation metrics from reducible counts.
//!
//! Every metric is a function of integer counts that add up over disjoint parts of an
//! evaluation set, so each rank counts its part, the ranks all-reduce (sum) the counts, and
//! the metric of the sum equals the metric of the whole set, whatever the number of ranks:
//!
//! - [`ConfusionMatrix`] → `accuracy`, `macro_f1` (sklearn's `f1_score(average="macro")`,
//!   `zero_division=0`) for sequence and pair classification;
//! - [`EntityCounts`] → entity-level `precision`, `recall`, `f1` as seqeval's default mode,
//!   and token `accuracy`, for token classification;
//! - [`SquadCounts`] → `exact_match`, `f1` as the official SQuAD v2.0 script (v1.1 gives the
//!   same numbers when every question has an answer), with the has-answer / no-answer split.
//!   Per-question F1 is summed in fixed point (millionths) to stay an exact count.
//!
//! [`postprocess_qa`] turns per-window start/end logits into answer texts (HF
//! `postprocess_qa_predictions`); it needs all windows of an example, so split a QA evaluation
//! set between ranks by example, not by window.
//!
//! Metrics are fractions in [0, 1] (the SQuAD script prints percentages).
//!
//! [`MetricCounts`] wraps one of the counters for the wire: [`MetricCounts::to_vec`] gives
//! `f32`s to all-reduce with the gradient collectives, [`MetricCounts::from_vec`] reads the sum
//! back. Each count travels as three `f32` parts of 12, 12 and the remaining bits, so sums
//! stay exact for up to 4096 ranks and totals below 2^48.

#![warn(missing_docs)]

mod classification;
mod entities;
mod squad;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub use classification::ConfusionMatrix;
pub use entities::{entities, Entity, EntityCounts};
pub use squad::{
    exact_match, normalize_answer, postprocess_qa, token_f1, QaPostprocess, QaPrediction,
    SquadCounts, F1_SCALE,
};

/// Which counter a [`MetricCounts`] holds (and so the length of its vector).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricKind {
    /// A [`ConfusionMatrix`] over `num_labels` labels.
    Classification {
        /// Number of labels (rows and columns of the matrix).
        num_labels: usize,
    },
    /// [`EntityCounts`], for token classification.
    Entities,
    /// [`SquadCounts`], for question answering.
    Squad,
}

/// The counts of one task's metrics, on one rank or summed over ranks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetricCounts {
    /// Sequence or pair classification.
    Classification(ConfusionMatrix),
    /// Token classification.
    Entities(EntityCounts),
    /// Extractive question answering.
    Squad(SquadCounts),
}

/// Bits of a count in each of its lower `f32` parts.
const PART_BITS: u32 = 12;
/// Largest integer an `f32` holds exactly.
const F32_EXACT: f32 = 16_777_216.0;

impl MetricCounts {
    /// Zero counts of `kind`.
    pub fn new(kind: MetricKind) -> Self {
        match kind {
            MetricKind::Classification { num_labels } => {
                MetricCounts::Classification(ConfusionMatrix::new(num_labels))
            }
            MetricKind::Entities => MetricCounts::Entities(EntityCounts::default()),
            MetricKind::Squad => MetricCounts::Squad(SquadCounts::default()),
        }
    }

    /// Which counter this holds (the `kind` to read a summed vector back with).
    pub fn kind(&self) -> MetricKind {
        match self {
            MetricCounts::Classification(m) => MetricKind::Classification {
                num_labels: m.num_labels(),
            },
            MetricCounts::Entities(_) => MetricKind::Entities,
            MetricCounts::Squad(_) => MetricKind::Squad,
        }
    }

    fn counts(&self) -> Vec<u64> {
        match self {
            MetricCounts::Classification(m) => m.counts().to_vec(),
            MetricCounts::Entities(c) => c.to_counts().to_vec(),
            MetricCounts::Squad(c) => c.to_counts().to_vec(),
        }
    }

    /// The counts as `f32`s for an all-reduce (sum); see the module comment.
    pub fn to_vec(&self) -> Vec<f32> {
        let mask = (1u64 << PART_BITS) - 1;
        let mut out = Vec::new();
        for c in self.counts() {
            out.push((c & mask) as f32);
            out.push(((c >> PART_BITS) & mask) as f32);
            out.push((c >> (2 * PART_BITS)) as f32);
        }
        out
    }

    /// Reads counts of `kind` from [`MetricCounts::to_vec`]'s layout (or a sum of such
    /// vectors); a wrong length or a part that is not a whole number fails.
    pub fn from_vec(kind: MetricKind, v: &[f32]) -> Result<Self> {
        let want = 3 * Self::new(kind).counts().len();
        if v.len() != want {
            return Err(Error::Metrics(format!(
                "{kind:?} counts need {want} values, got {}",
                v.len()
            )));
        }
        let mut counts = Vec::with_capacity(want / 3);
        for (i, p) in v.chunks_exact(3).enumerate() {
            if let Some(x) = p
                .iter()
                .find(|x| !(x.is_finite() && **x >= 0.0 && x.fract() == 0.0 && **x <= F32_EXACT))
            {
                return Err(Error::Metrics(format!(
                    "count {i} has the part {x}; expected a whole number in 0..=2^24"
                )));
            }
            let part = |k: usize| (p[k] as u64) << (k as u32 * PART_BITS);
            counts.push(part(0) + part(1) + part(2));
        }
        Ok(match kind {
            MetricKind::Classification { num_labels } => {
                MetricCounts::Classification(ConfusionMatrix::from_counts(num_labels, counts)?)
            }
            MetricKind::Entities => MetricCounts::Entities(EntityCounts::from_counts(&counts)),
            MetricKind::Squad => MetricCounts::Squad(SquadCounts::from_counts(&counts)),
        })
    }

    /// Adds `other`'s counts (of the same kind) to these.
    pub fn merge(&mut self, other: &MetricCounts) -> Result<()> {
        match (self, other) {
            (MetricCounts::Classification(a), MetricCounts::Classification(b)) => a.merge(b),
            (MetricCounts::Entities(a), MetricCounts::Entities(b)) => {
                a.merge(b);
                Ok(())
            }
            (MetricCounts::Squad(a), MetricCounts::Squad(b)) => {
                a.merge(b);
                Ok(())
            }
            (a, b) => Err(Error::Metrics(format!(
                "cannot merge {:?} counts into {:?} counts",
                b.kind(),
                a.kind()
            ))),
        }
    }

    /// Named metrics: `accuracy`, `macro_f1` (classification); `precision`, `recall`, `f1`,
    /// `accuracy` (entities); `exact_match`, `f1` and the `has_ans_` / `no_ans_` split (SQuAD);
    /// and `examples` (sentences for entities), the number of evaluated items.
    pub fn summary(&self) -> BTreeMap<&'static str, f64> {
        let mut m = BTreeMap::new();
        match self {
            MetricCounts::Classification(c) => {
                m.insert("accuracy", c.accuracy());
                m.insert("macro_f1", c.macro_f1());
                m.insert("examples", c.total() as f64);
            }
            MetricCounts::Entities(c) => {
                m.insert("precision", c.precision());
                m.insert("recall", c.recall());
                m.insert("f1", c.f1());
                m.insert("accuracy", c.accuracy());
                m.insert("examples", c.sentences as f64);
            }
            MetricCounts::Squad(c) => {
                m.insert("exact_match", c.exact_match());
                m.insert("f1", c.f1());
                m.insert("examples", c.total as f64);
                if c.has_ans_total > 0 {
                    m.insert("has_ans_exact_match", c.has_ans_exact_match());
                    m.insert("has_ans_f1", c.has_ans_f1());
                    m.insert("has_ans_examples", c.has_ans_total as f64);
                }
                if c.no_ans_total() > 0 {
                    m.insert("no_ans_exact_match", c.no_ans_exact_match());
                    m.insert("no_ans_f1", c.no_ans_exact_match());
                    m.insert("no_ans_examples", c.no_ans_total() as f64);
                }
            }
        }
        m
    }
}

/// Index of the largest value (the first on a tie, as `numpy.argmax`); 0 for an empty slice.
/// NaN never wins.
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] || x[best].is_nan() && !v.is_nan() {
            best = i;
        }
    }
    best
}

/// `a / b`, 0 when `b` is 0 (`zero_division=0`).
pub(crate) fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 {
        0.0
    } else {
        a / b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_survive_the_f32_wire_and_sum_exactly() {
        let a = SquadCounts {
            exact: (1 << 47) + 12345,
            f1_micros: 987_654_321_012,
            total: 3,
            ..SquadCounts::default()
        };
        let m = MetricCounts::Squad(a);
        let v = m.to_vec();
        assert_eq!(MetricCounts::from_vec(MetricKind::Squad, &v).unwrap(), m);
        // 4096 ranks holding a count whose parts are all 0xfff still sum exactly.
        let c = SquadCounts {
            exact: (1 << 36) - 1,
            ..SquadCounts::default()
        };
        let v = MetricCounts::Squad(c).to_vec();
        let sum: Vec<f32> = v.iter().map(|x| x * 4096.0).collect();
        let MetricCounts::Squad(s) = MetricCounts::from_vec(MetricKind::Squad, &sum).unwrap()
        else {
            panic!("kind changed")
        };
        assert_eq!(s.exact, ((1 << 36) - 1) * 4096);
        assert!(MetricCounts::from_vec(MetricKind::Squad, &v[1..]).is_err());
        let mut bad = v.clone();
        bad[0] = 0.5;
        assert!(MetricCounts::from_vec(MetricKind::Squad, &bad).is_err());
    }

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.1, 3.0, 3.0, -1.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 1.0]), 1);
        assert_eq!(argmax(&[]), 0);
    }
}
