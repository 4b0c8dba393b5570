//! Ring all-reduce over TCP: the CPU collective backend (Gloo/NCCL-style).
//!
//! Each rank holds two connections: a send side to `rank + 1` and a receive side from
//! `rank - 1`. An all-reduce is `2(n-1)` steps over `n` segments of the buffer (reduce-scatter,
//! then all-gather), every segment cut into chunks. During a call a sender thread writes chunks
//! straight from the caller's buffer while the calling thread reads and reduces: the two
//! directions overlap and can never deadlock on full socket buffers. See `README.md` here.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use sha2::Sha256;

use super::Collective;
use crate::error::{Error, Result};

mod deadline;
mod handshake;
mod link;
pub(crate) mod schedule;
mod seal;
mod stream;

use handshake::*;
use schedule::*;
pub use seal::Encryption;
use seal::{Binding, Opener, Sealer, TAG_BYTES};
use stream::{connect_local, Stream};
pub use stream::{RingListener, Transport};

/// Default pipelining granularity (measured on loopback, see `README.md`).
pub const DEFAULT_CHUNK_BYTES: usize = 1 << 20;
/// Default bound on every socket operation and on connection set-up.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes read before they are added in, so the staging buffer stays in the L1/L2 cache.
const READ_PIECE: usize = 64 << 10;
/// Calls that send at most this much are written inline, without a sender thread: so little
/// always fits in the socket buffers (at worst a write would time out, never hang).
const INLINE_BYTES: usize = 4 << 10;
/// Handshakes in progress at once on the listener; further connections are dropped.
const MAX_HANDSHAKES: usize = 16;
const HELLO_MAGIC: &[u8; 8] = b"TNDMRNG1";
const HEADER_MAGIC: u32 = 0x544e_4448; // "TNDH"
const HEADER_BYTES: usize = 40;

/// How one rank joins a ring.
#[derive(Clone)]
pub struct RingConfig {
    /// This rank's index in the ring, from 0.
    pub rank: usize,
    /// How many ranks the ring has.
    pub world_size: usize,
    /// Listen address of every rank, indexed by rank (the coordinator hands these out).
    pub peers: Vec<SocketAddr>,
    /// Job token. Peers prove they know it with an HMAC over a fresh nonce; it never travels.
    pub token: String,
    /// The membership generation the ring belongs to (peers of another one are refused).
    pub generation: u64,
    /// Bound on every socket operation and on connection set-up.
    pub timeout: Duration,
    /// Pipelining granularity in bytes (rounded down to whole floats).
    pub chunk_bytes: usize,
    /// Whether peers at loopback addresses are reached over a local socket (`Auto`).
    pub transport: Transport,
    /// Which connections carry sealed (AES-256-GCM) frames.
    pub encryption: Encryption,
}

impl RingConfig {
    /// Default pipelining granularity (same as [`DEFAULT_CHUNK_BYTES`]).
    pub const DEFAULT_CHUNK_BYTES: usize = DEFAULT_CHUNK_BYTES;
    /// Default operation and set-up bound (same as [`DEFAULT_TIMEOUT`]).
    pub const DEFAULT_TIMEOUT: Duration = DEFAULT_TIMEOUT;

    /// A config with the default timeout and chunk size.
    pub fn new(
        rank: usize,
        world_size: usize,
        peers: Vec<SocketAddr>,
        token: impl Into<String>,
        generation: u64,
    ) -> Self {
        RingConfig {
            rank,
            world_size,
            peers,
            token: token.into(),
            generation,
            timeout: DEFAULT_TIMEOUT,
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            transport: Transport::Auto,
            encryption: Encryption::Tcp,
        }
    }

    fn validate(&self) -> Result<()> {
        let fail = |msg: String| Err(comm_err(self.rank, msg));
        if self.world_size == 0 || self.rank >= self.world_size {
            return fail(format!(
                "rank {} is not in a world of size {}",
                self.rank, self.world_size
            ));
        }
        if self.peers.len() != self.world_size {
            return fail(format!(
                "{} peer addresses for a world of size {}",
                self.peers.len(),
                self.world_size
            ));
        }
        if self.token.is_empty() {
            return fail(
                "the job token is empty; every ring connection must be authenticated".into(),
            );
        }
        if self.timeout.is_zero() {
            return fail("the ring timeout must be positive".into());
        }
        if self.chunk_bytes < 4 {
            return fail(format!("chunk_bytes {} is below one f32", self.chunk_bytes));
        }
        Ok(())
    }
}

/// Debug without the token.
impl fmt::Debug for RingConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RingConfig")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("peers", &self.peers)
            .field("token", &"<redacted>")
            .field("generation", &self.generation)
            .field("timeout", &self.timeout)
            .field("chunk_bytes", &self.chunk_bytes)
            .field("transport", &self.transport)
            .field("encryption", &self.encryption)
            .finish()
    }
}

/// State shared by a [`Ring`], its sender thread and its [`AbortHandle`]s.
struct Shared {
    aborted: AtomicBool,
    /// Clones of both sockets, so any thread can shut them down (empty for world size 1).
    sockets: Vec<Stream>,
    /// The sender thread's failure, the root cause when the receive side then fails.
    send_error: Mutex<Option<String>>,
}

impl Shared {
    fn shutdown(&self) {
        for s in &self.sockets {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
    fn send_error(&self) -> Option<String> {
        self.send_error.lock().map(|e| e.clone()).unwrap_or(None)
    }
}

/// Makes every blocked or future operation of a [`Ring`] fail at once (used when the
/// coordinator aborts a generation).
#[derive(Clone)]
pub struct AbortHandle(Arc<Shared>);

impl AbortHandle {
    /// Marks the ring aborted and shuts its sockets down.
    pub fn abort(&self) {
        self.0.aborted.store(true, Ordering::SeqCst);
        self.0.shutdown();
    }
}

/// One rank's membership in a ring; implements [`Collective`].
pub struct Ring {
    rank: usize,
    world: usize,
    generation: u64,
    chunk_elems: usize,
    seq: u64,
    /// Set by the first failure: the streams are out of step, so later calls fail fast.
    broken: Option<String>,
    shared: Arc<Shared>,
    link: Option<Link>,
    transport: &'static str,
}

/// The connections of a ring of two or more ranks.
struct Link {
    prev: usize,
    next: usize,
    timeout: Duration,
    recv: Stream,
    send: Stream,
    /// Staging for bytes that are added into the buffer (reduce-scatter), and for sealed
    /// frames.
    rbuf: Vec<u8>,
    shared: Arc<Shared>,
    /// Seals what goes to `next` (a sealed connection); used by one thread at a time.
    sealer: Option<Mutex<Sealer>>,
    /// Opens what comes from `prev` (a sealed connection).
    opener: Option<Mutex<Opener>>,
    /// When the current call must be over ([`deadline`]).
    deadline: Instant,
}

/// Work for a call's sender thread. Chunks are lent to it and handed back once written, so
/// the borrow checker proves that no chunk is written to while it is being sent.
enum Job<'a> {
    Header([u8; HEADER_BYTES]),
    Chunk(usize, &'a mut [f32], Part),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    AllReduce = 1,
    Broadcast = 2,
    Barrier = 3,
    ReduceScatter = 4,
    AllGather = 5,
}

/// One collective call, for the wire header and for error messages.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Op {
    kind: Kind,
    seq: u64,
    len: usize,
    root: usize,
    chunk_elems: usize,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (seq, len) = (self.seq, self.len);
        match self.kind {
            Kind::AllReduce => write!(f, "all-reduce #{seq} of {len} floats"),
            Kind::Broadcast => write!(
                f,
                "broadcast #{seq} of {len} floats from rank {}",
                self.root
            ),
            Kind::Barrier => write!(f, "barrier #{seq}"),
            Kind::ReduceScatter => write!(f, "reduce-scatter #{seq} of {len} floats"),
            Kind::AllGather => write!(f, "all-gather #{seq} of {len} floats"),
        }
    }
}

impl Op {
    fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut h = [0u8; HEADER_BYTES];
        h[0..4].copy_from_slice(&HEADER_MAGIC.to_le_bytes());
        h[4..8].copy_from_slice(&(self.kind as u32).to_le_bytes());
        for (i, v) in [
            self.seq,
            self.len as u64,
            self.root as u64,
            self.chunk_elems as u64,
        ]
        .iter()
        .enumerate()
        {
            h[8 + 8 * i..16 + 8 * i].copy_from_slice(&v.to_le_bytes());
        }
        h
    }
}

/// Which part of a collective a message is.
#[derive(Clone, Copy, Debug)]
enum Part {
    Header,
    Chunk {
        phase: &'static str,
        step: usize,
        steps: usize,
        chunk: usize,
        chunks: usize,
    },
    Piece {
        chunk: usize,
        chunks: usize,
    },
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Part::Header => f.write_str("the header"),
            Part::Chunk {
                phase,
                step,
                steps,
                chunk,
                chunks,
            } => {
                write!(
                    f,
                    "chunk {}/{chunks} of {phase} step {}/{steps}",
                    chunk + 1,
                    step + 1
                )
            }
            Part::Piece { chunk, chunks } => write!(f, "chunk {}/{chunks}", chunk + 1),
        }
    }
}

fn comm_err(rank: usize, msg: String) -> Error {
    Error::Comm { rank, msg }
}

fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0} s")
    } else {
        format!("{s:.2} s")
    }
}

/// What an I/O failure on a ring socket means, in words.
fn io_reason(e: &io::Error, timeout: Duration) -> String {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            format!("timed out after {}", secs(timeout))
        }
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => {
            "lost the connection (the peer exited, failed or was aborted)".into()
        }
        _ => e.to_string(),
    }
}

impl Ring {
    /// Joins the ring: connects to `rank + 1` (send side) and accepts from `rank - 1` (receive
    /// side), both authenticated by token and generation, within `cfg.timeout`. `listener` was
    /// bound by this rank at `peers[rank]` (a `TcpListener` converts, binding its local
    /// companion then: bind a [`RingListener`] early so local peers never miss it).
    pub fn connect(cfg: RingConfig, listener: impl Into<RingListener>) -> Result<Ring> {
        Self::connect_abortable(cfg, listener, Arc::new(AtomicBool::new(false)))
    }

    /// [`Self::connect`] that gives up as soon as `abort` is set (by another thread: the
    /// worker's abort directive), instead of waiting out the timeout for a peer that is gone.
    pub fn connect_abortable(
        cfg: RingConfig,
        listener: impl Into<RingListener>,
        abort: Arc<AtomicBool>,
    ) -> Result<Ring> {
        cfg.validate()?;
        let listener = listener.into();
        let (rank, n) = (cfg.rank, cfg.world_size);
        let mut ring = Ring {
            rank,
            world: n,
            generation: cfg.generation,
            chunk_elems: cfg.chunk_bytes / 4,
            seq: 0,
            broken: None,
            shared: Arc::new(Shared {
                aborted: AtomicBool::new(false),
                sockets: vec![],
                send_error: Mutex::new(None),
            }),
            link: None,
            transport: "none",
        };
        if n == 1 {
            return Ok(ring);
        }
        let (prev, next) = ((rank + n - 1) % n, (rank + 1) % n);
        let deadline = Instant::now() + cfg.timeout;
        let cancel = Arc::new(AtomicBool::new(false));
        let dialer = {
            let (cfg, cancel, abort) = (cfg.clone(), cancel.clone(), abort.clone());
            thread::spawn(move || dial(&cfg, next, deadline, &cancel, &abort))
        };
        let recv = accept_from(&cfg, &listener, prev, deadline, &abort);
        // The caller may keep the listener for later generations: leave it as it came.
        let _ = listener.set_nonblocking(false);
        if recv.is_err() {
            cancel.store(true, Ordering::SeqCst);
        }
        if abort.load(Ordering::SeqCst) {
            // Not waiting for the dialer: it may be inside a handshake with a silent peer, and
            // ends by itself at its deadline (dropping the handle detaches it).
            return Err(comm_err(
                rank,
                format!(
                    "joining the ring of generation {} was aborted",
                    cfg.generation
                ),
            ));
        }
        let send = dialer
            .join()
            .unwrap_or_else(|_| Err("the connecting thread panicked".into()));
        let ((recv, recv_nonces), (send, send_nonces)) = match (recv, send) {
            (Ok(r), Ok(s)) => (r, s),
            (recv, send) => {
                let why: Vec<String> = [recv.err(), send.err()].into_iter().flatten().collect();
                let msg = format!(
                    "joining the ring of generation {}: {}",
                    cfg.generation,
                    why.join("; ")
                );
                return Err(comm_err(rank, msg));
            }
        };
        let setup = |recv: &Stream, send: &Stream| -> io::Result<Vec<Stream>> {
            for s in [recv, send] {
                s.set_nodelay()?;
                s.set_read_timeout(Some(cfg.timeout))?;
                s.set_write_timeout(Some(cfg.timeout))?;
            }
            Ok(vec![recv.try_clone()?, send.try_clone()?])
        };
        let sockets = setup(&recv, &send)
            .map_err(|e| comm_err(rank, format!("configuring ring sockets: {e}")))?;
        let shared = Arc::new(Shared {
            aborted: AtomicBool::new(false),
            sockets,
            send_error: Mutex::new(None),
        });
        ring.transport = match (recv.kind(), send.kind()) {
            (a, b) if a == b => a,
            _ => "mixed",
        };
        tracing::debug!(
            rank,
            prev,
            next,
            generation = cfg.generation,
            receive = recv.kind(),
            send = send.kind(),
            "ring connected"
        );
        ring.shared = shared.clone();
        ring.link = Some(Link::new(
            &cfg,
            (recv, recv_nonces),
            (send, send_nonces),
            shared,
        ));
        Ok(ring)
    }

    /// A handle another thread can use to make every blocked or future operation fail at once.
    pub fn abort_handle(&self) -> AbortHandle {
        AbortHandle(self.shared.clone())
    }

    /// The generation this ring was formed for.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// How this rank's two connections travel: "tcp", "local" (Unix-domain sockets), "mixed",
    /// or "none" (world size 1).
    pub fn transport(&self) -> &'static str {
        self.transport
    }

    /// Whether both of this rank's connections carry sealed (AES-256-GCM) frames.
    pub fn sealed(&self) -> bool {
        self.link
            .as_ref()
            .is_some_and(|l| l.sealer.is_some() && l.opener.is_some())
    }
}

impl Ring {
    fn run(&mut self, kind: Kind, buf: &mut [f32], root: usize) -> Result<()> {
        let rank = self.rank;
        self.seq += 1;
        let op = Op {
            kind,
            seq: self.seq,
            len: buf.len(),
            root,
            chunk_elems: self.chunk_elems,
        };
        if self.shared.aborted.load(Ordering::SeqCst) {
            return Err(comm_err(
                rank,
                format!(
                    "{op}: the ring of generation {} was aborted",
                    self.generation
                ),
            ));
        }
        if let Some(first) = &self.broken {
            return Err(comm_err(
                rank,
                format!("{op}: the ring is unusable after an earlier failure: {first}"),
            ));
        }
        let n = self.world;
        let Some(link) = self.link.as_mut() else {
            return Ok(()); // world size 1: the identity
        };
        let res = match kind {
            Kind::AllReduce | Kind::Barrier => link.ring_steps(buf, rank, n, op, 0..2 * (n - 1)),
            Kind::ReduceScatter => link.ring_steps(buf, rank, n, op, 0..n - 1),
            Kind::AllGather => link.ring_steps(buf, rank, n, op, n - 1..2 * (n - 1)),
            Kind::Broadcast => link.broadcast(buf, rank, n, op),
        };
        res.map_err(|msg| {
            self.broken = Some(msg.clone());
            self.shared.shutdown(); // the neighbours fail now rather than at their timeout
            comm_err(rank, msg)
        })
    }
}

impl Collective for Ring {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        self.run(Kind::AllReduce, buf, 0)
    }
    /// Through the host: the ring moves host memory only.
    fn all_reduce_sum_tensors(&mut self, ts: &[Tensor]) -> Result<Vec<Tensor>> {
        super::tensors_through_host(self, ts)
    }
    /// The first half of the all-reduce's schedule: this rank ends with its segment summed.
    fn reduce_scatter_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        self.run(Kind::ReduceScatter, buf, 0)
    }
    /// The second half: every rank's finished segment travels round the ring.
    fn all_gather(&mut self, buf: &mut [f32]) -> Result<()> {
        self.run(Kind::AllGather, buf, 0)
    }
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        if root >= self.world {
            let msg = format!(
                "broadcast root {root} is not a rank of a world of size {}",
                self.world
            );
            return Err(comm_err(self.rank, msg));
        }
        self.run(Kind::Broadcast, buf, root)
    }
    /// An all-reduce of one float per segment: every rank's result depends on every rank.
    fn barrier(&mut self) -> Result<()> {
        let mut v = vec![1.0f32; self.world];
        self.run(Kind::Barrier, &mut v, 0)?;
        if v.iter().any(|&x| x != self.world as f32) {
            return Err(comm_err(
                self.rank,
                format!("barrier #{}: wrong counts {v:?}", self.seq),
            ));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- measurement

/// Bus bandwidth in GB/s of an all-reduce of `bytes` over `world_size` ranks taking `secs`
/// (the NCCL-tests convention: each rank moves `2(n-1)/n` of the buffer each way).
pub fn bus_bandwidth_gbs(bytes: usize, world_size: usize, secs: f64) -> f64 {
    let n = world_size.max(1) as f64;
    2.0 * (n - 1.0) / n * bytes as f64 / secs / 1e9
}

/// Joins the ring and times `iters` all-reduces of each size (after one warm-up), every one
/// started together behind a barrier. Returns the transport and `(bytes, median milliseconds)` per size.
pub fn bench_rank(
    cfg: RingConfig,
    listener: impl Into<RingListener>,
    sizes_bytes: &[usize],
    iters: usize,
) -> Result<(String, Vec<(usize, f64)>)> {
    if iters == 0 {
        return Err(comm_err(
            cfg.rank,
            "bench_rank needs at least one iteration".into(),
        ));
    }
    let mut ring = Ring::connect(cfg, listener)?;
    let fill = 1.0 + ring.rank as f32 / 8.0;
    let mut out = Vec::with_capacity(sizes_bytes.len());
    for &bytes in sizes_bytes {
        let mut buf = vec![fill; bytes / 4];
        ring.barrier()?;
        ring.all_reduce_sum(&mut buf)?;
        let mut ms = Vec::with_capacity(iters);
        for _ in 0..iters {
            buf.fill(fill);
            ring.barrier()?;
            let t = Instant::now();
            ring.all_reduce_sum(&mut buf)?;
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        out.push((bytes, crate::util::median(&ms)));
    }
    let sealed = if ring.sealed() { "+sealed" } else { "" };
    Ok((format!("{}{sealed}", ring.transport()), out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_partition_the_buffer_in_order() {
        for len in [0, 1, 2, 7, 8, 1000, 100_003] {
            for n in 1..=5 {
                let mut end = 0;
                for i in 0..n {
                    let s = segment(len, n, i);
                    assert_eq!(s.start, end, "len {len} n {n} segment {i}");
                    assert!(s.len() == len / n || s.len() == len / n + 1);
                    end = s.end;
                }
                assert_eq!(end, len);
            }
        }
    }

    #[test]
    fn chunks_tile_every_segment() {
        for (len, n, ce) in [(0, 3, 2), (1, 3, 2), (7, 2, 3), (10, 3, 3), (100, 4, 1000)] {
            let mut buf: Vec<f32> = (0..len).map(|i| i as f32).collect();
            let chunks = Chunks::split(&mut buf, n, ce);
            assert_eq!(chunks.first.len(), n);
            for i in 0..n {
                let seg = segment(len, n, i);
                let k = n_chunks(&seg, ce);
                let end = chunks
                    .first
                    .get(i + 1)
                    .copied()
                    .unwrap_or(chunks.slots.len());
                assert_eq!(
                    end - chunks.first[i],
                    k,
                    "len {len} n {n} ce {ce} segment {i}"
                );
                let got: Vec<f32> = chunks.slots[chunks.first[i]..end]
                    .iter()
                    .flat_map(|c| c.as_deref().unwrap().to_vec())
                    .collect();
                assert_eq!(got, seg.map(|x| x as f32).collect::<Vec<_>>());
                assert!(chunks.slots[chunks.first[i]..end]
                    .iter()
                    .all(|c| matches!(c, Some(c) if !c.is_empty() && c.len() <= ce)));
            }
        }
    }

    #[test]
    fn schedule_is_consistent_around_the_ring() {
        for n in 2..=5 {
            let s = |rank| Schedule { len: 23, n, rank };
            for r in 0..n {
                let prev = (r + n - 1) % n;
                for t in 0..2 * (n - 1) {
                    // What a rank receives is what its predecessor sends at the same step.
                    assert_eq!(s(r).recv_segment(t), s(prev).send_segment(t));
                    // What it sends next is what it just received (reduced or final).
                    if t > 0 {
                        assert_eq!(s(r).send_segment(t), s(r).recv_segment(t - 1));
                    }
                }
                // After reduce-scatter, rank r holds segment r+1; it sends it first in all-gather.
                assert_eq!(s(r).recv_segment(n - 2), (r + 1) % n);
                // Over all-gather it receives every segment but its own finished one.
                let mut got: Vec<_> = (n - 1..2 * (n - 1)).map(|t| s(r).recv_segment(t)).collect();
                got.sort();
                let want: Vec<_> = (0..n).filter(|&i| i != (r + 1) % n).collect();
                assert_eq!(got, want);
            }
        }
    }

    /// Rank 1's local-socket name is squatted by a process that never answers: rank 0 waits a
    /// third of the timeout there, then reaches rank 1 over TCP; rank 1 reaches rank 0 over
    /// its local socket.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_squatted_local_name_falls_back_to_tcp() {
        use std::net::TcpListener;
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::net::{SocketAddr as UnixAddr, UnixListener};
        let tcp: Vec<TcpListener> = (0..2)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let peers: Vec<SocketAddr> = tcp.iter().map(|l| l.local_addr().unwrap()).collect();
        let name = UnixAddr::from_abstract_name(stream::local_name(peers[1])).unwrap();
        let _squatter = UnixListener::bind_addr(&name).unwrap();
        let start = Instant::now();
        let ranks: Vec<_> = tcp
            .into_iter()
            .map(RingListener::from)
            .enumerate()
            .map(|(rank, l)| {
                let mut cfg = RingConfig::new(rank, 2, peers.clone(), "squat", 1);
                cfg.timeout = Duration::from_secs(6);
                thread::spawn(move || {
                    let mut ring = Ring::connect(cfg, l).unwrap();
                    let mut v = vec![rank as f32 + 1.0];
                    ring.all_reduce_sum(&mut v).unwrap();
                    (ring.transport(), v[0])
                })
            })
            .collect();
        for r in ranks {
            assert_eq!(r.join().unwrap(), ("mixed", 3.0));
        }
        assert!(start.elapsed() < Duration::from_secs(6));
    }

    #[test]
    fn hmac_matches_rfc4231() {
        let mac = hmac(b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn wire_format_is_little_endian_f32() {
        let mut v = [1.5f32, -0.0, f32::MAX, f32::MIN_POSITIVE, 3.25];
        let wire: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(bytes_of(&v), &wire[..]);
        add_le(&mut v, &wire);
        assert_eq!(v[0], 3.0);
        bytes_of_mut(&mut v).copy_from_slice(&wire);
        assert_eq!(v[4], 3.25);
    }

    #[test]
    fn messages_name_the_part() {
        let s = Schedule {
            len: 100,
            n: 3,
            rank: 0,
        };
        assert_eq!(
            s.part(1, 2, 8).to_string(),
            "chunk 3/8 of reduce-scatter step 2/2"
        );
        assert_eq!(
            s.part(2, 0, 1).to_string(),
            "chunk 1/1 of all-gather step 1/2"
        );
        assert_eq!(secs(Duration::from_secs(30)), "30 s");
    }
}
