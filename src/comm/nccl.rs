//! NCCL between GPU workers (feature `cuda`), through cudarc's NCCL bindings.
//!
//! [`Nccl`] wraps the generation's ring: gradient tensors on the GPU are summed by
//! `ncclAllReduce` on the model's CUDA stream and never leave the device; everything else (the
//! few floats of counts and statistics, the start-up broadcast, barriers) stays on the ring,
//! which is also how the communicator is bootstrapped: rank 0 creates the NCCL unique id and
//! broadcasts it over the ring (authenticated with the job token and generation), then every
//! rank joins the communicator. Peers must be on distinct GPUs (NCCL refuses two ranks on one
//! device; workers sharing a GPU use `cluster.gpu_collective = "ring"`).
//!
//! NCCL is issued onto the model device's own stream (the worker opens its GPU with a stream
//! of its own, `Device::new_cuda_with_stream`), so it is ordered with the model's kernels
//! without events, whichever thread issues it.
//! The worker sets `NCCL_RUNTIME_CONNECT=0` (unless set), so that NCCL connects its peers
//! inside `ncclCommInitRank`, which is bounded below, and not lazily inside the first
//! all-reduce's host call, which could not be.
//!
//! Failure semantics match the ring's: every all-reduce is waited for with a deadline
//! (`cluster.collective_timeout_s`) while watching the worker's abort flag and NCCL's
//! asynchronous error; on any of them the communicator is aborted (`ncclCommAbort`, which
//! also releases a kernel stuck waiting for a dead peer) and the call returns an error, so a
//! dead peer produces an error, never a hang. An aborted communicator refuses further use;
//! the next generation builds a new one. Building one is bounded the same way.

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::cuda_backend::cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
use candle_core::cuda_backend::cudarc::nccl::{result, sys};
use candle_core::{CudaStorage, CustomOp1, Device, Layout, Shape, Tensor};

use super::Collective;
use crate::error::{Error, Result};

/// A communicator handle; aborted (never destroyed, which could wait for a dead peer) when
/// dropped.
struct RawComm(sys::ncclComm_t);

// SAFETY: an NCCL communicator may be used from any thread; tandem issues its operations from
// one thread at a time (`Nccl`'s `&mut self` methods), and `ncclCommAbort` is documented as safe to
// call while another thread is blocked in an operation of the same communicator.
unsafe impl Send for RawComm {}
unsafe impl Sync for RawComm {}

impl Drop for RawComm {
    fn drop(&mut self) {
        // SAFETY: the handle came from ncclCommInitRank and is not used after this.
        unsafe {
            let _ = result::comm_abort(self.0);
        }
    }
}

/// NCCL for GPU tensors, the wrapped collective (the ring) for everything else.
pub struct Nccl<C: Collective> {
    inner: C,
    /// `None` once aborted.
    comm: Option<Arc<RawComm>>,
    stream: Arc<CudaStream>,
    timeout: Duration,
    abort: Arc<AtomicBool>,
}

impl<C: Collective> Nccl<C> {
    /// Builds the communicator of `inner`'s group on `device` (collective: every rank of the
    /// group must call it). `abort` is the worker's abort flag; `timeout` bounds every
    /// all-reduce.
    pub fn new(
        mut inner: C,
        device: &Device,
        timeout: Duration,
        abort: Arc<AtomicBool>,
    ) -> Result<Self> {
        let (rank, world) = (inner.rank(), inner.world_size());
        let err = |msg: String| Error::Comm { rank, msg };
        let Device::Cuda(dev) = device else {
            return Err(err(format!("NCCL needs a CUDA device, not {device:?}")));
        };
        let stream = dev.cuda_stream();
        // The unique id, from rank 0 to all: 128 bytes, one per f32 (exact small integers).
        let mut bytes = [0f32; 128];
        if rank == 0 {
            let id = result::get_uniqueid().map_err(|e| {
                err(format!(
                    "ncclGetUniqueId: {e:?} (is libnccl.so.2 installed?)"
                ))
            })?;
            for (b, c) in bytes.iter_mut().zip(id.internal) {
                *b = c as u8 as f32;
            }
        }
        inner.broadcast(&mut bytes, 0)?;
        let mut internal = [0 as std::ffi::c_char; 128];
        for (c, b) in internal.iter_mut().zip(bytes) {
            *c = b as u8 as std::ffi::c_char;
        }
        // ncclCommInitRank blocks until every rank has joined; it runs on a helper thread so
        // that a peer that died in between cannot hang this one: past the deadline, or on
        // abort, the helper is left behind (blocked; it holds nothing of ours) and the call
        // fails like any other collective.
        let (tx, rx) = std::sync::mpsc::channel();
        let ctx = stream.context().clone();
        std::thread::Builder::new()
            .name(format!("nccl-init-{rank}"))
            .spawn(move || {
                let r = ctx
                    .bind_to_thread()
                    .map_err(|e| format!("binding the CUDA context: {e:?}"));
                let r = r.and_then(|()| {
                    let mut comm = std::mem::MaybeUninit::<sys::ncclComm_t>::uninit();
                    // SAFETY: `comm` is written by NCCL before it is read; the id is the
                    // group's.
                    unsafe {
                        result::comm_init_rank(
                            comm.as_mut_ptr(),
                            world as i32,
                            sys::ncclUniqueId { internal },
                            rank as i32,
                        )
                        .map(|_| RawComm(comm.assume_init()))
                        .map_err(|e| {
                            let hint = if e.0 == sys::ncclResult_t::ncclInvalidUsage {
                                "; two ranks on one GPU cannot share a communicator (use \
                                 cluster.gpu_collective = \"ring\" there)"
                            } else {
                                ""
                            };
                            format!("ncclCommInitRank: {e:?}{hint}")
                        })
                    }
                });
                let _ = tx.send(r);
            })
            .map_err(|e| err(format!("starting the NCCL init thread: {e}")))?;
        let comm = poll(timeout, &abort, || match rx.try_recv() {
            Ok(r) => r.map(Some),
            Err(std::sync::mpsc::TryRecvError::Empty) => Ok(None),
            Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                Err("the NCCL init thread died".into())
            }
        })
        .map_err(|why| {
            err(match why {
                GaveUp::Failed(e) => format!("{e} (rank {rank} of {world})"),
                GaveUp::Aborted => "aborted while building the NCCL communicator".into(),
                GaveUp::TimedOut => format!(
                    "the NCCL communicator was not ready within {timeout:?} (a peer is gone)"
                ),
            })
        })?;
        tracing::info!(rank, world, "NCCL communicator ready");
        Ok(Nccl {
            inner,
            comm: Some(Arc::new(comm)),
            stream,
            timeout,
            abort,
        })
    }

    /// Waits for the stream's work so far, watching the deadline, the abort flag and NCCL's
    /// asynchronous errors; on any of them retires the communicator (it is aborted, releasing
    /// any kernel still waiting for a peer, when the caller's last reference goes).
    fn wait(&mut self, comm: &RawComm) -> Result<()> {
        let rank = self.inner.rank();
        let event = self.stream.record_event(None).map_err(|e| Error::Comm {
            rank,
            msg: format!("recording a CUDA event: {e:?}"),
        })?;
        let done = poll(self.timeout, &self.abort, || {
            let done = event
                .try_is_complete()
                .map_err(|e| format!("CUDA error in all-reduce: {e:?}"))?;
            // Also after completion: NCCL's kernels end early on an internal error.
            let mut state = sys::ncclResult_t::ncclSuccess;
            // SAFETY: a live communicator; `state` is written by NCCL.
            let r = unsafe { sys::ncclCommGetAsyncError(comm.0, &mut state) };
            for s in [r, state] {
                if s != sys::ncclResult_t::ncclSuccess && s != sys::ncclResult_t::ncclInProgress {
                    return Err(format!("NCCL asynchronous error {s:?}"));
                }
            }
            Ok(done.then_some(()))
        });
        done.map_err(|why| {
            self.comm = None;
            let msg = match why {
                GaveUp::Failed(e) => e,
                GaveUp::Aborted => "all-reduce aborted".into(),
                GaveUp::TimedOut => format!(
                    "NCCL all-reduce did not complete within {:?} (a peer is gone or stalled)",
                    self.timeout
                ),
            };
            Error::Comm { rank, msg }
        })
    }
}

/// Why [`poll`] gave up.
enum GaveUp {
    Failed(String),
    Aborted,
    TimedOut,
}

/// Calls `step` until it yields a value or an error, `abort` is set or `timeout` has passed,
/// pausing between calls (20 µs, doubling up to 1 ms).
fn poll<T>(
    timeout: Duration,
    abort: &AtomicBool,
    mut step: impl FnMut() -> std::result::Result<Option<T>, String>,
) -> std::result::Result<T, GaveUp> {
    let start = Instant::now();
    let mut pause = Duration::from_micros(20);
    loop {
        if let Some(v) = step().map_err(GaveUp::Failed)? {
            return Ok(v);
        }
        if abort.load(Ordering::SeqCst) {
            return Err(GaveUp::Aborted);
        }
        if start.elapsed() > timeout {
            return Err(GaveUp::TimedOut);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(1));
    }
}

/// `ncclAllReduce(sum)` of a contiguous f32 tensor into a new buffer, as a candle op.
struct AllReduce {
    comm: Arc<RawComm>,
    stream: Arc<CudaStream>,
}

impl CustomOp1 for AllReduce {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("the NCCL all-reduce runs on CUDA tensors only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let Some((o1, o2)) = l.contiguous_offsets() else {
            candle_core::bail!("the NCCL all-reduce needs a contiguous tensor")
        };
        let n = o2 - o1;
        let src = s.as_cuda_slice::<f32>()?.slice(o1..o2);
        // SAFETY: every element is written by the all-reduce before anything reads it.
        let mut dst = unsafe { s.device.alloc::<f32>(n)? };
        {
            let (src_ptr, _src_sync) = src.device_ptr(&self.stream);
            let (dst_ptr, _dst_sync) = dst.device_ptr_mut(&self.stream);
            // SAFETY: both buffers hold `n` f32 on this communicator's device and stream.
            unsafe {
                result::all_reduce(
                    src_ptr as *const c_void,
                    dst_ptr as *mut c_void,
                    n,
                    sys::ncclDataType_t::ncclFloat32,
                    sys::ncclRedOp_t::ncclSum,
                    self.comm.0,
                    self.stream.cu_stream() as _,
                )
            }
            .map_err(|e| candle_core::Error::Msg(format!("ncclAllReduce: {e:?}")))?;
        }
        Ok((
            CudaStorage::wrap_cuda_slice(dst, s.device.clone()),
            l.shape().clone(),
        ))
    }
}

impl<C: Collective> Collective for Nccl<C> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        self.inner.all_reduce_sum(buf)
    }
    fn reduce_scatter_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        self.inner.reduce_scatter_sum(buf)
    }
    fn all_gather(&mut self, buf: &mut [f32]) -> Result<()> {
        self.inner.all_gather(buf)
    }
    /// Enqueues every bucket on the stream, then waits once.
    fn all_reduce_sum_tensors(&mut self, ts: &[Tensor]) -> Result<Vec<Tensor>> {
        if ts.iter().any(|t| !t.device().is_cuda()) {
            return self.inner.all_reduce_sum_tensors(ts);
        }
        let comm = self.comm.clone().ok_or_else(|| Error::Comm {
            rank: self.inner.rank(),
            msg: "the NCCL communicator was aborted by an earlier failure".into(),
        })?;
        let op = AllReduce {
            comm: comm.clone(),
            stream: self.stream.clone(),
        };
        let out = ts
            .iter()
            .map(|t| {
                t.to_dtype(candle_core::DType::F32)?
                    .contiguous()?
                    .apply_op1_no_bwd(&op)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        self.wait(&comm)?;
        Ok(out)
    }
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        self.inner.broadcast(buf, root)
    }
    fn barrier(&mut self) -> Result<()> {
        self.inner.barrier()
    }
}
