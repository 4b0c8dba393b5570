//! A deterministic WordPiece vocabulary learner.
//!
//! HF `tokenizers`' `WordPieceTrainer` (a BPE trainer underneath) breaks ties between equally
//! frequent pairs by ids it hands out in hash-map order, so two trainings on the same corpus
//! give different vocabularies, and a job's model could not be reproduced from its config and
//! seed. This learner runs the same algorithm — start from the characters (`##` marks a
//! character inside a word), repeatedly merge the most frequent adjacent pair — with every
//! choice ordered: by count, then by the merged string. Words come from HF's own BERT
//! normaliser and pre-tokeniser, and the vocabulary is used by HF's WordPiece model, so only
//! the learning is ours.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};

/// Learns up to `vocab_size` tokens (specials first, then the alphabet, then merges in
/// order) from `(word, count)` pairs. Merges stop early when the best pair occurs fewer than
/// `min_frequency` times.
pub fn learn(
    words: &BTreeMap<String, u64>,
    vocab_size: usize,
    min_frequency: u64,
    specials: &[&str],
    prefix: &str,
) -> Vec<String> {
    let mut vocab: Vec<String> = specials.iter().map(|s| s.to_string()).collect();
    let mut ids: HashMap<String, u32> = vocab
        .iter()
        .enumerate()
        .map(|(i, s)| (s.clone(), i as u32))
        .collect();
    let add = |vocab: &mut Vec<String>, ids: &mut HashMap<String, u32>, s: String| -> u32 {
        if let Some(&i) = ids.get(&s) {
            return i;
        }
        let i = vocab.len() as u32;
        ids.insert(s.clone(), i);
        vocab.push(s);
        i
    };
    // The alphabet, in a fixed order: word-initial characters, then continuations.
    let mut initial = BTreeSet::new();
    let mut inner = BTreeSet::new();
    for w in words.keys() {
        for (k, c) in w.chars().enumerate() {
            if k == 0 {
                initial.insert(c);
            } else {
                inner.insert(c);
            }
        }
    }
    for c in initial {
        add(&mut vocab, &mut ids, c.to_string());
    }
    for c in inner {
        add(&mut vocab, &mut ids, format!("{prefix}{c}"));
    }
    // Words as symbol sequences.
    let mut seqs: Vec<(Vec<u32>, u64)> = words
        .iter()
        .map(|(w, n)| {
            let syms = w
                .chars()
                .enumerate()
                .map(|(k, c)| {
                    ids[&if k == 0 {
                        c.to_string()
                    } else {
                        format!("{prefix}{c}")
                    }]
                })
                .collect();
            (syms, *n)
        })
        .collect();
    let mut counts: HashMap<(u32, u32), u64> = HashMap::new();
    let mut where_: HashMap<(u32, u32), BTreeSet<usize>> = HashMap::new();
    for (wi, (s, n)) in seqs.iter().enumerate() {
        for p in s.windows(2) {
            *counts.entry((p[0], p[1])).or_default() += n;
            where_.entry((p[0], p[1])).or_default().insert(wi);
        }
    }
    let merged = |vocab: &[String], p: (u32, u32)| -> String {
        let b = &vocab[p.1 as usize];
        format!(
            "{}{}",
            vocab[p.0 as usize],
            b.strip_prefix(prefix).unwrap_or(b)
        )
    };
    // Max-heap on (count, then the smallest merged string); stale entries are skipped.
    let mut heap: BinaryHeap<(u64, Reverse<String>, (u32, u32))> = counts
        .iter()
        .map(|(p, n)| (*n, Reverse(merged(&vocab, *p)), *p))
        .collect();
    while vocab.len() < vocab_size {
        let Some((n, Reverse(name), pair)) = heap.pop() else {
            break;
        };
        if counts.get(&pair).copied().unwrap_or(0) != n {
            continue; // stale: the current count was pushed again when it changed
        }
        if n < min_frequency.max(1) {
            break;
        }
        let new = add(&mut vocab, &mut ids, name);
        counts.remove(&pair);
        let affected = where_.remove(&pair).unwrap_or_default();
        let mut changed: BTreeSet<(u32, u32)> = BTreeSet::new();
        for wi in affected {
            let (syms, wn) = &mut seqs[wi];
            let wn = *wn;
            for p in syms.windows(2) {
                let key = (p[0], p[1]);
                if key != pair {
                    if let Some(c) = counts.get_mut(&key) {
                        *c -= wn;
                    }
                    changed.insert(key);
                }
            }
            let mut out = Vec::with_capacity(syms.len());
            let mut k = 0;
            while k < syms.len() {
                if k + 1 < syms.len() && (syms[k], syms[k + 1]) == pair {
                    out.push(new);
                    k += 2;
                } else {
                    out.push(syms[k]);
                    k += 1;
                }
            }
            *syms = out;
            for p in syms.windows(2) {
                let key = (p[0], p[1]);
                if key == pair {
                    continue;
                }
                *counts.entry(key).or_default() += wn;
                where_.entry(key).or_default().insert(wi);
                changed.insert(key);
            }
        }
        for key in changed {
            match counts.get(&key).copied() {
                Some(0) | None => {
                    counts.remove(&key);
                }
                Some(c) => heap.push((c, Reverse(merged(&vocab, key)), key)),
            }
        }
    }
    vocab
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(list: &[(&str, u64)]) -> BTreeMap<String, u64> {
        list.iter().map(|(w, n)| (w.to_string(), *n)).collect()
    }

    #[test]
    fn merges_the_most_frequent_pair_first_and_breaks_ties_by_name() {
        let w = words(&[
            ("hug", 10),
            ("pug", 5),
            ("pun", 12),
            ("bun", 4),
            ("hugs", 5),
        ]);
        let v = learn(&w, 100, 1, &["[UNK]"], "##");
        // Alphabet: initials b h p, then ##g ##n ##s ##u.
        assert_eq!(
            &v[..8],
            ["[UNK]", "b", "h", "p", "##g", "##n", "##s", "##u"]
        );
        // ##u##g (10+5+5 = 20) ties with ##u##n (12+4 = 16)? No: "##ug" 20 wins first.
        assert_eq!(v[8], "##ug");
        assert!(v.contains(&"hug".to_string()) && v.contains(&"pun".to_string()));
        // Deterministic: the same input gives the same vocabulary.
        assert_eq!(v, learn(&w, 100, 1, &["[UNK]"], "##"));
    }

    #[test]
    fn respects_size_and_min_frequency() {
        let w = words(&[("ab", 3), ("cd", 1)]);
        let v = learn(&w, 100, 2, &[], "##");
        assert!(v.contains(&"ab".to_string()));
        assert!(
            !v.contains(&"cd".to_string()),
            "cd occurs once, below min_frequency"
        );
        let v = learn(&w, 5, 1, &[], "##");
        assert_eq!(v.len(), 5);
    }
}
