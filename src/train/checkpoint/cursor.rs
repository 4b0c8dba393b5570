//! The data position of a stage (its cursor) and the ledger of what its committed steps
//! consumed: the proof that every instance of an epoch was used exactly once.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The data position of a stage. An epoch's instances form one sequence (`data::epoch`),
/// split into contiguous partitions (balanced for the world size at the epoch's start); each
/// is consumed in order, so a count per partition is an exact cursor, whatever world size
/// resumes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DataCursor {
    /// The epoch in progress.
    pub epoch: u32,
    /// Instances consumed per partition (empty: the epoch has not started).
    pub consumed: Vec<u64>,
    /// Where each partition starts in the epoch's sequence, and the sequence's end (one more
    /// entry than `consumed`; empty when the epoch has not started). Cursors written before
    /// partitions were ranges of the sequence have none (and a `partitions` count, ignored).
    #[serde(default)]
    pub bounds: Vec<u64>,
}

/// Instances `[start, end)` of one partition of one epoch, consumed in committed steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerRange {
    /// The epoch the range belongs to.
    pub epoch: u32,
    /// How many partitions the epoch was split into.
    pub partitions: u32,
    /// The partition the range lies in.
    pub partition: u32,
    /// First instance of the range.
    pub start: u64,
    /// One past the range's last instance.
    pub end: u64,
}

/// Per epoch: instances planned, consumed (union of committed ranges) and consumed more
/// than once — the proof that every instance of an epoch was used exactly once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochLedger {
    /// The epoch counted.
    pub epoch: u32,
    /// Instances the epoch's plan holds.
    pub instances_planned: u64,
    /// Distinct instances consumed in committed steps.
    pub instances_consumed: u64,
    /// Instances consumed more than once (each extra use counted).
    pub instances_repeated: u64,
}

/// Summarises ledger ranges per epoch; `planned` gives each epoch's instance total.
pub fn epoch_ledgers(ranges: &[LedgerRange], planned: &BTreeMap<u32, u64>) -> Vec<EpochLedger> {
    let mut by_stream: BTreeMap<(u32, u32, u32), Vec<(u64, u64)>> = BTreeMap::new();
    for r in ranges {
        by_stream
            .entry((r.epoch, r.partitions, r.partition))
            .or_default()
            .push((r.start, r.end));
    }
    let mut out: BTreeMap<u32, EpochLedger> = planned
        .iter()
        .map(|(&e, &p)| {
            (
                e,
                EpochLedger {
                    epoch: e,
                    instances_planned: p,
                    instances_consumed: 0,
                    instances_repeated: 0,
                },
            )
        })
        .collect();
    for ((epoch, _, _), mut v) in by_stream {
        v.sort();
        let e = out.entry(epoch).or_insert(EpochLedger {
            epoch,
            instances_planned: 0,
            instances_consumed: 0,
            instances_repeated: 0,
        });
        let mut covered_to = 0u64;
        for (s, t) in v {
            let total = t.saturating_sub(s);
            let overlap = covered_to.saturating_sub(s).min(total);
            e.instances_repeated += overlap;
            e.instances_consumed += total - overlap;
            covered_to = covered_to.max(t);
        }
    }
    out.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ledger_counts_union_and_repeats() {
        let r = |partition, start, end| LedgerRange {
            epoch: 0,
            partitions: 2,
            partition,
            start,
            end,
        };
        let planned = BTreeMap::from([(0, 30), (1, 10)]);
        let l = epoch_ledgers(
            &[r(0, 0, 10), r(1, 0, 5), r(0, 10, 20), r(1, 5, 10)],
            &planned,
        );
        assert_eq!(
            l[0],
            EpochLedger {
                epoch: 0,
                instances_planned: 30,
                instances_consumed: 30,
                instances_repeated: 0
            }
        );
        assert_eq!(l[1].instances_consumed, 0);
        // A resume from an older cursor than the committed one shows up as a repeat.
        let l = epoch_ledgers(&[r(0, 0, 10), r(0, 6, 12)], &planned);
        assert_eq!((l[0].instances_consumed, l[0].instances_repeated), (12, 4));
    }
}
