//! A pre-training stage on one rank: the model starts fresh (weights broadcast from rank 0)
//! or from the assignment's checkpoint, and the feed streams the epoch's instances from the
//! coordinator's shards. An epoch is one sequence of instances split into contiguous
//! partitions (balanced for the world size at the epoch's start, dealt round-robin), each
//! consumed in order, so a count per partition is an exact cursor for any world size.

use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Arc;

use anyhow::Context;

use super::assignment::assigned_model_config;
use super::client;
use super::ctx::{precision, set_phase, Ctx};
use super::feed::{self, FeedMsg, FeedSpec, Partition, Stream};
use super::phase::Phase;
use super::stage::{StageFeed, StageRun};
use crate::comm::Collective;
use crate::config::{JobConfig, StageConfig};
use crate::data::batch::PretrainBatch;
use crate::data::epoch::{balanced_bounds, EpochLayout};
use crate::data::instances::collate;
use crate::data::shard::{plan_epoch, EpochPlan, ShardIndex};
use crate::data::tokenizer::Tokenizer;
use crate::model::PretrainModel;
use crate::proto;
use crate::train::checkpoint::{DataCursor, LedgerRange, TrainerState};

/// Examples this rank consumes per step: the global batch split over the ranks (the first
/// `G mod world` ranks take one more).
pub(super) fn quota(global: usize, world: usize, rank: usize) -> usize {
    global / world + usize::from(rank < global % world)
}

/// Partitions `0..parts` dealt round-robin: those of `rank` in a world of `world`.
fn dealt(parts: usize, world: usize, rank: usize) -> impl Iterator<Item = usize> {
    (rank..parts).step_by(world)
}

/// A mid-epoch cursor from a checkpoint must describe this epoch's sequence: partition bounds
/// from 0 to its instance count, one consumed count per partition, none past its partition.
fn check_cursor(c: &DataCursor, epoch_total: u64) -> anyhow::Result<()> {
    anyhow::ensure!(
        !c.bounds.is_empty(),
        "the checkpoint's data cursor (epoch {}) has no partition bounds: it was written by an \
         older tandem, whose partitions were lists of shards; resume it with that version, \
         or restart the stage",
        c.epoch
    );
    let fits = c.bounds.len() == c.consumed.len() + 1
        && c.bounds[0] == 0
        && c.bounds
            .windows(2)
            .zip(&c.consumed)
            .all(|(w, &done)| w[0] <= w[1] && done <= w[1] - w[0]);
    anyhow::ensure!(
        fits,
        "the checkpoint's data cursor (epoch {}) is malformed: bounds {:?}, consumed {:?}",
        c.epoch,
        c.bounds,
        c.consumed
    );
    let planned = *c.bounds.last().unwrap();
    anyhow::ensure!(
        planned == epoch_total,
        "the checkpoint's data cursor is for {planned} instances in epoch {}, but the corpus \
         now yields {epoch_total}: the corpus, the tokenizer or data.instances changed since \
         the checkpoint was written",
        c.epoch
    );
    Ok(())
}

/// The partitions of an epoch and how far each is consumed: a plain type, so that the
/// cursor and the ledger can be tested without processes.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Partitions {
    pub epoch: u32,
    /// Where each partition starts in the epoch's sequence, and the sequence's end.
    pub bounds: Vec<u64>,
    /// Instances consumed per partition (this rank's partitions only, between cuts).
    pub consumed: Vec<u64>,
    /// Every rank's consumption at the last cut (what the ledger holds up to).
    pub mark: Vec<u64>,
}

impl Partitions {
    /// Epoch `epoch` of `total` instances, from `cursor` when it is mid-way through this
    /// epoch, else fresh: bounds balanced by the ranks' quotas of the global batch.
    pub(super) fn start(
        epoch: u32,
        total: u64,
        cursor: &DataCursor,
        quotas: &[usize],
    ) -> anyhow::Result<Self> {
        let (bounds, consumed) = if cursor.epoch == epoch && !cursor.consumed.is_empty() {
            check_cursor(cursor, total)?;
            (cursor.bounds.clone(), cursor.consumed.clone())
        } else {
            (balanced_bounds(total, quotas), vec![0u64; quotas.len()])
        };
        Ok(Partitions {
            epoch,
            mark: consumed.clone(),
            bounds,
            consumed,
        })
    }

    pub(super) fn parts(&self) -> usize {
        self.bounds.len() - 1
    }

    fn len(&self, p: usize) -> u64 {
        self.bounds[p + 1] - self.bounds[p]
    }

    /// This rank's partitions, from where each was left.
    pub(super) fn mine(&self, world: usize, rank: usize) -> Vec<Partition> {
        dealt(self.parts(), world, rank)
            .map(|p| Partition {
                id: p as u32,
                start: self.bounds[p] + self.consumed[p],
                end: self.bounds[p + 1],
            })
            .collect()
    }

    /// Steps the epoch lasts from here: the largest remaining share in steps (all equal on a
    /// fresh epoch); ranks that run out take part with empty batches (no duplicates, no
    /// dropped tail).
    pub(super) fn steps_left(&self, quotas: &[usize]) -> u64 {
        let world = quotas.len();
        (0..world)
            .map(|r| {
                let left: u64 = dealt(self.parts(), world, r)
                    .map(|p| self.len(p) - self.consumed[p])
                    .sum();
                left.div_ceil(quotas[r] as u64)
            })
            .max()
            .unwrap_or(0)
    }

    /// The ledger ranges from the mark to `cursor` (every rank's consumption), which
    /// becomes the mark.
    pub(super) fn advance(&mut self, cursor: Vec<u64>, ledger: &mut Vec<LedgerRange>) {
        for (p, (&from, &to)) in self.mark.iter().zip(&cursor).enumerate() {
            if to > from {
                ledger.push(LedgerRange {
                    epoch: self.epoch,
                    partitions: self.parts() as u32,
                    partition: p as u32,
                    start: from,
                    end: to,
                });
            }
        }
        self.mark = cursor;
    }

    /// Every rank's consumption, summed over the ranks (each counts its own partitions).
    fn gather(
        &self,
        world: usize,
        rank: usize,
        comm: &mut dyn Collective,
    ) -> anyhow::Result<Vec<u64>> {
        let mut c = vec![0f32; self.parts()];
        for p in dealt(self.parts(), world, rank) {
            c[p] = self.consumed[p] as f32;
        }
        comm.all_reduce_sum(&mut c)?;
        Ok(c.iter().map(|x| *x as u64).collect())
    }

    /// The cursor at the mark.
    fn cursor(&self) -> DataCursor {
        DataCursor {
            epoch: self.epoch,
            consumed: self.mark.clone(),
            bounds: self.bounds.clone(),
        }
    }

    /// Every partition consumed to its end.
    fn ends(&self) -> Vec<u64> {
        (0..self.parts()).map(|p| self.len(p)).collect()
    }
}

/// A running epoch feed: the plan, its instances and where to send the stream plan.
type Running = (EpochPlan, (Receiver<FeedMsg>, SyncSender<Stream>));

/// Pre-training's [`StageFeed`].
struct PretrainFeed<'a> {
    ctx: &'a Ctx,
    cfg: &'a JobConfig,
    stage: &'a StageConfig,
    a: &'a proto::Assignment,
    index: Arc<ShardIndex>,
    tokenizer: Arc<Tokenizer>,
    /// Per rank, its share of the global batch.
    quotas: Vec<usize>,
    pad_to: Option<usize>,
    /// The next epoch's feed, started near the end of the current one so that its counting
    /// pass overlaps training instead of stalling every rank at the epoch's start.
    next: Option<(u32, Running)>,
    rx: Option<Receiver<FeedMsg>>,
    parts: Option<Partitions>,
    /// Steps of the epoch in progress (from where it was begun).
    steps: u64,
}

impl PretrainFeed<'_> {
    fn rank(&self) -> usize {
        self.a.rank as usize
    }
    fn world(&self) -> usize {
        self.a.world_size as usize
    }

    /// The feed of an epoch (see `feed`): it counts this rank's run of the epoch's shards at
    /// once, then waits for the stream plan.
    fn spawn(&self, epoch: u32) -> Running {
        let seed = self.cfg.job.seed;
        let plan = plan_epoch(&self.index, seed, epoch as u64, self.world());
        let (fetch_client, rt) = (self.ctx.client.clone(), self.ctx.rt.clone());
        let (jid, generation) = (self.cfg.job.name.clone(), self.a.generation);
        let feed = feed::spawn(
            FeedSpec {
                count: plan.run(self.rank()).to_vec(),
                index: self.index.clone(),
                tokenizer: self.tokenizer.clone(),
                instances: self.cfg.data.instances.clone(),
                seed,
                epoch: epoch as u64,
            },
            move |id| {
                rt.block_on(client::fetch_shard(
                    &mut fetch_client.clone(),
                    &jid,
                    generation,
                    id,
                ))
            },
        );
        (plan, feed)
    }

    /// The epoch as one sequence of instances: every rank counts the instances of its run of
    /// the plan's shards, and the counts are all-reduced into every shard's count.
    fn layout(
        &self,
        epoch: u32,
        plan: EpochPlan,
        rx: &Receiver<FeedMsg>,
        comm: &mut dyn Collective,
    ) -> anyhow::Result<EpochLayout> {
        let counts_mine = match rx.recv() {
            Ok(FeedMsg::Count { counts }) => counts,
            Ok(FeedMsg::Error(e)) => anyhow::bail!("data for epoch {epoch}: {e}"),
            _ => anyhow::bail!("data feed for epoch {epoch} ended unexpectedly"),
        };
        let mut v = vec![0f32; plan.order.len()];
        for (pos, &c) in plan.per_rank[self.rank()].clone().zip(&counts_mine) {
            // Counts travel as f32 (the ring's type): exact below 2^24.
            anyhow::ensure!(
                c < 1 << 24,
                "shard {} yields {c} instances this epoch; at most 2^24 are supported \
                 (use a smaller data.shard_size)",
                plan.order[pos]
            );
            v[pos] = c as f32;
        }
        comm.all_reduce_sum(&mut v)?;
        let counts: Vec<u64> = v.iter().map(|x| *x as u64).collect();
        Ok(EpochLayout::new(plan.order, &counts))
    }
}

impl StageFeed for PretrainFeed<'_> {
    type Model = PretrainModel;

    fn begin_epoch(
        &mut self,
        epoch: u32,
        state: &mut TrainerState,
        comm: &mut dyn Collective,
    ) -> anyhow::Result<u64> {
        let (plan, (rx, stream_tx)) = match self.next.take() {
            Some((e, f)) if e == epoch => f,
            _ => self.spawn(epoch),
        };
        let layout = Arc::new(self.layout(epoch, plan, &rx, comm)?);
        let total = layout.total();
        let parts = Partitions::start(epoch, total, &state.cursor, &self.quotas)?;
        // A feed that failed has sent its error, which the first step reads.
        let _ = stream_tx.send(Stream {
            layout,
            partitions: parts.mine(self.world(), self.rank()),
        });
        if !state.planned.iter().any(|(e, _)| *e == epoch) {
            state.planned.push((epoch, total));
        }
        let steps = parts.steps_left(&self.quotas);
        self.steps = steps;
        self.rx = Some(rx);
        self.parts = Some(parts);
        Ok(steps)
    }

    fn before_step(&mut self, left: u64, next: Option<u32>) {
        // Steps before the epoch's end at which the next epoch's feed starts counting.
        let lead = (self.steps / 4).clamp(1, 256);
        if let (None, Some(e)) = (&self.next, next) {
            if left <= lead {
                self.next = Some((e, self.spawn(e)));
            }
        }
    }

    fn next_step(&mut self) -> anyhow::Result<Vec<PretrainBatch>> {
        let (q, b) = (self.quotas[self.rank()], self.stage.batch_size);
        let (rx, parts) = (
            self.rx.as_ref().expect("epoch begun"),
            self.parts.as_mut().expect("epoch begun"),
        );
        let pad_id = self.tokenizer.pad_id();
        let (mut micro, mut inst, mut taken) = (vec![], vec![], 0);
        while taken < q {
            match rx.recv() {
                Ok(FeedMsg::Instance(p, i)) => {
                    parts.consumed[p as usize] += 1;
                    taken += 1;
                    inst.push(i);
                    if inst.len() == b {
                        micro.push(collate(&std::mem::take(&mut inst), self.pad_to, pad_id)?);
                    }
                }
                Ok(FeedMsg::Error(e)) => anyhow::bail!("data for epoch {}: {e}", parts.epoch),
                Ok(FeedMsg::Count { .. }) | Err(_) => break,
            }
        }
        if !inst.is_empty() {
            micro.push(collate(&inst, self.pad_to, pad_id)?);
        }
        Ok(micro)
    }

    fn work(&self, micro: &[PretrainBatch]) -> (usize, usize) {
        let tokens = micro.iter().map(|b| b.token_count()).sum();
        (tokens, micro.iter().map(|b| b.mlm_count()).sum())
    }

    fn cut(&mut self, state: &mut TrainerState, comm: &mut dyn Collective) -> anyhow::Result<()> {
        let (world, rank) = (self.world(), self.rank());
        let parts = self.parts.as_mut().expect("epoch begun");
        let cursor = parts.gather(world, rank, comm)?;
        parts.advance(cursor, &mut state.ledger);
        state.cursor = parts.cursor();
        Ok(())
    }

    fn end_epoch(&mut self, state: &mut TrainerState) {
        if let Some(parts) = self.parts.as_mut() {
            let ends = parts.ends();
            parts.advance(ends, &mut state.ledger);
        }
    }
}

/// The pre-training stage of assignment `a` on this rank.
pub(super) fn run_pretrain(
    a: &proto::Assignment,
    ctx: &Ctx,
    cfg: &JobConfig,
    stage: &StageConfig,
) -> anyhow::Result<()> {
    let (rank, world) = (a.rank as usize, a.world_size as usize);
    let comm = super::collective::connect_collective(a, ctx, cfg)?;
    set_phase(ctx, Phase::InitialisingModel);
    let model_cfg = assigned_model_config(a)?;
    let mut model = PretrainModel::new(&model_cfg, cfg.job.seed, &ctx.device)?;
    model.set_precision(precision(cfg, ctx, rank));
    let (run, global) = StageRun::start(a, ctx, cfg, model, comm, None)?;
    let quotas: Vec<usize> = (0..world).map(|r| quota(global, world, r)).collect();
    let mut feed = PretrainFeed {
        ctx,
        cfg,
        stage,
        a,
        index: Arc::new(serde_json::from_str(&a.shard_index_json).context("shard index")?),
        tokenizer: Arc::new(Tokenizer::from_json(&a.tokenizer_json)?),
        quotas,
        pad_to: (cfg.data.instances.pad_to_max_length).then_some(cfg.data.instances.max_seq_length),
        next: None,
        rx: None,
        parts: None,
        steps: 0,
    };
    run.run(&mut feed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mid_epoch_cursor_must_describe_this_epoch() {
        let c = DataCursor {
            epoch: 3,
            consumed: vec![5, 7],
            bounds: vec![0, 50, 100],
        };
        check_cursor(&c, 100).unwrap();
        let e = check_cursor(&c, 101).unwrap_err().to_string();
        assert!(
            e.contains("100 instances in epoch 3") && e.contains("now yields 101"),
            "{e}"
        );
        let old = DataCursor {
            bounds: vec![],
            ..c.clone()
        };
        let e = check_cursor(&old, 100).unwrap_err().to_string();
        assert!(e.contains("older tandem"), "{e}");
        let bad = DataCursor {
            bounds: vec![0, 100],
            ..c.clone()
        };
        let e = check_cursor(&bad, 100).unwrap_err().to_string();
        assert!(e.contains("malformed"), "{e}");
        let past_its_end = DataCursor {
            consumed: vec![51, 7],
            ..c
        };
        let e = check_cursor(&past_its_end, 100).unwrap_err().to_string();
        assert!(e.contains("malformed"), "{e}");
    }

    #[test]
    fn partitions_cut_the_ledger_at_every_mark_and_close_at_the_end() {
        // 10 instances, quotas 3 and 2 of a global batch of 5: partitions of 6 and 4.
        let quotas = [3, 2];
        let mut p = Partitions::start(0, 10, &DataCursor::default(), &quotas).unwrap();
        assert_eq!(p.bounds, vec![0, 6, 10]);
        assert_eq!(p.steps_left(&quotas), 2);
        let mut ledger = vec![];
        p.advance(vec![3, 2], &mut ledger);
        assert_eq!(p.cursor().consumed, vec![3, 2]);
        // Resumed from that cursor, with one rank: the same bounds, the rest of each.
        let resumed = Partitions::start(0, 10, &p.cursor(), &[5]).unwrap();
        assert_eq!(
            resumed
                .mine(1, 0)
                .iter()
                .map(|q| (q.start, q.end))
                .collect::<Vec<_>>(),
            vec![(3, 6), (8, 10)]
        );
        assert_eq!(resumed.steps_left(&[5]), 1);
        let ends = p.ends();
        p.advance(ends, &mut ledger);
        let ranges: Vec<(u32, u64, u64)> = ledger
            .iter()
            .map(|r| (r.partition, r.start, r.end))
            .collect();
        assert_eq!(ranges, vec![(0, 0, 3), (1, 0, 2), (0, 3, 6), (1, 2, 4)]);
        // A cursor of another epoch starts this one fresh.
        let other = DataCursor {
            epoch: 1,
            ..p.cursor()
        };
        assert_eq!(
            Partitions::start(2, 10, &other, &quotas).unwrap().consumed,
            vec![0, 0]
        );
    }
}
