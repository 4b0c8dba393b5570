//! The coordinator: owns the job's truth (stages, membership and generation, data plan,
//! checkpoints, metrics), persists it under `state_dir`, and never touches a gradient.
//!
//! [`run`] prepares the job (shard index, tokenizer, model config), serves the gRPC
//! `Coordinator` service and drives the job's state machine until it finishes, fails or
//! `shutdown` resolves.

mod service;
mod state;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

pub use service::{auth_interceptor, checkpoint_chunks};
use state::{Event, JobState, Phase, Prepared, Shared, StageInputs};

use crate::config::JobConfig;
use crate::data::corpus::{resolve_inputs, CorpusOptions, ErrorPolicy};
use crate::data::shard::{build_index, ShardIndex};
use crate::data::tokenizer::{train_wordpiece, Tokenizer};
use crate::model::{BertConfig, Preset};
use crate::proto::{self, directive::Kind};
use crate::train::checkpoint::CheckpointStore;

pub struct CoordinatorOptions {
    pub listen: SocketAddr,
    /// Write the bound address here once listening (for `tandem launch` and tests).
    pub addr_file: Option<PathBuf>,
    pub token: String,
    /// Whether to continue the job recorded in `state_dir`.
    pub resume: Resume,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// Refuse a state_dir that already holds a job.
    Never,
    /// Continue the job in state_dir; refuse an empty one.
    Required,
    /// Continue if there is a job, start one otherwise.
    IfPresent,
}

/// Written to `state_dir/summary.json` when the job ends.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub job: String,
    /// "completed", "failed" or "interrupted".
    pub status: String,
    pub reason: String,
    pub generations: u64,
    /// Failed generations that were restarted.
    pub restarts: u32,
    pub history: Vec<GenerationRecord>,
    pub world_size: u32,
    pub wall_s: f64,
    pub corpus_documents: u64,
    pub shards: usize,
    pub stages: Vec<StageSummary>,
    pub final_checkpoint: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageSummary {
    pub name: String,
    pub kind: String,
    pub steps: u64,
    pub epochs: u32,
    pub examples: u64,
    /// Documents of the epochs whose every planned instance was consumed exactly once in
    /// committed steps (from the ledger): epochs × corpus_documents for a finished stage.
    pub documents: u64,
    pub loss: f32,
    pub mlm_loss: f32,
    pub nsp_loss: f32,
    /// Training loss and accuracies, averaged over the stage's last 20 steps (global: every
    /// rank's examples).
    pub mlm_accuracy: f32,
    pub nsp_accuracy: f32,
    pub samples_per_s: f32,
    /// Parameter fingerprint of every rank at the end (all equal when replicas are in sync).
    pub param_fingerprints: Vec<String>,
    pub replicas_identical: bool,
    /// Per epoch: instances planned, consumed and consumed more than once (committed steps
    /// only, across every generation and restart).
    pub epochs_ledger: Vec<crate::train::checkpoint::EpochLedger>,
    /// Fine-tuning: dev metrics of the final and best epochs (from rank 0's final report).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub metrics: serde_json::Value,
    /// Classification: dev accuracy of always predicting the most frequent label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub majority_baseline: Option<f64>,
}

fn corpus_options(cfg: &JobConfig) -> CorpusOptions {
    CorpusOptions {
        max_line_bytes: cfg.data.max_line_bytes,
        on_error: if cfg.data.on_error == "skip" {
            ErrorPolicy::Skip
        } else {
            ErrorPolicy::Fail
        },
    }
}

/// Builds (or re-uses) the shard index, the tokenizer and the model config under `state_dir`.
pub fn prepare(cfg: &JobConfig) -> anyhow::Result<Prepared> {
    let state_dir = &cfg.job.state_dir;
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating state_dir {}", state_dir.display()))?;
    let files = resolve_inputs(&cfg.data.corpus)?;
    let opts = corpus_options(cfg);
    let index_path = state_dir.join("shards.json");
    let index = match ShardIndex::load(&index_path) {
        Ok(ix)
            if ix.options == opts
                && ix.same_inputs(&files, cfg.shard_bytes())
                && ix.verify_unchanged().is_ok() =>
        {
            tracing::info!(
                shards = ix.shards.len(),
                "re-using the shard index in {}",
                index_path.display()
            );
            ix
        }
        _ => {
            let t0 = Instant::now();
            let ix = build_index(&files, cfg.shard_bytes(), &opts)?;
            ix.save(&index_path)?;
            tracing::info!(
                shards = ix.shards.len(),
                documents = ix.total_documents(),
                secs = format!("{:.2}", t0.elapsed().as_secs_f64()),
                "built the shard index"
            );
            ix
        }
    };
    let tok_dir = state_dir.join("tokenizer");
    let tokenizer = match &cfg.data.tokenizer {
        Some(p) => Tokenizer::load(p)?,
        None if tok_dir.join("tokenizer.json").exists() => Tokenizer::load(&tok_dir)?,
        None => {
            tracing::info!(
                vocab_size = cfg.data.vocab_size,
                "training a WordPiece vocabulary on the corpus"
            );
            let t0 = Instant::now();
            let tok = train_wordpiece(&files, cfg.data.vocab_size, cfg.data.lowercase, None, 2)?;
            tok.save(&tok_dir)?;
            tracing::info!(
                vocab = tok.vocab_size(),
                secs = format!("{:.1}", t0.elapsed().as_secs_f64()),
                "tokenizer saved to {}",
                tok_dir.display()
            );
            tok
        }
    };
    let mut model_cfg = match (&cfg.model.preset, &cfg.model.config) {
        (Some(p), _) => BertConfig::preset(*p),
        (None, Some(path)) => BertConfig::load(path)?,
        (None, None) => BertConfig::preset(Preset::Tiny),
    };
    model_cfg.vocab_size = tokenizer.vocab_size();
    model_cfg.pad_token_id = tokenizer.pad_id() as usize;
    if let Some(p) = cfg.model.dropout {
        model_cfg.hidden_dropout_prob = p;
        model_cfg.attention_probs_dropout_prob = p;
    }
    if let Some(m) = cfg.model.max_position_embeddings {
        model_cfg.max_position_embeddings = m;
    }
    let seq = cfg.data.instances.max_seq_length;
    anyhow::ensure!(
        seq <= model_cfg.max_position_embeddings,
        "data.instances.max_seq_length {seq} exceeds the model's max_position_embeddings {}",
        model_cfg.max_position_embeddings
    );
    model_cfg.validate()?;
    let stages = cfg
        .stages
        .iter()
        .enumerate()
        .map(|(i, s)| stage_inputs(cfg, i, s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Prepared {
        index_json: serde_json::to_string(&index)?,
        index,
        tokenizer_json: tokenizer.to_json()?,
        model_cfg_json: serde_json::to_string(&model_cfg)?,
        model_cfg,
        stages,
    })
}

/// Reads a fine-tuning stage's datasets and `init_from` checkpoint (imported into the
/// checkpoint store, so workers fetch it over gRPC like any checkpoint).
fn stage_inputs(
    cfg: &JobConfig,
    i: usize,
    s: &crate::config::StageConfig,
) -> anyhow::Result<StageInputs> {
    use crate::config::StageKind;
    if s.kind == StageKind::Pretrain {
        return Ok(StageInputs::default());
    }
    let mut out = StageInputs::default();
    for (role, path) in [("train", &s.train), ("dev", &s.dev)] {
        let path = path.as_ref().expect("validated");
        let data = std::fs::read(path)
            .with_context(|| format!("stages[{i}].{role}: reading {}", path.display()))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| role.into());
        out.files.push(proto::DataFile {
            role: role.into(),
            name,
            sha256: crate::train::checkpoint::sha256_hex(&data),
            size: data.len() as u64,
            data,
        });
    }
    // Check the datasets here, so a bad file fails the job before any worker starts.
    let (train, dev) = (s.train.as_ref().unwrap(), s.dev.as_ref().unwrap());
    match s.kind {
        StageKind::SequenceClassification | StageKind::PairClassification => {
            let t = crate::data::finetune::ClassificationSet::read(train)?;
            let d = crate::data::finetune::ClassificationSet::read(dev)?;
            let labels = t.label_map()?;
            let ids = d.label_ids(&labels)?;
            let mut counts = vec![0usize; labels.len()];
            ids.iter().for_each(|i| counts[*i as usize] += 1);
            out.majority_baseline =
                Some(*counts.iter().max().unwrap_or(&0) as f64 / ids.len().max(1) as f64);
        }
        StageKind::TokenClassification => {
            let t = crate::data::finetune::TokenSet::read(train)?;
            crate::data::finetune::TokenSet::read(dev)?.label_ids(&t.label_map()?)?;
        }
        StageKind::QuestionAnswering => {
            crate::data::finetune::QaSet::read(train)?;
            crate::data::finetune::QaSet::read(dev)?;
        }
        StageKind::Pretrain => unreachable!(),
    }
    if let Some(dir) = s.init_from.as_deref().filter(|d| *d != "previous") {
        let dir = std::path::Path::new(dir);
        let mut files = vec![];
        for f in [
            crate::model::hf::WEIGHTS_FILE,
            crate::model::hf::CONFIG_FILE,
        ] {
            let p = dir.join(f);
            files.push((
                f.to_string(),
                std::fs::read(&p)
                    .with_context(|| format!("stages[{i}].init_from: reading {}", p.display()))?,
            ));
        }
        let mcfg = BertConfig::load(&dir.join(crate::model::hf::CONFIG_FILE))?;
        out.model_cfg_json = Some(serde_json::to_string(&mcfg)?);
        if dir.join("tokenizer.json").exists() || dir.join("vocab.txt").exists() {
            let tok = Tokenizer::load(dir)?;
            anyhow::ensure!(
                tok.vocab_size() <= mcfg.vocab_size,
                "stages[{i}].init_from: the tokenizer has {} tokens, the model {}",
                tok.vocab_size(),
                mcfg.vocab_size
            );
            out.tokenizer_json = Some(tok.to_json()?);
        }
        let name = format!("stage{i}-init");
        let store =
            CheckpointStore::new(cfg.job.state_dir.join("checkpoints"), cfg.checkpoint.keep)?;
        store.commit(&name, &files)?;
        out.imported = Some(name);
    }
    Ok(out)
}

/// Runs the job to its end. The returned summary is also written to `state_dir/summary.json`.
pub async fn run(
    cfg: JobConfig,
    opts: CoordinatorOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<Summary> {
    let record = match JobRecord::load(&cfg.job.state_dir)? {
        Some(r) if opts.resume == Resume::Never => anyhow::bail!(
            "state_dir {} already holds job {:?} ({}, generation {}); pass --resume to continue it, or choose another state_dir",
            cfg.job.state_dir.display(),
            r.job,
            r.status,
            r.generation
        ),
        Some(r) if r.status == "completed" => {
            let path = cfg.job.state_dir.join("summary.json");
            tracing::info!("job {:?} already finished; its summary is {}", r.job, path.display());
            let s: Summary = serde_json::from_slice(&std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?)?;
            return Ok(s);
        }
        Some(mut r) => {
            tracing::info!(generation = r.generation, status = %r.status, "resuming job {:?}", r.job);
            r.restarts = 0;
            r
        }
        None if opts.resume == Resume::Required => anyhow::bail!("--resume: {} holds no job to resume", cfg.job.state_dir.display()),
        None => JobRecord { job: cfg.job.name.clone(), status: "running".into(), ..Default::default() },
    };
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("binding {}", opts.listen))?;
    let addr = listener.local_addr()?;
    let cfg2 = cfg.clone();
    let prepared = tokio::task::spawn_blocking(move || prepare(&cfg2)).await??;
    let store = CheckpointStore::new(cfg.job.state_dir.join("checkpoints"), cfg.checkpoint.keep)?;
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        job_id: cfg.job.name.clone(),
        cfg_json: cfg.to_json(),
        cfg: cfg.clone(),
        prepared,
        store,
        state: Mutex::new(JobState {
            phase: Phase::Rendezvous,
            generation: record.generation,
            next_member: 0,
            members: BTreeMap::new(),
            stage_index: record.stage_index,
            last: None,
            message: "waiting for workers".into(),
        }),
        events: events_tx,
        started: Instant::now(),
    });

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<proto::coordinator_server::CoordinatorServer<service::Service>>()
        .await;
    let svc = proto::coordinator_server::CoordinatorServer::new(service::Service {
        shared: shared.clone(),
    })
    .max_decoding_message_size(proto::MAX_MESSAGE_BYTES)
    .max_encoding_message_size(proto::MAX_MESSAGE_BYTES);
    let svc = tonic_health_free_intercept(svc, opts.token.clone());
    let (stop_server_tx, stop_server_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(svc)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = stop_server_rx.await;
                },
            ),
    );
    if let Some(f) = &opts.addr_file {
        crate::util::write_atomic(f, addr.to_string().as_bytes())?;
    }
    tracing::info!(%addr, job = %cfg.job.name, "coordinator listening");

    let summary = drive(shared.clone(), events_rx, shutdown, record).await;
    // Let workers read their Stop directive before the server goes away.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = stop_server_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    let summary = summary?;
    let path = cfg.job.state_dir.join("summary.json");
    crate::util::write_atomic(&path, serde_json::to_string_pretty(&summary)?.as_bytes())?;
    tracing::info!(status = %summary.status, "summary written to {}", path.display());
    Ok(summary)
}

fn tonic_health_free_intercept<S>(
    svc: S,
    token: String,
) -> tonic::service::interceptor::InterceptedService<S, impl tonic::service::Interceptor + Clone> {
    tonic::service::interceptor::InterceptedService::new(svc, auth_interceptor(token))
}

/// The job's durable state (`state_dir/job_state.json`): what a restarted coordinator needs
/// to resume the job.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct JobRecord {
    pub job: String,
    /// "running", "completed", "failed" or "interrupted".
    pub status: String,
    pub stage_index: u32,
    pub generation: u64,
    /// Generations that failed and were restarted (since the last manual resume).
    pub restarts: u32,
    /// One line per generation: world size, outcome.
    pub history: Vec<GenerationRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenerationRecord {
    pub generation: u64,
    pub world_size: u32,
    /// The checkpoint it started from ("" = from scratch).
    pub start_checkpoint: String,
    /// "completed", or why it ended.
    pub outcome: String,
}

pub const JOB_RECORD: &str = "job_state.json";

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

/// Per-generation bookkeeping of the driver.
struct Generation {
    world: u32,
    done: BTreeMap<u32, proto::ProgressReport>,
}

/// What the driver decided after a generation failed.
enum AfterFailure {
    Restart,
    Fail(Summary),
}

struct Driver {
    shared: Arc<Shared>,
    record: JobRecord,
    gen: Option<Generation>,
    stages: Vec<StageSummary>,
    quorum_since: Option<Instant>,
    join_deadline: Instant,
}

impl Driver {
    fn state_dir(&self) -> &std::path::Path {
        &self.shared.cfg.job.state_dir
    }

    fn persist(&self) {
        if let Err(e) = self.record.save(self.state_dir()) {
            tracing::error!("cannot persist the job state: {e:#}");
        }
    }

    fn summary(&self, status: &str, reason: String) -> Summary {
        Summary {
            job: self.shared.job_id.clone(),
            status: status.into(),
            reason,
            generations: self.record.generation,
            restarts: self.record.restarts,
            history: self.record.history.clone(),
            world_size: self.gen.as_ref().map(|g| g.world).unwrap_or(0),
            wall_s: self.shared.started.elapsed().as_secs_f64(),
            corpus_documents: self.shared.prepared.index.total_documents(),
            shards: self.shared.prepared.index.shards.len(),
            stages: self.stages.clone(),
            final_checkpoint: Some(self.state_dir().join("final")).filter(|p| p.exists()),
        }
    }

    fn end(&mut self, status: &str, reason: String) -> Summary {
        self.record.status = status.into();
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
            if status == "completed" {
                Phase::Finished
            } else {
                Phase::Failed
            },
            status,
        );
        self.shared.broadcast(Kind::Stop(proto::Stop {
            reason: if reason.is_empty() {
                format!("job {status}")
            } else {
                reason.clone()
            },
        }));
        self.summary(status, reason)
    }

    /// A generation ended badly: abort it everywhere, evict the culprit (if any), and either
    /// go back to rendezvous for a new generation or fail the job after `max_restarts`.
    fn on_failure(&mut self, reason: String, culprit: Option<u64>) -> AfterFailure {
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
            return AfterFailure::Fail(self.end("failed", r));
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
        self.gen = None;
        self.quorum_since = None;
        self.join_deadline =
            Instant::now() + Duration::from_secs_f64(self.shared.cfg.cluster.join_timeout_s);
        tracing::warn!(
            restart = self.record.restarts,
            max,
            "waiting for workers to (re)join for a new generation"
        );
        AfterFailure::Restart
    }

    /// Starts a generation: ranks in join order, peers, the checkpoint to resume from.
    fn assign(&mut self) -> anyhow::Result<()> {
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
            let a = proto::Assignment {
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
        tracing::info!(generation, world, ?peers, checkpoint = %start_checkpoint, "assigned ranks");
        self.record.generation = generation;
        self.record.status = "running".into();
        self.record.history.push(GenerationRecord {
            generation,
            world_size: world,
            start_checkpoint,
            outcome: String::new(),
        });
        self.persist();
        self.gen = Some(Generation {
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

async fn drive(
    shared: Arc<Shared>,
    mut events: mpsc::UnboundedReceiver<Event>,
    shutdown: impl Future<Output = ()>,
    record: JobRecord,
) -> anyhow::Result<Summary> {
    let cfg = shared.cfg.clone();
    let c = &cfg.cluster;
    let heartbeat = Duration::from_secs_f64(c.heartbeat_timeout_s);
    let mut d = Driver {
        shared: shared.clone(),
        record,
        gen: None,
        stages: vec![],
        quorum_since: None,
        join_deadline: Instant::now() + Duration::from_secs_f64(c.join_timeout_s),
    };
    tokio::pin!(shutdown);
    loop {
        let ev = tokio::select! {
            _ = &mut shutdown => {
                tracing::warn!("shutdown requested: telling workers to stop; the last checkpoint is kept");
                return Ok(d.end("interrupted", "interrupted by signal".into()));
            }
            ev = events.recv() => ev,
            _ = tokio::time::sleep(Duration::from_millis(200)) => None,
        };
        let phase = shared.state.lock().unwrap().phase;
        let failure: Option<(String, Option<u64>)> = match (phase, ev) {
            (_, Some(Event::Checkpoint(name))) => {
                tracing::debug!(%name, "checkpoint event");
                None
            }
            (Phase::Rendezvous, Some(Event::Left(id))) => {
                shared.state.lock().unwrap().members.remove(&id);
                None
            }
            (Phase::Running, Some(Event::Left(id))) => {
                let m = shared.state.lock().unwrap().members.remove(&id);
                m.filter(|m| m.rank.is_some()).map(|m| {
                    (
                        format!(
                            "rank {} (worker {}) disconnected at step {} while {}",
                            m.rank.unwrap(),
                            m.worker_id,
                            m.step,
                            m.phase
                        ),
                        None,
                    )
                })
            }
            (Phase::Running, Some(Event::Failed { rank, error })) => {
                Some((format!("rank {rank} failed: {error}"), None))
            }
            (Phase::Running, Some(Event::Done(r))) => {
                let g = d.gen.as_mut().expect("running has a generation");
                tracing::info!(
                    rank = r.rank,
                    step = r.step,
                    fingerprint = format!("{:016x}", r.param_fingerprint),
                    "rank finished the stage"
                );
                g.done.insert(r.rank, *r);
                if g.done.len() as u32 == g.world {
                    let s = stage_summary(&shared, g);
                    let identical = s.replicas_identical;
                    let fps = s.param_fingerprints.clone();
                    d.stages.push(s);
                    if !identical {
                        return Ok(d.end(
                            "failed",
                            format!("replicas diverged: parameter fingerprints {fps:?}"),
                        ));
                    }
                    let current = shared.state.lock().unwrap().stage_index;
                    finish_stage(&shared, current)?;
                    let next = current + 1;
                    if next as usize >= cfg.stages.len() {
                        export_final(&shared)?;
                        return Ok(d.end("completed", String::new()));
                    }
                    // The next stage starts at once with the same workers.
                    shared.state.lock().unwrap().stage_index = next;
                    d.record.stage_index = next;
                    if let Some(h) = d.record.history.last_mut() {
                        h.outcome = format!("stage {current} completed");
                    }
                    tracing::info!(stage = next, name = %cfg.stages[next as usize].name, "starting the next stage");
                    d.assign()?;
                }
                None
            }
            _ => None,
        };
        let failure = failure.or_else(|| {
            if phase != Phase::Running {
                return None;
            }
            let st = shared.state.lock().unwrap();
            st.members.iter().find(|(_, m)| m.rank.is_some() && m.last_seen.elapsed() > heartbeat).map(|(id, m)| {
                (
                    format!(
                        "rank {} (worker {}) stalled: silent for {:.0} s (heartbeat_timeout_s = {}) at step {} while {}",
                        m.rank.unwrap(),
                        m.worker_id,
                        m.last_seen.elapsed().as_secs_f64(),
                        c.heartbeat_timeout_s,
                        m.step,
                        m.phase
                    ),
                    Some(*id),
                )
            })
        });
        if let Some((reason, culprit)) = failure {
            if let AfterFailure::Fail(summary) = d.on_failure(reason, culprit) {
                return Ok(summary);
            }
            continue;
        }
        if phase == Phase::Rendezvous {
            let n = shared.state.lock().unwrap().members.len();
            if n >= c.min_workers {
                let since = *d.quorum_since.get_or_insert_with(Instant::now);
                if n >= c.max_workers || since.elapsed() >= Duration::from_secs_f64(c.join_window_s)
                {
                    d.assign()?;
                }
            } else {
                d.quorum_since = None;
                if Instant::now() > d.join_deadline {
                    let reason = format!(
                        "only {n} of min_workers = {} joined within join_timeout_s = {}",
                        c.min_workers, c.join_timeout_s
                    );
                    return Ok(d.end("failed", reason));
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

fn stage_summary(shared: &Shared, g: &Generation) -> StageSummary {
    let st = shared.state.lock().unwrap();
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
    let ledger = shared
        .store
        .latest_good()
        .and_then(|(_, files)| {
            files
                .into_iter()
                .find(|(f, _)| f == crate::train::checkpoint::STATE_FILE)
        })
        .and_then(|(_, b)| {
            serde_json::from_slice::<crate::train::checkpoint::TrainerState>(&b).ok()
        })
        .map(|s| {
            crate::train::checkpoint::epoch_ledgers(&s.ledger, &s.planned.iter().copied().collect())
        })
        .unwrap_or_default();
    let docs = shared.prepared.index.total_documents();
    let documents = if stage.kind != crate::config::StageKind::Pretrain {
        0
    } else {
        ledger
            .iter()
            .filter(|e| e.instances_planned > 0 && e.instances_consumed == e.instances_planned)
            .count() as u64
            * docs
    };
    StageSummary {
        name: stage.name.clone(),
        kind: format!("{:?}", stage.kind).to_lowercase(),
        steps: r0.step,
        epochs: stage.epochs,
        examples: r0.examples,
        documents,
        loss: r0.loss,
        mlm_loss: r0.mlm_loss,
        nsp_loss: r0.nsp_loss,
        mlm_accuracy: r0.mlm_accuracy,
        nsp_accuracy: r0.nsp_accuracy,
        samples_per_s: r0.samples_per_s,
        replicas_identical: fps.windows(2).all(|w| w[0] == w[1]),
        param_fingerprints: fps,
        epochs_ledger: ledger,
        metrics: serde_json::from_str(&r0.metrics_json).unwrap_or_default(),
        majority_baseline: shared.prepared.stages[st.stage_index as usize].majority_baseline,
    }
}

/// Copies the newest checkpoint's model and the tokenizer to `state_dir/final` as an HF
/// directory (config.json, model.safetensors, tokenizer.json, vocab.txt).
fn export_final(shared: &Shared) -> anyhow::Result<()> {
    let dst = shared.cfg.job.state_dir.join("final");
    let last = shared.cfg.stages.len() - 1;
    let best = format!("stage{last}-best");
    let (name, files) = match shared.store.read(&best) {
        Ok(files) => (best, files),
        Err(_) => shared
            .store
            .latest_good()
            .ok_or_else(|| anyhow::anyhow!("no checkpoint was stored: nothing to export"))?,
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

/// Pins the stage's final checkpoint as `stage{i}-final` (never pruned): the next stage
/// starts from it.
fn finish_stage(shared: &Shared, stage: u32) -> anyhow::Result<()> {
    let (name, files) = shared
        .store
        .latest_good()
        .ok_or_else(|| anyhow::anyhow!("stage {stage} finished without a checkpoint"))?;
    shared
        .store
        .commit(&format!("stage{stage}-final"), &files)?;
    tracing::info!(stage, from = %name, "stage finished; final checkpoint pinned");
    Ok(())
}

/// Reads the job token: `TANDEM_TOKEN`, else `job.token_file`.
pub fn resolve_token(cfg: &JobConfig) -> anyhow::Result<String> {
    if let Ok(t) = std::env::var("TANDEM_TOKEN") {
        if !t.is_empty() {
            return Ok(t);
        }
    }
    if let Some(f) = &cfg.job.token_file {
        let t = std::fs::read_to_string(f)
            .with_context(|| format!("reading job.token_file {}", f.display()))?;
        let t = t.trim().to_string();
        anyhow::ensure!(!t.is_empty(), "job.token_file {} is empty", f.display());
        return Ok(t);
    }
    anyhow::bail!("no job token: set TANDEM_TOKEN or job.token_file")
}
