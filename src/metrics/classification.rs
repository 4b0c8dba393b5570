//! Classification: a confusion matrix → accuracy and macro-F1.

use super::ratio;
use crate::error::{Error, Result};

/// Counts of (gold, predicted) label pairs, `counts[gold * n + predicted]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfusionMatrix {
    num_labels: usize,
    counts: Vec<u64>,
}

impl ConfusionMatrix {
    /// A matrix of `num_labels` labels with every count 0.
    pub fn new(num_labels: usize) -> Self {
        ConfusionMatrix {
            num_labels,
            counts: vec![0; num_labels * num_labels],
        }
    }

    /// A matrix from its row-major counts (`num_labels²` of them).
    pub fn from_counts(num_labels: usize, counts: Vec<u64>) -> Result<Self> {
        if counts.len() != num_labels * num_labels {
            return Err(Error::Metrics(format!(
                "a confusion matrix of {num_labels} labels needs {} counts, got {}",
                num_labels * num_labels,
                counts.len()
            )));
        }
        Ok(ConfusionMatrix { num_labels, counts })
    }

    pub(crate) fn num_labels(&self) -> usize {
        self.num_labels
    }

    /// Row-major counts, gold label by row.
    pub fn counts(&self) -> &[u64] {
        &self.counts
    }

    /// Examples with this gold and predicted label.
    pub fn count(&self, gold: u32, predicted: u32) -> u64 {
        self.counts[gold as usize * self.num_labels + predicted as usize]
    }

    /// Counts one example; a label outside `0..num_labels` fails.
    pub fn add(&mut self, gold: u32, predicted: u32) -> Result<()> {
        let n = self.num_labels;
        if gold as usize >= n || predicted as usize >= n {
            return Err(Error::Metrics(format!(
                "label pair (gold {gold}, predicted {predicted}) outside 0..{n}"
            )));
        }
        self.counts[gold as usize * n + predicted as usize] += 1;
        Ok(())
    }

    /// Adds pairs of equal-length slices.
    pub fn add_all(&mut self, gold: &[u32], predicted: &[u32]) -> Result<()> {
        if gold.len() != predicted.len() {
            return Err(Error::Metrics(format!(
                "{} gold labels but {} predictions",
                gold.len(),
                predicted.len()
            )));
        }
        gold.iter()
            .zip(predicted)
            .try_for_each(|(g, p)| self.add(*g, *p))
    }

    pub(crate) fn merge(&mut self, other: &ConfusionMatrix) -> Result<()> {
        if other.num_labels != self.num_labels {
            return Err(Error::Metrics(format!(
                "cannot merge a confusion matrix of {} labels into one of {}",
                other.num_labels, self.num_labels
            )));
        }
        self.counts
            .iter_mut()
            .zip(&other.counts)
            .for_each(|(a, b)| *a += b);
        Ok(())
    }

    pub(crate) fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    pub(crate) fn correct(&self) -> u64 {
        (0..self.num_labels)
            .map(|i| self.counts[i * self.num_labels + i])
            .sum()
    }

    /// Correct / total (0 for no examples).
    pub fn accuracy(&self) -> f64 {
        ratio(self.correct() as f64, self.total() as f64)
    }

    /// Per label: `2·tp / (gold + predicted)`, or `None` for a label in neither the gold
    /// labels nor the predictions.
    pub fn f1_per_label(&self) -> Vec<Option<f64>> {
        let n = self.num_labels;
        (0..n)
            .map(|k| {
                let tp = self.counts[k * n + k];
                let gold: u64 = self.counts[k * n..(k + 1) * n].iter().sum();
                let predicted: u64 = (0..n).map(|g| self.counts[g * n + k]).sum();
                (gold + predicted > 0).then(|| 2.0 * tp as f64 / (gold + predicted) as f64)
            })
            .collect()
    }

    /// Mean F1 over the labels present in the gold labels or the predictions, as sklearn's
    /// `f1_score(average="macro")` with the labels it infers (0 for no examples).
    pub fn macro_f1(&self) -> f64 {
        let present: Vec<f64> = self.f1_per_label().into_iter().flatten().collect();
        ratio(present.iter().sum(), present.len() as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macro_f1_skips_labels_never_seen() {
        let mut m = ConfusionMatrix::new(3);
        m.add_all(&[0, 0, 1], &[0, 1, 1]).unwrap();
        // Label 0: tp 1, gold 2, predicted 1 → 2/3. Label 1: tp 1, gold 1, predicted 2 → 2/3.
        assert_eq!(m.f1_per_label()[2], None);
        assert!((m.macro_f1() - 2.0 / 3.0).abs() < 1e-12);
        assert!(m.add(3, 0).is_err());
        assert_eq!(ConfusionMatrix::new(2).macro_f1(), 0.0);
    }
}
