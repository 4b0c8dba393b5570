//! The coordinator's job state, shared between the gRPC handlers and the driver.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use tokio::sync::mpsc;
use tonic::Status;

use super::store::CheckpointStore;
use crate::data::shard::ShardIndex;
use crate::model::BertConfig;
use crate::proto;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Rendezvous,
    Running,
    Finished,
    Failed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Rendezvous => "rendezvous",
            Phase::Running => "running",
            Phase::Finished => "finished",
            Phase::Failed => "failed",
        }
    }
}

/// Everything prepared before workers are admitted.
pub struct Prepared {
    pub index: ShardIndex,
    pub index_json: String,
    pub tokenizer_json: String,
    pub model_cfg: BertConfig,
    pub model_cfg_json: String,
    /// Per stage: what its assignments carry beyond the job's defaults.
    pub stages: Vec<StageInputs>,
}

/// A stage's inputs, read once by the coordinator.
#[derive(Default, Clone)]
pub struct StageInputs {
    /// Dataset files (fine-tuning).
    pub files: Vec<proto::DataFile>,
    /// Tokenizer and model config of the stage (those of `init_from` when it has them).
    pub tokenizer_json: Option<String>,
    pub model_cfg_json: Option<String>,
    /// The `init_from` directory, imported into the checkpoint store under this name.
    pub imported: Option<String>,
    /// Accuracy of always predicting the dev set's most frequent label (classification).
    pub majority_baseline: Option<f64>,
}

/// A connected worker.
pub struct Member {
    pub worker_id: String,
    pub ring_addr: String,
    pub tx: mpsc::Sender<Result<proto::Directive, Status>>,
    /// Rank in the current generation (None: waiting).
    pub rank: Option<u32>,
    pub last_seen: Instant,
    pub phase: String,
    pub step: u64,
    /// The secret handed out with this member's assignment (hex; empty while waiting): its
    /// reports and uploads must carry it.
    pub secret: String,
}

impl Member {
    fn status(&self) -> proto::MemberStatus {
        proto::MemberStatus {
            worker_id: self.worker_id.clone(),
            assigned: self.rank.is_some(),
            rank: self.rank.unwrap_or(0),
            phase: self.phase.clone(),
            step: self.step,
        }
    }
}

pub enum Event {
    Joined,
    Left(u64),
    Done(Box<proto::ProgressReport>),
    Failed { rank: u32, error: String },
    Checkpoint(String),
}

pub struct JobState {
    pub phase: Phase,
    pub generation: u64,
    pub next_member: u64,
    pub members: BTreeMap<u64, Member>,
    pub stage_index: u32,
    /// Rank 0's latest progress report.
    pub last: Option<proto::ProgressReport>,
    pub message: String,
    /// The current stage's training window as the coordinator sees it: rank 0's first report
    /// and its report of the highest step (time, the coordinator's CPU seconds, step).
    pub train_window: Option<[(Instant, f64, u64); 2]>,
}

impl JobState {
    /// Records rank 0's progress report at `step` of `stage_index` in the training window.
    pub fn note_training(&mut self, stage_index: u32, step: u64) {
        if stage_index != self.stage_index || step == 0 {
            return;
        }
        let seen = self.train_window.map_or(0, |w| w[1].2);
        if step <= seen {
            return; // the same step again (a heartbeat during the final upload): not training
        }
        if let Some(cpu) = crate::util::process_cpu_seconds() {
            let now = (Instant::now(), cpu, step);
            self.train_window.get_or_insert([now, now])[1] = now;
        }
    }
}

pub struct Shared {
    pub job_id: String,
    pub cfg: crate::config::JobConfig,
    pub cfg_json: String,
    pub prepared: Prepared,
    pub store: CheckpointStore,
    pub state: Mutex<JobState>,
    pub events: mpsc::UnboundedSender<Event>,
    pub started: Instant,
    /// state_dir/metrics.jsonl.
    pub metrics: Mutex<super::metrics_log::MetricsLog>,
    /// Checkpoint uploads accepted and still streaming (see [`UploadGuard`]).
    pub uploads: std::sync::atomic::AtomicUsize,
    /// Requests turned away (token, job, protocol version), for the log and join timeouts.
    pub refusals: std::sync::Arc<super::refusals::Refusals>,
}

/// Counts one checkpoint upload in flight in [`Shared::uploads`] while it lives (from its
/// first accepted chunk until it is stored or fails): a new generation is not assigned while
/// a checkpoint of the failed one is still arriving, so it starts from the newest state
/// instead of redoing those steps.
pub struct UploadGuard(std::sync::Arc<Shared>);

impl UploadGuard {
    pub fn new(shared: std::sync::Arc<Shared>) -> Self {
        shared
            .uploads
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        UploadGuard(shared)
    }
}

impl Drop for UploadGuard {
    fn drop(&mut self) {
        self.0
            .uploads
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Shared {
    pub fn status(&self) -> proto::StatusResponse {
        let st = self.state.lock().unwrap();
        let stage = self.cfg.stages.get(st.stage_index as usize);
        let last = st.last.clone().unwrap_or_default();
        proto::StatusResponse {
            job_id: self.job_id.clone(),
            phase: st.phase.as_str().into(),
            generation: st.generation,
            workers: st.members.len() as u32,
            stage_index: st.stage_index,
            stages: self.cfg.stages.len() as u32,
            stage_name: stage.map(|s| s.name.clone()).unwrap_or_default(),
            epoch: last.epoch,
            epochs: stage.map(|s| s.epochs).unwrap_or(0),
            step: last.step,
            total_steps: last.total_steps,
            loss: last.loss,
            mlm_accuracy: last.mlm_accuracy,
            nsp_accuracy: last.nsp_accuracy,
            samples_per_s: last.samples_per_s,
            elapsed_s: self.started.elapsed().as_secs_f64(),
            message: st.message.clone(),
            members: st.members.values().map(Member::status).collect(),
            train_accuracy: last.train_accuracy,
        }
    }

    /// Sends a directive to every member (ignoring members already gone).
    pub fn broadcast(&self, d: proto::directive::Kind) {
        let st = self.state.lock().unwrap();
        for m in st.members.values() {
            let _ = m.tx.try_send(Ok(proto::Directive {
                kind: Some(d.clone()),
            }));
        }
    }
}
