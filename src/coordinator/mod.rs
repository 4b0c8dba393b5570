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
use state::{Event, JobState, Phase, Prepared, Shared};

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
}

/// Written to `state_dir/summary.json` when the job ends.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub job: String,
    /// "completed", "failed" or "interrupted".
    pub status: String,
    pub reason: String,
    pub generations: u64,
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
    /// Documents consumed, summed over ranks and epochs (= epochs × corpus_documents).
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
    Ok(Prepared {
        index_json: serde_json::to_string(&index)?,
        index,
        tokenizer_json: tokenizer.to_json()?,
        model_cfg_json: serde_json::to_string(&model_cfg)?,
        model_cfg,
    })
}

/// Runs the job to its end. The returned summary is also written to `state_dir/summary.json`.
pub async fn run(
    cfg: JobConfig,
    opts: CoordinatorOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<Summary> {
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
            generation: 0,
            next_member: 0,
            members: BTreeMap::new(),
            stage_index: 0,
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

    let summary = drive(shared.clone(), events_rx, shutdown).await;
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

/// Per-generation bookkeeping of the driver.
struct Generation {
    id: u64,
    world: u32,
    done: BTreeMap<u32, proto::ProgressReport>,
}

async fn drive(
    shared: Arc<Shared>,
    mut events: mpsc::UnboundedReceiver<Event>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<Summary> {
    let cfg = shared.cfg.clone();
    let c = &cfg.cluster;
    let join_deadline = Instant::now() + Duration::from_secs_f64(c.join_timeout_s);
    let heartbeat = Duration::from_secs_f64(c.heartbeat_timeout_s);
    let mut quorum_since: Option<Instant> = None;
    let mut gen: Option<Generation> = None;
    let mut stages: Vec<StageSummary> = vec![];
    tokio::pin!(shutdown);
    let finish =
        |status: &str, reason: String, stages: Vec<StageSummary>, gen: &Option<Generation>| {
            let st = shared.state.lock().unwrap();
            Summary {
                job: shared.job_id.clone(),
                status: status.into(),
                reason,
                generations: st.generation,
                world_size: gen.as_ref().map(|g| g.world).unwrap_or(0),
                wall_s: shared.started.elapsed().as_secs_f64(),
                corpus_documents: shared.prepared.index.total_documents(),
                shards: shared.prepared.index.shards.len(),
                stages,
                final_checkpoint: Some(cfg.job.state_dir.join("final")).filter(|p| p.exists()),
            }
        };
    loop {
        let ev = tokio::select! {
            _ = &mut shutdown => {
                tracing::warn!("shutdown requested: telling workers to stop");
                shared.broadcast(Kind::Stop(proto::Stop { reason: "coordinator shutting down".into() }));
                set_phase(&shared, Phase::Failed, "interrupted");
                return Ok(finish("interrupted", "interrupted by signal".into(), stages, &gen));
            }
            ev = events.recv() => ev,
            _ = tokio::time::sleep(Duration::from_millis(200)) => None,
        };
        let phase = shared.state.lock().unwrap().phase;
        match (phase, ev) {
            (_, Some(Event::Checkpoint(name))) => tracing::debug!(%name, "checkpoint event"),
            (Phase::Rendezvous, Some(Event::Left(id))) => {
                shared.state.lock().unwrap().members.remove(&id);
            }
            (Phase::Running, Some(Event::Left(id))) => {
                let m = shared.state.lock().unwrap().members.remove(&id);
                if let Some(m) = m.filter(|m| m.rank.is_some()) {
                    let reason = format!(
                        "rank {} (worker {}) disconnected at step {} while {}",
                        m.rank.unwrap(),
                        m.worker_id,
                        m.step,
                        m.phase
                    );
                    return Ok(fail_generation(&shared, reason, stages, &gen, &finish));
                }
            }
            (Phase::Running, Some(Event::Failed { rank, error })) => {
                let reason = format!("rank {rank} failed: {error}");
                return Ok(fail_generation(&shared, reason, stages, &gen, &finish));
            }
            (Phase::Running, Some(Event::Done(r))) => {
                let g = gen.as_mut().expect("running has a generation");
                tracing::info!(
                    rank = r.rank,
                    step = r.step,
                    fingerprint = format!("{:016x}", r.param_fingerprint),
                    "rank finished the stage"
                );
                g.done.insert(r.rank, *r);
                if g.done.len() as u32 == g.world {
                    let s = stage_summary(&shared, g);
                    if !s.replicas_identical {
                        let reason = format!(
                            "replicas diverged: parameter fingerprints {:?}",
                            s.param_fingerprints
                        );
                        stages.push(s);
                        return Ok(fail_generation(&shared, reason, stages, &gen, &finish));
                    }
                    stages.push(s);
                    let next = shared.state.lock().unwrap().stage_index + 1;
                    if next as usize >= cfg.stages.len() {
                        export_final(&shared)?;
                        shared.broadcast(Kind::Stop(proto::Stop {
                            reason: "job completed".into(),
                        }));
                        set_phase(&shared, Phase::Finished, "completed");
                        return Ok(finish("completed", String::new(), stages, &gen));
                    }
                    anyhow::bail!("multi-stage jobs are not implemented yet");
                }
            }
            (_, _) => {}
        }
        match phase {
            Phase::Rendezvous => {
                let n = shared.state.lock().unwrap().members.len();
                if n >= c.min_workers {
                    let since = *quorum_since.get_or_insert_with(Instant::now);
                    if n >= c.max_workers
                        || since.elapsed() >= Duration::from_secs_f64(c.join_window_s)
                    {
                        gen = Some(assign(&shared)?);
                    }
                } else {
                    quorum_since = None;
                    if Instant::now() > join_deadline {
                        let reason = format!(
                            "only {n} of min_workers = {} joined within join_timeout_s = {}",
                            c.min_workers, c.join_timeout_s
                        );
                        shared.broadcast(Kind::Stop(proto::Stop {
                            reason: reason.clone(),
                        }));
                        set_phase(&shared, Phase::Failed, &reason);
                        return Ok(finish("failed", reason, stages, &gen));
                    }
                }
            }
            Phase::Running => {
                let stalled = {
                    let st = shared.state.lock().unwrap();
                    st.members
                        .values()
                        .find(|m| m.rank.is_some() && m.last_seen.elapsed() > heartbeat)
                        .map(|m| {
                            format!(
                                "rank {} (worker {}) silent for {:.0} s (heartbeat_timeout_s = {}) at step {} while {}",
                                m.rank.unwrap(),
                                m.worker_id,
                                m.last_seen.elapsed().as_secs_f64(),
                                c.heartbeat_timeout_s,
                                m.step,
                                m.phase
                            )
                        })
                };
                if let Some(reason) = stalled {
                    return Ok(fail_generation(&shared, reason, stages, &gen, &finish));
                }
            }
            Phase::Finished | Phase::Failed => {}
        }
    }
}

fn set_phase(shared: &Shared, phase: Phase, message: &str) {
    let mut st = shared.state.lock().unwrap();
    st.phase = phase;
    st.message = message.into();
}

fn fail_generation(
    shared: &Shared,
    reason: String,
    stages: Vec<StageSummary>,
    gen: &Option<Generation>,
    finish: &impl Fn(&str, String, Vec<StageSummary>, &Option<Generation>) -> Summary,
) -> Summary {
    tracing::error!("generation failed: {reason}");
    let g = shared.state.lock().unwrap().generation;
    shared.broadcast(Kind::Abort(proto::Abort {
        generation: g,
        reason: reason.clone(),
    }));
    shared.broadcast(Kind::Stop(proto::Stop {
        reason: reason.clone(),
    }));
    set_phase(shared, Phase::Failed, &reason);
    finish("failed", reason, stages, gen)
}

/// Starts a generation: ranks in join order, peers, and the assignment to every member.
fn assign(shared: &Shared) -> anyhow::Result<Generation> {
    let mut st = shared.state.lock().unwrap();
    st.generation += 1;
    let generation = st.generation;
    let max = shared.cfg.cluster.max_workers;
    let ids: Vec<u64> = st.members.keys().copied().take(max).collect();
    let peers: Vec<String> = ids
        .iter()
        .map(|id| st.members[id].ring_addr.clone())
        .collect();
    let world = ids.len() as u32;
    let stage_index = st.stage_index;
    for (rank, id) in ids.iter().enumerate() {
        let m = st.members.get_mut(id).expect("member listed");
        m.rank = Some(rank as u32);
        m.last_seen = Instant::now();
        let a = proto::Assignment {
            generation,
            rank: rank as u32,
            world_size: world,
            peers: peers.clone(),
            job_config_json: shared.cfg_json.clone(),
            stage_index,
            shard_index_json: shared.prepared.index_json.clone(),
            tokenizer_json: shared.prepared.tokenizer_json.clone(),
            model_config_json: shared.prepared.model_cfg_json.clone(),
            init_checkpoint: String::new(),
        };
        let _ = m.tx.try_send(Ok(proto::Directive {
            kind: Some(Kind::Assignment(a)),
        }));
    }
    st.phase = Phase::Running;
    st.message = format!("generation {generation}: {world} workers");
    tracing::info!(generation, world, ?peers, "assigned ranks");
    Ok(Generation {
        id: generation,
        world,
        done: BTreeMap::new(),
    })
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
    let _ = g.id;
    StageSummary {
        name: stage.name.clone(),
        kind: format!("{:?}", stage.kind).to_lowercase(),
        steps: r0.step,
        epochs: stage.epochs,
        examples: r0.examples,
        documents: g.done.values().map(|r| r.documents).sum(),
        loss: r0.loss,
        mlm_loss: r0.mlm_loss,
        nsp_loss: r0.nsp_loss,
        mlm_accuracy: r0.mlm_accuracy,
        nsp_accuracy: r0.nsp_accuracy,
        samples_per_s: r0.samples_per_s,
        replicas_identical: fps.windows(2).all(|w| w[0] == w[1]),
        param_fingerprints: fps,
    }
}

/// Copies the newest checkpoint's model and the tokenizer to `state_dir/final` as an HF
/// directory (config.json, model.safetensors, tokenizer.json, vocab.txt).
fn export_final(shared: &Shared) -> anyhow::Result<()> {
    let dst = shared.cfg.job.state_dir.join("final");
    let Some((name, files)) = shared.store.latest_good() else {
        anyhow::bail!("no checkpoint was stored: nothing to export");
    };
    std::fs::create_dir_all(&dst)?;
    for (f, bytes) in &files {
        if f == crate::model::hf::WEIGHTS_FILE || f == crate::model::hf::CONFIG_FILE {
            crate::util::write_atomic(&dst.join(f), bytes)?;
        }
    }
    let tok = Tokenizer::from_json(&shared.prepared.tokenizer_json)?;
    tok.save(&dst)?;
    tracing::info!(checkpoint = %name, "final model exported to {}", dst.display());
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
