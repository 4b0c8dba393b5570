//! The training thread of one assignment: owns the model, the optimiser and the ring; runs
//! the stage's epochs; publishes progress; rank 0 uploads checkpoints.

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use candle_core::Device;

use super::client::{self, Client};
use super::feed::{self, FeedMsg, FeedSpec};
use crate::comm::ring::{AbortHandle, Ring, RingConfig};
use crate::comm::Collective;
use crate::config::JobConfig;
use crate::data::instances::collate;
use crate::data::shard::{plan_epoch, ShardIndex};
use crate::data::tokenizer::Tokenizer;
use crate::model::{BertConfig, PretrainModel};
use crate::proto;
use crate::train::checkpoint::{checkpoint_files, TrainerState};
use crate::train::{AdamWConfig, Schedule, StepOptions, Trainer};

/// What the training thread shares with the async side.
pub struct Ctx {
    pub rt: tokio::runtime::Handle,
    pub client: Client,
    pub listener: TcpListener,
    pub token: String,
    /// Set by an Abort/Stop directive: the loop stops between steps.
    pub abort: Arc<AtomicBool>,
    /// Lets the async side unblock a collective in progress.
    pub ring_abort: Arc<Mutex<Option<AbortHandle>>>,
    /// The latest progress, sent by the heartbeat task.
    pub progress: Arc<Mutex<proto::ProgressReport>>,
}

fn set_phase(ctx: &Ctx, phase: &str) {
    ctx.progress.lock().unwrap().phase = phase.into();
}

pub fn run_assignment(a: proto::Assignment, ctx: Ctx) -> anyhow::Result<()> {
    let cfg = JobConfig::from_json(&a.job_config_json)?;
    let stage = cfg
        .stages
        .get(a.stage_index as usize)
        .with_context(|| format!("stage {} does not exist", a.stage_index))?
        .clone();
    let index: Arc<ShardIndex> =
        Arc::new(serde_json::from_str(&a.shard_index_json).context("shard index")?);
    let tokenizer = Arc::new(Tokenizer::from_json(&a.tokenizer_json)?);
    let model_cfg: BertConfig =
        serde_json::from_str(&a.model_config_json).context("model config")?;
    let (rank, world) = (a.rank as usize, a.world_size as usize);
    let seed = cfg.job.seed;
    let job_id = cfg.job.name.clone();
    {
        let mut p = ctx.progress.lock().unwrap();
        *p = proto::ProgressReport {
            job_id: job_id.clone(),
            generation: a.generation,
            rank: a.rank,
            stage_index: a.stage_index,
            phase: "connecting ring".into(),
            ..Default::default()
        };
    }

    let peers: Vec<SocketAddr> = a
        .peers
        .iter()
        .map(|p| {
            p.to_socket_addrs()
                .ok()
                .and_then(|mut it| it.next())
                .with_context(|| format!("cannot resolve peer address {p:?}"))
        })
        .collect::<anyhow::Result<_>>()?;
    let mut ring = Ring::connect(
        RingConfig {
            rank,
            world_size: world,
            peers,
            token: ctx.token.clone(),
            generation: a.generation,
            timeout: Duration::from_secs_f64(cfg.cluster.collective_timeout_s),
            chunk_bytes: RingConfig::DEFAULT_CHUNK_BYTES,
        },
        ctx.listener.try_clone()?,
    )?;
    *ctx.ring_abort.lock().unwrap() = Some(ring.abort_handle());
    tracing::info!(rank, world, generation = a.generation, "ring connected");

    set_phase(&ctx, "initialising model");
    let model = PretrainModel::new(&model_cfg, seed, &Device::Cpu)?;
    let options = StepOptions {
        adamw: AdamWConfig {
            weight_decay: stage.weight_decay,
            ..Default::default()
        },
        schedule: Schedule {
            peak_lr: stage.lr,
            warmup_steps: 0,
            total_steps: 1,
            decay: stage.decay,
        },
        max_grad_norm: stage.max_grad_norm,
        bucket_elems: ((cfg.cluster.bucket_mib * (1 << 20) as f64) / 4.0) as usize,
        seed,
        dropout: true,
    };
    let mut trainer = Trainer::new(model, options)?;
    // Identical starting weights on every rank, whatever happened before.
    trainer.broadcast_params(&mut ring, 0)?;

    let per_step = stage.batch_size * stage.grad_accum;
    let mut window: VecDeque<crate::train::StepStats> = VecDeque::new();
    let mut documents = 0u64;
    let mut examples = 0u64;
    let mut total_steps = 0u64;
    // Throughput is measured from the end of the second step on (start-up excluded).
    let mut since = (Instant::now(), 0u64);
    let pad_id = tokenizer.pad_id();
    'epochs: for epoch in 0..stage.epochs {
        let plan = plan_epoch(&index, seed, epoch as u64, world);
        set_phase(&ctx, "preparing data");
        let fetch_client = ctx.client.clone();
        let rt = ctx.rt.clone();
        let (jid, generation) = (job_id.clone(), a.generation);
        let rx = feed::spawn(
            FeedSpec {
                shards: plan.per_rank[rank].clone(),
                index: index.clone(),
                tokenizer: tokenizer.clone(),
                instances: cfg.data.instances.clone(),
                seed,
                epoch: epoch as u64,
            },
            move |id| {
                let mut c = fetch_client.clone();
                rt.block_on(client::fetch_shard(&mut c, &jid, generation, id))
            },
        );
        let (local, docs) = match rx.recv() {
            Ok(FeedMsg::Count {
                instances,
                documents,
            }) => (instances, documents),
            Ok(FeedMsg::Error(e)) => anyhow::bail!("data for epoch {epoch}: {e}"),
            _ => anyhow::bail!("data feed for epoch {epoch} ended unexpectedly"),
        };
        documents += docs;
        // Every rank learns every rank's instance count; the epoch lasts as long as the
        // largest share, and ranks that run out feed empty micro-batches (no duplicates,
        // no dropped tail).
        let mut counts = vec![0f32; world];
        counts[rank] = local as f32;
        ring.all_reduce_sum(&mut counts)?;
        let steps_in_epoch = counts
            .iter()
            .map(|c| (*c as u64).div_ceil(per_step as u64))
            .max()
            .unwrap_or(0);
        if epoch == 0 {
            total_steps = steps_in_epoch * stage.epochs as u64;
            if let Some(m) = stage.max_steps {
                total_steps = total_steps.min(m);
            }
            trainer.options.schedule.total_steps = total_steps.max(1);
            trainer.options.schedule.warmup_steps =
                (total_steps as f64 * stage.warmup_fraction as f64).round() as u64;
            tracing::info!(
                rank,
                instances = local,
                steps_in_epoch,
                total_steps,
                "epoch 0 planned"
            );
        }
        for _ in 0..steps_in_epoch {
            if ctx.abort.load(Ordering::SeqCst) {
                anyhow::bail!("aborted by the coordinator");
            }
            let mut micro = vec![];
            for _ in 0..stage.grad_accum {
                let mut inst = vec![];
                while inst.len() < stage.batch_size {
                    match rx.recv() {
                        Ok(FeedMsg::Instance(i)) => inst.push(i),
                        Ok(FeedMsg::Error(e)) => anyhow::bail!("data for epoch {epoch}: {e}"),
                        Ok(FeedMsg::Count { .. }) | Err(_) => break,
                    }
                }
                if !inst.is_empty() {
                    micro.push(collate(&inst, None, pad_id)?);
                }
            }
            set_phase(&ctx, "training");
            let stats = trainer.train_step(&micro, &mut ring)?;
            examples += stats.examples;
            if trainer.step == 2 {
                since = (Instant::now(), examples);
            }
            window.push_back(stats);
            if window.len() > 20 {
                window.pop_front();
            }
            if trainer.step % cfg.cluster.progress_every == 0 {
                let mut p = ctx.progress.lock().unwrap();
                fill_report(
                    &mut p,
                    &window,
                    epoch,
                    trainer.step,
                    total_steps,
                    examples,
                    since,
                );
            }
            let ckpt_due =
                cfg.checkpoint.every_steps > 0 && trainer.step % cfg.checkpoint.every_steps == 0;
            if rank == 0 && ckpt_due {
                set_phase(&ctx, "checkpoint");
                upload(
                    &ctx,
                    &trainer,
                    &job_id,
                    &a,
                    &stage.name,
                    epoch,
                    total_steps,
                    world,
                    false,
                )?;
            }
            if stage.max_steps.is_some_and(|m| trainer.step >= m) {
                break 'epochs;
            }
        }
    }
    set_phase(&ctx, "finishing");
    let fingerprint = trainer.model.store.fingerprint()?;
    if rank == 0 {
        upload(
            &ctx,
            &trainer,
            &job_id,
            &a,
            &stage.name,
            stage.epochs,
            total_steps,
            world,
            true,
        )?;
    }
    let mut done = ctx.progress.lock().unwrap().clone();
    fill_report(
        &mut done,
        &window,
        stage.epochs,
        trainer.step,
        total_steps,
        examples,
        since,
    );
    done.done = true;
    done.param_fingerprint = fingerprint;
    done.documents = documents;
    done.phase = "done".into();
    let mut c = ctx.client.clone();
    ctx.rt
        .block_on(c.report_progress(done))
        .context("reporting the end of the stage")?;
    ctx.progress.lock().unwrap().done = true;
    tracing::info!(
        rank,
        steps = trainer.step,
        fingerprint = format!("{fingerprint:016x}"),
        "stage finished"
    );
    Ok(())
}

fn fill_report(
    p: &mut proto::ProgressReport,
    window: &VecDeque<crate::train::StepStats>,
    epoch: u32,
    step: u64,
    total_steps: u64,
    examples: u64,
    since: (Instant, u64),
) {
    let n = window.len().max(1) as f32;
    let mean = |f: fn(&crate::train::StepStats) -> f32| window.iter().map(f).sum::<f32>() / n;
    p.epoch = epoch;
    p.step = step;
    p.total_steps = total_steps;
    p.loss = mean(|s| s.loss);
    p.mlm_loss = mean(|s| s.mlm_loss);
    p.nsp_loss = mean(|s| s.nsp_loss);
    p.mlm_accuracy = mean(|s| s.mlm_accuracy);
    p.nsp_accuracy = mean(|s| s.nsp_accuracy);
    p.lr = window.back().map(|s| s.lr).unwrap_or(0.0);
    p.examples = examples;
    p.samples_per_s =
        ((examples - since.1) as f64 / since.0.elapsed().as_secs_f64().max(1e-9)) as f32;
}

#[allow(clippy::too_many_arguments)]
fn upload(
    ctx: &Ctx,
    trainer: &Trainer,
    job_id: &str,
    a: &proto::Assignment,
    stage_name: &str,
    epoch: u32,
    total_steps: u64,
    world: usize,
    done: bool,
) -> anyhow::Result<()> {
    let state = TrainerState {
        stage_index: a.stage_index,
        stage_name: stage_name.into(),
        step: trainer.step,
        epoch,
        epoch_step: 0,
        total_steps,
        world_size: world as u32,
        generation: a.generation,
        stage_done: done,
    };
    let files = checkpoint_files(trainer, &state)?;
    let name = format!("stage{}-step{:06}", a.stage_index, trainer.step);
    let mut c = ctx.client.clone();
    ctx.rt.block_on(client::put_checkpoint(
        &mut c,
        job_id,
        a.generation,
        &name,
        &files,
    ))
}
