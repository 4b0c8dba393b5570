//! What every stage's training thread shares with the worker's async side: the client, the
//! ring listener, the abort flags and the progress report the heartbeat sends; and the small
//! helpers every stage uses on it (phase, logged steps, the final report).

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use candle_core::Device;

use super::client::Client;
use super::phase::Phase;
use crate::comm::ring::{AbortHandle, RingListener};
use crate::config::JobConfig;
use crate::proto;
use crate::train::{CollectiveCall, CollectiveHook};

/// What the training thread shares with the async side.
pub struct Ctx {
    pub rt: tokio::runtime::Handle,
    pub client: Client,
    pub listener: RingListener,
    pub token: String,
    /// Set by an Abort/Stop directive: the loop stops between steps.
    pub abort: Arc<AtomicBool>,
    /// Lets the async side unblock a collective in progress.
    pub ring_abort: Arc<Mutex<Option<AbortHandle>>>,
    /// The latest progress, sent by the heartbeat task.
    pub progress: Arc<Mutex<proto::ProgressReport>>,
    /// Where the model computes (`--device`).
    pub device: Device,
}

pub(super) fn set_phase(ctx: &Ctx, phase: Phase) {
    ctx.progress.lock().unwrap().phase = phase.to_string();
}

/// Names each collective call of a step in the progress phase, so a stall is reported as
/// e.g. "all-reduce 3 of step 41 (6553600 floats)".
pub(super) struct PhaseHook(pub Arc<Mutex<proto::ProgressReport>>);

impl CollectiveHook for PhaseHook {
    fn before(&mut self, c: &CollectiveCall) {
        self.0.lock().unwrap().phase = Phase::Collective(*c).to_string();
    }
    fn after(&mut self, _: &CollectiveCall) {
        self.0.lock().unwrap().phase = Phase::Training.to_string();
    }
}

/// Most logged steps kept while the coordinator is unreachable (the oldest are dropped).
const MAX_PENDING_STEPS: usize = 100_000;

/// Queues a logged step for the next progress report (rank 0; metrics.jsonl).
pub(super) fn log_step(p: &mut proto::ProgressReport, record: proto::StepRecord) {
    if p.steps.len() >= MAX_PENDING_STEPS {
        p.steps.remove(0);
    }
    p.steps.push(record);
}

/// Sends rank 0's progress now, with its queued step records (before `what`).
pub(super) fn flush_progress(ctx: &Ctx, what: &str) {
    let mut c = ctx.client.clone();
    if let Err(e) = ctx.rt.block_on(super::send_progress(&mut c, &ctx.progress)) {
        tracing::warn!("could not send the logged steps before {what}: {e}");
    }
}

/// Sends the stage's final report (the coordinator waits for one from every rank).
pub(super) fn report_done(
    ctx: &Ctx,
    mut done: proto::ProgressReport,
    fingerprint: u64,
    steps: u64,
) -> anyhow::Result<()> {
    done.done = true;
    done.param_fingerprint = fingerprint;
    done.phase = Phase::Done.to_string();
    let rank = done.rank;
    let mut c = ctx.client.clone();
    ctx.rt
        .block_on(c.report_progress(done))
        .context("reporting the end of the stage")?;
    ctx.progress.lock().unwrap().done = true;
    tracing::info!(
        rank,
        steps,
        fingerprint = format!("{fingerprint:016x}"),
        "stage finished"
    );
    Ok(())
}

/// The job's compute precision; bf16 on the CPU is allowed but said to be slow.
pub(super) fn precision(cfg: &JobConfig, ctx: &Ctx, rank: usize) -> crate::model::Precision {
    let p = cfg.model.precision;
    if p == crate::model::Precision::Bf16 && ctx.device.is_cpu() && rank == 0 {
        tracing::warn!(
            "model.precision = bf16 on the CPU runs candle's composed ops (no bf16 gemm there): \
             slower than f32; bf16 is meant for GPUs"
        );
    }
    p
}
