//! A fine-tuning stage on one rank: the task model starts from the previous stage's (or an
//! imported) encoder, or resumes the stage's checkpoint, and trains in the same loop as
//! pre-training (`stage`). Every example is used once per epoch: a seeded permutation, of
//! which each step takes the next global batch, dealt round-robin over the ranks, so the
//! epoch's consumed part is always a prefix of the permutation and one count is an exact
//! cursor for any world size. At every epoch's end the dev set is scored across ranks (each
//! scores its share; metric counts are all-reduced, never averaged) and rank 0 keeps the
//! best epoch's checkpoint by the stage's metric.

use std::collections::HashMap;

use anyhow::Context;

use super::assignment::assigned_model_config;
use super::client;
use super::ctx::{precision, set_phase, Ctx};
use super::phase::Phase;
use super::stage::{StageFeed, StageRun};
use super::task_data::TaskData;
use crate::comm::Collective;
use crate::config::{JobConfig, StageConfig};
use crate::data::batch::FinetuneBatch;
use crate::data::tokenizer::Tokenizer;
use crate::metrics::MetricCounts;
use crate::model::{hf, TaskHead, TaskModel};
use crate::proto;
use crate::train::checkpoint::{checkpoint_name, BestEpoch, DataCursor, LedgerRange, TrainerState};
use crate::train::Trainer;
use crate::util;

/// An epoch's order and how far into it the steps are: a plain type.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct EpochOrder {
    pub epoch: u32,
    /// The epoch's permutation of the training examples.
    pub order: Vec<usize>,
    /// Examples of `order` consumed (by all ranks), and that count at the last cut.
    pub pos: u64,
    pub mark: u64,
}

impl EpochOrder {
    /// Epoch `epoch` of `n` examples (permuted from `seed`), from `cursor` when it is mid-way
    /// through this epoch.
    pub(super) fn start(
        epoch: u32,
        n: usize,
        seed: &[u64],
        cursor: &DataCursor,
    ) -> anyhow::Result<Self> {
        let mut order: Vec<usize> = (0..n).collect();
        rand::seq::SliceRandom::shuffle(order.as_mut_slice(), &mut util::rng(seed));
        let pos = if cursor.epoch == epoch && !cursor.consumed.is_empty() {
            anyhow::ensure!(
                cursor.bounds == [0, n as u64] && cursor.consumed.len() == 1 && cursor.consumed[0] <= n as u64,
                "the checkpoint's data cursor (epoch {epoch}: bounds {:?}, consumed {:?}) does not \
                 describe this stage's {n} training examples: the train file, the tokenizer or \
                 max_seq_length changed since the checkpoint was written",
                cursor.bounds,
                cursor.consumed
            );
            cursor.consumed[0]
        } else {
            0
        };
        Ok(EpochOrder {
            epoch,
            order,
            pos,
            mark: pos,
        })
    }

    pub(super) fn steps_left(&self, global: usize) -> u64 {
        (self.order.len() as u64 - self.pos).div_ceil(global as u64)
    }

    /// The next step's examples of `rank`: positions `rank, rank + world, …` of the next
    /// `global` examples.
    pub(super) fn take(&mut self, global: usize, world: usize, rank: usize) -> Vec<usize> {
        let from = self.pos as usize;
        let to = (from + global).min(self.order.len());
        self.pos = to as u64;
        self.order[from..to]
            .iter()
            .copied()
            .skip(rank)
            .step_by(world)
            .collect()
    }

    /// The ledger range since the last cut up to `to`.
    pub(super) fn advance(&mut self, to: u64, ledger: &mut Vec<LedgerRange>) {
        if to > self.mark {
            ledger.push(LedgerRange {
                epoch: self.epoch,
                partitions: 1,
                partition: 0,
                start: self.mark,
                end: to,
            });
        }
        self.mark = to;
    }

    pub(super) fn cursor(&self) -> DataCursor {
        DataCursor {
            epoch: self.epoch,
            consumed: vec![self.mark],
            bounds: vec![0, self.order.len() as u64],
        }
    }
}

/// Fine-tuning's [`StageFeed`].
struct TaskFeed<'a> {
    ctx: &'a Ctx,
    a: &'a proto::Assignment,
    stage: &'a StageConfig,
    seed: u64,
    data: TaskData,
    tokenizer: Tokenizer,
    global: usize,
    metric: String,
    epoch: Option<EpochOrder>,
}

impl TaskFeed<'_> {
    fn rank(&self) -> usize {
        self.a.rank as usize
    }
    fn world(&self) -> usize {
        self.a.world_size as usize
    }
}

impl StageFeed for TaskFeed<'_> {
    type Model = TaskModel;

    fn begin_epoch(
        &mut self,
        epoch: u32,
        state: &mut TrainerState,
        _: &mut dyn Collective,
    ) -> anyhow::Result<u64> {
        let n = self.data.n_train();
        let seed = [self.seed, self.a.stage_index as u64, epoch as u64];
        let order = EpochOrder::start(epoch, n, &seed, &state.cursor)?;
        if !state.planned.iter().any(|(e, _)| *e == epoch) {
            state.planned.push((epoch, n as u64));
        }
        let steps = order.steps_left(self.global);
        self.epoch = Some(order);
        Ok(steps)
    }

    fn next_step(&mut self) -> anyhow::Result<Vec<FinetuneBatch>> {
        let (global, world, rank) = (self.global, self.world(), self.rank());
        let mine = self
            .epoch
            .as_mut()
            .expect("epoch begun")
            .take(global, world, rank);
        mine.chunks(self.stage.batch_size)
            .map(|c| self.data.batch(c, self.tokenizer.pad_id()))
            .collect()
    }

    fn work(&self, micro: &[FinetuneBatch]) -> (usize, usize) {
        let tokens = micro
            .iter()
            .map(|b| b.attention_mask.iter().filter(|m| **m != 0).count());
        (tokens.sum(), 0)
    }

    /// Every rank knows the position (the steps are deterministic): no collective.
    fn cut(&mut self, state: &mut TrainerState, _: &mut dyn Collective) -> anyhow::Result<()> {
        let e = self.epoch.as_mut().expect("epoch begun");
        e.advance(e.pos, &mut state.ledger);
        state.cursor = e.cursor();
        Ok(())
    }

    fn end_epoch(&mut self, state: &mut TrainerState) {
        if let Some(e) = self.epoch.as_mut() {
            e.advance(e.order.len() as u64, &mut state.ledger);
        }
    }

    /// Dev evaluation across ranks; the epoch's checkpoint is the stage's best when it
    /// improved on every earlier epoch (stored once, pinned; it is also a resume point like
    /// any other, as the newest checkpoint of the stage wins).
    fn after_epoch(
        &mut self,
        epoch: u32,
        trainer: &Trainer<TaskModel>,
        state: &mut TrainerState,
        comm: &mut dyn Collective,
    ) -> anyhow::Result<Option<String>> {
        set_phase(self.ctx, Phase::Evaluating);
        let (rank, world) = (self.rank(), self.world());
        let counts = self
            .data
            .evaluate(&trainer.model, &self.tokenizer, rank, world)?;
        let mut v = counts.to_vec();
        comm.all_reduce_sum(&mut v)?;
        let total = MetricCounts::from_vec(counts.kind(), &v)?;
        state.dev_metrics = total
            .summary()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let score = state
            .dev_metrics
            .get(self.metric.as_str())
            .copied()
            .unwrap_or(0.0);
        tracing::info!(rank, epoch, metrics = ?state.dev_metrics, "dev evaluation");
        self.ctx.progress.lock().unwrap().metrics_json = serde_json::to_string(&state.dev_metrics)?;
        state.step = trainer.step;
        let improved = state.best.is_none_or(|b| score > b.score);
        Ok(Some(if improved {
            state.best = Some(BestEpoch { score, epoch });
            format!("stage{}-best", self.a.stage_index)
        } else {
            checkpoint_name(state)
        }))
    }

    fn done_metrics(&self, state: &TrainerState) -> Option<String> {
        let mut m = serde_json::json!({ "final": state.dev_metrics, "metric": self.metric });
        if let Some(b) = state.best {
            m["best"] = serde_json::json!({ "score": b.score, "epoch": b.epoch });
        }
        Some(m.to_string())
    }
}

/// The fine-tuning stage of assignment `a` on this rank.
pub(super) fn run_finetune(
    a: &proto::Assignment,
    ctx: &Ctx,
    cfg: &JobConfig,
    stage: &StageConfig,
) -> anyhow::Result<()> {
    let tokenizer = Tokenizer::from_json(&a.tokenizer_json)?;
    set_phase(ctx, Phase::PreparingData);
    let data = load_data(a, ctx, cfg, stage, &tokenizer)?;
    let comm = super::collective::connect_collective(a, ctx, cfg)?;
    set_phase(ctx, Phase::InitialisingModel);
    let model = task_model(a, ctx, cfg, data.head(), &data.label_names())?;
    let stream = Some(a.stage_index as u64);
    let (run, global) = StageRun::start(a, ctx, cfg, model, comm, stream)?;
    let mut feed = TaskFeed {
        ctx,
        a,
        stage,
        seed: cfg.job.seed,
        data,
        tokenizer,
        global,
        metric: stage.best_metric().to_string(),
        epoch: None,
    };
    run.run(&mut feed)
}

/// The stage's train and dev files from the coordinator, featurised.
fn load_data(
    a: &proto::Assignment,
    ctx: &Ctx,
    cfg: &JobConfig,
    stage: &StageConfig,
    tokenizer: &Tokenizer,
) -> anyhow::Result<TaskData> {
    // A fresh private directory (0700, unpredictable name), removed when the data is read.
    let scratch = tempfile::Builder::new()
        .prefix(&format!("tandem-stage{}-", a.stage_index))
        .tempdir()
        .context("creating a scratch directory for the stage's files")?;
    let fetch = |role: &str| {
        let mut c = ctx.client.clone();
        ctx.rt.block_on(client::fetch_stage_file(
            &mut c,
            &cfg.job.name,
            a.generation,
            a.stage_index,
            role,
        ))
    };
    TaskData::load(
        stage.kind,
        &a.stage_files,
        fetch,
        tokenizer,
        stage,
        scratch.path(),
    )
}

/// The task model: the encoder checkpoint's weights with a fresh head (or all fresh), with
/// the stage's label names in its configuration. A resumed stage's weights are restored
/// into it afterwards.
fn task_model(
    a: &proto::Assignment,
    ctx: &Ctx,
    cfg: &JobConfig,
    head: TaskHead,
    labels: &[String],
) -> anyhow::Result<TaskModel> {
    let model_cfg = assigned_model_config(a)?;
    let (seed, rank) = (cfg.job.seed, a.rank as usize);
    let mut model = if a.encoder_checkpoint.is_empty() || !a.init_checkpoint.is_empty() {
        TaskModel::new(&model_cfg, head, seed, &ctx.device)?
    } else {
        let mut c = ctx.client.clone();
        let files: HashMap<String, Vec<u8>> = ctx
            .rt
            .block_on(client::get_checkpoint(
                &mut c,
                &cfg.job.name,
                a.generation,
                &a.encoder_checkpoint,
            ))?
            .into_iter()
            .collect();
        let weights = files
            .get(hf::WEIGHTS_FILE)
            .with_context(|| format!("{} lacks {}", a.encoder_checkpoint, hf::WEIGHTS_FILE))?;
        let tensors = hf::tensors_from_bytes(weights, &a.encoder_checkpoint)?;
        let origin = std::path::Path::new(&a.encoder_checkpoint);
        let (m, report) =
            TaskModel::from_encoder_tensors(&model_cfg, tensors, origin, head, seed, &ctx.device)?;
        if rank == 0 {
            tracing::info!(from = %a.encoder_checkpoint, initialised = ?report.initialised, dropped = report.ignored.len(), "encoder loaded; task head initialised");
        }
        m
    };
    model.cfg = model.hf_config(labels)?;
    model.set_precision(precision(cfg, ctx, rank));
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_epoch_order_deals_each_example_once_and_resumes_at_its_cursor() {
        // 10 examples, global batch 4 over 2 ranks: steps of 4, 4 and 2.
        let mut e = EpochOrder::start(0, 10, &[7, 1, 0], &DataCursor::default()).unwrap();
        let mut sorted = e.order.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        assert_eq!(e.steps_left(4), 3);
        let (a, b) = (e.clone().take(4, 2, 0), e.clone().take(4, 2, 1));
        assert_eq!(a, vec![e.order[0], e.order[2]]);
        assert_eq!(b, vec![e.order[1], e.order[3]]);
        e.take(4, 2, 0);
        let mut ledger = vec![];
        e.advance(e.pos, &mut ledger);
        let cursor = e.cursor();
        assert_eq!(
            (cursor.consumed.clone(), cursor.bounds.clone()),
            (vec![4], vec![0, 10])
        );
        // Resumed with one rank: the same permutation, from the fifth example, in two steps.
        let mut r = EpochOrder::start(0, 10, &[7, 1, 0], &cursor).unwrap();
        assert_eq!((r.order.clone(), r.pos), (e.order.clone(), 4));
        assert_eq!(r.steps_left(4), 2);
        assert_eq!(r.take(4, 1, 0), e.order[4..8].to_vec());
        assert_eq!(r.take(4, 1, 0), e.order[8..].to_vec());
        r.advance(r.pos, &mut ledger);
        let ranges: Vec<(u64, u64)> = ledger.iter().map(|l| (l.start, l.end)).collect();
        assert_eq!(ranges, vec![(0, 4), (4, 10)]);
        // A cursor that does not describe this data set is refused, naming what changed.
        let e = EpochOrder::start(0, 12, &[7, 1, 0], &cursor).unwrap_err();
        assert!(e.to_string().contains("12 training examples"), "{e}");
        // A cursor of an earlier epoch starts this one fresh.
        let next = EpochOrder::start(1, 10, &[7, 1, 1], &cursor).unwrap();
        assert_eq!(next.pos, 0);
        assert_ne!(next.order, r.order, "each epoch has its own permutation");
    }
}
