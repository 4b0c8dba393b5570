//! The trainer's view of a collective: every call it makes goes through [`Traced`], which tells
//! an optional [`CollectiveHook`] what is in flight (the worker names it in its progress
//! phase, so a stall reads "all-reduce 3 of step 41 (6553600 floats)").
//!
//! `Traced` is not itself a [`Collective`]: it offers exactly the calls the trainer makes and
//! forwards each to the same method of the backend, so no call can fall through to a slower
//! default (gradient buckets on a device reach NCCL's tensor all-reduce, never the host).

use candle_core::Tensor;

use crate::comm::Collective;
use crate::error::Result;

/// One collective call of a step, as a hook sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CollectiveCall {
    /// "all-reduce", "reduce-scatter", "all-gather", "broadcast" or "barrier".
    pub what: &'static str,
    /// The step it belongs to (the one being taken: steps so far + 1).
    pub step: u64,
    /// Its position among the step's calls, from 1.
    pub index: usize,
    /// Floats it moves (over all tensors of a device all-reduce).
    pub floats: usize,
    /// Whether the buffers are device tensors.
    pub tensors: bool,
}

/// Told about each collective call before it starts and after it returns.
pub trait CollectiveHook: Send {
    /// Called just before `call` starts.
    fn before(&mut self, call: &CollectiveCall);
    /// Called just after `call` returns (whether or not it succeeded).
    fn after(&mut self, call: &CollectiveCall);
}

/// A collective with the trainer's hook around every call (see the module docs).
pub struct Traced<'a> {
    inner: &'a mut dyn Collective,
    hook: Option<&'a mut dyn CollectiveHook>,
    step: u64,
    calls: usize,
}

impl<'a> Traced<'a> {
    /// `inner` with `hook` told about every call, as calls of `step`.
    pub fn new(
        inner: &'a mut dyn Collective,
        hook: Option<&'a mut dyn CollectiveHook>,
        step: u64,
    ) -> Self {
        Traced {
            inner,
            hook,
            step,
            calls: 0,
        }
    }

    /// This rank's index in the group.
    pub fn rank(&self) -> usize {
        self.inner.rank()
    }

    /// How many ranks the group has.
    pub fn world_size(&self) -> usize {
        self.inner.world_size()
    }

    fn around<T>(
        &mut self,
        what: &'static str,
        floats: usize,
        tensors: bool,
        f: impl FnOnce(&mut dyn Collective) -> Result<T>,
    ) -> Result<T> {
        self.calls += 1;
        let call = CollectiveCall {
            what,
            step: self.step,
            index: self.calls,
            floats,
            tensors,
        };
        if let Some(h) = self.hook.as_deref_mut() {
            h.before(&call);
        }
        let r = f(&mut *self.inner);
        if let Some(h) = self.hook.as_deref_mut() {
            h.after(&call);
        }
        r
    }

    /// [`Collective::all_reduce_sum`], told to the hook.
    pub fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        self.around("all-reduce", buf.len(), false, |c| c.all_reduce_sum(buf))
    }

    /// [`Collective::all_reduce_sum_tensors`], told to the hook.
    pub fn all_reduce_sum_tensors(&mut self, ts: &[Tensor]) -> Result<Vec<Tensor>> {
        let floats = ts.iter().map(|t| t.elem_count()).sum();
        self.around("all-reduce", floats, true, |c| c.all_reduce_sum_tensors(ts))
    }

    /// [`Collective::reduce_scatter_sum`], told to the hook.
    pub fn reduce_scatter_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        self.around("reduce-scatter", buf.len(), false, |c| {
            c.reduce_scatter_sum(buf)
        })
    }

    /// [`Collective::all_gather`], told to the hook.
    pub fn all_gather(&mut self, buf: &mut [f32]) -> Result<()> {
        self.around("all-gather", buf.len(), false, |c| c.all_gather(buf))
    }

    /// [`Collective::broadcast`], told to the hook.
    pub fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        self.around("broadcast", buf.len(), false, |c| c.broadcast(buf, root))
    }

    /// [`Collective::barrier`], told to the hook.
    pub fn barrier(&mut self) -> Result<()> {
        self.around("barrier", 0, false, |c| c.barrier())
    }
}
