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

/// The assignment's model configuration, checked as the coordinator checked it: the JSON
/// comes over the wire, and a shape candle cannot build must be an error, not a panic.
pub(super) fn assigned_model_config(
    a: &proto::Assignment,
) -> anyhow::Result<crate::model::BertConfig> {
    let cfg: crate::model::BertConfig =
        serde_json::from_str(&a.model_config_json).context("the assignment's model config")?;
    cfg.validate().context("the assignment's model config")?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_assigned_model_config_is_validated() {
        let mut cfg = crate::model::BertConfig::preset(crate::model::Preset::Tiny);
        let a = |c: &crate::model::BertConfig| proto::Assignment {
            model_config_json: serde_json::to_string(c).unwrap(),
            ..Default::default()
        };
        assert_eq!(
            assigned_model_config(&a(&cfg)).unwrap().hidden_size,
            cfg.hidden_size
        );
        // Heads that do not divide the width: candle would fail deep in a forward pass.
        cfg.num_attention_heads = 3;
        let e = format!("{:#}", assigned_model_config(&a(&cfg)).unwrap_err());
        assert!(e.contains("the assignment's model config"), "{e}");
    }
}
