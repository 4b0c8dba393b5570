//! Where a replica keeps its master weights, gradient and optimiser state, and the update
//! it applies after the all-reduce.
//!
//! Two places, one arithmetic:
//! - **host** (CPU models): flat `Vec<f32>` buffers and the in-place [`AdamW`] — the fastest
//!   there is on a CPU, and what the ring all-reduce reads directly;
//! - **device** (GPU models): flat tensors on the model's device and the same AdamW written as
//!   tensor ops, so gradients never leave the GPU: they are concatenated there, summed there
//!   (NCCL, through [`crate::comm::Collective::all_reduce_sum_tensors`]), clipped and applied there, and
//!   written back into the parameters device to device. On a GPU the host path would copy
//!   every gradient down and every weight up each step and run AdamW on one CPU core.
//!
//! The device path performs the host path's floating-point operations in the same order, so
//! on the CPU (where it runs in the tests) the two give bit-identical weights.

use std::borrow::Cow;
use std::ops::Range;

use candle_core::{backprop::GradStore, DType, Device, Tensor};

use super::optim::{
    clip_global_norm, clip_scale, sum_of_squares, AdamW, AdamWConfig, NORM_CHUNK, NORM_LANES,
};
use super::traced::Traced;
use crate::comm::owned_segment;
use crate::error::{Error, Result};
use crate::model::ParamStore;

/// Where the update runs (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdatePlace {
    /// On the host: flat `Vec<f32>` buffers and [`AdamW`].
    Host,
    /// On the model's device: flat tensors and AdamW as tensor ops.
    Device,
}

impl UpdatePlace {
    /// The host for CPU models, the device for accelerators. `TANDEM_DEVICE_UPDATE=1` takes
    /// the device path on the CPU too (with `TANDEM_FUSED_KERNELS=0`, a CPU run then does what
    /// a GPU run does: scripts/gpu-check.sh's dry run).
    pub fn for_device(device: &Device) -> Self {
        static FORCED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let forced =
            *FORCED.get_or_init(|| std::env::var("TANDEM_DEVICE_UPDATE").is_ok_and(|v| v == "1"));
        if device.is_cpu() && !forced {
            UpdatePlace::Host
        } else {
            UpdatePlace::Device
        }
    }
}

/// Master weights, gradient accumulator and optimiser of one replica.
pub(crate) enum Updater {
    Host {
        params: Vec<f32>,
        grad: Vec<f32>,
        opt: AdamW,
        /// Shard the optimiser step over the ranks (see [`Updater::set_sharded`]).
        sharded: bool,
        /// After a sharded all-reduce: the bucket size and this rank's parts of the buffer.
        owned: Option<(usize, Vec<Range<usize>>)>,
    },
    Device {
        params: Tensor,
        grad: Tensor,
        opt: DeviceAdamW,
    },
}

impl Updater {
    /// Starts from the store's current weights, with zero moments.
    pub fn new(store: &ParamStore, cfg: AdamWConfig, place: UpdatePlace) -> Result<Self> {
        Self::with_state(store, AdamW::new(cfg, store), place)
    }

    /// Starts from the store's current weights and the optimiser state `opt` (a checkpoint's).
    pub fn with_state(store: &ParamStore, opt: AdamW, place: UpdatePlace) -> Result<Self> {
        Ok(match place {
            UpdatePlace::Host => {
                let params = store.to_flat()?;
                let grad = vec![0.0; params.len()];
                Updater::Host {
                    params,
                    grad,
                    opt,
                    sharded: false,
                    owned: None,
                }
            }
            UpdatePlace::Device => Updater::Device {
                params: store.to_flat_tensor()?,
                grad: Tensor::zeros(store.numel(), DType::F32, store.device())?,
                opt: DeviceAdamW::from_host(&opt, store)?,
            },
        })
    }

    pub fn place(&self) -> UpdatePlace {
        match self {
            Updater::Host { .. } => UpdatePlace::Host,
            Updater::Device { .. } => UpdatePlace::Device,
        }
    }

    /// Clears the gradient accumulator (start of a step).
    pub fn zero_grad(&mut self) -> Result<()> {
        match self {
            Updater::Host { grad, owned, .. } => {
                grad.iter_mut().for_each(|g| *g = 0.0);
                *owned = None;
            }
            Updater::Device { grad, .. } => *grad = grad.zeros_like()?,
        }
        Ok(())
    }

    /// Adds one backward pass's gradients into the accumulator.
    pub fn accumulate(&mut self, store: &ParamStore, grads: &GradStore) -> Result<()> {
        match self {
            Updater::Host { grad, .. } => store.accumulate_grads(grads, grad),
            Updater::Device { grad, .. } => {
                *grad = grad.add(&store.flat_grads(grads)?)?;
                Ok(())
            }
        }
    }

    /// Shards the optimiser step over the ranks (host path, more than one rank; ZeRO stage 1):
    /// the gradient is reduce-scattered instead of all-reduced, each rank clips and updates
    /// only its own part of the parameters and AdamW state, and the new parameters are
    /// all-gathered. The same bytes travel as with an all-reduce; the optimiser's work per
    /// rank is divided by the world size. The weights stay bit-identical on every rank (each
    /// part is computed by one rank and copied), and equal to an unsharded step's, except that
    /// the clipping norm's sum of squares is added up in another order (one f32 per rank).
    /// Each rank's AdamW state is current only in its own parts until
    /// [`Updater::gather_state`]. No effect on the device path (its collective is NCCL's
    /// all-reduce). Returns whether the steps will be sharded (with more than one rank).
    pub fn set_sharded(&mut self, on: bool) -> bool {
        match self {
            Updater::Host { sharded, .. } => {
                *sharded = on;
                on
            }
            Updater::Device { .. } => false,
        }
    }

    /// Sums the accumulated gradient over all ranks, in buckets of `bucket_elems` floats (on
    /// a sharded host updater: each bucket's own part only).
    pub fn all_reduce(&mut self, comm: &mut Traced<'_>, bucket_elems: usize) -> Result<()> {
        let bucket = bucket_elems.max(1);
        let (rank, world) = (comm.rank(), comm.world_size());
        match self {
            Updater::Host {
                grad,
                sharded: true,
                owned,
                ..
            } if world > 1 => {
                let mut parts = vec![];
                for (k, b) in grad.chunks_mut(bucket).enumerate() {
                    comm.reduce_scatter_sum(b)?;
                    let own = owned_segment(b.len(), world, rank);
                    parts.push(k * bucket + own.start..k * bucket + own.end);
                }
                *owned = Some((bucket, parts));
            }
            Updater::Host { grad, .. } => {
                for b in grad.chunks_mut(bucket) {
                    comm.all_reduce_sum(b)?;
                }
            }
            Updater::Device { grad, .. } => {
                let mut parts = comm.all_reduce_sum_tensors(&chunks(grad, bucket)?)?;
                *grad = match parts.len() {
                    0 => return Ok(()),
                    1 => parts.pop().expect("one part"),
                    _ => Tensor::cat(&parts, 0)?,
                };
            }
        }
        Ok(())
    }

    /// Refuses a non-finite gradient, clips by global norm (`max_grad_norm`, 0 = off), takes
    /// an AdamW step at `lr` and writes the new weights into `store`. Returns the norm before
    /// clipping. `comm` is used after a sharded all-reduce only (the norm's sum of squares and
    /// the all-gather of the new weights).
    pub fn apply(
        &mut self,
        store: &ParamStore,
        comm: &mut Traced<'_>,
        max_grad_norm: f32,
        lr: f32,
        step: u64,
    ) -> Result<f32> {
        let norm = match self {
            Updater::Host {
                params,
                grad,
                opt,
                owned,
                ..
            } if owned.is_some() => {
                let (bucket, parts) = owned.take().expect("checked");
                let mut sq = [parts
                    .iter()
                    .map(|r| sum_of_squares(&grad[r.clone()]))
                    .sum::<f64>() as f32];
                comm.all_reduce_sum(&mut sq)?;
                let norm = (sq[0] as f64).sqrt() as f32;
                check_finite(norm, step)?;
                if let Some(s) = clip_scale(norm, max_grad_norm) {
                    for r in &parts {
                        grad[r.clone()].iter_mut().for_each(|g| *g *= s);
                    }
                }
                opt.step_parts(params, grad, lr, &parts);
                for b in params.chunks_mut(bucket) {
                    comm.all_gather(b)?;
                }
                store.set_from_flat(params)?;
                norm
            }
            Updater::Host {
                params, grad, opt, ..
            } => {
                let norm = clip_global_norm(grad, max_grad_norm);
                check_finite(norm, step)?;
                opt.step(params, grad, lr);
                store.set_from_flat(params)?;
                norm
            }
            Updater::Device { params, grad, opt } => {
                let norm = device_norm(grad)?;
                check_finite(norm, step)?;
                if let Some(s) = clip_scale(norm, max_grad_norm) {
                    *grad = grad.affine(s as f64, 0.0)?;
                }
                *params = opt.step(params, grad, lr)?;
                store.set_from_flat_tensor(params)?;
                norm
            }
        };
        Ok(norm)
    }

    /// Copies `root`'s weights to every rank and into `store`.
    pub fn broadcast_params(
        &mut self,
        comm: &mut Traced<'_>,
        root: usize,
        store: &ParamStore,
    ) -> Result<()> {
        match self {
            Updater::Host { params, .. } => {
                comm.broadcast(params, root)?;
                store.set_from_flat(params)
            }
            Updater::Device { params, .. } => {
                let mut host = params.to_vec1::<f32>()?;
                comm.broadcast(&mut host, root)?;
                *params = Tensor::from_vec(host, params.dims(), params.device())?;
                store.set_from_flat_tensor(params)
            }
        }
    }

    /// Brings every rank's AdamW state up to date in all parts (after sharded steps each rank
    /// has its own parts only): all ranks call it before a checkpoint is taken. `bucket_elems`
    /// is the all-reduce's. Nothing to do when the steps were not sharded.
    pub fn gather_state(&mut self, comm: &mut Traced<'_>, bucket_elems: usize) -> Result<()> {
        if let Updater::Host {
            opt, sharded: true, ..
        } = self
        {
            if comm.world_size() > 1 {
                let bucket = bucket_elems.max(1);
                for b in opt.m.chunks_mut(bucket).chain(opt.v.chunks_mut(bucket)) {
                    comm.all_gather(b)?;
                }
            }
        }
        Ok(())
    }

    /// Re-reads the master weights from `store` (after weights were loaded into it).
    pub fn reload_params(&mut self, store: &ParamStore) -> Result<()> {
        match self {
            Updater::Host { params, .. } => *params = store.to_flat()?,
            Updater::Device { params, .. } => *params = store.to_flat_tensor()?,
        }
        Ok(())
    }

    /// The optimiser state on the host (for checkpoints): borrowed on the host path, copied
    /// down from the device on the device path.
    pub fn adamw(&self, store: &ParamStore) -> Result<Cow<'_, AdamW>> {
        match self {
            Updater::Host { opt, .. } => Ok(Cow::Borrowed(opt)),
            Updater::Device { opt, .. } => Ok(Cow::Owned(opt.to_host(store)?)),
        }
    }

    /// Replaces the optimiser state (from a checkpoint).
    pub fn set_adamw(&mut self, state: AdamW, store: &ParamStore) -> Result<()> {
        match self {
            Updater::Host { opt, .. } => *opt = state,
            Updater::Device { opt, .. } => *opt = DeviceAdamW::from_host(&state, store)?,
        }
        Ok(())
    }

    /// The accumulated (after `all_reduce`: summed) gradient, on the host. After a sharded
    /// step, only this rank's own parts are summed (and clipped).
    pub fn grad(&self) -> Result<Cow<'_, [f32]>> {
        match self {
            Updater::Host { grad, .. } => Ok(Cow::Borrowed(grad)),
            Updater::Device { grad, .. } => Ok(Cow::Owned(grad.to_vec1::<f32>()?)),
        }
    }
}

/// [`super::optim::global_norm`] of a flat tensor, on its device: sums of squares in f64 over
/// the same chunks (so the two agree to the bit, and the f64 copy is one chunk at a time), the
/// chunks' sums read back in one copy and added in order.
pub fn device_norm(grad: &Tensor) -> Result<f32> {
    // Chunks are never empty; the rows and the tail may be, and are then left out (a
    // zero-element kernel launch is an error on CUDA). Adding the host's empty sum (+0.0)
    // changes no bit.
    let chunk_sum = |c: &Tensor| -> candle_core::Result<Tensor> {
        let n = c.dim(0)?;
        let main = n / NORM_LANES * NORM_LANES;
        let sq = |t: Tensor| t.to_dtype(DType::F64)?.sqr();
        // Rows of NORM_LANES summed down each column (in row order), then the columns.
        let lanes = (main > 0)
            .then(|| {
                sq(c.narrow(0, 0, main)?)?
                    .reshape((main / NORM_LANES, NORM_LANES))?
                    .sum(0)?
                    .sum_all()
            })
            .transpose()?;
        let tail = (n > main)
            .then(|| sq(c.narrow(0, main, n - main)?)?.sum_all())
            .transpose()?;
        match (lanes, tail) {
            (Some(l), Some(t)) => l + t,
            (Some(s), None) | (None, Some(s)) => Ok(s),
            (None, None) => unreachable!("chunks are never empty"),
        }
    };
    let partial = chunks(grad, NORM_CHUNK)?
        .iter()
        .map(chunk_sum)
        .collect::<candle_core::Result<Vec<_>>>()?;
    if partial.is_empty() {
        return Ok(super::optim::global_norm(&[]));
    }
    let sq = Tensor::stack(&partial, 0)?
        .to_vec1::<f64>()?
        .into_iter()
        .sum::<f64>();
    Ok(sq.sqrt() as f32)
}

/// `t` (1-D) as consecutive views of `size` elements (the last one shorter).
fn chunks(t: &Tensor, size: usize) -> Result<Vec<Tensor>> {
    let n = t.dim(0)?;
    (0..n)
        .step_by(size.max(1))
        .map(|start| Ok(t.narrow(0, start, size.min(n - start))?))
        .collect()
}

fn check_finite(norm: f32, step: u64) -> Result<()> {
    if norm.is_finite() {
        Ok(())
    } else {
        Err(Error::Train(format!(
            "non-finite gradient norm ({norm}) at step {step}; the step was not applied"
        )))
    }
}

/// [`AdamW`] as tensor ops over flat tensors on the model's device.
pub(crate) struct DeviceAdamW {
    pub cfg: AdamWConfig,
    m: Tensor,
    v: Tensor,
    t: u64,
    /// 1 where the parameter takes weight decay, 0 where not (biases, LayerNorm).
    decays: Tensor,
}

impl DeviceAdamW {
    /// The host state `opt` moved to `store`'s device.
    pub fn from_host(opt: &AdamW, store: &ParamStore) -> Result<Self> {
        let n = store.numel();
        let mut decays = vec![0f32; n];
        for (i, spec) in store.specs().iter().enumerate() {
            if spec.decays() {
                decays[store.range(i)].fill(1.0);
            }
        }
        let dev = store.device();
        Ok(DeviceAdamW {
            cfg: opt.cfg,
            m: Tensor::from_slice(&opt.m, n, dev)?,
            v: Tensor::from_slice(&opt.v, n, dev)?,
            t: opt.t,
            decays: Tensor::from_vec(decays, n, dev)?,
        })
    }

    /// The state copied to the host (`store` is the model the state belongs to).
    pub fn to_host(&self, store: &ParamStore) -> Result<AdamW> {
        let mut opt = AdamW::new(self.cfg, store);
        opt.m = self.m.to_vec1()?;
        opt.v = self.v.to_vec1()?;
        opt.t = self.t;
        Ok(opt)
    }

    /// One update; returns the new parameters. Operation for operation the host
    /// [`AdamW::step`] (`affine(a, 0)` is an exact `a · x`; the shrink factor
    /// `decays · (−lr·wd) + 1` is exactly the host's `1 − lr·wd`, or 1).
    pub fn step(&mut self, params: &Tensor, grad: &Tensor, lr: f32) -> Result<Tensor> {
        self.t += 1;
        let c = self.cfg;
        let (step_size, bc2_sqrt) = c.bias_corrected(lr, self.t);
        let one_minus = |b: f32| (1.0 - b) as f64;
        self.m = (self.m.affine(c.beta1 as f64, 0.0)? + grad.affine(one_minus(c.beta1), 0.0)?)?;
        self.v = (self.v.affine(c.beta2 as f64, 0.0)?
            + grad.affine(one_minus(c.beta2), 0.0)?.mul(grad)?)?;
        let bc2_sqrt = Tensor::new(bc2_sqrt, params.device())?;
        let denom = self
            .v
            .sqrt()?
            .broadcast_div(&bc2_sqrt)?
            .affine(1.0, c.eps as f64)?;
        let update = self.m.affine(step_size as f64, 0.0)?.div(&denom)?;
        let shrink = self.decays.affine(-((lr * c.weight_decay) as f64), 1.0)?;
        Ok(params.mul(&shrink)?.sub(&update)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::optim::global_norm;
    use rand::Rng;

    #[test]
    fn the_device_norm_is_the_host_norm_to_the_bit_over_several_chunks() {
        let mut rng = crate::util::rng(&[7]);
        for n in [0, 1, 7, 8, 9, 1000, NORM_CHUNK, 2 * NORM_CHUNK + 12345] {
            let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1e-2f32..1e-2)).collect();
            let t = Tensor::from_slice(&v, n, &Device::Cpu).unwrap();
            let (host, dev) = (global_norm(&v), device_norm(&t).unwrap());
            assert_eq!(host.to_bits(), dev.to_bits(), "n = {n}: {host} vs {dev}");
        }
    }
}
