//! Collectives: how replicas agree on gradients. One trait, several backends.
//!
//! Gradients travel only here (the data plane), never over gRPC. Buffers are flat f32 in
//! the parameter store's name order, so every rank sums the same tensors together.

use crate::error::Result;

pub mod ring;

pub use ring::{AbortHandle, Ring, RingConfig};

/// Sum-all-reduce, broadcast and barrier over a fixed group of ranks.
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Replaces `buf` on every rank by the element-wise sum of all ranks' `buf`.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()>;
    /// Replaces `buf` on every rank by `root`'s `buf`.
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()>;
    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<()>;
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
    fn broadcast(&mut self, _buf: &mut [f32], _root: usize) -> Result<()> {
        Ok(())
    }
    fn barrier(&mut self) -> Result<()> {
        Ok(())
    }
}
