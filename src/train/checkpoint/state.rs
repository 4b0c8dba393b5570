//! Where training stood when a checkpoint was taken: enough to resume a stage exactly.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::cursor::{DataCursor, LedgerRange};

/// Where training stood when a checkpoint was taken: enough to resume exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Index of the stage in the job's stage list.
    pub stage_index: u32,
    /// Name of the stage, as in the job config.
    pub stage_name: String,
    /// Optimiser steps taken in this stage.
    pub step: u64,
    /// The schedule's total steps (fixed when the stage started).
    pub total_steps: u64,
    /// World size when the stage started (the global batch policy refers to it).
    pub initial_world_size: u32,
    /// World size of the generation that took the checkpoint.
    pub world_size: u32,
    /// The membership generation that took the checkpoint.
    pub generation: u64,
    /// Data position: epoch in progress and, per data partition, instances consumed.
    pub cursor: DataCursor,
    /// Every instance range consumed in committed steps since the stage started.
    pub ledger: Vec<LedgerRange>,
    /// Instances planned per epoch started so far: (epoch, total).
    pub planned: Vec<(u32, u64)>,
    /// Set on the checkpoint written when the stage finished.
    pub stage_done: bool,
    /// What the committed steps of the stage consumed, over all ranks.
    #[serde(default)]
    pub totals: StageTotals,
    /// Fine-tuning: the last dev evaluation's metrics, and the best epoch so far by the
    /// stage's metric (kept across a resume, so a worse later epoch never replaces it).
    #[serde(default)]
    pub dev_metrics: BTreeMap<String, f64>,
    /// Fine-tuning: the best epoch so far by the stage's metric.
    #[serde(default)]
    pub best: Option<BestEpoch>,
}

/// A fine-tuning stage's best epoch by its metric.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BestEpoch {
    /// The stage's metric on the dev set after the epoch.
    pub score: f64,
    /// The epoch evaluated.
    pub epoch: u32,
}

/// Running totals of a stage's committed steps, over all ranks (for summary.json).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct StageTotals {
    /// Non-padding tokens.
    pub tokens: u64,
    /// MLM-labelled (masked) positions.
    pub masked: u64,
    /// Examples.
    pub examples: u64,
    /// Examples labelled IsNext.
    pub is_next: u64,
}

impl StageTotals {
    /// Adds one committed fine-tuning step's global counts (its examples).
    pub fn add_task(&mut self, s: &crate::train::TaskStats) {
        self.examples += s.examples;
    }

    /// Adds one committed pre-training step's global counts.
    pub fn add(&mut self, s: &crate::train::StepStats) {
        self.tokens += s.tokens;
        self.masked += s.mlm_tokens;
        self.examples += s.examples;
        self.is_next += s.is_next;
    }

    /// Masked positions per non-padding token (`None` before any token).
    pub fn masked_fraction(&self) -> Option<f64> {
        (self.tokens > 0).then(|| self.masked as f64 / self.tokens as f64)
    }

    /// IsNext examples per example (`None` before any example).
    pub fn is_next_fraction(&self) -> Option<f64> {
        (self.examples > 0).then(|| self.is_next as f64 / self.examples as f64)
    }
}

/// Name of a stage's checkpoint: `stageN-final` once the stage is done (pinned, the next stage
/// starts from it), else `stageN-stepNNNNNN`.
pub fn checkpoint_name(state: &TrainerState) -> String {
    if state.stage_done {
        format!("stage{}-final", state.stage_index)
    } else {
        format!("stage{}-step{:06}", state.stage_index, state.step)
    }
}

impl TrainerState {
    /// The state of a stage that starts now with `world_size` ranks.
    pub fn start(stage_index: u32, stage_name: &str, world_size: u32, generation: u64) -> Self {
        TrainerState {
            stage_index,
            stage_name: stage_name.into(),
            step: 0,
            total_steps: 0,
            initial_world_size: world_size,
            world_size,
            generation,
            cursor: DataCursor::default(),
            ledger: vec![],
            planned: vec![],
            stage_done: false,
            totals: StageTotals::default(),
            dev_metrics: BTreeMap::new(),
            best: None,
        }
    }
}
