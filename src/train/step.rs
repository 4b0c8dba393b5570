//! The exact data-parallel training step for pre-training.
//!
//! One optimiser step over `k` micro-batches on each of `n` ranks:
//! 1. all-reduce the MLM-token and NSP-example counts of the whole step (cheap, known from
//!    the labels before any forward pass);
//! 2. per micro-batch: forward, loss = Σ_mlm / N_mlm + Σ_nsp / N_nsp with the *global*
//!    counts, backward, add the gradients into one flat buffer (sorted-name order);
//! 3. all-reduce the flat buffer in buckets — the sum over ranks is then exactly the
//!    gradient of the global mean loss, so n ranks × batch b follow 1 rank × batch n·b;
//! 4. refuse a non-finite gradient, clip by global norm, AdamW at the scheduled rate, and
//!    write the new weights back into the model.

use candle_core::{backprop::GradStore, Tensor};

use super::optim::{AdamW, AdamWConfig};
use super::schedule::Schedule;
use super::update::{UpdatePlace, Updater};
use crate::comm::Collective;
use crate::data::batch::PretrainBatch;
use crate::error::Result;
use crate::model::{ParamStore, PretrainModel};
use crate::util;

/// Default gradient bucket: ~25 MB of f32, as PyTorch DDP.
pub const DEFAULT_BUCKET_ELEMS: usize = 25 * 1024 * 1024 / 4;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOptions {
    pub adamw: AdamWConfig,
    pub schedule: Schedule,
    /// Global-norm clipping threshold (0 disables clipping).
    pub max_grad_norm: f32,
    pub bucket_elems: usize,
    /// Seed of the dropout masks (combined with step, rank and micro-batch).
    pub seed: u64,
    /// Dropout on (training mode) or off.
    pub dropout: bool,
}

/// What one step did, already reduced over all ranks.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct StepStats {
    pub step: u64,
    pub lr: f32,
    pub loss: f32,
    pub mlm_loss: f32,
    pub nsp_loss: f32,
    pub mlm_accuracy: f32,
    pub nsp_accuracy: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    /// Masked tokens and examples in this step, over all ranks.
    pub mlm_tokens: u64,
    pub examples: u64,
    /// Non-padding tokens and IsNext examples in this step, over all ranks.
    pub tokens: u64,
    pub is_next: u64,
}

/// Model, optimiser and the flat buffers of one replica.
pub struct Trainer {
    pub model: PretrainModel,
    pub options: StepOptions,
    /// Master weights, gradient and AdamW state (on the host or on the model's device).
    update: Updater,
    /// Optimiser steps taken.
    pub step: u64,
    /// Where the last step's time went.
    pub phases: PhaseTimes,
}

/// Wall time of the parts of one step, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct PhaseTimes {
    /// Forward passes (all micro-batches).
    pub forward_ms: f64,
    /// Backward passes.
    pub backward_ms: f64,
    /// Copying gradients into the flat buffer.
    pub pack_ms: f64,
    /// The step's first collective (the label counts, a few floats): in effect a barrier, so
    /// its time is the wait for the slowest rank to finish the previous step.
    pub sync_ms: f64,
    /// All-reduce of the gradient buckets and the statistics (including any wait there for a
    /// rank that was slower in forward and backward).
    pub allreduce_ms: f64,
    /// Clipping, AdamW and writing the weights back.
    pub optimizer_ms: f64,
}

impl std::ops::AddAssign<&PhaseTimes> for PhaseTimes {
    fn add_assign(&mut self, p: &PhaseTimes) {
        self.forward_ms += p.forward_ms;
        self.backward_ms += p.backward_ms;
        self.pack_ms += p.pack_ms;
        self.sync_ms += p.sync_ms;
        self.allreduce_ms += p.allreduce_ms;
        self.optimizer_ms += p.optimizer_ms;
    }
}

/// Sums of one forward pass, as plain numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LossSums {
    pub mlm_sum: f64,
    pub mlm_count: u64,
    pub mlm_correct: u64,
    pub nsp_sum: f64,
    pub nsp_count: u64,
    pub nsp_correct: u64,
}

/// Where a backward pass's gradients are added: a flat host buffer (in the store's layout)
/// or a replica's [`Updater`].
pub trait GradSink {
    fn add_grads(&mut self, store: &ParamStore, grads: &GradStore) -> Result<()>;
}

impl GradSink for [f32] {
    fn add_grads(&mut self, store: &ParamStore, grads: &GradStore) -> Result<()> {
        store.accumulate_grads(grads, self)
    }
}

impl GradSink for Vec<f32> {
    fn add_grads(&mut self, store: &ParamStore, grads: &GradStore) -> Result<()> {
        store.accumulate_grads(grads, self)
    }
}

impl GradSink for Updater {
    fn add_grads(&mut self, store: &ParamStore, grads: &GradStore) -> Result<()> {
        self.accumulate(store, grads)
    }
}

/// Forward and backward of `Σ_mlm · w_mlm + Σ_nsp · w_nsp`, adding the gradient into `grad`.
pub fn forward_backward<S: GradSink + ?Sized>(
    m: &PretrainModel,
    batch: &PretrainBatch,
    weights: (f64, f64),
    dropout: Option<&mut rand_chacha::ChaCha8Rng>,
    grad: &mut S,
) -> Result<LossSums> {
    forward_backward_timed(m, batch, weights, dropout, grad, &mut PhaseTimes::default())
}

/// [`forward_backward`], adding the time of each part to `times`.
pub fn forward_backward_timed<S: GradSink + ?Sized>(
    m: &PretrainModel,
    batch: &PretrainBatch,
    weights: (f64, f64),
    dropout: Option<&mut rand_chacha::ChaCha8Rng>,
    grad: &mut S,
    times: &mut PhaseTimes,
) -> Result<LossSums> {
    let mut rng = dropout;
    let t0 = std::time::Instant::now();
    let out = m.model.forward(batch, &mut rng)?;
    // Weights as tensors, not `x * w`: candle prunes an affine op whose factor is 0 from the
    // backward pass, which would leave the MLM head without a gradient on a step with no
    // masked token (and break the buckets' layout).
    let w = |x: f64| Tensor::new(x as f32, out.mlm_sum.device());
    let loss = (out.mlm_sum.mul(&w(weights.0)?)? + out.nsp_sum.mul(&w(weights.1)?)?)?;
    let t1 = std::time::Instant::now();
    let grads = loss.backward()?;
    let t2 = std::time::Instant::now();
    grad.add_grads(&m.store, &grads)?;
    let ms = |a: std::time::Instant, b: std::time::Instant| (b - a).as_secs_f64() * 1e3;
    times.forward_ms += ms(t0, t1);
    times.backward_ms += ms(t1, t2);
    times.pack_ms += ms(t2, std::time::Instant::now());
    Ok(LossSums {
        mlm_sum: scalar(&out.mlm_sum)?,
        mlm_count: out.mlm_count as u64,
        mlm_correct: out.mlm_correct as u64,
        nsp_sum: scalar(&out.nsp_sum)?,
        nsp_count: out.nsp_count as u64,
        nsp_correct: out.nsp_correct as u64,
    })
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_scalar::<f32>()? as f64)
}

fn inv(x: f64) -> f64 {
    if x > 0.0 {
        1.0 / x
    } else {
        0.0
    }
}

impl Trainer {
    /// A trainer that updates where the model lives ([`UpdatePlace::for_device`]).
    pub fn new(model: PretrainModel, options: StepOptions) -> Result<Self> {
        let place = UpdatePlace::for_device(model.store.device());
        Self::with_update_place(model, options, place)
    }

    /// A trainer whose update runs at `place` (the device path on a CPU model is how the
    /// tests check it against the host path).
    pub fn with_update_place(
        model: PretrainModel,
        options: StepOptions,
        place: UpdatePlace,
    ) -> Result<Self> {
        let update = Updater::new(&model.store, options.adamw, place)?;
        Ok(Trainer {
            model,
            options,
            update,
            step: 0,
            phases: PhaseTimes::default(),
        })
    }

    pub fn update_place(&self) -> UpdatePlace {
        self.update.place()
    }

    /// The flat gradient of the last step (after all-reduce, before clipping), on the host.
    pub fn last_grad(&self) -> Result<std::borrow::Cow<'_, [f32]>> {
        self.update.grad()
    }

    /// The optimiser state, on the host (for checkpoints).
    pub fn adamw(&self) -> Result<std::borrow::Cow<'_, AdamW>> {
        self.update.adamw(&self.model.store)
    }

    /// Replaces the optimiser state (from a checkpoint).
    pub fn set_adamw(&mut self, state: AdamW) -> Result<()> {
        self.update.set_adamw(state, &self.model.store)
    }

    /// Re-reads the master copy of the parameters from the model (after weights were loaded
    /// into the store from outside).
    pub fn reload_params(&mut self) -> Result<()> {
        self.update.reload_params(&self.model.store)
    }

    /// Shards the optimiser step over the ranks ([`Updater::set_sharded`]; host path only);
    /// returns whether it will be.
    pub fn set_sharded(&mut self, on: bool) -> bool {
        self.update.set_sharded(on)
    }

    /// Brings the AdamW state up to date on every rank after sharded steps (all ranks call it
    /// before a checkpoint is taken; [`Updater::gather_state`]).
    pub fn gather_state(&mut self, comm: &mut dyn Collective) -> Result<()> {
        self.update.gather_state(comm, self.options.bucket_elems)
    }

    /// Copies `root`'s weights to every rank (used once at start so replicas are identical).
    pub fn broadcast_params(&mut self, comm: &mut dyn Collective, root: usize) -> Result<()> {
        self.update.broadcast_params(comm, root, &self.model.store)
    }

    /// One optimiser step over `micro` (this rank's micro-batches), as described above.
    pub fn train_step(
        &mut self,
        micro: &[PretrainBatch],
        comm: &mut dyn Collective,
    ) -> Result<StepStats> {
        let rank = comm.rank() as u64;
        let mut counts = [
            micro.iter().map(|b| b.mlm_count()).sum::<usize>() as f32,
            micro.iter().map(|b| b.nsp_count()).sum::<usize>() as f32,
        ];
        let t_counts = std::time::Instant::now();
        comm.all_reduce_sum(&mut counts)?;
        let sync_ms = t_counts.elapsed().as_secs_f64() * 1e3;
        let weights = (inv(counts[0] as f64), inv(counts[1] as f64));

        self.update.zero_grad()?;
        let mut local = LossSums::default();
        let mut times = PhaseTimes::default();
        for (i, b) in micro.iter().enumerate() {
            let mut rng = util::rng(&[self.options.seed, self.step, rank, i as u64]);
            let dropout = self.options.dropout.then_some(&mut rng);
            let s = forward_backward_timed(
                &self.model,
                b,
                weights,
                dropout,
                &mut self.update,
                &mut times,
            )?;
            local.mlm_sum += s.mlm_sum;
            local.nsp_sum += s.nsp_sum;
            local.mlm_correct += s.mlm_correct;
            local.nsp_correct += s.nsp_correct;
        }
        let t_reduce = std::time::Instant::now();
        self.update.all_reduce(comm, self.options.bucket_elems)?;
        let mut sums = [
            local.mlm_sum as f32,
            local.nsp_sum as f32,
            local.mlm_correct as f32,
            local.nsp_correct as f32,
            micro.iter().map(|b| b.token_count()).sum::<usize>() as f32,
            micro.iter().map(|b| b.is_next_count()).sum::<usize>() as f32,
        ];
        comm.all_reduce_sum(&mut sums)?;
        let t_opt = std::time::Instant::now();
        times.sync_ms = sync_ms;
        times.allreduce_ms = (t_opt - t_reduce).as_secs_f64() * 1e3;

        let lr = self.options.schedule.lr(self.step);
        let grad_norm = self.update.apply(
            &self.model.store,
            comm,
            self.options.max_grad_norm,
            lr,
            self.step,
        )?;
        self.step += 1;
        times.optimizer_ms = t_opt.elapsed().as_secs_f64() * 1e3;
        self.phases = times;

        let mlm_loss = sums[0] as f64 * weights.0;
        let nsp_loss = sums[1] as f64 * weights.1;
        Ok(StepStats {
            step: self.step,
            lr,
            loss: (mlm_loss + nsp_loss) as f32,
            mlm_loss: mlm_loss as f32,
            nsp_loss: nsp_loss as f32,
            mlm_accuracy: (sums[2] as f64 * weights.0) as f32,
            nsp_accuracy: (sums[3] as f64 * weights.1) as f32,
            grad_norm,
            mlm_tokens: counts[0] as u64,
            examples: counts[1] as u64,
            tokens: sums[4] as u64,
            is_next: sums[5] as u64,
        })
    }
}
