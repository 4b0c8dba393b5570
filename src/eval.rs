//! `tandem eval-batch`: a checkpoint's losses (and gradient norms) on one batch, in the
//! terms transformers reports them, so a checkpoint can be checked against PyTorch.

#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Device;
use serde::Serialize;

use crate::data::batch::PretrainBatch;
use crate::error::Result;
use crate::model::PretrainModel;
use crate::train::optim::global_norm;
use crate::train::step::forward_backward;

/// What `tandem eval-batch` prints: a checkpoint's losses (and gradient norms) on one batch.
#[derive(Debug, Serialize)]
pub struct EvalReport {
    /// Mean MLM cross-entropy over labelled positions (`None` without `labels`).
    pub mlm_loss: Option<f64>,
    /// Mean NSP cross-entropy (`None` without `next_sentence_label`).
    pub nsp_loss: Option<f64>,
    /// `mlm_loss + nsp_loss` (the missing one counts as 0).
    pub loss: f64,
    /// Labelled MLM positions in the batch.
    pub mlm_count: u64,
    /// Sequences with an NSP label.
    pub nsp_count: u64,
    /// Global L2 norm of the gradient of `loss` (with `grads`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    /// L2 norm of each parameter's gradient, by HF name (with `grads`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_norms: Option<BTreeMap<String, f64>>,
    /// Heads the checkpoint lacked and that were initialised for this run.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub initialised: Vec<String>,
    /// `fused-cpu` (tandem's CPU kernels) or `composed` (differentiable candle ops, as on CUDA
    /// or with `TANDEM_FUSED_KERNELS=0`).
    pub kernels: &'static str,
}

/// Evaluation mode (no dropout); with `grads`, the gradient of `loss` w.r.t. every parameter.
pub fn eval_batch(m: &PretrainModel, batch: &PretrainBatch, grads: bool) -> Result<EvalReport> {
    let mlm_n = batch.mlm_count() as f64;
    let nsp_n = batch.nsp_count() as f64;
    let w = (
        if mlm_n > 0.0 { 1.0 / mlm_n } else { 0.0 },
        if nsp_n > 0.0 { 1.0 / nsp_n } else { 0.0 },
    );
    let mut grad = vec![0f32; m.store.numel()];
    let s = if grads {
        forward_backward(m, batch, w, None, grad.as_mut_slice())?
    } else {
        let out = m.model.forward(batch, &mut None)?;
        crate::train::step::LossSums {
            mlm_sum: out.mlm_sum.to_scalar::<f32>()? as f64,
            mlm_count: out.mlm_count as u64,
            nsp_sum: out.nsp_sum.to_scalar::<f32>()? as f64,
            nsp_count: out.nsp_count as u64,
            ..Default::default()
        }
    };
    let mlm_loss = (mlm_n > 0.0).then(|| s.mlm_sum / mlm_n);
    let nsp_loss = (nsp_n > 0.0).then(|| s.nsp_sum / nsp_n);
    let (grad_norm, grad_norms) = if grads {
        let per = m
            .store
            .specs()
            .iter()
            .enumerate()
            .map(|(i, sp)| (sp.name.clone(), global_norm(&grad[m.store.range(i)]) as f64))
            .collect();
        (Some(global_norm(&grad) as f64), Some(per))
    } else {
        (None, None)
    };
    Ok(EvalReport {
        mlm_loss,
        nsp_loss,
        loss: mlm_loss.unwrap_or(0.0) + nsp_loss.unwrap_or(0.0),
        mlm_count: s.mlm_count,
        nsp_count: s.nsp_count,
        grad_norm,
        grad_norms,
        initialised: vec![],
        kernels: if m.store.device().is_cpu() && crate::model::kernels::ops::fused_kernels() {
            "fused-cpu"
        } else {
            "composed"
        },
    })
}

/// Loads `checkpoint` (an HF directory) and `batch` (JSON) and evaluates.
pub fn eval_batch_files(checkpoint: &Path, batch: &Path, grads: bool) -> Result<EvalReport> {
    let (m, report) = PretrainModel::load(checkpoint, 0, &Device::Cpu)?;
    if !report.initialised.is_empty() {
        tracing::warn!(
            "{}: initialised {} tensor(s) the checkpoint lacks: {}",
            checkpoint.display(),
            report.initialised.len(),
            report.initialised.join(", ")
        );
    }
    let b = PretrainBatch::from_json_file(batch)?;
    let mut r = eval_batch(&m, &b, grads)?;
    r.initialised = report.initialised;
    Ok(r)
}
