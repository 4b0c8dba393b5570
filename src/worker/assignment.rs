//! An assignment on the training thread: the job's configuration, the stage, and the stage
//! kind's run (pre-training or fine-tuning).

use anyhow::Context;

use super::ctx::Ctx;
use crate::config::{JobConfig, StageKind};
use crate::proto;

/// Runs the stage of assignment `a` to its end (or its abort).
pub fn run_assignment(a: proto::Assignment, ctx: Ctx) -> anyhow::Result<()> {
    let cfg = JobConfig::from_json(&a.job_config_json)?;
    let stage = cfg
        .stages
        .get(a.stage_index as usize)
        .with_context(|| format!("stage {} does not exist", a.stage_index))?;
    *ctx.progress.lock().unwrap() = proto::ProgressReport {
        job_id: cfg.job.name.clone(),
        generation: a.generation,
        rank: a.rank,
        stage_index: a.stage_index,
        member_secret: a.member_secret.clone(),
        phase: super::phase::Phase::ConnectingRing.to_string(),
        ..Default::default()
    };
    if ctx.device.is_cuda() {
        // The GPU's f32 matmul mode (`model.tf32`), set for the whole process per assignment.
        candle_core::cuda::set_gemm_reduced_precision_f32(cfg.model.tf32);
    }
    match stage.kind {
        StageKind::Pretrain => super::pretrain::run_pretrain(&a, &ctx, &cfg, stage),
        _ => super::finetune::run_finetune(&a, &ctx, &cfg, stage),
    }
}
