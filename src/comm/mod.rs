//! Collectives: how replicas agree on gradients. One trait, several backends.
//!
//! Gradients travel only here (the data plane), never over gRPC. Buffers are flat f32 in
//! the parameter store's name order, so every rank sums the same tensors together.

#![warn(missing_docs)]

use candle_core::Tensor;

use crate::error::Result;

#[cfg(feature = "cuda")]
pub mod nccl;
pub mod ring;

pub use ring::{AbortHandle, Ring, RingConfig};

/// Sum-all-reduce, broadcast and barrier over a fixed group of ranks.
pub trait Collective: Send {
    /// This rank's index in the group, from 0.
    fn rank(&self) -> usize;
    /// How many ranks the group has.
    fn world_size(&self) -> usize;
    /// Replaces `buf` on every rank by the element-wise sum of all ranks' `buf`.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()>;
    /// The element-wise sums over all ranks of the 1-D f32 tensors `ts` (gradient buckets),
    /// on their device. Required, with no default, so that no backend or wrapper can take the
    /// host path for device buffers without saying so: a device collective (NCCL) keeps them
    /// on the GPU and enqueues them all before waiting once; host collectives call
    /// [`tensors_through_host`].
    fn all_reduce_sum_tensors(&mut self, ts: &[Tensor]) -> Result<Vec<Tensor>>;
    /// Sums `buf` over all ranks into this rank's part of it ([`owned_segment`]); the rest
    /// of `buf` is left unspecified. With [`Self::all_gather`] after it, an all-reduce in two
    /// halves, between which each rank works on its own part only (a sharded optimiser step).
    /// By default a full all-reduce.
    fn reduce_scatter_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        self.all_reduce_sum(buf)
    }
    /// Replaces every rank's `buf` by the concatenation of every rank's own part
    /// ([`owned_segment`]), copied bit for bit. By default an all-reduce of `buf` with all but
    /// the own part zeroed.
    fn all_gather(&mut self, buf: &mut [f32]) -> Result<()> {
        let own = owned_segment(buf.len(), self.world_size(), self.rank());
        buf[..own.start].fill(0.0);
        buf[own.end..].fill(0.0);
        self.all_reduce_sum(buf)
    }
    /// Replaces `buf` on every rank by `root`'s `buf`.
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()>;
    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<()>;
}

/// The part of a buffer of `len` floats that `rank` of `world` holds summed after
/// [`Collective::reduce_scatter_sum`] and contributes to [`Collective::all_gather`]: the
/// ring's segment `rank + 1` (where its reduce-scatter ends), all of it for one rank.
pub fn owned_segment(len: usize, world: usize, rank: usize) -> std::ops::Range<usize> {
    if world <= 1 {
        0..len
    } else {
        ring::schedule::segment(len, world, (rank + 1) % world)
    }
}

/// [`Collective::all_reduce_sum_tensors`] through the host: each bucket copied out, summed
/// with [`Collective::all_reduce_sum`] and copied back to its device (the ring's way, on the
/// CPU and for GPU workers with `cluster.gpu_collective = "ring"`).
pub fn tensors_through_host<C: Collective + ?Sized>(
    c: &mut C,
    ts: &[Tensor],
) -> Result<Vec<Tensor>> {
    ts.iter()
        .map(|t| {
            if c.world_size() == 1 {
                return Ok(t.clone()); // the sum over one rank: no trip through the host
            }
            // A bucket is a view of the whole gradient; candle would copy all of the storage
            // down to read it, so copy the bucket out first.
            let mut host = t.force_contiguous()?.to_vec1::<f32>()?;
            c.all_reduce_sum(&mut host)?;
            Ok(Tensor::from_vec(host, t.dims(), t.device())?)
        })
        .collect()
}

impl<C: Collective + ?Sized> Collective for Box<C> {
    fn rank(&self) -> usize {
        (**self).rank()
    }
    fn world_size(&self) -> usize {
        (**self).world_size()
    }
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        (**self).all_reduce_sum(buf)
    }
    fn all_reduce_sum_tensors(&mut self, ts: &[Tensor]) -> Result<Vec<Tensor>> {
        (**self).all_reduce_sum_tensors(ts)
    }
    fn reduce_scatter_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        (**self).reduce_scatter_sum(buf)
    }
    fn all_gather(&mut self, buf: &mut [f32]) -> Result<()> {
        (**self).all_gather(buf)
    }
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        (**self).broadcast(buf, root)
    }
    fn barrier(&mut self) -> Result<()> {
        (**self).barrier()
    }
}

/// The single-process group: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct Local;

impl Collective for Local {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_tensors(&mut self, ts: &[Tensor]) -> Result<Vec<Tensor>> {
        Ok(ts.to_vec())
    }
    fn broadcast(&mut self, _buf: &mut [f32], _root: usize) -> Result<()> {
        Ok(())
    }
    fn barrier(&mut self) -> Result<()> {
        Ok(())
    }
}
