//! The generation's collective: the authenticated ring to the other ranks and, for a model
//! on a GPU, NCCL over it.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use anyhow::Context;

use super::ctx::{set_phase, Ctx};
use super::phase::Phase;
use crate::comm::ring::{Ring, RingConfig};
use crate::comm::Collective;
use crate::config::{GpuCollective, JobConfig};
use crate::proto;

/// Connects this rank to the generation's ring and registers its abort handle.
fn connect_ring(a: &proto::Assignment, ctx: &Ctx, cfg: &JobConfig) -> anyhow::Result<Ring> {
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
            encryption: cfg.cluster.ring_encryption,
        },
        ctx.listener.try_clone()?,
        ctx.abort.clone(),
    )?;
    *ctx.ring_abort.lock().unwrap() = Some(ring.abort_handle());
    if cfg.cluster.ring_encryption == crate::comm::ring::Encryption::Off {
        tracing::warn!(
            rank,
            "cluster.ring_encryption = \"off\": gradients and weights cross the network in clear \
             and can be read or altered by anyone on the path"
        );
    }
    tracing::info!(
        rank,
        world,
        generation = a.generation,
        transport = ring.transport(),
        sealed = ring.sealed(),
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
        set_phase(ctx, Phase::ConnectingNccl);
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
