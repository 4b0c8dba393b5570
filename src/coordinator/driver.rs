//! The coordinator's state machine: rendezvous, generations, failures and restarts, stage
//! transitions, and the job's durable record (`state_dir/job_state.json`).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::state::{Event, Phase, Shared};
use super::status::JobStatus;
use super::{StageSummary, Summary};
use crate::data::tokenizer::Tokenizer;
use crate::proto::{self, directive::Kind};

/// The job's durable state (`state_dir/job_state.json`): what a restarted coordinator needs
/// to resume the job.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub(crate) struct JobRecord {
    pub job: String,
    pub status: JobStatus,
    pub stage_index: u32,
    pub generation: u64,
    /// Generations that failed and were restarted (since the last manual resume).
    pub restarts: u32,
    /// One line per generation: world size, outcome.
    pub history: Vec<GenerationRecord>,
}

/// One generation of the job: its stage, size, starting checkpoint and outcome.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenerationRecord {
    /// The generation's number.
    pub generation: u64,
    /// The stage it ran (records written before this field existed read as stage 0).
    #[serde(default)]
    pub stage_index: u32,
    /// Ranks in the generation.
    pub world_size: u32,
    /// The checkpoint it started from: the stage's resume point, or, for a fine-tuning
    /// stage's first generation, the checkpoint its encoder comes from ("" = from scratch).
    pub start_checkpoint: String,
    /// "completed", or why it ended.
    pub outcome: String,
}

pub(crate) const JOB_RECORD: &str = "job_state.json";

impl JobRecord {
    pub fn load(state_dir: &std::path::Path) -> anyhow::Result<Option<JobRecord>> {
        let p = state_dir.join(JOB_RECORD);
        match std::fs::read(&p) {
            Ok(b) => Ok(Some(
                serde_json::from_slice(&b).with_context(|| format!("reading {}", p.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }

    fn save(&self, state_dir: &std::path::Path) -> anyhow::Result<()> {
        crate::util::write_atomic(
            &state_dir.join(JOB_RECORD),
            serde_json::to_string_pretty(self)?.as_bytes(),
        )?;
        Ok(())
    }
}

/// A generation training the current stage.
struct Generation {
    world: u32,
    /// The final reports of the ranks that finished the stage.
    done: BTreeMap<u32, proto::ProgressReport>,
}

/// Waiting for workers to form the next generation.
struct Gathering {
    /// The job fails if fewer than `min_workers` have joined by then.
    deadline: Instant,
    /// Since when `min_workers` are present (`join_window_s` counts from here).
    quorum_since: Option<Instant>,
    /// After a failed generation, none is formed before this (see [`RESTART_SETTLE`]).
    settle_until: Option<Instant>,
    /// Until when a quorum waits for a checkpoint upload still in flight.
    upload_wait: Option<Instant>,
}

impl Gathering {
    fn new(join_timeout_s: f64, settle: Option<Duration>) -> Self {
        Gathering {
            deadline: Instant::now() + Duration::from_secs_f64(join_timeout_s),
            quorum_since: None,
            settle_until: settle.map(|d| Instant::now() + d),
            upload_wait: None,
        }
    }
}

/// The driver's state: everything its decisions depend on besides the job record.
enum State {
    Rendezvous(Gathering),
    Running(Generation),
}

/// What an event or a tick leads to.
enum Next {
    /// Nothing more to do now.
    Go,
    /// The generation failed for this reason (and, for a stall, because of this member).
    Failed(String, Option<u64>),
    /// The job ended.
    End(Summary),
}

struct Driver {
    shared: Arc<Shared>,
    record: JobRecord,
    state: State,
    stages: Vec<StageSummary>,
    /// When the current stage's first generation was assigned, and the coordinator's CPU
    /// time then (for the stage's `wall_s` and `coordinator_cpu_s`).
    stage_clock: Option<(Instant, Option<f64>)>,
    /// The member that was rank 0 (the uploader) of the latest generation.
    uploader: Option<u64>,
}

/// How long the coordinator lets a failure settle before it forms the next generation. A rank
/// often reports that its ring lost a peer a moment before the coordinator sees that peer's
/// stream end (a killed process); a generation formed at once would still include the dead
/// worker, fail at once and cost a restart (seen under load).
const RESTART_SETTLE: Duration = Duration::from_secs(1);

impl Driver {
    fn state_dir(&self) -> &std::path::Path {
        &self.shared.cfg.job.state_dir
    }

    fn persist(&self) {
        if let Err(e) = self.record.save(self.state_dir()) {
            tracing::error!("cannot persist the job state: {e:#}");
        }
    }

    fn summary(&self, status: JobStatus, reason: String) -> Summary {
        let world_size = match &self.state {
            State::Running(g) => g.world,
            State::Rendezvous(_) => 0,
        };
        Summary {
            job: self.shared.job_id.clone(),
            status,
            reason,
            generations: self.record.generation,
            restarts: self.record.restarts,
            history: self.record.history.clone(),
            world_size,
            wall_s: self.shared.started.elapsed().as_secs_f64(),
            corpus_documents: self.shared.prepared.index.total_documents(),
            shards: self.shared.prepared.index.shards.len(),
            stages: self.stages.clone(),
            final_checkpoint: Some(self.state_dir().join("final")).filter(|p| p.exists()),
        }
    }

    fn end(&mut self, status: JobStatus, reason: String) -> Summary {
        self.record.status = status;
        if let Some(h) = self.record.history.last_mut() {
            if h.outcome.is_empty() {
                h.outcome = if reason.is_empty() {
                    status.to_string()
                } else {
                    reason.clone()
                };
            }
        }
        self.persist();
        set_phase(
            &self.shared,
            if status == JobStatus::Completed {
                Phase::Finished
            } else {
                Phase::Failed
            },
            status.as_str(),
        );
        self.shared.broadcast(Kind::Stop(proto::Stop {
            reason: if reason.is_empty() {
                format!("job {status}")
            } else {
                reason.clone()
            },
            kind: status.stop_kind() as i32,
        }));
        self.summary(status, reason)
    }

    /// An event in the current state.
    fn on_event(&mut self, ev: Event) -> anyhow::Result<Next> {
        let running = matches!(self.state, State::Running(_));
        Ok(match ev {
            Event::Checkpoint(name) => {
                tracing::debug!(%name, "checkpoint event");
                Next::Go
            }
            Event::Joined => Next::Go,
            Event::Left(id) => {
                let m = self.shared.state.lock().unwrap().members.remove(&id);
                match m {
                    Some(m) if running && m.rank.is_some() => Next::Failed(
                        format!(
                            "rank {} (worker {}) disconnected at step {} while {}",
                            m.rank.unwrap_or_default(),
                            m.worker_id,
                            m.step,
                            m.phase
                        ),
                        None,
                    ),
                    _ => Next::Go,
                }
            }
            Event::Failed { rank, error } if running => {
                Next::Failed(format!("rank {rank} failed: {error}"), None)
            }
            Event::Failed { .. } => Next::Go,
            Event::Done(r) if running => self.on_done(*r)?,
            Event::Done(_) => Next::Go,
        })
    }

    /// A rank's final report of the stage; once every rank has sent one, the stage ends.
    fn on_done(&mut self, r: proto::ProgressReport) -> anyhow::Result<Next> {
        let State::Running(g) = &mut self.state else {
            return Ok(Next::Go);
        };
        tracing::info!(
            rank = r.rank,
            step = r.step,
            fingerprint = format!("{:016x}", r.param_fingerprint),
            "rank finished the stage"
        );
        g.done.insert(r.rank, r);
        if g.done.len() as u32 == g.world {
            return self.finish_stage();
        }
        Ok(Next::Go)
    }

    /// Every rank finished the stage: its summary, then the next stage with the same
    /// workers, or the job's end.
    fn finish_stage(&mut self) -> anyhow::Result<Next> {
        let clock = self.stage_clock.take();
        let State::Running(g) = &self.state else {
            return Ok(Next::Go);
        };
        let shared = self.shared.clone();
        let current = shared.state.lock().unwrap().stage_index;
        if let Some(why) = done_disagrees(&g.done) {
            return Ok(Next::Failed(why, None));
        }
        // Rank 0 uploaded the stage's final checkpoint before reporting done. A done without
        // it (premature, or a failed upload) fails the generation, not the whole job: the next
        // one resumes from the last checkpoint.
        let final_files = match shared.store.read(&format!("stage{current}-final")) {
            Ok(f) => f,
            Err(e) => {
                let why = format!("every rank reported stage {current} done, but its final checkpoint is not usable: {e}");
                return Ok(Next::Failed(why, None));
            }
        };
        let s = stage_summary(&shared, g, &final_files, &self.record.history, clock);
        tracing::info!("{}", super::stage_line(&s));
        let (identical, fps) = (s.replicas_identical, s.param_fingerprints.clone());
        self.stages.push(s);
        if !identical {
            let why = format!("replicas diverged: parameter fingerprints {fps:?}");
            return Ok(Next::End(self.end(JobStatus::Failed, why)));
        }
        let next = current + 1;
        if next as usize >= shared.cfg.stages.len() {
            export_final(&shared, final_files)?;
            return Ok(Next::End(self.end(JobStatus::Completed, String::new())));
        }
        shared.state.lock().unwrap().stage_index = next;
        self.record.stage_index = next;
        if let Some(h) = self.record.history.last_mut() {
            h.outcome = format!("stage {current} completed");
        }
        tracing::info!(stage = next, name = %shared.cfg.stages[next as usize].name, "starting the next stage");
        self.assign()?;
        Ok(Next::Go)
    }

    /// What time alone decides: a stalled rank while running; forming a generation, or
    /// giving up on one, while gathering.
    fn tick(&mut self) -> anyhow::Result<Next> {
        match &self.state {
            State::Running(_) => Ok(self.stalled()),
            State::Rendezvous(_) => self.gather(),
        }
    }

    /// A rank silent for longer than `heartbeat_timeout_s`, as a failure.
    fn stalled(&self) -> Next {
        let c = &self.shared.cfg.cluster;
        let limit = Duration::from_secs_f64(c.heartbeat_timeout_s);
        let st = self.shared.state.lock().unwrap();
        let silent = st
            .members
            .iter()
            .find(|(_, m)| m.rank.is_some() && m.last_seen.elapsed() > limit);
        match silent {
            Some((id, m)) => Next::Failed(
                format!(
                    "rank {} (worker {}) stalled: silent for {:.0} s (heartbeat_timeout_s = {}) at step {} while {}",
                    m.rank.unwrap_or_default(),
                    m.worker_id,
                    m.last_seen.elapsed().as_secs_f64(),
                    c.heartbeat_timeout_s,
                    m.step,
                    m.phase
                ),
                Some(*id),
            ),
            None => Next::Go,
        }
    }

    /// Rendezvous: forms a generation once `max_workers` joined, or `min_workers` stayed for
    /// `join_window_s`, a failure has settled and no checkpoint upload is still arriving; fails
    /// the job when `min_workers` did not join by the deadline.
    fn gather(&mut self) -> anyhow::Result<Next> {
        let c = &self.shared.cfg.cluster;
        let (n, uploader_here) = {
            let st = self.shared.state.lock().unwrap();
            let here = self.uploader.is_some_and(|id| st.members.contains_key(&id));
            (st.members.len(), here)
        };
        let in_flight = &self.shared.uploads;
        let upload_limit = Duration::from_secs_f64(c.collective_timeout_s);
        let State::Rendezvous(g) = &mut self.state else {
            return Ok(Next::Go);
        };
        if n < c.min_workers {
            g.quorum_since = None;
            if Instant::now() <= g.deadline {
                return Ok(Next::Go);
            }
            let mut reason = format!(
                "only {n} of min_workers = {} joined within join_timeout_s = {}",
                c.min_workers, c.join_timeout_s
            );
            if let Some(r) = self.shared.refusals.describe() {
                reason += &format!("; {r}");
            }
            return Ok(Next::End(self.end(JobStatus::Failed, reason)));
        }
        let since = *g.quorum_since.get_or_insert_with(Instant::now);
        let settled = g.settle_until.is_none_or(|t| Instant::now() >= t);
        let full =
            n >= c.max_workers || since.elapsed() >= Duration::from_secs_f64(c.join_window_s);
        if full
            && settled
            && !waiting_for_uploads(&mut g.upload_wait, in_flight, uploader_here, upload_limit)
        {
            self.assign()?;
        }
        Ok(Next::Go)
    }

    /// A generation ended badly: abort it everywhere, evict the culprit (if any), and either
    /// go back to rendezvous for a new generation or fail the job after `max_restarts`.
    fn on_failure(&mut self, reason: String, culprit: Option<u64>) -> Option<Summary> {
        let generation = self.shared.state.lock().unwrap().generation;
        tracing::error!(generation, "generation failed: {reason}");
        if let Some(id) = culprit {
            // Dropping its directive sender ends its stream: a stalled worker that wakes up
            // finds itself out and rejoins.
            self.shared.state.lock().unwrap().members.remove(&id);
        }
        self.shared.broadcast(Kind::Abort(proto::Abort {
            generation,
            reason: reason.clone(),
        }));
        if let Some(h) = self.record.history.last_mut() {
            h.outcome = reason.clone();
        }
        let max = self.shared.cfg.cluster.max_restarts;
        if self.record.restarts >= max {
            let r = format!("{reason}; giving up after max_restarts = {max} restarts");
            return Some(self.end(JobStatus::Failed, r));
        }
        self.record.restarts += 1;
        self.persist();
        {
            let mut st = self.shared.state.lock().unwrap();
            st.phase = Phase::Rendezvous;
            st.message = format!("restart {}/{max}: {reason}", self.record.restarts);
            for m in st.members.values_mut() {
                m.rank = None;
            }
        }
        let join_timeout_s = self.shared.cfg.cluster.join_timeout_s;
        self.state = State::Rendezvous(Gathering::new(join_timeout_s, Some(RESTART_SETTLE)));
        tracing::warn!(
            restart = self.record.restarts,
            max,
            "waiting for workers to (re)join for a new generation"
        );
        None
    }

    /// Starts a generation: ranks in join order, peers, the checkpoint to resume from.
    fn assign(&mut self) -> anyhow::Result<()> {
        self.stage_clock
            .get_or_insert_with(|| (Instant::now(), crate::util::process_cpu_seconds()));
        let start_checkpoint = self.resume_point();
        let shared = &self.shared;
        let mut st = shared.state.lock().unwrap();
        st.generation = st.generation.max(self.record.generation) + 1;
        let generation = st.generation;
        let ids: Vec<u64> = st
            .members
            .keys()
            .copied()
            .take(shared.cfg.cluster.max_workers)
            .collect();
        let peers: Vec<String> = ids
            .iter()
            .map(|id| st.members[id].ring_addr.clone())
            .collect();
        let world = ids.len() as u32;
        self.uploader = ids.first().copied();
        let stage_index = st.stage_index;
        let inputs = shared.prepared.stages[stage_index as usize].clone();
        let encoder_checkpoint = match (stage_index, &inputs.imported) {
            (_, Some(name)) => name.clone(),
            (0, None) => String::new(),
            (i, None) => format!("stage{}-final", i - 1),
        };
        for (rank, id) in ids.iter().enumerate() {
            let m = st.members.get_mut(id).expect("member listed");
            m.rank = Some(rank as u32);
            m.last_seen = Instant::now();
            m.phase = "assigned".into();
            m.secret = crate::util::random_hex(32);
            let a = proto::Assignment {
                member_secret: m.secret.clone(),
                generation,
                rank: rank as u32,
                world_size: world,
                peers: peers.clone(),
                job_config_json: shared.cfg_json.clone(),
                stage_index,
                shard_index_json: shared.prepared.index_json.clone(),
                tokenizer_json: inputs
                    .tokenizer_json
                    .clone()
                    .unwrap_or_else(|| shared.prepared.tokenizer_json.clone()),
                model_config_json: inputs
                    .model_cfg_json
                    .clone()
                    .unwrap_or_else(|| shared.prepared.model_cfg_json.clone()),
                init_checkpoint: start_checkpoint.clone(),
                encoder_checkpoint: encoder_checkpoint.clone(),
                // Descriptions only: workers fetch the bytes with FetchStageFile.
                stage_files: inputs
                    .files
                    .iter()
                    .map(|f| proto::DataFile {
                        data: vec![],
                        ..f.clone()
                    })
                    .collect(),
            };
            let _ = m.tx.try_send(Ok(proto::Directive {
                kind: Some(Kind::Assignment(a)),
            }));
        }
        st.phase = Phase::Running;
        st.message = format!("generation {generation}: {world} workers");
        drop(st);
        tracing::info!(generation, world, ?peers, checkpoint = %start_checkpoint, encoder = %encoder_checkpoint, "assigned ranks");
        self.record.generation = generation;
        self.record.status = JobStatus::Running;
        self.record.history.push(GenerationRecord {
            generation,
            stage_index,
            world_size: world,
            start_checkpoint: match start_checkpoint.as_str() {
                "" => encoder_checkpoint,
                _ => start_checkpoint,
            },
            outcome: String::new(),
        });
        self.persist();
        self.state = State::Running(Generation {
            world,
            done: BTreeMap::new(),
        });
        Ok(())
    }

    /// The newest verified checkpoint of the current stage ("" = none: start from scratch).
    fn resume_point(&self) -> String {
        let stage = self.shared.state.lock().unwrap().stage_index;
        match self.shared.store.latest_good() {
            Some((name, files)) => {
                let state = files
                    .iter()
                    .find(|(f, _)| f == crate::train::checkpoint::STATE_FILE);
                let st: Option<crate::train::checkpoint::TrainerState> =
                    state.and_then(|(_, b)| serde_json::from_slice(b).ok());
                match st {
                    Some(s) if s.stage_index == stage => name,
                    _ => String::new(),
                }
            }
            None => String::new(),
        }
    }
}

/// Whether to hold a new generation back because a checkpoint (of the generation that just
/// failed) is still arriving: it is newer than any the new generation could start from.
/// Bounded by `limit` (`cluster.collective_timeout_s`) from the first wait (`wait`); an
/// uploader that left or was evicted (stalled) will not finish, so it is not waited for.
fn waiting_for_uploads(
    wait: &mut Option<Instant>,
    in_flight: &std::sync::atomic::AtomicUsize,
    uploader_here: bool,
    limit: Duration,
) -> bool {
    let in_flight = in_flight.load(std::sync::atomic::Ordering::SeqCst);
    if in_flight == 0 || !uploader_here {
        *wait = None;
        return false;
    }
    let until = *wait.get_or_insert_with(|| {
        tracing::info!(
            in_flight,
            "a checkpoint upload is still arriving: the new generation waits for it (at most {:.0} s)",
            limit.as_secs_f64()
        );
        Instant::now() + limit
    });
    if Instant::now() < until {
        return true;
    }
    tracing::warn!(
        "the checkpoint upload did not finish within {:.0} s: starting without it",
        limit.as_secs_f64()
    );
    false
}

/// Runs the job's state machine until it ends: events from the gRPC handlers, and a tick for
/// what time alone decides (heartbeats, join windows, deadlines).
pub(super) async fn drive(
    shared: Arc<Shared>,
    mut events: mpsc::UnboundedReceiver<Event>,
    shutdown: impl Future<Output = ()>,
    record: JobRecord,
) -> anyhow::Result<Summary> {
    let join_timeout_s = shared.cfg.cluster.join_timeout_s;
    let mut d = Driver {
        shared,
        record,
        state: State::Rendezvous(Gathering::new(join_timeout_s, None)),
        stages: vec![],
        stage_clock: None,
        uploader: None,
    };
    tokio::pin!(shutdown);
    loop {
        let ev = tokio::select! {
            _ = &mut shutdown => {
                tracing::warn!("shutdown requested: telling workers to stop; the last checkpoint is kept");
                return Ok(d.end(JobStatus::Interrupted, "interrupted by signal".into()));
            }
            ev = events.recv() => ev,
            _ = tokio::time::sleep(Duration::from_millis(200)) => None,
        };
        let mut next = match ev {
            Some(ev) => d.on_event(ev)?,
            None => Next::Go,
        };
        if let Next::Go = next {
            next = d.tick()?;
        }
        match next {
            Next::Go => {}
            Next::End(summary) => return Ok(summary),
            Next::Failed(reason, culprit) => {
                if let Some(summary) = d.on_failure(reason, culprit) {
                    return Ok(summary);
                }
            }
        }
    }
}

fn set_phase(shared: &Shared, phase: Phase, message: &str) {
    let mut st = shared.state.lock().unwrap();
    st.phase = phase;
    st.message = message.into();
}

fn stage_summary(
    shared: &Shared,
    g: &Generation,
    final_files: &[(String, Vec<u8>)],
    history: &[GenerationRecord],
    clock: Option<(Instant, Option<f64>)>,
) -> StageSummary {
    let mut st = shared.state.lock().unwrap();
    // The coordinator's own cost: over the whole stage, and over rank 0's training window.
    let cpu_now = crate::util::process_cpu_seconds();
    let wall_s = clock.map(|(t, _)| t.elapsed().as_secs_f64());
    let coordinator_cpu_s = clock.and_then(|(_, c)| Some(cpu_now? - c?));
    let window = st.train_window.take();
    let stage = &shared.cfg.stages[st.stage_index as usize];
    // Rank 0's final report carries the global metrics averaged over the last steps.
    let r0 = &g.done[&0];
    let fps: Vec<String> = g
        .done
        .values()
        .map(|r| format!("{:016x}", r.param_fingerprint))
        .collect();
    // The ledger comes from the stage's final checkpoint (written by rank 0 before it
    // reported done): every committed range of every generation.
    let final_state = final_files
        .iter()
        .find(|(f, _)| f == crate::train::checkpoint::STATE_FILE)
        .and_then(|(_, b)| {
            serde_json::from_slice::<crate::train::checkpoint::TrainerState>(b).ok()
        });
    let ledger = final_state
        .as_ref()
        .map(|s| {
            crate::train::checkpoint::epoch_ledgers(&s.ledger, &s.planned.iter().copied().collect())
        })
        .unwrap_or_default();
    let totals = final_state.map(|s| s.totals).unwrap_or_default();
    let (first_loss, last_loss) =
        super::metrics_log::first_and_last_loss(&shared.cfg.job.state_dir, st.stage_index);
    let docs = shared.prepared.index.total_documents();
    let pretrain = stage.kind == crate::config::StageKind::Pretrain;
    let full_epochs = ledger
        .iter()
        .filter(|e| e.instances_planned > 0 && e.instances_consumed == e.instances_planned)
        .count() as u64;
    // Each kind reports what it measures: MLM/NSP and the data fractions for pre-training,
    // the task's training accuracy for fine-tuning.
    let pre = |v: f32| pretrain.then_some(v);
    StageSummary {
        name: stage.name.clone(),
        kind: stage.kind.name(),
        steps: r0.step,
        epochs: ledger.iter().filter(|e| e.instances_consumed > 0).count() as u32,
        epochs_planned: stage.epochs,
        examples: r0.examples,
        documents: pretrain.then_some(full_epochs * docs),
        loss: r0.loss,
        mlm_loss: pre(r0.mlm_loss),
        nsp_loss: pre(r0.nsp_loss),
        mlm_accuracy: pre(r0.mlm_accuracy),
        nsp_accuracy: pre(r0.nsp_accuracy),
        train_accuracy: (!pretrain).then_some(r0.train_accuracy),
        samples_per_s: r0.samples_per_s,
        first_loss,
        last_loss: last_loss.or(Some(r0.loss)),
        masked_fraction: totals.masked_fraction().filter(|_| pretrain),
        is_next_fraction: totals.is_next_fraction().filter(|_| pretrain),
        world_size: g.world,
        generations: history
            .iter()
            .filter(|h| h.stage_index == st.stage_index)
            .map(|h| h.generation)
            .collect(),
        replicas_identical: fps.windows(2).all(|w| w[0] == w[1]),
        param_fingerprints: fps,
        epochs_ledger: ledger,
        metrics: serde_json::from_str(&r0.metrics_json).unwrap_or_default(),
        majority_baseline: shared.prepared.stages[st.stage_index as usize].majority_baseline,
        wall_s,
        coordinator_cpu_s,
        training_window_s: window.map(|[a, b]| (b.0 - a.0).as_secs_f64()),
        coordinator_cpu_training_s: window.map(|[a, b]| b.1 - a.1),
    }
}

/// Copies the last stage's best checkpoint (fine-tuning) or its final one, and the tokenizer,
/// to `state_dir/final` as an HF directory (config.json, model.safetensors, tokenizer.json,
/// vocab.txt).
fn export_final(shared: &Shared, final_files: Vec<(String, Vec<u8>)>) -> anyhow::Result<()> {
    let dst = shared.cfg.job.state_dir.join("final");
    let last = shared.cfg.stages.len() - 1;
    let best = format!("stage{last}-best");
    let (name, files) = match shared.store.read(&best) {
        Ok(files) => (best, files),
        Err(_) => (format!("stage{last}-final"), final_files),
    };
    std::fs::create_dir_all(&dst)?;
    for (f, bytes) in &files {
        if f == crate::model::hf::WEIGHTS_FILE || f == crate::model::hf::CONFIG_FILE {
            crate::util::write_atomic(&dst.join(f), bytes)?;
        }
    }
    let stage_tok = shared.prepared.stages[last].tokenizer_json.as_ref();
    let tok = Tokenizer::from_json(stage_tok.unwrap_or(&shared.prepared.tokenizer_json))?;
    tok.save(&dst)?;
    tracing::info!(checkpoint = %name, "final model exported to {}", dst.display());
    Ok(())
}

/// Why the ranks' final reports of a stage cannot all be true: they must name the same step
/// (ranks take every step together). `None` when they agree.
fn done_disagrees(done: &std::collections::BTreeMap<u32, proto::ProgressReport>) -> Option<String> {
    let steps: std::collections::BTreeSet<u64> = done.values().map(|r| r.step).collect();
    (steps.len() > 1).then(|| {
        let each: Vec<String> = done
            .iter()
            .map(|(k, r)| format!("rank {k} at step {}", r.step))
            .collect();
        format!(
            "the ranks reported the stage done at different steps ({}): a premature report",
            each.join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_reports_must_name_one_step() {
        let at = |step| proto::ProgressReport {
            step,
            ..Default::default()
        };
        let agree = BTreeMap::from([(0, at(40)), (1, at(40))]);
        assert_eq!(done_disagrees(&agree), None);
        let early = BTreeMap::from([(0, at(40)), (1, at(12))]);
        let why = done_disagrees(&early).unwrap();
        assert!(
            why.contains("rank 1 at step 12") && why.contains("premature"),
            "{why}"
        );
    }
}
