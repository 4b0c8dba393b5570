//! The loop every stage kind runs on a rank: epochs of steps from the stage's feed, the
//! trainer's step, progress, the data cursor cut and checkpoints every
//! `checkpoint.every_steps` (streamed in the background by rank 0), the kind's epoch end, and
//! the final checkpoint and report. A kind supplies a [`StageFeed`]; nothing else differs.

use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::Context;

use super::client;
use super::ctx::{flush_progress, report_done, set_phase, Ctx, PhaseHook};
use super::phase::Phase;
use super::progress::{Position, Reported, Reporter};
use super::upload::Uploads;
use crate::comm::Collective;
use crate::config::{JobConfig, ResizePolicy, StageConfig};
use crate::proto;
use crate::train::checkpoint::{checkpoint_name, restore, DataCursor, TrainerState};
use crate::train::{AdamWConfig, Schedule, StageModel, StepOptions, Trainer};

/// The global batch per step by the resize policy (see [`ResizePolicy`]); keeping the
/// per-worker batch scales the peak learning rate with the world size.
fn global_batch(
    cfg: &JobConfig,
    stage: &StageConfig,
    state: &TrainerState,
    world: usize,
    peak_lr: &mut f32,
) -> anyhow::Result<usize> {
    let per_worker = stage.batch_size * stage.grad_accum;
    let initial = state.initial_world_size as usize;
    let global = match cfg.cluster.resize_policy {
        ResizePolicy::KeepGlobalBatch => per_worker * initial,
        ResizePolicy::KeepPerWorkerBatch => {
            *peak_lr = stage.lr * world as f32 / initial as f32;
            per_worker * world
        }
    };
    anyhow::ensure!(
        global >= world,
        "global batch {global} is smaller than the world size {world}"
    );
    Ok(global)
}

/// A stage kind's micro-batch type.
pub(super) type Batch<F> = <<F as StageFeed>::Model as StageModel>::Batch;

/// Where a stage kind's batches come from, and what it does at an epoch's end.
pub(super) trait StageFeed {
    type Model: StageModel;
    /// Starts `epoch` at `state.cursor` (every rank calls it: it may be collective), records
    /// its plan in `state` and returns the steps it has left.
    fn begin_epoch(
        &mut self,
        epoch: u32,
        state: &mut TrainerState,
        comm: &mut dyn Collective,
    ) -> anyhow::Result<u64>;
    /// Called before each step with the steps left in the epoch, counting this one, and
    /// whether another epoch follows (pre-training starts its feed early).
    fn before_step(&mut self, _left: u64, _next: Option<u32>) {}
    /// This rank's micro-batches of the next step (none when its share ran out).
    fn next_step(&mut self) -> anyhow::Result<Vec<Batch<Self>>>;
    /// This rank's (non-padding tokens, masked tokens) of a step, for the time split.
    fn work(&self, _micro: &[Batch<Self>]) -> (usize, usize) {
        (0, 0)
    }
    /// Brings `state.cursor` and the ledger up to the steps taken (collective).
    fn cut(&mut self, state: &mut TrainerState, comm: &mut dyn Collective) -> anyhow::Result<()>;
    /// The epoch was consumed to its end: its ledger is closed.
    fn end_epoch(&mut self, state: &mut TrainerState);
    /// After epoch `epoch` (run to its end or cut by max_steps): the name of a checkpoint to
    /// take now, if any. Fine-tuning evaluates here (collective).
    fn after_epoch(
        &mut self,
        _epoch: u32,
        _trainer: &Trainer<Self::Model>,
        _state: &mut TrainerState,
        _comm: &mut dyn Collective,
    ) -> anyhow::Result<Option<String>> {
        Ok(None)
    }
    /// The final report's `metrics_json` (fine-tuning: dev metrics), if any.
    fn done_metrics(&self, _state: &TrainerState) -> Option<String> {
        None
    }
}

/// One rank's run of a stage: everything the loop needs besides the feed.
pub(super) struct StageRun<'a, M: StageModel> {
    pub ctx: &'a Ctx,
    pub cfg: &'a JobConfig,
    pub stage: &'a StageConfig,
    pub rank: usize,
    pub trainer: Trainer<M>,
    pub state: TrainerState,
    pub comm: Box<dyn Collective>,
    pub uploads: Uploads,
}

impl<'a, M: StageModel> StageRun<'a, M>
where
    M::Stats: Reported,
{
    /// This rank's run of assignment `a`'s stage with `model`: its trainer (each collective
    /// call named in the phase; the optimiser sharded as configured), its state restored from
    /// the assignment's checkpoint or started fresh, and the stage's global batch (returned
    /// with it). `dropout_stream` keeps two stages from sharing dropout masks.
    pub(super) fn start(
        a: &proto::Assignment,
        ctx: &'a Ctx,
        cfg: &'a JobConfig,
        model: M,
        mut comm: Box<dyn Collective>,
        dropout_stream: Option<u64>,
    ) -> anyhow::Result<(Self, usize)> {
        let (rank, world) = (a.rank as usize, a.world_size as usize);
        let stage = &cfg.stages[a.stage_index as usize];
        let mut trainer = Trainer::new(model, step_options(cfg, stage, dropout_stream))?;
        trainer.set_hook(Box::new(PhaseHook(ctx.progress.clone())));
        let sharded = trainer.set_sharded(cfg.cluster.shard_optimizer) && world > 1;
        tracing::info!(rank, device = ?ctx.device, update = ?trainer.update_place(), sharded, "model ready");
        let state = start_or_restore(a, ctx, cfg, &mut trainer, &mut *comm)?;
        let peak_lr = &mut trainer.options.schedule.peak_lr;
        let global = global_batch(cfg, stage, &state, world, peak_lr)?;
        tracing::info!(rank, global_batch = global, "batch per step");
        let run = StageRun {
            ctx,
            cfg,
            stage,
            rank,
            trainer,
            state,
            comm,
            uploads: Uploads::new(&cfg.job.name, a.generation, &a.member_secret),
        };
        Ok((run, global))
    }
}

impl<M: StageModel> StageRun<'_, M>
where
    M::Stats: Reported,
{
    /// Runs the stage's remaining epochs, then the final checkpoint and report.
    pub(super) fn run<F: StageFeed<Model = M>>(mut self, feed: &mut F) -> anyhow::Result<()> {
        let mut report = Reporter::new(self.rank, self.cfg.cluster.progress_every);
        let mut epoch = self.state.cursor.epoch;
        while epoch < self.stage.epochs && !self.over() {
            set_phase(self.ctx, Phase::PreparingData);
            let steps = feed.begin_epoch(epoch, &mut self.state, &mut *self.comm)?;
            self.plan(steps);
            set_phase(self.ctx, Phase::Training);
            let cut_short = self.epoch(feed, epoch, steps, &mut report)?;
            if !cut_short {
                feed.end_epoch(&mut self.state);
                self.state.cursor = DataCursor {
                    epoch: epoch + 1,
                    ..Default::default()
                };
            }
            if let Some(name) =
                feed.after_epoch(epoch, &self.trainer, &mut self.state, &mut *self.comm)?
            {
                self.checkpoint(&name, "an epoch's checkpoint")?;
            }
            if cut_short {
                break; // the report's epoch stays the one in progress
            }
            epoch += 1;
        }
        self.finish(feed, epoch, &report)
    }

    /// Whether max_steps is reached (a stage resumed from the cut's checkpoint is over).
    fn over(&self) -> bool {
        self.stage.max_steps.is_some_and(|m| self.trainer.step >= m)
    }

    /// Fixes the stage's schedule at its first epoch (`steps` in it): total steps and warm-up.
    fn plan(&mut self, steps_in_epoch: u64) {
        let (state, stage) = (&mut self.state, self.stage);
        if state.total_steps == 0 {
            let total =
                (steps_in_epoch * stage.epochs as u64).min(stage.max_steps.unwrap_or(u64::MAX));
            state.total_steps = total.max(1);
            tracing::info!(
                rank = self.rank,
                steps_in_epoch,
                total_steps = state.total_steps,
                "stage planned"
            );
        }
        let s = &mut self.trainer.options.schedule;
        s.total_steps = state.total_steps;
        s.warmup_steps = (state.total_steps as f64 * stage.warmup_fraction as f64).round() as u64;
    }

    /// The epoch's `steps` steps; returns whether max_steps cut it short.
    fn epoch<F: StageFeed<Model = M>>(
        &mut self,
        feed: &mut F,
        epoch: u32,
        steps: u64,
        report: &mut Reporter<M::Stats>,
    ) -> anyhow::Result<bool> {
        let every = self.cfg.checkpoint.every_steps;
        for k in 0..steps {
            if self.ctx.abort.load(Ordering::SeqCst) {
                anyhow::bail!("aborted by the coordinator");
            }
            let goes_on = self.trainer.step + steps - k < self.state.total_steps;
            let next = (epoch + 1 < self.stage.epochs && goes_on).then_some(epoch + 1);
            feed.before_step(steps - k, next);
            let t_data = Instant::now();
            let micro = feed.next_step()?;
            let data_ms = t_data.elapsed().as_secs_f64() * 1e3;
            set_phase(self.ctx, Phase::Training);
            let stats = self.trainer.train_step(&micro, &mut *self.comm)?;
            stats.add_to(&mut self.state.totals);
            let at = Position {
                epoch,
                step: self.trainer.step,
                total_steps: self.state.total_steps,
            };
            report.step(
                self.ctx,
                at,
                stats,
                data_ms,
                &self.trainer.phases,
                feed.work(&micro),
            );
            let at_max = self.over();
            let due = every > 0 && self.trainer.step % every == 0;
            if due || at_max {
                feed.cut(&mut self.state, &mut *self.comm)?;
                self.state.step = self.trainer.step;
            }
            if at_max {
                return Ok(true);
            }
            if due && self.trainer.step < self.state.total_steps {
                self.checkpoint(&checkpoint_name(&self.state), "a checkpoint")?;
            }
        }
        Ok(false)
    }

    /// Takes a checkpoint named `name` of the steps so far, streamed in the background by rank 0.
    fn checkpoint(&mut self, name: &str, what: &str) -> anyhow::Result<()> {
        // After sharded steps each rank's AdamW state is current in its own part only.
        // Gathered before the flush below: from the flush to the upload's start no collective
        // may fail on a lost peer (the checkpoint would be lost with it).
        self.trainer.gather_state(&mut *self.comm)?;
        self.state.step = self.trainer.step;
        if self.rank == 0 {
            // The logged steps up to a checkpoint reach metrics.jsonl before it is taken: a
            // failure later replays only the steps after it.
            flush_progress(self.ctx, what);
            set_phase(self.ctx, Phase::Checkpoint);
            self.uploads
                .in_background(self.ctx, &self.trainer, &self.state, name)?;
        }
        Ok(())
    }

    /// The stage's final checkpoint (rank 0) and every rank's final report.
    fn finish<F: StageFeed<Model = M>>(
        mut self,
        feed: &F,
        epoch: u32,
        report: &Reporter<M::Stats>,
    ) -> anyhow::Result<()> {
        set_phase(self.ctx, Phase::Finishing);
        report.log_split();
        self.trainer.gather_state(&mut *self.comm)?;
        self.state.step = self.trainer.step;
        self.state.stage_done = true;
        let fingerprint = self.trainer.model.store().fingerprint()?;
        if self.rank == 0 {
            // As before every checkpoint: the last logged steps reach metrics.jsonl first (and
            // the coordinator's training window ends at the last step, not after the upload).
            flush_progress(self.ctx, "the final checkpoint");
            let name = checkpoint_name(&self.state);
            self.uploads.finish(self.ctx)?;
            if !skip_final_upload_once() {
                self.uploads
                    .now(self.ctx, &self.trainer, &self.state, &name)?;
            }
        }
        let mut done = self.ctx.progress.lock().unwrap().clone();
        let at = Position {
            epoch: epoch.min(self.stage.epochs),
            step: self.trainer.step,
            total_steps: self.state.total_steps,
        };
        report.fill(&mut done, at);
        if let Some(m) = feed.done_metrics(&self.state) {
            done.metrics_json = m;
        }
        report_done(self.ctx, done, fingerprint, self.trainer.step)?;
        // Every rank has reported before any leaves the ring (fine-tuning's evaluation ran
        // collectives up to the end).
        let _ = self.comm.barrier();
        Ok(())
    }
}

/// The step options of `stage` (the schedule's length is set when the stage is planned).
fn step_options(cfg: &JobConfig, stage: &StageConfig, dropout_stream: Option<u64>) -> StepOptions {
    StepOptions {
        adamw: AdamWConfig {
            weight_decay: stage.weight_decay,
            ..Default::default()
        },
        schedule: Schedule {
            peak_lr: stage.lr,
            warmup_steps: 0,
            total_steps: 1,
            decay: stage.decay,
        },
        max_grad_norm: stage.max_grad_norm,
        bucket_elems: ((cfg.cluster.bucket_mib * (1 << 20) as f64) / 4.0) as usize,
        seed: cfg.job.seed,
        dropout: true,
        dropout_stream,
    }
}

/// The stage's state: restored with the weights from the assignment's checkpoint, or a fresh
/// start with rank 0's weights on every rank.
fn start_or_restore<M: StageModel>(
    a: &proto::Assignment,
    ctx: &Ctx,
    cfg: &JobConfig,
    trainer: &mut Trainer<M>,
    comm: &mut dyn Collective,
) -> anyhow::Result<TrainerState> {
    let stage = &cfg.stages[a.stage_index as usize];
    let world = a.world_size;
    let mut state = if a.init_checkpoint.is_empty() {
        // Identical starting weights on every rank, whatever happened before.
        trainer.broadcast_params(comm, 0)?;
        TrainerState::start(a.stage_index, &stage.name, world, a.generation)
    } else {
        set_phase(ctx, Phase::RestoringCheckpoint);
        let mut c = ctx.client.clone();
        let files = ctx.rt.block_on(client::get_checkpoint(
            &mut c,
            &cfg.job.name,
            a.generation,
            &a.init_checkpoint,
        ))?;
        let state = restore(trainer, &files.into_iter().collect())
            .with_context(|| format!("restoring {}", a.init_checkpoint))?;
        anyhow::ensure!(
            state.stage_index == a.stage_index,
            "checkpoint {} belongs to stage {}",
            a.init_checkpoint,
            state.stage_index
        );
        tracing::info!(rank = a.rank, checkpoint = %a.init_checkpoint, step = state.step, epoch = state.cursor.epoch, "resumed");
        state
    };
    state.world_size = world;
    state.generation = a.generation;
    Ok(state)
}

/// Test hook: `TANDEM_TEST_SKIP_FINAL_UPLOAD=1` makes this process's first final report come
/// without its checkpoint (a premature "done"), so a test can check the coordinator fails the
/// generation rather than the job.
fn skip_final_upload_once() -> bool {
    static SKIPPED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    std::env::var_os("TANDEM_TEST_SKIP_FINAL_UPLOAD").is_some()
        && !SKIPPED.swap(true, std::sync::atomic::Ordering::SeqCst)
}
