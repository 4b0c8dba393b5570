//! Token classification: entity-level precision / recall / F1 as seqeval's default mode.
//!
//! Entities are found as seqeval 1.x's `get_entities` does (IOB1, IOB2/BIO, IOE, IOBES tags,
//! prefix before `-`): a `B-`, or an `I-` (or `E-`) after `O` or after a tag of another type,
//! starts an entity; `O`, a `B-`, or a change of type ends one. An entity counts as correct
//! when the gold and predicted tags give the same type and span.

use std::collections::HashSet;

use super::ratio;
use crate::data::batch::IGNORE;
use crate::data::finetune::LabelMap;
use crate::error::{Error, Result};

/// An entity: its type and its first and last token (inclusive, as seqeval).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Entity {
    /// The entity type (the tag after its prefix, e.g. `PER`).
    pub kind: String,
    /// Index of the first token.
    pub start: usize,
    /// Index of the last token (inclusive).
    pub end: usize,
}

/// Splits a tag into seqeval's (prefix character, type); the type of `O` is `_`.
fn split_tag(tag: &str) -> (char, &str) {
    let mut chars = tag.chars();
    let prefix = chars.next().unwrap_or('O');
    let rest = chars.as_str();
    let kind = rest.split_once('-').map_or(rest, |(_, k)| k);
    (prefix, if kind.is_empty() { "_" } else { kind })
}

fn ends(prev: char, tag: char, prev_kind: &str, kind: &str) -> bool {
    matches!(prev, 'E' | 'S')
        || (matches!(prev, 'B' | 'I') && matches!(tag, 'B' | 'S' | 'O'))
        || (prev != 'O' && prev != '.' && prev_kind != kind)
}

fn starts(prev: char, tag: char, prev_kind: &str, kind: &str) -> bool {
    matches!(tag, 'B' | 'S')
        || (matches!(prev, 'E' | 'S' | 'O') && matches!(tag, 'E' | 'I'))
        || (tag != 'O' && tag != '.' && prev_kind != kind)
}

/// The entities of one sentence's tags.
pub fn entities<S: AsRef<str>>(tags: &[S]) -> Vec<Entity> {
    let mut out = Vec::new();
    let (mut prev, mut prev_kind, mut begin) = ('O', "", 0);
    let sentinel = [String::from("O")];
    let all = tags
        .iter()
        .map(|t| t.as_ref())
        .chain(sentinel.iter().map(|s| s.as_str()));
    for (i, t) in all.enumerate() {
        let (tag, kind) = split_tag(t);
        if ends(prev, tag, prev_kind, kind) {
            out.push(Entity {
                kind: prev_kind.to_string(),
                start: begin,
                end: i - 1,
            });
        }
        if starts(prev, tag, prev_kind, kind) {
            begin = i;
        }
        (prev, prev_kind) = (tag, kind);
    }
    out
}

/// Entity and token counts over sentences.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EntityCounts {
    /// Predicted entities that are also gold entities.
    pub correct: u64,
    /// Predicted entities.
    pub predicted: u64,
    /// Gold entities.
    pub gold: u64,
    /// Tokens whose predicted tag equals the gold tag.
    pub tokens_correct: u64,
    /// Tokens scored.
    pub tokens: u64,
    /// Sentences scored.
    pub sentences: u64,
}

impl EntityCounts {
    /// Adds one sentence's gold and predicted tags (as many).
    pub fn add_sentence<S: AsRef<str>, T: AsRef<str>>(
        &mut self,
        gold: &[S],
        predicted: &[T],
    ) -> Result<()> {
        if gold.len() != predicted.len() {
            return Err(Error::Metrics(format!(
                "a sentence has {} gold tags but {} predicted tags",
                gold.len(),
                predicted.len()
            )));
        }
        let g: HashSet<Entity> = entities(gold).into_iter().collect();
        let p: HashSet<Entity> = entities(predicted).into_iter().collect();
        self.correct += g.intersection(&p).count() as u64;
        self.gold += g.len() as u64;
        self.predicted += p.len() as u64;
        self.tokens += gold.len() as u64;
        self.tokens_correct += gold
            .iter()
            .zip(predicted)
            .filter(|(a, b)| a.as_ref() == b.as_ref())
            .count() as u64;
        self.sentences += 1;
        Ok(())
    }

    /// Adds one sequence of label ids and predicted ids (per position), keeping the
    /// positions whose label is not [`IGNORE`] (first sub-tokens), as HF `run_ner.py`.
    pub fn add_positions(
        &mut self,
        labels: &[i64],
        predicted: &[u32],
        names: &LabelMap,
    ) -> Result<()> {
        if labels.len() != predicted.len() {
            return Err(Error::Metrics(format!(
                "{} labels but {} predictions",
                labels.len(),
                predicted.len()
            )));
        }
        let name = |id: i64| {
            u32::try_from(id)
                .ok()
                .and_then(|i| names.name(i))
                .ok_or_else(|| Error::Metrics(format!("label id {id} is not in the label map")))
        };
        let mut gold = Vec::new();
        let mut pred = Vec::new();
        for (l, p) in labels.iter().zip(predicted) {
            if *l != IGNORE {
                gold.push(name(*l)?);
                pred.push(name(*p as i64)?);
            }
        }
        self.add_sentence(&gold, &pred)
    }

    pub(crate) fn merge(&mut self, o: &EntityCounts) {
        self.correct += o.correct;
        self.predicted += o.predicted;
        self.gold += o.gold;
        self.tokens_correct += o.tokens_correct;
        self.tokens += o.tokens;
        self.sentences += o.sentences;
    }

    pub(crate) fn to_counts(&self) -> [u64; 6] {
        [
            self.correct,
            self.predicted,
            self.gold,
            self.tokens_correct,
            self.tokens,
            self.sentences,
        ]
    }

    pub(crate) fn from_counts(c: &[u64]) -> Self {
        EntityCounts {
            correct: c[0],
            predicted: c[1],
            gold: c[2],
            tokens_correct: c[3],
            tokens: c[4],
            sentences: c[5],
        }
    }

    /// Correct / predicted entities (0 when nothing is predicted).
    pub fn precision(&self) -> f64 {
        ratio(self.correct as f64, self.predicted as f64)
    }

    /// Correct / gold entities (0 when there is no gold entity).
    pub fn recall(&self) -> f64 {
        ratio(self.correct as f64, self.gold as f64)
    }

    /// Harmonic mean of precision and recall (0 when both are 0).
    pub fn f1(&self) -> f64 {
        let (p, r) = (self.precision(), self.recall());
        ratio(2.0 * p * r, p + r)
    }

    /// Token-level accuracy (seqeval's `accuracy_score`).
    pub fn accuracy(&self) -> f64 {
        ratio(self.tokens_correct as f64, self.tokens as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spans(tags: &[&str]) -> Vec<(String, usize, usize)> {
        entities(tags)
            .into_iter()
            .map(|e| (e.kind, e.start, e.end))
            .collect()
    }

    #[test]
    fn follows_seqeval_get_entities() {
        // seqeval's own docstring example.
        let t = ["B-PER", "I-PER", "O", "B-LOC"];
        assert_eq!(spans(&t), [("PER".into(), 0, 1), ("LOC".into(), 3, 3)]);
        // IOBES: S- is a single-token entity; E- closes one.
        let t = ["S-LOC", "B-ORG", "E-ORG", "S-LOC", "S-LOC"];
        assert_eq!(
            spans(&t),
            [
                ("LOC".into(), 0, 0),
                ("ORG".into(), 1, 2),
                ("LOC".into(), 3, 3),
                ("LOC".into(), 4, 4)
            ]
        );
    }
}
