//! The exact data-parallel training step, one for every stage kind ([`StageModel`]).
//!
//! One optimiser step over `k` micro-batches on each of `n` ranks:
//! 1. all-reduce the normaliser of each loss term over the whole step (pre-training: masked
//!    tokens and NSP examples; fine-tuning: labelled examples or positions), cheap and known
//!    from the labels before any forward pass;
//! 2. per micro-batch: forward, loss = Σ_i sum_i / N_i with the *global* counts N_i,
//!    backward, add the gradients into one flat buffer (sorted-name order);
//! 3. all-reduce the flat buffer in buckets — the sum over ranks is then exactly the
//!    gradient of the global mean loss, so n ranks × batch b follow 1 rank × batch n·b;
//! 4. refuse a non-finite gradient, clip by global norm, AdamW at the scheduled rate, and
//!    write the new weights back into the model.

use candle_core::{backprop::GradStore, Tensor};

use crate::model::dropout::DropoutStream;

use super::kind::{inv, StageModel, StepSums};
use super::optim::{AdamW, AdamWConfig};
use super::schedule::Schedule;
use super::traced::{CollectiveHook, Traced};
use super::update::{UpdatePlace, Updater};
use crate::comm::Collective;
use crate::data::batch::PretrainBatch;
use crate::error::Result;
use crate::model::{ParamStore, PretrainModel};

/// Default gradient bucket: ~25 MB of f32, as PyTorch DDP.
pub const DEFAULT_BUCKET_ELEMS: usize = 25 * 1024 * 1024 / 4;

/// How a [`Trainer`] steps: optimiser, schedule, clipping, buckets and dropout.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOptions {
    /// AdamW hyper-parameters.
    pub adamw: AdamWConfig,
    /// The learning-rate schedule.
    pub schedule: Schedule,
    /// Global-norm clipping threshold (0 disables clipping).
    pub max_grad_norm: f32,
    /// Elements per all-reduce bucket of the flat gradient.
    pub bucket_elems: usize,
    /// Seed of the dropout masks (combined with step, rank and micro-batch).
    pub seed: u64,
    /// Dropout on (training mode) or off.
    pub dropout: bool,
    /// Mixed into the dropout seed after `seed` when set (fine-tuning stages: the stage
    /// index, so two stages never share masks).
    pub dropout_stream: Option<u64>,
}

/// Model, optimiser and the flat buffers of one replica, for any stage kind.
pub struct Trainer<M: StageModel = PretrainModel> {
    /// The model trained (its parameter store holds the current weights).
    pub model: M,
    /// How it steps.
    pub options: StepOptions,
    /// Master weights, gradient and AdamW state (on the host or on the model's device).
    update: Updater,
    /// Optimiser steps taken.
    pub step: u64,
    /// Where the last step's time went.
    pub phases: PhaseTimes,
    /// Told about every collective call ([`Traced`]).
    hook: Option<Box<dyn CollectiveHook>>,
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
    /// Sum of the MLM loss over the MLM-labelled (masked) positions.
    pub mlm_sum: f64,
    /// MLM-labelled positions.
    pub mlm_count: u64,
    /// MLM-labelled positions predicted right.
    pub mlm_correct: u64,
    /// Sum of the NSP loss over the NSP-labelled examples.
    pub nsp_sum: f64,
    /// NSP-labelled examples.
    pub nsp_count: u64,
    /// NSP-labelled examples predicted right.
    pub nsp_correct: u64,
}

/// Where a backward pass's gradients are added: a flat host buffer (in the store's layout)
/// or a replica's [`Updater`].
pub trait GradSink {
    /// Adds the gradients in `grads` of `store`'s parameters.
    fn add_grads(&mut self, store: &ParamStore, grads: &GradStore) -> Result<()>;
}

impl GradSink for [f32] {
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
    dropout: Option<&mut DropoutStream>,
    grad: &mut S,
) -> Result<LossSums> {
    let mut times = PhaseTimes::default();
    let (sums, metrics) =
        forward_backward_terms(m, batch, &[weights.0, weights.1], dropout, grad, &mut times)?;
    Ok(LossSums {
        mlm_sum: sums[0],
        mlm_count: batch.mlm_count() as u64,
        mlm_correct: metrics[0] as u64,
        nsp_sum: sums[1],
        nsp_count: batch.nsp_count() as u64,
        nsp_correct: metrics[1] as u64,
    })
}

/// Forward and backward of `Σ_i sum_i · weights[i]` over the model's loss terms, adding the
/// gradient into `grad` and the time of each part to `times`; returns the loss sums and the
/// metric counts as plain numbers.
pub fn forward_backward_terms<M: StageModel, S: GradSink + ?Sized>(
    m: &M,
    batch: &M::Batch,
    weights: &[f64],
    dropout: Option<&mut DropoutStream>,
    grad: &mut S,
    times: &mut PhaseTimes,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let t0 = std::time::Instant::now();
    let out = m.forward(batch, dropout)?;
    // Weights as tensors, not `x * w`: candle prunes an affine op whose factor is 0 from the
    // backward pass, which would leave a head without a gradient on a step with no label of
    // its term (and break the buckets' layout).
    let mut loss: Option<Tensor> = None;
    for (sum, &w) in out.loss_sums.iter().zip(weights) {
        let term = sum.mul(&Tensor::new(w as f32, sum.device())?)?;
        loss = Some(match loss {
            None => term,
            Some(l) => (l + term)?,
        });
    }
    let loss = loss.expect("a stage kind has at least one loss term");
    let t1 = std::time::Instant::now();
    let grads = loss.backward()?;
    let t2 = std::time::Instant::now();
    grad.add_grads(m.store(), &grads)?;
    let ms = |a: std::time::Instant, b: std::time::Instant| (b - a).as_secs_f64() * 1e3;
    times.forward_ms += ms(t0, t1);
    times.backward_ms += ms(t1, t2);
    times.pack_ms += ms(t2, std::time::Instant::now());
    let sums = out
        .loss_sums
        .iter()
        .map(|t| Ok(t.to_scalar::<f32>()? as f64))
        .collect::<Result<Vec<f64>>>()?;
    Ok((sums, out.metrics))
}

/// Adds `b` into `a` element by element.
fn add_into(a: &mut [f64], b: &[f64]) {
    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
}

impl<M: StageModel> Trainer<M> {
    /// A trainer that updates where the model lives ([`UpdatePlace::for_device`]).
    pub fn new(model: M, options: StepOptions) -> Result<Self> {
        let place = UpdatePlace::for_device(model.store().device());
        Self::with_update_place(model, options, place)
    }

    /// A trainer whose update runs at `place` (the device path on a CPU model is how the
    /// tests check it against the host path).
    pub fn with_update_place(model: M, options: StepOptions, place: UpdatePlace) -> Result<Self> {
        let update = Updater::new(model.store(), options.adamw, place)?;
        Ok(Trainer {
            model,
            options,
            update,
            step: 0,
            phases: PhaseTimes::default(),
            hook: None,
        })
    }

    /// Tells `hook` about every collective call from now on.
    pub fn set_hook(&mut self, hook: Box<dyn CollectiveHook>) {
        self.hook = Some(hook);
    }

    /// Where the update runs (host or device).
    pub fn update_place(&self) -> UpdatePlace {
        self.update.place()
    }

    /// The flat gradient of the last step (after all-reduce, before clipping), on the host.
    pub fn last_grad(&self) -> Result<std::borrow::Cow<'_, [f32]>> {
        self.update.grad()
    }

    /// The optimiser state, on the host (for checkpoints).
    pub fn adamw(&self) -> Result<std::borrow::Cow<'_, AdamW>> {
        self.update.adamw(self.model.store())
    }

    /// Replaces the optimiser state (from a checkpoint).
    pub fn set_adamw(&mut self, state: AdamW) -> Result<()> {
        self.update.set_adamw(state, self.model.store())
    }

    /// Re-reads the master copy of the parameters from the model (after weights were loaded
    /// into the store from outside).
    pub fn reload_params(&mut self) -> Result<()> {
        self.update.reload_params(self.model.store())
    }

    /// Shards the optimiser step over the ranks ([`Updater::set_sharded`]; host path only);
    /// returns whether it will be.
    pub fn set_sharded(&mut self, on: bool) -> bool {
        self.update.set_sharded(on)
    }

    /// `comm` with the hook around its calls, as calls of the step being taken.
    fn traced<'a>(
        hook: &'a mut Option<Box<dyn CollectiveHook>>,
        comm: &'a mut dyn Collective,
        step: u64,
    ) -> Traced<'a> {
        let hook = hook.as_deref_mut().map(|h| h as &mut dyn CollectiveHook);
        Traced::new(comm, hook, step)
    }

    /// Brings the AdamW state up to date on every rank after sharded steps (all ranks call it
    /// before a checkpoint is taken; [`Updater::gather_state`]).
    pub fn gather_state(&mut self, comm: &mut dyn Collective) -> Result<()> {
        let mut comm = Self::traced(&mut self.hook, comm, self.step);
        self.update
            .gather_state(&mut comm, self.options.bucket_elems)
    }

    /// Copies `root`'s weights to every rank (used once at start so replicas are identical).
    pub fn broadcast_params(&mut self, comm: &mut dyn Collective, root: usize) -> Result<()> {
        let mut comm = Self::traced(&mut self.hook, comm, self.step);
        self.update
            .broadcast_params(&mut comm, root, self.model.store())
    }

    /// The dropout masks' generator of micro-batch `i` of the step being taken on `rank`.
    fn dropout_rng(&self, rank: u64, i: usize) -> DropoutStream {
        let o = &self.options;
        match o.dropout_stream {
            None => DropoutStream::new(&[o.seed, self.step, rank, i as u64]),
            Some(s) => DropoutStream::new(&[o.seed, s, self.step, rank, i as u64]),
        }
    }

    /// One optimiser step over `micro` (this rank's micro-batches, possibly none), as
    /// described above.
    pub fn train_step(
        &mut self,
        micro: &[M::Batch],
        comm: &mut dyn Collective,
    ) -> Result<M::Stats> {
        let rank = comm.rank() as u64;
        let mut counts = vec![0f64; M::TERMS];
        for b in micro {
            add_into(&mut counts, &self.model.counts(b));
        }
        let mut counts: Vec<f32> = counts.iter().map(|&c| c as f32).collect();
        let rngs: Vec<DropoutStream> = (0..micro.len())
            .map(|i| self.dropout_rng(rank, i))
            .collect();
        let mut comm = Self::traced(&mut self.hook, comm, self.step + 1);
        let t_counts = std::time::Instant::now();
        comm.all_reduce_sum(&mut counts)?;
        let sync_ms = t_counts.elapsed().as_secs_f64() * 1e3;
        let weights: Vec<f64> = counts.iter().map(|&c| inv(c as f64)).collect();

        self.update.zero_grad()?;
        let (mut loss_sums, mut metrics) = (vec![0f64; M::TERMS], vec![0f64; M::METRICS]);
        let mut times = PhaseTimes::default();
        for (b, mut rng) in micro.iter().zip(rngs) {
            let dropout = self.options.dropout.then_some(&mut rng);
            let (l, m) = forward_backward_terms(
                &self.model,
                b,
                &weights,
                dropout,
                &mut self.update,
                &mut times,
            )?;
            add_into(&mut loss_sums, &l);
            add_into(&mut metrics, &m);
        }
        let t_reduce = std::time::Instant::now();
        self.update
            .all_reduce(&mut comm, self.options.bucket_elems)?;
        let mut sums: Vec<f32> = loss_sums
            .iter()
            .chain(&metrics)
            .map(|&x| x as f32)
            .collect();
        comm.all_reduce_sum(&mut sums)?;
        let t_opt = std::time::Instant::now();
        times.sync_ms = sync_ms;
        times.allreduce_ms = (t_opt - t_reduce).as_secs_f64() * 1e3;

        let lr = self.options.schedule.lr(self.step);
        let grad_norm = self.update.apply(
            self.model.store(),
            &mut comm,
            self.options.max_grad_norm,
            lr,
            self.step,
        )?;
        self.step += 1;
        times.optimizer_ms = t_opt.elapsed().as_secs_f64() * 1e3;
        self.phases = times;
        let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
        Ok(self.model.stats(&StepSums {
            step: self.step,
            lr,
            grad_norm,
            counts: f64s(&counts),
            loss_sums: f64s(&sums[..M::TERMS]),
            metrics: f64s(&sums[M::TERMS..]),
        }))
    }
}
