//! The training thread of one assignment: owns the model, the optimiser and the ring; runs
//! the stage's epochs from the assignment's checkpoint (or from scratch); publishes
//! progress; rank 0 uploads checkpoints with the data cursor and the consumption ledger.

use std::collections::VecDeque;

use super::recent::Recent;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use candle_core::Device;

use super::client::{self, Client};
use super::feed::{self, FeedMsg, FeedSpec, Partition, Stream};
use crate::comm::ring::{AbortHandle, Ring, RingConfig, RingListener};
use crate::comm::Collective;
use crate::config::{GpuCollective, JobConfig, ResizePolicy};
use crate::data::epoch::{balanced_bounds, EpochLayout};
use crate::data::instances::collate;
use crate::data::shard::{plan_epoch, ShardIndex};
use crate::data::tokenizer::Tokenizer;
use crate::model::{BertConfig, PretrainModel};
use crate::proto;
use crate::train::checkpoint::{
    checkpoint_files, checkpoint_name, restore, DataCursor, LedgerRange, TrainerState,
};
use crate::train::{AdamWConfig, Schedule, StepOptions, StepStats, Trainer};

/// What the training thread shares with the async side.
pub struct Ctx {
    pub rt: tokio::runtime::Handle,
    pub client: Client,
    pub listener: RingListener,
    pub token: String,
    /// Set by an Abort/Stop directive: the loop stops between steps.
    pub abort: Arc<AtomicBool>,
    /// Lets the async side unblock a collective in progress.
    pub ring_abort: Arc<Mutex<Option<AbortHandle>>>,
    /// The latest progress, sent by the heartbeat task.
    pub progress: Arc<Mutex<proto::ProgressReport>>,
    /// Where the model computes (`--device`).
    pub device: Device,
}

pub(super) fn set_phase(ctx: &Ctx, phase: &str) {
    ctx.progress.lock().unwrap().phase = phase.into();
}

/// Examples this rank consumes per step: the global batch split over the ranks (the first
/// `G mod world` ranks take one more).
fn quota(global: usize, world: usize, rank: usize) -> usize {
    global / world + usize::from(rank < global % world)
}

/// Partitions `0..parts` dealt round-robin: those of `rank` in a world of `world`.
fn dealt(parts: usize, world: usize, rank: usize) -> impl Iterator<Item = usize> {
    (rank..parts).step_by(world)
}

/// A mid-epoch cursor from a checkpoint must describe this epoch's sequence: partition bounds
/// from 0 to its instance count, one consumed count per partition, none past its partition.
fn check_cursor(c: &DataCursor, epoch_total: u64) -> anyhow::Result<()> {
    anyhow::ensure!(
        !c.bounds.is_empty(),
        "the checkpoint's data cursor (epoch {}) has no partition bounds: it was written by an \
         older tandem, whose partitions were lists of shards; resume it with that version, \
         or restart the stage",
        c.epoch
    );
    let fits = c.bounds.len() == c.consumed.len() + 1
        && c.bounds[0] == 0
        && c.bounds
            .windows(2)
            .zip(&c.consumed)
            .all(|(w, &done)| w[0] <= w[1] && done <= w[1] - w[0]);
    anyhow::ensure!(
        fits,
        "the checkpoint's data cursor (epoch {}) is malformed: bounds {:?}, consumed {:?}",
        c.epoch,
        c.bounds,
        c.consumed
    );
    let planned = *c.bounds.last().unwrap();
    anyhow::ensure!(
        planned == epoch_total,
        "the checkpoint's data cursor is for {planned} instances in epoch {}, but the corpus \
         now yields {epoch_total}: the corpus, the tokenizer or data.instances changed since \
         the checkpoint was written",
        c.epoch
    );
    Ok(())
}

/// Connects this rank to the generation's ring and registers its abort handle.
pub(super) fn connect_ring(
    a: &proto::Assignment,
    ctx: &Ctx,
    cfg: &JobConfig,
) -> anyhow::Result<Ring> {
    let (rank, world) = (a.rank as usize, a.world_size as usize);
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
    // Abortable: an abort directive (the generation failed) must not wait out the timeout
    // here for a peer that is gone.
    let ring = Ring::connect_abortable(
        RingConfig {
            rank,
            world_size: world,
            peers,
            token: ctx.token.clone(),
            generation: a.generation,
            timeout: Duration::from_secs_f64(cfg.cluster.collective_timeout_s),
            chunk_bytes: RingConfig::DEFAULT_CHUNK_BYTES,
            transport: cfg.cluster.ring_transport,
        },
        ctx.listener.try_clone()?,
        ctx.abort.clone(),
    )?;
    *ctx.ring_abort.lock().unwrap() = Some(ring.abort_handle());
    tracing::info!(
        rank,
        world,
        generation = a.generation,
        transport = ring.transport(),
        "ring connected"
    );
    Ok(ring)
}

/// The generation's collective: the ring, wrapped in NCCL for the gradients of a model on a
/// GPU unless `cluster.gpu_collective = "ring"`.
pub(super) fn connect_collective(
    a: &proto::Assignment,
    ctx: &Ctx,
    cfg: &JobConfig,
) -> anyhow::Result<Box<dyn Collective>> {
    let ring = connect_ring(a, ctx, cfg)?;
    if ctx.device.is_cuda() && cfg.cluster.gpu_collective == GpuCollective::Nccl {
        set_phase(ctx, "connecting NCCL");
        return nccl(ring, ctx, cfg);
    }
    Ok(Box::new(ring))
}

#[cfg(feature = "cuda")]
fn nccl(ring: Ring, ctx: &Ctx, cfg: &JobConfig) -> anyhow::Result<Box<dyn Collective>> {
    let timeout = Duration::from_secs_f64(cfg.cluster.collective_timeout_s);
    let c = crate::comm::nccl::Nccl::new(ring, &ctx.device, timeout, ctx.abort.clone())?;
    Ok(Box::new(c))
}

#[cfg(not(feature = "cuda"))]
fn nccl(_: Ring, _: &Ctx, _: &JobConfig) -> anyhow::Result<Box<dyn Collective>> {
    anyhow::bail!("NCCL needs a build with the `cuda` feature (scripts/build-cuda.sh)")
}

pub fn run_assignment(a: proto::Assignment, ctx: Ctx) -> anyhow::Result<()> {
    let cfg = JobConfig::from_json(&a.job_config_json)?;
    if cfg
        .stages
        .get(a.stage_index as usize)
        .is_some_and(|s| s.kind != crate::config::StageKind::Pretrain)
    {
        *ctx.progress.lock().unwrap() = proto::ProgressReport {
            job_id: cfg.job.name.clone(),
            generation: a.generation,
            rank: a.rank,
            stage_index: a.stage_index,
            phase: "starting".into(),
            ..Default::default()
        };
        return super::finetune::run_finetune(a, ctx, cfg);
    }
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
    *ctx.progress.lock().unwrap() = proto::ProgressReport {
        job_id: job_id.clone(),
        generation: a.generation,
        rank: a.rank,
        stage_index: a.stage_index,
        phase: "connecting ring".into(),
        ..Default::default()
    };

    let mut ring = connect_collective(&a, &ctx, &cfg)?;

    set_phase(&ctx, "initialising model");
    let mut model = PretrainModel::new(&model_cfg, seed, &ctx.device)?;
    model.set_precision(precision(&cfg, &ctx, rank));
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
    let sharded = trainer.set_sharded(cfg.cluster.shard_optimizer) && world > 1;
    tracing::info!(
        rank,
        device = ?ctx.device,
        update = ?trainer.update_place(),
        sharded,
        "model ready"
    );
    let mut state = TrainerState::start(a.stage_index, &stage.name, world as u32, a.generation);
    if a.init_checkpoint.is_empty() {
        // Identical starting weights on every rank, whatever happened before.
        trainer.broadcast_params(&mut ring, 0)?;
    } else {
        set_phase(&ctx, "restoring checkpoint");
        let mut c = ctx.client.clone();
        let files = ctx.rt.block_on(client::get_checkpoint(
            &mut c,
            &job_id,
            a.generation,
            &a.init_checkpoint,
        ))?;
        let files = files.into_iter().collect();
        state = restore(&mut trainer, &files)
            .with_context(|| format!("restoring {}", a.init_checkpoint))?;
        anyhow::ensure!(
            state.stage_index == a.stage_index,
            "checkpoint {} belongs to stage {}",
            a.init_checkpoint,
            state.stage_index
        );
        tracing::info!(rank, checkpoint = %a.init_checkpoint, step = state.step, epoch = state.cursor.epoch, "resumed");
    }
    state.world_size = world as u32;
    state.generation = a.generation;

    // The global batch per step, by the resize policy (see config::ResizePolicy).
    let per_worker = stage.batch_size * stage.grad_accum;
    let global = match cfg.cluster.resize_policy {
        ResizePolicy::KeepGlobalBatch => per_worker * state.initial_world_size as usize,
        ResizePolicy::KeepPerWorkerBatch => {
            trainer.options.schedule.peak_lr =
                stage.lr * world as f32 / state.initial_world_size as f32;
            per_worker * world
        }
    };
    let q = quota(global, world, rank);
    anyhow::ensure!(
        q > 0,
        "global batch {global} is smaller than the world size {world}"
    );

    let mut window: Recent<StepStats> = Recent::new();
    let mut examples = 0u64;
    // Throughput is measured from the end of the second step on (start-up excluded).
    let mut since = (Instant::now(), 0u64);
    let stage_start = since;
    let mut time_split = TimeSplit::default();
    // Rank 0's periodic checkpoint upload in flight, if any.
    let mut uploading: Option<Upload> = None;
    // Throughput counts training time only: not the final checkpoint upload after the last step.
    let mut last_step_end = Instant::now();
    let pad_id = tokenizer.pad_id();
    let pad_to = cfg
        .data
        .instances
        .pad_to_max_length
        .then_some(cfg.data.instances.max_seq_length);
    let mut epoch = state.cursor.epoch;
    let mut finished_early = false;
    // The feed of an epoch (see `feed`): it counts this rank's run of the epoch's shards at
    // once, then waits for the stream plan.
    let spawn_feed = |epoch: u32| {
        let plan = plan_epoch(&index, seed, epoch as u64, world);
        let (fetch_client, rt) = (ctx.client.clone(), ctx.rt.clone());
        let (jid, generation) = (job_id.clone(), a.generation);
        let feed = feed::spawn(
            FeedSpec {
                count: plan.run(rank).to_vec(),
                index: index.clone(),
                tokenizer: tokenizer.clone(),
                instances: cfg.data.instances.clone(),
                seed,
                epoch: epoch as u64,
            },
            move |id| {
                rt.block_on(client::fetch_shard(
                    &mut fetch_client.clone(),
                    &jid,
                    generation,
                    id,
                ))
            },
        );
        (plan, feed)
    };
    // The next epoch's feed, started near the end of the current one so that its counting
    // pass overlaps training instead of stalling every rank at the epoch's start.
    let mut next_feed = None;
    while epoch < stage.epochs && !finished_early {
        // The epoch as one sequence of instances: every rank counts the instances of its run
        // of the plan's shards, and the counts are all-reduced into every shard's count.
        set_phase(&ctx, "preparing data");
        let (plan, (rx, stream_tx)) = match next_feed.take() {
            Some((e, f)) if e == epoch => f,
            _ => spawn_feed(epoch),
        };
        let counts_mine = match rx.recv() {
            Ok(FeedMsg::Count { counts }) => counts,
            Ok(FeedMsg::Error(e)) => anyhow::bail!("data for epoch {epoch}: {e}"),
            _ => anyhow::bail!("data feed for epoch {epoch} ended unexpectedly"),
        };
        let mut v = vec![0f32; plan.order.len()];
        for (pos, &c) in plan.per_rank[rank].clone().zip(&counts_mine) {
            // Counts travel as f32 (the ring's type): exact below 2^24.
            anyhow::ensure!(
                c < 1 << 24,
                "shard {} yields {c} instances this epoch; at most 2^24 are supported \
                 (use a smaller data.shard_size)",
                plan.order[pos]
            );
            v[pos] = c as f32;
        }
        ring.all_reduce_sum(&mut v)?;
        let counts: Vec<u64> = v.iter().map(|x| *x as u64).collect();
        let layout = Arc::new(EpochLayout::new(plan.order, &counts));
        let epoch_total = layout.total();
        // Partitions: contiguous ranges of the sequence, balanced by instance counts for the
        // world size at the epoch's start (kept when resuming mid-epoch, even with another
        // world size), dealt round-robin.
        let resuming = state.cursor.epoch == epoch && !state.cursor.consumed.is_empty();
        let (bounds, consumed0) = if resuming {
            let c = &state.cursor;
            check_cursor(c, epoch_total)?;
            (c.bounds.clone(), c.consumed.clone())
        } else {
            let quotas: Vec<usize> = (0..world).map(|r| quota(global, world, r)).collect();
            (balanced_bounds(epoch_total, &quotas), vec![0u64; world])
        };
        let parts = bounds.len() - 1;
        let totals: Vec<u64> = bounds.windows(2).map(|w| w[1] - w[0]).collect();
        let mine: Vec<Partition> = dealt(parts, world, rank)
            .map(|p| Partition {
                id: p as u32,
                start: bounds[p] + consumed0[p],
                end: bounds[p + 1],
            })
            .collect();
        // A feed that failed has sent its error, which the first step reads.
        let _ = stream_tx.send(Stream {
            layout,
            partitions: mine,
        });
        // The epoch lasts as long as the largest remaining share (all equal on a fresh
        // epoch); ranks that run out take part with empty batches (no duplicates, no
        // dropped tail).
        let steps_in_epoch = (0..world)
            .map(|r| {
                let left: u64 = dealt(parts, world, r)
                    .map(|p| totals[p] - consumed0[p])
                    .sum();
                left.div_ceil(quota(global, world, r) as u64)
            })
            .max()
            .unwrap_or(0);
        if !state.planned.iter().any(|(e, _)| *e == epoch) {
            state.planned.push((epoch, epoch_total));
        }
        if state.total_steps == 0 {
            let mut total = steps_in_epoch * stage.epochs as u64;
            if let Some(m) = stage.max_steps {
                total = total.min(m);
            }
            state.total_steps = total.max(1);
            trainer.options.schedule.total_steps = state.total_steps;
            trainer.options.schedule.warmup_steps =
                (state.total_steps as f64 * stage.warmup_fraction as f64).round() as u64;
            tracing::info!(
                rank,
                steps_in_epoch,
                total_steps = state.total_steps,
                global_batch = global,
                "stage planned"
            );
        } else {
            trainer.options.schedule.warmup_steps =
                (state.total_steps as f64 * stage.warmup_fraction as f64).round() as u64;
        }

        let mut consumed = consumed0.clone();
        let mut mark = consumed0;
        // All ranks' cursors, and the ledger ranges since the last cut.
        let cut = |consumed: &[u64],
                   mark: &mut Vec<u64>,
                   state: &mut TrainerState,
                   ring: &mut dyn Collective|
         -> anyhow::Result<()> {
            let mut c = vec![0f32; parts];
            for p in dealt(parts, world, rank) {
                c[p] = consumed[p] as f32;
            }
            ring.all_reduce_sum(&mut c)?;
            let cursor: Vec<u64> = c.iter().map(|x| *x as u64).collect();
            for p in 0..parts {
                if cursor[p] > mark[p] {
                    state.ledger.push(LedgerRange {
                        epoch,
                        partitions: parts as u32,
                        partition: p as u32,
                        start: mark[p],
                        end: cursor[p],
                    });
                }
            }
            *mark = cursor.clone();
            state.cursor = DataCursor {
                epoch,
                consumed: cursor,
                bounds: bounds.clone(),
            };
            Ok(())
        };
        // Steps before the epoch's end at which the next epoch's feed starts counting.
        let lead = (steps_in_epoch / 4).clamp(1, 256);
        for k in 0..steps_in_epoch {
            if ctx.abort.load(Ordering::SeqCst) {
                anyhow::bail!("aborted by the coordinator");
            }
            let stage_goes_on = trainer.step + steps_in_epoch - k < state.total_steps;
            if next_feed.is_none()
                && steps_in_epoch - k <= lead
                && epoch + 1 < stage.epochs
                && stage_goes_on
            {
                next_feed = Some((epoch + 1, spawn_feed(epoch + 1)));
            }
            let t_data = Instant::now();
            let mut micro = vec![];
            let mut inst = vec![];
            let mut taken = 0;
            while taken < q {
                match rx.recv() {
                    Ok(FeedMsg::Instance(p, i)) => {
                        consumed[p as usize] += 1;
                        taken += 1;
                        inst.push(i);
                        if inst.len() == stage.batch_size {
                            micro.push(collate(&std::mem::take(&mut inst), pad_to, pad_id)?);
                        }
                    }
                    Ok(FeedMsg::Error(e)) => anyhow::bail!("data for epoch {epoch}: {e}"),
                    Ok(FeedMsg::Count { .. }) | Err(_) => break,
                }
            }
            if !inst.is_empty() {
                micro.push(collate(&inst, pad_to, pad_id)?);
            }
            set_phase(&ctx, "training");
            // Collectives of the step name themselves in the progress phase, so a stall is
            // reported as e.g. "all-reduce 3 of step 41 (6553600 floats)".
            let mut traced = Traced {
                inner: &mut *ring,
                ctx: &ctx,
                step: trainer.step + 1,
                calls: 0,
            };
            let data_ms = t_data.elapsed().as_secs_f64() * 1e3;
            let stats = trainer.train_step(&micro, &mut traced)?;
            last_step_end = Instant::now();
            let ph = &trainer.phases;
            tracing::debug!(
                rank,
                step = trainer.step,
                data_ms = format!("{data_ms:.1}"),
                sync_ms = format!("{:.1}", ph.sync_ms),
                forward_ms = format!("{:.1}", ph.forward_ms),
                backward_ms = format!("{:.1}", ph.backward_ms),
                allreduce_ms = format!("{:.1}", ph.allreduce_ms),
                optimizer_ms = format!("{:.1}", ph.optimizer_ms),
                "step time"
            );
            state.totals.add(&stats);
            if trainer.step > 2 {
                let tokens = micro.iter().map(|b| b.token_count()).sum::<usize>();
                let masked = micro.iter().map(|b| b.mlm_count()).sum::<usize>();
                time_split.add(data_ms, &trainer.phases, tokens, masked);
            }
            examples += stats.examples;
            if trainer.step == 2 {
                since = (Instant::now(), examples);
            }
            window.push(stats);
            if trainer.step % cfg.cluster.progress_every == 0 {
                let mut p = ctx.progress.lock().unwrap();
                let samples_per_s = rate_or_whole(examples, since, stage_start, last_step_end);
                fill_report(
                    &mut p,
                    &window,
                    epoch,
                    trainer.step,
                    state.total_steps,
                    examples,
                    samples_per_s,
                );
                if rank == 0 {
                    let record = proto::StepRecord {
                        step: trainer.step,
                        epoch,
                        loss: stats.loss,
                        mlm_loss: stats.mlm_loss,
                        nsp_loss: stats.nsp_loss,
                        lr: stats.lr,
                        samples_per_s,
                    };
                    log_step(&mut p, record);
                }
            }
            let at_max = stage.max_steps.is_some_and(|m| trainer.step >= m);
            let ckpt_due =
                cfg.checkpoint.every_steps > 0 && trainer.step % cfg.checkpoint.every_steps == 0;
            if ckpt_due || at_max {
                cut(&consumed, &mut mark, &mut state, &mut ring)?;
                state.step = trainer.step;
            }
            if at_max {
                finished_early = true;
                break;
            }
            if ckpt_due && trainer.step < state.total_steps {
                // After sharded steps each rank's AdamW state is current in its own part only.
                // Gathered before the flush below: from the flush to the upload's start no
                // collective may fail on a lost peer (the checkpoint would be lost with it).
                trainer.gather_state(&mut ring)?;
            }
            if ckpt_due && rank == 0 {
                // The logged steps up to a checkpoint reach metrics.jsonl before it is taken:
                // a failure later replays only the steps after it.
                flush_progress(&ctx, "a checkpoint");
            }
            if ckpt_due && rank == 0 && trainer.step < state.total_steps {
                set_phase(&ctx, "checkpoint");
                // Serialised now (a consistent snapshot), streamed while training goes on.
                upload_in_background(
                    &ctx,
                    &trainer,
                    &state,
                    &job_id,
                    a.generation,
                    &mut uploading,
                )?;
            }
        }
        if !finished_early {
            // The epoch is over: every partition was consumed to its end.
            for p in 0..parts {
                if totals[p] > mark[p] {
                    state.ledger.push(LedgerRange {
                        epoch,
                        partitions: parts as u32,
                        partition: p as u32,
                        start: mark[p],
                        end: totals[p],
                    });
                }
            }
            epoch += 1;
            state.cursor = DataCursor {
                epoch,
                ..Default::default()
            };
        }
    }
    set_phase(&ctx, "finishing");
    time_split.log(rank);
    trainer.gather_state(&mut ring)?;
    state.step = trainer.step;
    state.stage_done = true;
    let fingerprint = trainer.model.store.fingerprint()?;
    if rank == 0 {
        // As before every checkpoint: the last logged steps reach metrics.jsonl first (and
        // the coordinator's training window ends at the last step, not after the upload).
        flush_progress(&ctx, "the final checkpoint");
        finish_upload(&ctx, &mut uploading)?;
        upload(&ctx, &trainer, &state, &job_id, a.generation)?;
    }
    let mut done = ctx.progress.lock().unwrap().clone();
    fill_report(
        &mut done,
        &window,
        epoch.min(stage.epochs),
        trainer.step,
        state.total_steps,
        examples,
        rate_or_whole(examples, since, stage_start, last_step_end),
    );
    report_done(&ctx, done, fingerprint, trainer.step)
}

/// Sends the stage's final report (the coordinator waits for one from every rank).
pub(super) fn report_done(
    ctx: &Ctx,
    mut done: proto::ProgressReport,
    fingerprint: u64,
    steps: u64,
) -> anyhow::Result<()> {
    done.done = true;
    done.param_fingerprint = fingerprint;
    done.phase = "done".into();
    let rank = done.rank;
    let mut c = ctx.client.clone();
    ctx.rt
        .block_on(c.report_progress(done))
        .context("reporting the end of the stage")?;
    ctx.progress.lock().unwrap().done = true;
    tracing::info!(
        rank,
        steps,
        fingerprint = format!("{fingerprint:016x}"),
        "stage finished"
    );
    Ok(())
}

/// A collective that records which call of the step is in flight in the progress phase.
struct Traced<'a> {
    inner: &'a mut dyn Collective,
    ctx: &'a Ctx,
    step: u64,
    calls: usize,
}

impl Traced<'_> {
    /// Runs one collective of the step with its name in the progress phase.
    fn traced(
        &mut self,
        what: &str,
        buf: &mut [f32],
        f: impl FnOnce(&mut dyn Collective, &mut [f32]) -> crate::Result<()>,
    ) -> crate::Result<()> {
        self.calls += 1;
        let phase = format!(
            "{what} {} of step {} ({} floats)",
            self.calls,
            self.step,
            buf.len()
        );
        set_phase(self.ctx, &phase);
        let r = f(&mut *self.inner, buf);
        set_phase(self.ctx, "training");
        r
    }
}

impl Collective for Traced<'_> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> crate::Result<()> {
        self.traced("all-reduce", buf, |c, b| c.all_reduce_sum(b))
    }
    fn reduce_scatter_sum(&mut self, buf: &mut [f32]) -> crate::Result<()> {
        self.traced("reduce-scatter", buf, |c, b| c.reduce_scatter_sum(b))
    }
    fn all_gather(&mut self, buf: &mut [f32]) -> crate::Result<()> {
        self.traced("all-gather", buf, |c, b| c.all_gather(b))
    }
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> crate::Result<()> {
        self.inner.broadcast(buf, root)
    }
    fn barrier(&mut self) -> crate::Result<()> {
        self.inner.barrier()
    }
}

/// Most logged steps kept while the coordinator is unreachable (the oldest are dropped).
const MAX_PENDING_STEPS: usize = 100_000;

/// Queues a logged step for the next progress report (rank 0; metrics.jsonl).
pub(super) fn log_step(p: &mut proto::ProgressReport, record: proto::StepRecord) {
    if p.steps.len() >= MAX_PENDING_STEPS {
        p.steps.remove(0);
    }
    p.steps.push(record);
}

/// Examples per second from `since` (an instant and the example count then) to `until`.
/// A stage too short to have steps after `since` (the warm-up cut) counts from its start.
fn rate(examples: u64, since: (Instant, u64), until: Instant) -> f32 {
    (examples.saturating_sub(since.1) as f64
        / until.duration_since(since.0).as_secs_f64().max(1e-9)) as f32
}

fn rate_or_whole(
    examples: u64,
    since: (Instant, u64),
    start: (Instant, u64),
    until: Instant,
) -> f32 {
    if examples > since.1 && until > since.0 {
        rate(examples, since, until)
    } else {
        rate(examples, start, until)
    }
}

fn fill_report(
    p: &mut proto::ProgressReport,
    window: &VecDeque<StepStats>,
    epoch: u32,
    step: u64,
    total_steps: u64,
    examples: u64,
    samples_per_s: f32,
) {
    let n = window.len().max(1) as f32;
    let mean = |f: fn(&StepStats) -> f32| window.iter().map(f).sum::<f32>() / n;
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
    p.samples_per_s = samples_per_s;
}

/// A checkpoint upload running on the async runtime.
type Upload = tokio::task::JoinHandle<anyhow::Result<()>>;

/// Serialises a checkpoint and streams it to the coordinator.
fn upload(
    ctx: &Ctx,
    trainer: &Trainer,
    state: &TrainerState,
    job_id: &str,
    generation: u64,
) -> anyhow::Result<()> {
    let task = put(ctx, trainer, state, job_id, generation)?;
    ctx.rt.block_on(task)
}

/// Serialises a checkpoint here (the snapshot), then streams it on the async runtime while
/// training goes on: a 62 MB mini checkpoint takes ~1 s to stream over loopback, which every
/// rank would otherwise wait for. One upload at a time, in order: a previous one is finished
/// (and its error returned) first. A checkpoint still streaming when this worker dies is lost,
/// as if the failure had come before it; the previous one is there. When another rank fails,
/// the stream goes on and the coordinator waits for it before the next generation, which
/// then resumes from it.
fn upload_in_background(
    ctx: &Ctx,
    trainer: &Trainer,
    state: &TrainerState,
    job_id: &str,
    generation: u64,
    uploading: &mut Option<Upload>,
) -> anyhow::Result<()> {
    finish_upload(ctx, uploading)?;
    let task = put(ctx, trainer, state, job_id, generation)?;
    *uploading = Some(ctx.rt.spawn(task));
    Ok(())
}

/// The job's compute precision; bf16 on the CPU is allowed but said to be slow.
pub(super) fn precision(cfg: &JobConfig, ctx: &Ctx, rank: usize) -> crate::model::Precision {
    let p = cfg.model.precision;
    if p == crate::model::Precision::Bf16 && ctx.device.is_cpu() && rank == 0 {
        tracing::warn!(
            "model.precision = bf16 on the CPU runs candle's composed ops (no bf16 gemm there): \
             slower than f32; bf16 is meant for GPUs"
        );
    }
    p
}

/// Sends rank 0's progress now, with its queued step records (before `what`).
fn flush_progress(ctx: &Ctx, what: &str) {
    let mut c = ctx.client.clone();
    if let Err(e) = ctx.rt.block_on(super::send_progress(&mut c, &ctx.progress)) {
        tracing::warn!("could not send the logged steps before {what}: {e}");
    }
}

/// Waits for the upload in flight, if any.
fn finish_upload(ctx: &Ctx, uploading: &mut Option<Upload>) -> anyhow::Result<()> {
    match uploading.take() {
        Some(task) => ctx.rt.block_on(task).context("checkpoint upload task")?,
        None => Ok(()),
    }
}

/// The checkpoint's files, serialised now, and the future that streams them.
fn put(
    ctx: &Ctx,
    trainer: &Trainer,
    state: &TrainerState,
    job_id: &str,
    generation: u64,
) -> anyhow::Result<impl std::future::Future<Output = anyhow::Result<()>> + Send + 'static> {
    let t0 = Instant::now();
    let files = checkpoint_files(trainer, state)?;
    let name = checkpoint_name(state);
    let serialise_ms = t0.elapsed().as_millis() as u64;
    let mut c = ctx.client.clone();
    let job_id = job_id.to_string();
    Ok(async move {
        let t1 = Instant::now();
        client::put_checkpoint(&mut c, &job_id, generation, &name, &files).await?;
        let bytes: usize = files.iter().map(|(_, b)| b.len()).sum();
        tracing::info!(
            checkpoint = %name,
            mib = format!("{:.1}", bytes as f64 / (1 << 20) as f64),
            serialise_ms,
            upload_ms = t1.elapsed().as_millis() as u64,
            "checkpoint uploaded"
        );
        Ok(())
    })
}

/// Where this rank's steps spent their time (steps after the second), for the end-of-stage log.
#[derive(Default)]
struct TimeSplit {
    steps: u64,
    data_ms: f64,
    phases: crate::train::step::PhaseTimes,
    /// This rank's non-padding and masked tokens (its work differs from its peers' with them).
    tokens: usize,
    masked: usize,
}

impl TimeSplit {
    fn add(
        &mut self,
        data_ms: f64,
        p: &crate::train::step::PhaseTimes,
        tokens: usize,
        masked: usize,
    ) {
        self.steps += 1;
        self.data_ms += data_ms;
        self.phases += p;
        self.tokens += tokens;
        self.masked += masked;
    }

    /// Logs the mean milliseconds per step of each part: waiting for data, waiting for the
    /// other ranks at the step's start, forward, backward, all-reduce and the optimiser; and
    /// the rank's mean non-padding and masked tokens per step (to tell an imbalance of the
    /// ranks' data from one of their machines).
    fn log(&self, rank: usize) {
        if self.steps == 0 {
            return;
        }
        let n = self.steps as f64;
        let p = &self.phases;
        tracing::info!(
            rank,
            steps = self.steps,
            data_ms = format!("{:.1}", self.data_ms / n),
            forward_ms = format!("{:.1}", p.forward_ms / n),
            backward_ms = format!("{:.1}", p.backward_ms / n),
            sync_ms = format!("{:.1}", p.sync_ms / n),
            allreduce_ms = format!("{:.1}", p.allreduce_ms / n),
            optimizer_ms = format!("{:.1}", (p.pack_ms + p.optimizer_ms) / n),
            tokens = format!("{:.0}", self.tokens as f64 / n),
            masked = format!("{:.0}", self.masked as f64 / n),
            "mean time per step"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mid_epoch_cursor_must_describe_this_epoch() {
        let c = DataCursor {
            epoch: 3,
            consumed: vec![5, 7],
            bounds: vec![0, 50, 100],
        };
        check_cursor(&c, 100).unwrap();
        let e = check_cursor(&c, 101).unwrap_err().to_string();
        assert!(
            e.contains("100 instances in epoch 3") && e.contains("now yields 101"),
            "{e}"
        );
        let old = DataCursor {
            bounds: vec![],
            ..c.clone()
        };
        let e = check_cursor(&old, 100).unwrap_err().to_string();
        assert!(e.contains("older tandem"), "{e}");
        let bad = DataCursor {
            bounds: vec![0, 100],
            ..c.clone()
        };
        let e = check_cursor(&bad, 100).unwrap_err().to_string();
        assert!(e.contains("malformed"), "{e}");
        let past_its_end = DataCursor {
            consumed: vec![51, 7],
            ..c
        };
        let e = check_cursor(&past_its_end, 100).unwrap_err().to_string();
        assert!(e.contains("malformed"), "{e}");
    }
}
