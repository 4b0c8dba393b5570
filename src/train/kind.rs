//! What a stage kind supplies to the one [`super::Trainer`]: its batches, the counts that
//! normalise its loss terms, the loss sums and metric counts of a forward pass, and how the
//! step's global sums read as statistics. Everything else (accumulation, the all-reduce,
//! clipping, the optimiser, checkpoints) is the trainer's, the same for every kind.
//!
//! Pre-training ([`PretrainModel`]: MLM and NSP terms) and the four fine-tuning heads
//! ([`TaskModel`]: one term) are the kinds today.

use crate::model::dropout::DropoutStream;
use candle_core::Tensor;

use crate::data::batch::{FinetuneBatch, PretrainBatch};
use crate::error::Result;
use crate::model::{ParamStore, PretrainModel, TaskModel};

/// One forward pass in training terms.
pub struct Forward {
    /// Per loss term, its sum over the batch (a scalar in the graph).
    pub loss_sums: Vec<Tensor>,
    /// Metric counts (correct predictions, examples, …), added over micro-batches and ranks.
    pub metrics: Vec<f64>,
}

/// A step's numbers summed over all micro-batches and ranks.
#[derive(Debug, Clone, PartialEq)]
pub struct StepSums {
    /// Steps taken, this one included.
    pub step: u64,
    /// Learning rate the step used.
    pub lr: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    /// Per loss term, its global normaliser.
    pub counts: Vec<f64>,
    /// Per loss term, its global sum (the term's loss is `loss_sums[i] / counts[i]`).
    pub loss_sums: Vec<f64>,
    /// Metric counts, summed over micro-batches and ranks.
    pub metrics: Vec<f64>,
}

impl StepSums {
    /// `loss_sums[i] / counts[i]` (0 without a count).
    pub fn mean(&self, i: usize) -> f64 {
        self.per(self.loss_sums[i], i)
    }

    /// `x / counts[i]` (0 without a count).
    pub fn per(&self, x: f64, i: usize) -> f64 {
        x * inv(self.counts[i])
    }
}

/// `1 / x`, 0 for no count (a step without a masked token has no MLM term).
pub(crate) fn inv(x: f64) -> f64 {
    if x > 0.0 {
        1.0 / x
    } else {
        0.0
    }
}

/// A model the trainer can train (see the module docs).
pub trait StageModel: Send {
    /// The batch the model trains on.
    type Batch;
    /// What a step reports.
    type Stats: Clone + Send + 'static;
    /// Loss terms, each normalised by its own global count (pre-training: MLM and NSP).
    const TERMS: usize;
    /// Metric counts a forward pass returns.
    const METRICS: usize;
    /// The model's parameter store.
    fn store(&self) -> &ParamStore;
    /// The std of its initialisation (for parameters a checkpoint lacks).
    fn init_std(&self) -> f32;
    /// Per loss term, what normalises it in `b` (labelled positions, examples): known from
    /// the labels before any forward pass, so summed over ranks first.
    fn counts(&self, b: &Self::Batch) -> Vec<f64>;
    /// Forward pass; `rng` draws the dropout masks (`None`: dropout off).
    fn forward(&self, b: &Self::Batch, rng: Option<&mut DropoutStream>) -> Result<Forward>;
    /// The step's statistics from its global sums.
    fn stats(&self, sums: &StepSums) -> Self::Stats;
    /// `config.json` of a checkpoint of this model.
    fn config_json(&self) -> Result<Vec<u8>>;
}

/// What one pre-training step did, already reduced over all ranks.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct StepStats {
    /// Steps taken, this one included.
    pub step: u64,
    /// Learning rate the step used.
    pub lr: f32,
    /// Total loss: MLM plus NSP.
    pub loss: f32,
    /// Mean MLM loss per masked token.
    pub mlm_loss: f32,
    /// Mean NSP loss per example.
    pub nsp_loss: f32,
    /// Fraction of masked tokens predicted right.
    pub mlm_accuracy: f32,
    /// Fraction of examples whose IsNext label was predicted right.
    pub nsp_accuracy: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    /// Masked tokens and examples in this step, over all ranks.
    pub mlm_tokens: u64,
    /// Examples in this step, over all ranks.
    pub examples: u64,
    /// Non-padding tokens and IsNext examples in this step, over all ranks.
    pub tokens: u64,
    /// IsNext examples in this step, over all ranks.
    pub is_next: u64,
}

impl StageModel for PretrainModel {
    type Batch = PretrainBatch;
    type Stats = StepStats;
    const TERMS: usize = 2;
    const METRICS: usize = 4;

    fn store(&self) -> &ParamStore {
        &self.store
    }
    fn init_std(&self) -> f32 {
        self.cfg.initializer_range
    }
    fn counts(&self, b: &PretrainBatch) -> Vec<f64> {
        vec![b.mlm_count() as f64, b.nsp_count() as f64]
    }
    fn forward(&self, b: &PretrainBatch, rng: Option<&mut DropoutStream>) -> Result<Forward> {
        let mut rng = rng;
        let out = self.model.forward(b, &mut rng)?;
        let metrics = vec![
            out.mlm_correct as f64,
            out.nsp_correct as f64,
            b.token_count() as f64,
            b.is_next_count() as f64,
        ];
        Ok(Forward {
            loss_sums: vec![out.mlm_sum, out.nsp_sum],
            metrics,
        })
    }
    fn stats(&self, s: &StepSums) -> StepStats {
        let (mlm, nsp) = (s.mean(0), s.mean(1));
        StepStats {
            step: s.step,
            lr: s.lr,
            loss: (mlm + nsp) as f32,
            mlm_loss: mlm as f32,
            nsp_loss: nsp as f32,
            mlm_accuracy: s.per(s.metrics[0], 0) as f32,
            nsp_accuracy: s.per(s.metrics[1], 1) as f32,
            grad_norm: s.grad_norm,
            mlm_tokens: s.counts[0] as u64,
            examples: s.counts[1] as u64,
            tokens: s.metrics[2] as u64,
            is_next: s.metrics[3] as u64,
        }
    }
    fn config_json(&self) -> Result<Vec<u8>> {
        Ok(self.cfg.to_hf_json(crate::model::pretrain::ARCHITECTURE))
    }
}

/// What one fine-tuning step did, reduced over all ranks.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct TaskStats {
    /// Steps taken, this one included.
    pub step: u64,
    /// Learning rate the step used.
    pub lr: f32,
    /// Mean loss per labelled example (per labelled position for token classification).
    pub loss: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    /// Labelled examples (positions) and how many of them the argmax got right.
    pub labelled: u64,
    /// Labelled examples (positions) the argmax got right.
    pub correct: u64,
    /// Rows (features) in the step.
    pub examples: u64,
}

impl StageModel for TaskModel {
    type Batch = FinetuneBatch;
    type Stats = TaskStats;
    const TERMS: usize = 1;
    const METRICS: usize = 2;

    fn store(&self) -> &ParamStore {
        &self.store
    }
    fn init_std(&self) -> f32 {
        self.cfg.initializer_range
    }
    fn counts(&self, b: &FinetuneBatch) -> Vec<f64> {
        vec![b.labelled() as f64]
    }
    fn forward(&self, b: &FinetuneBatch, rng: Option<&mut DropoutStream>) -> Result<Forward> {
        let mut rng = rng;
        let out = TaskModel::forward(self, b, &mut rng)?;
        Ok(Forward {
            loss_sums: vec![out.loss_sum],
            metrics: vec![out.correct as f64, b.batch as f64],
        })
    }
    fn stats(&self, s: &StepSums) -> TaskStats {
        TaskStats {
            step: s.step,
            lr: s.lr,
            loss: s.mean(0) as f32,
            grad_norm: s.grad_norm,
            labelled: s.counts[0] as u64,
            correct: s.metrics[0] as u64,
            examples: s.metrics[1] as u64,
        }
    }
    fn config_json(&self) -> Result<Vec<u8>> {
        Ok(self.hf_config(&[])?.to_hf_json(self.head.architecture()))
    }
}
