//! The coordinator: owns the job's truth (stages, membership and generation, data plan,
//! checkpoints, metrics), persists it under `state_dir`, and never touches a gradient.
//!
//! [`run`] prepares the job (shard index, tokenizer, model config), serves the gRPC
//! `Coordinator` service and drives the job's state machine until it finishes, fails or
//! `shutdown` resolves.

#![warn(missing_docs)]

mod admission;
mod driver;
mod lock;
mod metrics_log;
mod prepare;
mod progress_log;
mod refusals;
mod service;
mod state;
mod status;
mod store;
mod summary_text;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic_health::pb::health_server::{Health, HealthServer};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

pub use driver::GenerationRecord;
pub(crate) use driver::JobRecord;
pub use prepare::prepare;
pub use service::{auth_interceptor, checkpoint_chunks};
use state::{Event, JobState, Phase, Prepared, Shared};
pub use status::JobStatus;
pub use summary_text::{human_summary, stage_line, summary_of};

use crate::config::JobConfig;
use crate::proto;
use store::CheckpointStore;

/// How [`run`] serves the job.
pub struct CoordinatorOptions {
    /// Address the gRPC service binds (port 0: any free port, see `addr_file`).
    pub listen: SocketAddr,
    /// Write the bound address here once listening (for `tandem launch` and tests).
    pub addr_file: Option<PathBuf>,
    /// The job token every worker must present ([`resolve_token`]).
    pub token: String,
    /// Mutual TLS with the job's certificates, or plaintext (`--insecure`).
    pub security: crate::tls::Security,
    /// Also serve gRPC health checks, and nothing else, in plaintext here (for probes that
    /// show no client certificate, as the kubelet's).
    pub health_listen: Option<SocketAddr>,
    /// Whether to continue the job recorded in `state_dir`.
    pub resume: Resume,
}

/// What [`run`] does with a job already recorded in `state_dir`.
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
    /// The job's name (`job.name`).
    pub job: String,
    /// Completed, failed or interrupted.
    pub status: JobStatus,
    /// Why the job ended as it did (empty when it completed).
    pub reason: String,
    /// Number of the last generation (generations are numbered from 1).
    pub generations: u64,
    /// Failed generations that were restarted.
    pub restarts: u32,
    /// Every generation the job has run, oldest first.
    pub history: Vec<GenerationRecord>,
    /// Ranks of the generation running at the end (0 if none was).
    pub world_size: u32,
    /// Seconds from this coordinator's start to the job's end.
    pub wall_s: f64,
    /// Documents in the prepared corpus, over all shards.
    pub corpus_documents: u64,
    /// Shards the corpus was cut into.
    pub shards: usize,
    /// The stages this coordinator saw finish, in order.
    pub stages: Vec<StageSummary>,
    /// `state_dir/final` (the exported HF model), if the job wrote it.
    pub final_checkpoint: Option<PathBuf>,
}

/// One finished stage, as `summary.json` reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageSummary {
    /// The stage's name, as in the job config.
    pub name: String,
    /// As the config spells it (`pretrain`, `sequence_classification`, …).
    pub kind: String,
    /// Optimiser steps the stage took.
    pub steps: u64,
    /// Epochs the stage trained in (a stage stopped by max_steps may run fewer than planned).
    pub epochs: u32,
    /// The stage's `epochs`.
    #[serde(default)]
    pub epochs_planned: u32,
    /// Examples trained on, over all ranks (rank 0's final report).
    pub examples: u64,
    /// Pre-training: documents of the epochs whose every planned instance was consumed
    /// exactly once in committed steps (from the ledger): epochs × corpus_documents for a
    /// finished stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub documents: Option<u64>,
    /// Training loss, averaged over the stage's last steps (see `mlm_accuracy`).
    pub loss: f32,
    /// Pre-training: the MLM term of `loss`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlm_loss: Option<f32>,
    /// Pre-training: the NSP term of `loss`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nsp_loss: Option<f32>,
    /// Training loss and accuracies, averaged over the stage's last 20 steps (global: every
    /// rank's examples). Pre-training reports MLM and NSP accuracy, fine-tuning its task's
    /// training accuracy (tokens for token classification, start and end for QA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlm_accuracy: Option<f32>,
    /// Pre-training: NSP accuracy (see `mlm_accuracy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nsp_accuracy: Option<f32>,
    /// Fine-tuning: the task's training accuracy (see `mlm_accuracy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_accuracy: Option<f32>,
    /// Training throughput in examples per second, over all ranks.
    pub samples_per_s: f32,
    /// Loss of the stage's first and last logged steps (metrics.jsonl).
    pub first_loss: Option<f32>,
    /// Loss of the last logged step (rank 0's final loss if none was logged).
    pub last_loss: Option<f32>,
    /// Pre-training data actually trained on (committed steps, all ranks): masked positions
    /// per non-padding token, and the share of IsNext pairs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masked_fraction: Option<f64>,
    /// Pre-training: the share of IsNext pairs among the examples.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_next_fraction: Option<f64>,
    /// Ranks of the generation that finished the stage.
    pub world_size: u32,
    /// Every generation that ran this stage (more than one after a failure or a resize).
    pub generations: Vec<u64>,
    /// Parameter hash of every rank at the end (all equal when replicas are in sync).
    #[serde(rename = "param_hashes", alias = "param_fingerprints")]
    pub param_fingerprints: Vec<String>,
    /// Whether every rank ended with the same parameter hash.
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
    /// Seconds from the stage's first assignment to its last rank's `done` (set-up, data
    /// fetch, training, final checkpoint; restarts included).
    #[serde(default)]
    pub wall_s: Option<f64>,
    /// CPU seconds the coordinator process used over `wall_s`: everything the control plane
    /// costs (progress reports, metrics.jsonl, shard serving, receiving and verifying
    /// checkpoints). On a machine whose cores the workers fill, this is the most the
    /// coordinator can take from training.
    #[serde(default)]
    pub coordinator_cpu_s: Option<f64>,
    /// From rank 0's first to its last progress report of the stage (training only), and
    /// the coordinator's CPU seconds over that window: its cost while steps run.
    #[serde(default)]
    pub training_window_s: Option<f64>,
    /// The coordinator's CPU seconds over `training_window_s`.
    #[serde(default)]
    pub coordinator_cpu_training_s: Option<f64>,
}

/// Runs the job to its end. The returned summary is also written to `state_dir/summary.json`.
pub async fn run(
    cfg: JobConfig,
    opts: CoordinatorOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<Summary> {
    let _lock = lock::StateLock::acquire(&cfg.job.state_dir)?;
    let record = match job_record(&cfg, opts.resume)? {
        Ok(r) => r,
        Err(finished) => return Ok(*finished),
    };
    opts.security.warn_if_insecure("coordinator");
    // Read before binding: a bad certificate is an error now, not a refused handshake later.
    let tls = opts.security.server_config()?;
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("binding {}", opts.listen))?;
    // Health first: alive now (liveness), the coordinator's service serving once prepared.
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_not_serving::<proto::coordinator_server::CoordinatorServer<service::Service>>()
        .await;
    let plain_health = match opts.health_listen {
        Some(addr) => Some(serve_health(addr, health_service.clone()).await?),
        None => None,
    };
    let addr = listener.local_addr()?;
    let cfg2 = cfg.clone();
    let prepared = tokio::task::spawn_blocking(move || prepare(&cfg2)).await??;
    let store = CheckpointStore::new(cfg.job.state_dir.join("checkpoints"), cfg.checkpoint.keep)?;
    // The effective config beside the job's state, so `tandem launch --resume STATE_DIR`
    // works on a state dir a hand-started coordinator made (launch writes it itself).
    let job_file = cfg.job.state_dir.join("job.toml");
    if !job_file.exists() {
        crate::util::write_atomic(&job_file, toml::to_string(&cfg)?.as_bytes())?;
    }
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let shared = Arc::new(shared_state(&cfg, prepared, store, &record, events_tx));
    health_reporter
        .set_serving::<proto::coordinator_server::CoordinatorServer<service::Service>>()
        .await;
    let (stop_server, server) = serve(&shared, listener, &opts, tls, health_service).await?;
    if let Some(f) = &opts.addr_file {
        crate::util::write_atomic(f, addr.to_string().as_bytes())?;
    }
    tracing::info!(%addr, job = %cfg.job.name, "coordinator listening");
    let progress = (cfg.cluster.progress_log_s > 0.0).then(|| {
        let every = Duration::from_secs_f64(cfg.cluster.progress_log_s);
        tokio::spawn(progress_log::run(shared.clone(), every))
    });

    let summary = driver::drive(shared.clone(), events_rx, shutdown, record).await;
    if let Some(p) = progress {
        p.abort();
    }
    // Let workers read their Stop directive before the server goes away.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = stop_server.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    if let Some(h) = plain_health {
        h.abort();
    }
    let summary = summary?;
    let path = cfg.job.state_dir.join("summary.json");
    crate::util::write_atomic(&path, serde_json::to_string_pretty(&summary)?.as_bytes())?;
    tracing::info!(status = %summary.status, "summary written to {}", path.display());
    Ok(summary)
}

/// The job's record: a new one, or the state dir's to resume (`Err` holds the summary of a job
/// that already finished: there is nothing to run).
fn job_record(cfg: &JobConfig, resume: Resume) -> anyhow::Result<Result<JobRecord, Box<Summary>>> {
    Ok(Ok(match JobRecord::load(&cfg.job.state_dir)? {
        Some(r) if resume == Resume::Never => anyhow::bail!(
            "state_dir {} already holds job {:?} ({}, generation {}); pass --resume to continue it, or choose another state_dir",
            cfg.job.state_dir.display(),
            r.job,
            r.status,
            r.generation
        ),
        Some(r) if r.status == JobStatus::Completed => {
            let path = cfg.job.state_dir.join("summary.json");
            tracing::info!("job {:?} already finished; its summary is {}", r.job, path.display());
            let s: Summary = serde_json::from_slice(&std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?)?;
            return Ok(Err(Box::new(s)));
        }
        Some(mut r) => {
            tracing::info!(generation = r.generation, status = %r.status, "resuming job {:?}", r.job);
            r.restarts = 0;
            r
        }
        None if resume == Resume::Required => anyhow::bail!("--resume: {} holds no job to resume", cfg.job.state_dir.display()),
        None => JobRecord { job: cfg.job.name.clone(), status: JobStatus::Running, ..Default::default() },
    }))
}

/// What the gRPC handlers and the driver share, at the job's start (or resume from `record`).
fn shared_state(
    cfg: &JobConfig,
    prepared: Prepared,
    store: CheckpointStore,
    record: &JobRecord,
    events: mpsc::UnboundedSender<Event>,
) -> Shared {
    Shared {
        metrics: Mutex::new(metrics_log::MetricsLog::new(&cfg.job.state_dir)),
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
            train_window: None,
        }),
        events,
        started: Instant::now(),
        uploads: Default::default(),
        refusals: Default::default(),
    }
}

/// Calls one connection may have in progress (a worker makes a handful: its join stream,
/// progress, a shard or checkpoint transfer).
const PER_CONNECTION_CALLS: usize = 32;

/// Serves the coordinator's gRPC service (token-checked) and the health service on
/// `listener` (behind mutual TLS when `tls` is given) until the returned sender fires.
async fn serve(
    shared: &Arc<Shared>,
    listener: tokio::net::TcpListener,
    opts: &CoordinatorOptions,
    tls: Option<tonic::transport::ServerTlsConfig>,
    health_service: HealthServer<impl Health>,
) -> anyhow::Result<(
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
)> {
    let svc = proto::coordinator_server::CoordinatorServer::new(service::Service {
        shared: shared.clone(),
    })
    .max_decoding_message_size(proto::MAX_MESSAGE_BYTES)
    .max_encoding_message_size(proto::MAX_MESSAGE_BYTES);
    let svc = tonic_health_free_intercept(svc, opts.token.clone(), shared.refusals.clone());
    let (stop_server_tx, stop_server_rx) = tokio::sync::oneshot::channel::<()>();
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls)
            .context("the coordinator's TLS certificate or key")?;
    }
    let server = tokio::spawn(
        builder
            // Bounded work per connection: a client opening streams without end queues
            // instead of the coordinator holding them all.
            .concurrency_limit_per_connection(PER_CONNECTION_CALLS)
            .max_concurrent_streams(Some(PER_CONNECTION_CALLS as u32))
            // HTTP/2's default 64 KiB flow-control window stalls checkpoint uploads.
            .initial_stream_window_size(proto::STREAM_WINDOW_BYTES)
            .initial_connection_window_size(proto::STREAM_WINDOW_BYTES * 2)
            .add_service(health_service)
            .add_service(svc)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = stop_server_rx.await;
                },
            ),
    );
    Ok((stop_server_tx, server))
}

/// Serves the health service alone, in plaintext, on `addr`: it tells whether the coordinator
/// runs and is ready, nothing about the job, and takes no requests that change anything.
async fn serve_health(
    addr: SocketAddr,
    health: HealthServer<impl Health>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the health listener on {addr}"))?;
    tracing::info!(addr = %listener.local_addr()?, "plaintext gRPC health checks (only) served");
    Ok(tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
        if let Err(e) = served {
            tracing::warn!("the health listener stopped: {e}");
        }
    }))
}

fn tonic_health_free_intercept<S>(
    svc: S,
    token: String,
    refusals: Arc<refusals::Refusals>,
) -> tonic::service::interceptor::InterceptedService<S, impl tonic::service::Interceptor + Clone> {
    tonic::service::interceptor::InterceptedService::new(svc, auth_interceptor(token, refusals))
}

/// Reads the job token: `TANDEM_TOKEN`, else `job.token_file`.
pub fn resolve_token(cfg: &JobConfig) -> anyhow::Result<String> {
    if let Ok(t) = std::env::var("TANDEM_TOKEN") {
        if !t.is_empty() {
            check_token_length(&t, "TANDEM_TOKEN")?;
            return Ok(t);
        }
    }
    if let Some(f) = &cfg.job.token_file {
        let t = std::fs::read_to_string(f)
            .with_context(|| format!("reading job.token_file {}", f.display()))?;
        let t = t.trim().to_string();
        anyhow::ensure!(!t.is_empty(), "job.token_file {} is empty", f.display());
        check_token_length(&t, &format!("job.token_file {}", f.display()))?;
        return Ok(t);
    }
    anyhow::bail!("no job token: set TANDEM_TOKEN or job.token_file")
}

/// Characters a job token must have at least: it authenticates every RPC and keys the ring's
/// handshake, so a guessable one is refused.
pub const MIN_TOKEN_CHARS: usize = 16;

/// Refuses a job token shorter than [`MIN_TOKEN_CHARS`], naming where it came from.
fn check_token_length(token: &str, from: &str) -> anyhow::Result<()> {
    let n = token.chars().count();
    anyhow::ensure!(
        n >= MIN_TOKEN_CHARS,
        "the job token in {from} has {n} characters; at least {MIN_TOKEN_CHARS} are required \
         (make one with e.g. `openssl rand -hex 32`)"
    );
    Ok(())
}
