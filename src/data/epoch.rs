//! An epoch's pre-training instances as one numbered sequence, and its split into the
//! streams (partitions) the ranks train on.
//!
//! A shard's instances depend only on (seed, epoch, shard), so once every shard's instance
//! count is known the epoch is one sequence: the plan's shards in order, each shard's
//! instances in order. Partitions are contiguous ranges of it, sized by instance counts — not
//! by shard bytes, which predict instances poorly (Hangul takes three bytes a character,
//! short documents make short instances) — so that every rank takes its full share of the
//! global batch at every step and all ranks run out at the same step.

/// The positions of an epoch's instances: where each shard of the plan's order starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EpochLayout {
    order: Vec<u32>,
    /// `starts[i]`: position of the first instance of `order[i]`; one more entry, the total.
    starts: Vec<u64>,
}

/// Instances `[from, to)` of one shard (indices within the shard's own instances).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    /// The shard's id.
    pub shard: u32,
    /// First instance of the range.
    pub from: usize,
    /// One past the last instance of the range.
    pub to: usize,
}

impl EpochLayout {
    /// `counts[i]`: how many instances shard `order[i]` yields this epoch.
    pub fn new(order: Vec<u32>, counts: &[u64]) -> Self {
        assert_eq!(
            order.len(),
            counts.len(),
            "one count per shard of the order"
        );
        let mut starts = Vec::with_capacity(order.len() + 1);
        starts.push(0u64);
        for c in counts {
            starts.push(starts.last().unwrap() + c);
        }
        EpochLayout { order, starts }
    }

    /// Instances in the epoch.
    pub fn total(&self) -> u64 {
        *self.starts.last().unwrap()
    }

    /// The shards holding positions `[start, end)`, in order, each with the part of its
    /// instances that falls inside (shards without instances are left out).
    pub fn pieces(&self, start: u64, end: u64) -> Vec<Piece> {
        let end = end.min(self.total());
        if start >= end {
            return vec![];
        }
        // The last shard starting at or before `start`.
        let mut i = self.starts.partition_point(|&s| s <= start) - 1;
        let mut out = vec![];
        while i < self.order.len() && self.starts[i] < end {
            let (lo, hi) = (start.max(self.starts[i]), end.min(self.starts[i + 1]));
            if lo < hi {
                out.push(Piece {
                    shard: self.order[i],
                    from: (lo - self.starts[i]) as usize,
                    to: (hi - self.starts[i]) as usize,
                });
            }
            i += 1;
        }
        out
    }
}

/// Partition boundaries for an epoch of `total` instances streamed by ranks that take
/// `quotas[r]` instances per step: `bounds[r]..bounds[r + 1]` is rank `r`'s partition.
///
/// With `S = ⌈total / Σ quotas⌉` steps, every rank gets `quotas[r]` instances for each of the
/// first `S − 1` steps and a share of the last, partial global batch proportional to its
/// quota (largest remainders), so no rank waits with an empty batch while another still
/// computes, and the epoch takes as many steps as one rank with the whole global batch would.
pub fn balanced_bounds(total: u64, quotas: &[usize]) -> Vec<u64> {
    let global: u64 = quotas.iter().map(|&q| q as u64).sum();
    assert!(global > 0, "balanced_bounds: the quotas sum to zero");
    let steps = total.div_ceil(global);
    let full = steps.saturating_sub(1);
    let last = total - full * global;
    // The last step's `last` instances, split in proportion to the quotas.
    let mut share: Vec<u64> = quotas.iter().map(|&q| last * q as u64 / global).collect();
    let mut rest = last - share.iter().sum::<u64>();
    let mut by_remainder: Vec<usize> = (0..quotas.len()).collect();
    by_remainder.sort_by_key(|&r| (std::cmp::Reverse(last * quotas[r] as u64 % global), r));
    for r in by_remainder {
        if rest == 0 {
            break;
        }
        share[r] += 1;
        rest -= 1;
    }
    let mut bounds = Vec::with_capacity(quotas.len() + 1);
    bounds.push(0u64);
    for (q, s) in quotas.iter().zip(share) {
        bounds.push(bounds.last().unwrap() + full * *q as u64 + s);
    }
    debug_assert_eq!(*bounds.last().unwrap(), total);
    bounds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cut_shards_at_the_range() {
        // Shards 7, 3, 9 with 4, 0, 5 instances: positions 0..4 are shard 7's, 4..9 shard 9's.
        let l = EpochLayout::new(vec![7, 3, 9], &[4, 0, 5]);
        assert_eq!(l.total(), 9);
        let p = |shard, from, to| Piece { shard, from, to };
        assert_eq!(l.pieces(0, 9), vec![p(7, 0, 4), p(9, 0, 5)]);
        assert_eq!(l.pieces(2, 6), vec![p(7, 2, 4), p(9, 0, 2)]);
        assert_eq!(l.pieces(4, 5), vec![p(9, 0, 1)]);
        assert_eq!(l.pieces(6, 100), vec![p(9, 2, 5)]);
        assert_eq!(l.pieces(5, 5), vec![]);
        assert_eq!(l.pieces(9, 12), vec![]);
        assert_eq!(EpochLayout::new(vec![], &[]).pieces(0, 1), vec![]);
    }

    #[test]
    fn bounds_give_every_rank_its_quota_until_the_last_step() {
        // 100 instances, global 32 = 16 + 16: 4 steps, 3 full, the last 4 split 2 + 2.
        assert_eq!(balanced_bounds(100, &[16, 16]), vec![0, 50, 100]);
        // Global 11 = 4 + 4 + 3 (not divisible): 30 = 2 × 11 + 8 → 8 split 3, 3, 2.
        assert_eq!(balanced_bounds(30, &[4, 4, 3]), vec![0, 11, 22, 30]);
        // Fewer instances than one global batch; none at all.
        assert_eq!(balanced_bounds(3, &[4, 4]), vec![0, 2, 3]);
        assert_eq!(balanced_bounds(0, &[4, 4]), vec![0, 0, 0]);
        // Exactly full steps.
        assert_eq!(balanced_bounds(64, &[16, 16]), vec![0, 32, 64]);
        assert_eq!(balanced_bounds(7, &[5]), vec![0, 7]);
    }

    #[test]
    fn bounds_finish_all_ranks_together_for_any_split() {
        for world in 1..6usize {
            for global in world..(3 * world + 2) {
                let quotas: Vec<usize> = (0..world)
                    .map(|r| global / world + usize::from(r < global % world))
                    .collect();
                for total in 0..200u64 {
                    let b = balanced_bounds(total, &quotas);
                    assert_eq!((b[0], b[world]), (0, total));
                    let steps = total.div_ceil(global as u64);
                    for r in 0..world {
                        let n = b[r + 1] - b[r];
                        let q = quotas[r] as u64;
                        // Never more than the quota allows in `steps`, never a step short
                        // before the last.
                        assert!(n <= steps * q, "{quotas:?} {total}: {b:?}");
                        assert!(
                            n >= steps.saturating_sub(1) * q,
                            "{quotas:?} {total}: {b:?}"
                        );
                    }
                }
            }
        }
    }
}
