//! What a rank reports while a stage trains: the recent steps' means in the progress report
//! the heartbeat sends, rank 0's logged steps (metrics.jsonl), throughput, and the
//! end-of-stage split of where a step's time went.

use std::time::Instant;

use super::ctx::{log_step, Ctx};
use super::recent::Recent;
use crate::proto;
use crate::train::checkpoint::StageTotals;
use crate::train::step::PhaseTimes;
use crate::train::{StepStats, TaskStats};

/// A step's statistics as reports carry them (one impl per stage kind's stats).
pub(super) trait Reported: Copy {
    /// Examples (rows) of the step, over all ranks.
    fn examples(&self) -> u64;
    fn lr(&self) -> f32;
    /// The logged step (rank 0, metrics.jsonl).
    fn record(&self, epoch: u32, samples_per_s: f32) -> proto::StepRecord;
    /// The recent steps' means into `p`.
    fn fill(window: &Recent<Self>, p: &mut proto::ProgressReport);
    /// Adds the step to the stage's running totals (summary.json).
    fn add_to(&self, totals: &mut StageTotals);
}

fn mean<S>(window: &Recent<S>, f: impl Fn(&S) -> f32) -> f32 {
    window.iter().map(f).sum::<f32>() / window.len().max(1) as f32
}

impl Reported for StepStats {
    fn examples(&self) -> u64 {
        self.examples
    }
    fn lr(&self) -> f32 {
        self.lr
    }
    fn record(&self, epoch: u32, samples_per_s: f32) -> proto::StepRecord {
        proto::StepRecord {
            step: self.step,
            epoch,
            loss: self.loss,
            mlm_loss: self.mlm_loss,
            nsp_loss: self.nsp_loss,
            lr: self.lr,
            samples_per_s,
        }
    }
    fn fill(w: &Recent<Self>, p: &mut proto::ProgressReport) {
        p.loss = mean(w, |s| s.loss);
        p.mlm_loss = mean(w, |s| s.mlm_loss);
        p.nsp_loss = mean(w, |s| s.nsp_loss);
        p.mlm_accuracy = mean(w, |s| s.mlm_accuracy);
        p.nsp_accuracy = mean(w, |s| s.nsp_accuracy);
    }
    fn add_to(&self, totals: &mut StageTotals) {
        totals.add(self);
    }
}

impl Reported for TaskStats {
    fn examples(&self) -> u64 {
        self.examples
    }
    fn lr(&self) -> f32 {
        self.lr
    }
    fn record(&self, epoch: u32, samples_per_s: f32) -> proto::StepRecord {
        proto::StepRecord {
            step: self.step,
            epoch,
            loss: self.loss,
            lr: self.lr,
            samples_per_s,
            ..Default::default()
        }
    }
    fn fill(w: &Recent<Self>, p: &mut proto::ProgressReport) {
        p.loss = mean(w, |s| s.loss);
        // Over the window's labelled examples, not a mean of per-step rates.
        let (right, seen) = w
            .iter()
            .fold((0u64, 0u64), |t, s| (t.0 + s.correct, t.1 + s.labelled));
        p.train_accuracy = if seen > 0 {
            right as f32 / seen as f32
        } else {
            0.0
        };
    }
    fn add_to(&self, totals: &mut StageTotals) {
        totals.add_task(self);
    }
}

/// A rank's reporting state through a stage.
pub(super) struct Reporter<S> {
    rank: usize,
    every: u64,
    window: Recent<S>,
    /// Examples of the steps this process took, over all ranks.
    examples: u64,
    steps: u64,
    /// Throughput is measured from the end of this process's second step on (start-up
    /// excluded); a stage too short for that counts from its start.
    since: (Instant, u64),
    start: (Instant, u64),
    /// Throughput counts training time only: not the final upload after the last step.
    last_step_end: Instant,
    split: TimeSplit,
}

impl<S: Reported> Reporter<S> {
    pub(super) fn new(rank: usize, progress_every: u64) -> Self {
        let now = (Instant::now(), 0);
        Reporter {
            rank,
            every: progress_every.max(1),
            window: Recent::new(),
            examples: 0,
            steps: 0,
            since: now,
            start: now,
            last_step_end: Instant::now(),
            split: TimeSplit::default(),
        }
    }

    /// Takes a step's statistics; every `progress_every` steps they reach the report (and
    /// rank 0's log of steps). `work` is this rank's (tokens, masked) for the time split.
    pub(super) fn step(
        &mut self,
        ctx: &Ctx,
        at: Position,
        stats: S,
        data_ms: f64,
        phases: &PhaseTimes,
        work: (usize, usize),
    ) {
        self.last_step_end = Instant::now();
        self.steps += 1;
        self.examples += stats.examples();
        if self.steps > 2 {
            self.split.add(data_ms, phases, work);
        }
        if self.steps == 2 {
            self.since = (Instant::now(), self.examples);
        }
        self.window.push(stats);
        if at.step % self.every == 0 {
            let mut p = ctx.progress.lock().unwrap();
            self.fill(&mut p, at);
            if self.rank == 0 {
                let record = stats.record(at.epoch, p.samples_per_s);
                log_step(&mut p, record);
            }
        }
    }

    /// The recent steps and the stage's throughput into `p`.
    pub(super) fn fill(&self, p: &mut proto::ProgressReport, at: Position) {
        p.epoch = at.epoch;
        p.step = at.step;
        p.total_steps = at.total_steps;
        S::fill(&self.window, p);
        p.lr = self.window.back().map(|s| s.lr()).unwrap_or(0.0);
        p.examples = self.examples;
        p.samples_per_s = self.rate();
    }

    fn rate(&self) -> f32 {
        let until = self.last_step_end;
        let from = if self.examples > self.since.1 && until > self.since.0 {
            self.since
        } else {
            self.start
        };
        (self.examples.saturating_sub(from.1) as f64
            / until.duration_since(from.0).as_secs_f64().max(1e-9)) as f32
    }

    /// Logs where this rank's steps spent their time (see [`TimeSplit::log`]).
    pub(super) fn log_split(&self) {
        self.split.log(self.rank);
    }
}

/// Where a stage stands, for a report.
#[derive(Debug, Clone, Copy)]
pub(super) struct Position {
    pub epoch: u32,
    pub step: u64,
    pub total_steps: u64,
}

/// Where this rank's steps spent their time (steps after the second), for the end-of-stage log.
#[derive(Default)]
struct TimeSplit {
    steps: u64,
    data_ms: f64,
    phases: PhaseTimes,
    /// This rank's non-padding and masked tokens (its work differs from its peers' with them).
    tokens: usize,
    masked: usize,
}

impl TimeSplit {
    fn add(&mut self, data_ms: f64, p: &PhaseTimes, (tokens, masked): (usize, usize)) {
        self.steps += 1;
        self.data_ms += data_ms;
        self.phases += p;
        self.tokens += tokens;
        self.masked += masked;
    }

    /// Logs the mean milliseconds per step of each part: waiting for data, waiting for the
    /// other ranks at the step's start, forward, backward, all-reduce and the optimiser; and
    /// the rank's mean non-padding and masked tokens per step (to tell an imbalance of the
    /// ranks' data from one of their machines).
    fn log(&self, rank: usize) {
        if self.steps == 0 {
            return;
        }
        let n = self.steps as f64;
        let p = &self.phases;
        tracing::info!(
            rank,
            steps = self.steps,
            data_ms = format!("{:.1}", self.data_ms / n),
            forward_ms = format!("{:.1}", p.forward_ms / n),
            backward_ms = format!("{:.1}", p.backward_ms / n),
            sync_ms = format!("{:.1}", p.sync_ms / n),
            allreduce_ms = format!("{:.1}", p.allreduce_ms / n),
            optimizer_ms = format!("{:.1}", (p.pack_ms + p.optimizer_ms) / n),
            tokens = format!("{:.0}", self.tokens as f64 / n),
            masked = format!("{:.0}", self.masked as f64 / n),
            "mean time per step"
        );
    }
}
