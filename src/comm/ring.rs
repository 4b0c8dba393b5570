//! Ring all-reduce over TCP: the CPU collective backend (Gloo/NCCL-style).
//!
//! Each rank holds two connections: a send side to `rank + 1` and a receive side from
//! `rank - 1`. An all-reduce is `2(n-1)` steps over `n` segments of the buffer (reduce-scatter,
//! then all-gather), every segment cut into chunks. During a call a sender thread writes chunks
//! straight from the caller's buffer while the calling thread reads and reduces: the two
//! directions overlap and can never deadlock on full socket buffers. See `README.md` here.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::Collective;
use crate::error::{Error, Result};

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
    pub rank: usize,
    pub world_size: usize,
    /// Listen address of every rank, indexed by rank (the coordinator hands these out).
    pub peers: Vec<SocketAddr>,
    /// Job token. Peers prove they know it with an HMAC over a fresh nonce; it never travels.
    pub token: String,
    pub generation: u64,
    /// Bound on every socket operation and on connection set-up.
    pub timeout: Duration,
    /// Pipelining granularity in bytes (rounded down to whole floats).
    pub chunk_bytes: usize,
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
            .finish()
    }
}

/// State shared by a [`Ring`], its sender thread and its [`AbortHandle`]s.
struct Shared {
    aborted: AtomicBool,
    /// Clones of both sockets, so any thread can shut them down (empty for world size 1).
    sockets: Vec<TcpStream>,
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
}

/// The connections of a ring of two or more ranks.
struct Link {
    prev: usize,
    next: usize,
    timeout: Duration,
    recv: TcpStream,
    send: TcpStream,
    /// Staging for bytes that are added into the buffer (reduce-scatter).
    rbuf: Vec<u8>,
    shared: Arc<Shared>,
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

// ---------------------------------------------------------------- segment arithmetic

/// Segment `i` of `n` over `len` elements: the first `len % n` segments hold one extra.
fn segment(len: usize, n: usize, i: usize) -> Range<usize> {
    let (base, rem) = (len / n, len % n);
    let start = i * base + i.min(rem);
    start..start + base + usize::from(i < rem)
}

fn n_chunks(seg: &Range<usize>, ce: usize) -> usize {
    seg.len().div_ceil(ce)
}

/// One all-reduce's schedule: at step `t` of `2(n-1)` this rank sends segment
/// `(rank - t) mod n` and receives segment `(rank - t - 1) mod n`, which its predecessor sends
/// at the same step. The first `n-1` steps add what arrives (reduce-scatter); after them this
/// rank holds the finished segment `rank + 1`, and the last `n-1` steps pass finished segments
/// on, overwriting (all-gather). Each finished segment is summed once, in one order, by one rank
/// and then copied bit for bit: every rank ends with identical floats.
struct Schedule {
    len: usize,
    n: usize,
    rank: usize,
}

impl Schedule {
    fn steps(&self) -> usize {
        2 * (self.n - 1)
    }
    /// The segment this rank sends at step `t`.
    fn send_segment(&self, t: usize) -> usize {
        (self.rank + self.n - t % self.n) % self.n
    }
    /// The segment this rank receives at step `t`.
    fn recv_segment(&self, t: usize) -> usize {
        (self.rank + 2 * self.n - 1 - t % self.n) % self.n
    }
    fn part(&self, t: usize, c: usize, chunks: usize) -> Part {
        let (phase, step) = if t < self.n - 1 {
            ("reduce-scatter", t)
        } else {
            ("all-gather", t + 1 - self.n)
        };
        Part::Chunk {
            phase,
            step,
            steps: self.n - 1,
            chunk: c,
            chunks,
        }
    }
}

/// `dst[i] += src[i]`, `src` being little-endian f32 bytes.
fn add_le(dst: &mut [f32], src: &[u8]) {
    for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
        *d += f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
    }
}

#[cfg(not(target_endian = "little"))]
compile_error!("the ring sends f32 in memory order, the wire format only on little-endian targets");

/// The bytes of `v` as they lie in memory: little-endian f32, the wire format.
fn bytes_of(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding, so all `size_of_val(v)` bytes are initialised; u8 needs no
    // alignment; the result borrows `v`, so the memory stays alive and unwritten meanwhile.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// As [`bytes_of`], writable: received bytes land in the buffer without a copy.
fn bytes_of_mut(v: &mut [f32]) -> &mut [u8] {
    // SAFETY: as for `bytes_of`, and every bit pattern is a valid f32, so any bytes written
    // through the result leave `v` valid; the result borrows `v` exclusively.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// A buffer cut into the chunks of every segment; `slots[first[i] + c]` is chunk `c` of
/// segment `i`, or `None` while lent to the sender thread.
struct Chunks<'a> {
    slots: Vec<Option<&'a mut [f32]>>,
    first: Vec<usize>,
}

impl<'a> Chunks<'a> {
    fn split(buf: &'a mut [f32], n: usize, ce: usize) -> Self {
        let len = buf.len();
        let (mut slots, mut first) = (Vec::new(), Vec::with_capacity(n));
        let mut rest = buf;
        for i in 0..n {
            let (mut seg, tail) = std::mem::take(&mut rest).split_at_mut(segment(len, n, i).len());
            rest = tail;
            first.push(slots.len());
            while !seg.is_empty() {
                let k = ce.min(seg.len());
                let (c, tail) = std::mem::take(&mut seg).split_at_mut(k);
                slots.push(Some(c));
                seg = tail;
            }
        }
        Chunks { slots, first }
    }
}

// ---------------------------------------------------------------- connection set-up

const DIAL_DOMAIN: &[u8] = b"tandem-ring/v1/dial";
const ACCEPT_DOMAIN: &[u8] = b"tandem-ring/v1/accept";
const STATUS_OK: u8 = 0;
const STATUS_GENERATION: u8 = 1;
const STATUS_RANKS: u8 = 2;
const STATUS_TOKEN: u8 = 3;

fn refusal(code: u8) -> &'static str {
    match code {
        STATUS_GENERATION => "a different generation",
        STATUS_RANKS => "unexpected ranks or world size",
        STATUS_TOKEN => "a wrong job token",
        _ => "an unknown reason",
    }
}

/// HMAC-SHA256 (RFC 2104) of the concatenated `parts`.
fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    for p in parts {
        inner.update(p);
    }
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// Proof that the sender knows the token, bound to its role, generation, rank, world size and
/// the other side's fresh nonce (so it cannot be replayed or reflected).
fn proof(cfg: &RingConfig, domain: &[u8], rank: usize, nonce: &[u8; 16]) -> [u8; 32] {
    let fields = [cfg.generation, rank as u64, cfg.world_size as u64].map(u64::to_le_bytes);
    hmac(
        cfg.token.as_bytes(),
        &[domain, &fields[0], &fields[1], &fields[2], nonce],
    )
}

fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn set_timeouts(s: &TcpStream, deadline: Instant) -> io::Result<()> {
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    s.set_read_timeout(Some(left))?;
    s.set_write_timeout(Some(left))
}

fn handshake_failure(e: io::Error) -> String {
    match e.kind() {
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => {
            "the peer hung up during the handshake (did it reject our token or generation?)".into()
        }
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "the handshake timed out".into(),
        _ => format!("handshake: {e}"),
    }
}

/// The dialling side of the handshake, on a fresh connection to `to`.
fn dial_handshake(
    mut s: TcpStream,
    cfg: &RingConfig,
    to: usize,
    deadline: Instant,
) -> Result<TcpStream, String> {
    let io = handshake_failure;
    set_timeouts(&s, deadline).map_err(io)?;
    let nonce: [u8; 16] = rand::random();
    let mut hello = Vec::with_capacity(56);
    hello.extend_from_slice(HELLO_MAGIC);
    for v in [
        cfg.generation,
        cfg.rank as u64,
        to as u64,
        cfg.world_size as u64,
    ] {
        hello.extend_from_slice(&v.to_le_bytes());
    }
    hello.extend_from_slice(&nonce);
    s.write_all(&hello).map_err(io)?;
    let mut status = [0u8; 1];
    s.read_exact(&mut status).map_err(io)?;
    if status[0] != STATUS_OK {
        return Err(format!("refused: it expects {}", refusal(status[0])));
    }
    let mut reply = [0u8; 48];
    s.read_exact(&mut reply).map_err(io)?;
    let their_nonce: [u8; 16] = reply[..16].try_into().expect("16 bytes");
    let their_proof: [u8; 32] = reply[16..].try_into().expect("32 bytes");
    if !ct_eq(&their_proof, &proof(cfg, ACCEPT_DOMAIN, to, &nonce)) {
        return Err(format!(
            "the listener failed to prove the job token for generation {} (another job or generation?)",
            cfg.generation
        ));
    }
    s.write_all(&proof(cfg, DIAL_DOMAIN, cfg.rank, &their_nonce))
        .map_err(io)?;
    s.read_exact(&mut status).map_err(io)?;
    if status[0] != STATUS_OK {
        return Err(format!("refused: it expects {}", refusal(status[0])));
    }
    Ok(s)
}

/// The accepting side of the handshake: only rank `from` of our job and generation passes.
fn accept_handshake(
    mut s: TcpStream,
    cfg: &RingConfig,
    from: usize,
    deadline: Instant,
) -> Result<TcpStream, String> {
    let io = handshake_failure;
    s.set_nonblocking(false).map_err(io)?;
    set_timeouts(&s, deadline).map_err(io)?;
    let mut hello = [0u8; 56];
    s.read_exact(&mut hello).map_err(io)?;
    if &hello[..8] != HELLO_MAGIC {
        return Err("not a tandem ring peer (bad magic)".into());
    }
    let field =
        |i: usize| u64::from_le_bytes(hello[8 + 8 * i..16 + 8 * i].try_into().expect("8 bytes"));
    let (generation, their_rank, to, world) = (field(0), field(1), field(2), field(3));
    let nonce: [u8; 16] = hello[40..].try_into().expect("16 bytes");
    let code = if generation != cfg.generation {
        STATUS_GENERATION
    } else if their_rank != from as u64 || to != cfg.rank as u64 || world != cfg.world_size as u64 {
        STATUS_RANKS
    } else {
        STATUS_OK
    };
    if code != STATUS_OK {
        let _ = s.write_all(&[code]);
        return Err(format!(
            "refused a peer claiming rank {their_rank} -> {to} of {world} in generation {generation}: {}",
            refusal(code)
        ));
    }
    let ours: [u8; 16] = rand::random();
    let mut reply = vec![STATUS_OK];
    reply.extend_from_slice(&ours);
    reply.extend_from_slice(&proof(cfg, ACCEPT_DOMAIN, cfg.rank, &nonce));
    s.write_all(&reply).map_err(io)?;
    let mut theirs = [0u8; 32];
    s.read_exact(&mut theirs).map_err(io)?;
    if !ct_eq(&theirs, &proof(cfg, DIAL_DOMAIN, from, &ours)) {
        let _ = s.write_all(&[STATUS_TOKEN]);
        return Err(format!(
            "refused a peer claiming rank {from}: it failed to prove the job token"
        ));
    }
    s.write_all(&[STATUS_OK]).map_err(io)?;
    Ok(s)
}

/// Connects to rank `to`, retrying with backoff (the peer may not listen yet, or a stale
/// process may hold its address) until `deadline` or `cancel`.
fn dial(
    cfg: &RingConfig,
    to: usize,
    deadline: Instant,
    cancel: &AtomicBool,
) -> Result<TcpStream, String> {
    let addr = cfg.peers[to];
    let mut backoff = Duration::from_millis(5);
    let mut last = String::from("no attempt finished");
    // A handshake refusal says more than the connection errors that may follow it.
    let mut refused: Option<String> = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let gave_up = if cancel.load(Ordering::SeqCst) {
            Some(format!("connecting to rank {to} at {addr} was cancelled"))
        } else if left.is_zero() {
            let t = secs(cfg.timeout);
            Some(format!(
                "could not connect to rank {to} at {addr} within {t}"
            ))
        } else {
            None
        };
        if let Some(msg) = gave_up {
            let refused = match refused {
                Some(r) if r != last => format!("; earlier, {r}"),
                _ => String::new(),
            };
            return Err(format!("{msg}; last attempt: {last}{refused}"));
        }
        match TcpStream::connect_timeout(&addr, left.min(Duration::from_secs(1))) {
            Ok(s) => match dial_handshake(s, cfg, to, deadline) {
                Ok(s) => return Ok(s),
                Err(e) => {
                    tracing::warn!(rank = cfg.rank, peer = to, %addr, "ring connection refused: {e}");
                    refused = Some(e.clone());
                    last = e;
                }
            },
            Err(e) => last = format!("connect: {e}"),
        }
        thread::sleep(backoff.min(deadline.saturating_duration_since(Instant::now())));
        backoff = (backoff * 2).min(Duration::from_millis(250));
    }
}

/// Accepts the authenticated connection from rank `from`; handshakes run on their own threads
/// so a silent or hostile connection cannot hold the listener up.
fn accept_from(
    cfg: &RingConfig,
    listener: &TcpListener,
    from: usize,
    deadline: Instant,
) -> Result<TcpStream, String> {
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("listener: {e}"))?;
    let (tx, rx) = mpsc::channel();
    let busy = Arc::new(AtomicUsize::new(0));
    let mut last: Option<String> = None;
    loop {
        while let Ok(res) = rx.try_recv() {
            match res {
                Ok(s) => return Ok(s),
                Err(e) => {
                    tracing::warn!(rank = cfg.rank, "ring listener: {e}");
                    last = Some(e);
                }
            }
        }
        if Instant::now() >= deadline {
            let last = last
                .map(|e| format!("; last refusal: {e}"))
                .unwrap_or_default();
            return Err(format!(
                "no authenticated connection from rank {from} within {}{last}",
                secs(cfg.timeout)
            ));
        }
        match listener.accept() {
            Ok((s, addr)) if busy.load(Ordering::SeqCst) < MAX_HANDSHAKES => {
                busy.fetch_add(1, Ordering::SeqCst);
                let (tx, busy, cfg) = (tx.clone(), busy.clone(), cfg.clone());
                thread::spawn(move || {
                    let res = accept_handshake(s, &cfg, from, deadline)
                        .map_err(|e| format!("{addr}: {e}"));
                    busy.fetch_sub(1, Ordering::SeqCst);
                    let _ = tx.send(res);
                });
            }
            Ok(_) => {} // too many handshakes in flight: drop this connection
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(2))
            }
            Err(e) => {
                last = Some(format!("accept: {e}"));
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

impl Ring {
    /// Joins the ring: connects to `rank + 1` (send side) and accepts from `rank - 1` (receive
    /// side), both authenticated by token and generation, within `cfg.timeout`. `listener` was
    /// bound by this rank at `peers[rank]`.
    pub fn connect(cfg: RingConfig, listener: TcpListener) -> Result<Ring> {
        cfg.validate()?;
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
        };
        if n == 1 {
            return Ok(ring);
        }
        let (prev, next) = ((rank + n - 1) % n, (rank + 1) % n);
        let deadline = Instant::now() + cfg.timeout;
        let cancel = Arc::new(AtomicBool::new(false));
        let dialer = {
            let (cfg, cancel) = (cfg.clone(), cancel.clone());
            thread::spawn(move || dial(&cfg, next, deadline, &cancel))
        };
        let recv = accept_from(&cfg, &listener, prev, deadline);
        // The caller may keep the listener for later generations: leave it as it came.
        let _ = listener.set_nonblocking(false);
        if recv.is_err() {
            cancel.store(true, Ordering::SeqCst);
        }
        let send = dialer
            .join()
            .unwrap_or_else(|_| Err("the connecting thread panicked".into()));
        let (recv, send) = match (recv, send) {
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
        let setup = |recv: &TcpStream, send: &TcpStream| -> io::Result<Vec<TcpStream>> {
            for s in [recv, send] {
                s.set_nodelay(true)?;
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
        tracing::debug!(
            rank,
            prev,
            next,
            generation = cfg.generation,
            "ring connected"
        );
        ring.shared = shared.clone();
        ring.link = Some(Link {
            prev,
            next,
            timeout: cfg.timeout,
            recv,
            send,
            rbuf: vec![0u8; READ_PIECE],
            shared,
        });
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
}

/// Writes one part of a call to the next rank; the error says what and to whom.
fn write_part(
    mut to: &TcpStream,
    bytes: &[u8],
    op: Op,
    part: Part,
    link: &Link,
) -> Result<(), String> {
    to.write_all(bytes).map_err(|e| {
        let why = io_reason(&e, link.timeout);
        format!("{op}: {why} sending {part} to rank {}", link.next)
    })
}

/// A call's sender thread: writes the queued work in order and hands every chunk back once
/// written. On failure it records why and shuts both sockets down, so the calling thread fails
/// at once, then hands the rest back unwritten. Returns whether everything went out.
fn send_loop<'a>(
    link: &Link,
    op: Op,
    jobs: mpsc::Receiver<Job<'a>>,
    done: mpsc::Sender<(usize, &'a mut [f32])>,
) -> bool {
    let mut ok = true;
    for job in jobs {
        let res = match &job {
            _ if !ok => Ok(()),
            Job::Header(h) => write_part(&link.send, h, op, Part::Header, link),
            Job::Chunk(_, c, part) => write_part(&link.send, bytes_of(c), op, *part, link),
        };
        if let Err(msg) = res {
            ok = false;
            if let Ok(mut first) = link.shared.send_error.lock() {
                first.get_or_insert(msg);
            }
            link.shared.shutdown();
        }
        if let Job::Chunk(i, c, _) = job {
            let _ = done.send((i, c));
        }
    }
    ok
}

// ---------------------------------------------------------------- the collectives

impl Link {
    /// Why sending failed: an abort, else `own` or the sender thread's error.
    fn send_failure(&self, op: Op, own: Option<String>) -> String {
        if self.shared.aborted.load(Ordering::SeqCst) {
            let next = self.next;
            return format!(
                "{op}: aborted (the generation was ended) while sending to rank {next}"
            );
        }
        let stopped = || format!("{op}: the ring sender thread stopped");
        own.or_else(|| self.shared.send_error())
            .unwrap_or_else(stopped)
    }

    fn recv_failure(&self, e: &io::Error, op: Op, part: Part) -> String {
        let prev = self.prev;
        if self.shared.aborted.load(Ordering::SeqCst) {
            return format!(
                "{op}: aborted (the generation was ended) while receiving {part} from rank {prev}"
            );
        }
        // The sender's failure shut this socket down: it is the root cause.
        if let Some(msg) = self.shared.send_error() {
            return msg;
        }
        let why = io_reason(e, self.timeout);
        format!("{op}: {why} receiving {part} from rank {prev}")
    }

    /// Runs one call: `body` drives the receive side on this thread while a scoped sender
    /// thread writes what it queues (or, for a call sending at most [`INLINE_BYTES`], this
    /// thread writes it inline). On failure both sockets are shut down before the sender is
    /// joined, so it cannot sit in a write.
    fn call<'a>(
        &mut self,
        op: Op,
        send_bytes: usize,
        body: impl FnOnce(&mut Caller<'_, 'a>) -> Result<(), String>,
    ) -> Result<(), String> {
        let mut rbuf = std::mem::take(&mut self.rbuf);
        let link: &Link = self;
        let res = thread::scope(|scope| {
            let mut io = Caller {
                link,
                rbuf: &mut rbuf,
                jobs: None,
                done: None,
                back: Vec::new(),
                op,
            };
            let sender = (send_bytes > INLINE_BYTES).then(|| {
                let (jobs_tx, jobs_rx) = mpsc::channel();
                let (done_tx, done_rx) = mpsc::channel();
                (io.jobs, io.done) = (Some(jobs_tx), Some(done_rx));
                scope.spawn(move || send_loop(link, op, jobs_rx, done_tx))
            });
            let res = body(&mut io);
            if res.is_err() {
                link.shared.shutdown();
            }
            drop(io); // closes the queue: the sender ends after the queued work
            let sent = sender.is_none_or(|h| h.join().unwrap_or(false));
            match res {
                Err(e) => Err(e),
                Ok(()) if sent => Ok(()),
                Ok(()) => Err(link.send_failure(op, None)),
            }
        });
        self.rbuf = rbuf;
        res
    }

    fn all_reduce(&mut self, buf: &mut [f32], rank: usize, n: usize, op: Op) -> Result<(), String> {
        let ce = op.chunk_elems;
        let sched = Schedule {
            len: buf.len(),
            n,
            rank,
        };
        let count = move |seg: usize| n_chunks(&segment(sched.len, n, seg), ce);
        // Each step sends at most one segment of ceil(len / n) floats.
        let send_bytes = HEADER_BYTES + 2 * (n - 1) * buf.len().div_ceil(n) * 4;
        let mut chunks = Chunks::split(buf, n, ce);
        self.call(op, send_bytes, move |io| {
            io.exchange_header()?;
            let steps = sched.steps();
            let (mut st, mut sc) = (0, 0); // next chunk to send: (step, chunk)
            let (mut rt, mut rc) = (0, 0); // next chunk to receive
            loop {
                // Queue, in wire order, every chunk whose data is final: all of step 0, then
                // chunk c of step t once chunk c of step t-1 has arrived. Only receiving ever
                // waits on a peer, so no cycle of waits can form around the ring.
                loop {
                    while st < steps && sc >= count(sched.send_segment(st)) {
                        (st, sc) = (st + 1, 0);
                    }
                    if st == steps || (st > 0 && (rt, rc) <= (st - 1, sc)) {
                        break;
                    }
                    let seg = sched.send_segment(st);
                    let i = chunks.first[seg] + sc;
                    let c = io.take(&mut chunks, i)?;
                    io.push(Job::Chunk(i, c, sched.part(st, sc, count(seg))))?;
                    sc += 1;
                }
                while rt < steps && rc >= count(sched.recv_segment(rt)) {
                    (rt, rc) = (rt + 1, 0);
                }
                if rt == steps {
                    return Ok(());
                }
                let seg = sched.recv_segment(rt);
                let i = chunks.first[seg] + rc;
                let part = sched.part(rt, rc, count(seg));
                // In all-gather this chunk was sent n-1 steps ago; the sender has finished
                // with it (its bytes went round the ring), `take` only collects it.
                let c = io.take(&mut chunks, i)?;
                if rt < n - 1 {
                    io.read_add(c, part)?;
                } else {
                    io.read(bytes_of_mut(c), part)?;
                }
                chunks.slots[i] = Some(c);
                rc += 1;
            }
        })
    }

    /// Passes `buf` along the chain root → root+1 → … → root-1, chunk by chunk.
    fn broadcast(&mut self, buf: &mut [f32], rank: usize, n: usize, op: Op) -> Result<(), String> {
        let pos = (rank + n - op.root) % n;
        let send_bytes = HEADER_BYTES + buf.len() * 4;
        let mut chunks = Chunks::split(buf, 1, op.chunk_elems);
        self.call(op, send_bytes, move |io| {
            io.exchange_header()?;
            let total = chunks.slots.len();
            for (i, slot) in chunks.slots.iter_mut().enumerate() {
                let c = slot.take().expect("each chunk is used once");
                let part = Part::Piece {
                    chunk: i,
                    chunks: total,
                };
                if pos > 0 {
                    io.read(bytes_of_mut(c), part)?;
                }
                if pos < n - 1 {
                    io.push(Job::Chunk(i, c, part))?;
                }
            }
            Ok(())
        })
    }
}

/// The calling thread's side of one call.
struct Caller<'l, 'a> {
    link: &'l Link,
    rbuf: &'l mut [u8],
    /// The sender thread's queue and its returns; `None` when writing inline.
    jobs: Option<mpsc::Sender<Job<'a>>>,
    done: Option<mpsc::Receiver<(usize, &'a mut [f32])>>,
    /// Chunks written inline, to put back in the table.
    back: Vec<(usize, &'a mut [f32])>,
    op: Op,
}

impl<'a> Caller<'_, 'a> {
    fn push(&mut self, job: Job<'a>) -> Result<(), String> {
        let (link, op) = (self.link, self.op);
        let Some(jobs) = &self.jobs else {
            let res = match job {
                Job::Header(h) => write_part(&link.send, &h, op, Part::Header, link),
                Job::Chunk(i, c, part) => {
                    let res = write_part(&link.send, bytes_of(c), op, part, link);
                    self.back.push((i, c));
                    res
                }
            };
            return res.map_err(|e| link.send_failure(op, Some(e)));
        };
        jobs.send(job).map_err(|_| link.send_failure(op, None))
    }

    /// Takes chunk `i` out of the table, collecting it from the sender if it still holds it.
    fn take(&mut self, chunks: &mut Chunks<'a>, i: usize) -> Result<&'a mut [f32], String> {
        for (j, c) in self.back.drain(..) {
            chunks.slots[j] = Some(c);
        }
        loop {
            if let Some(c) = chunks.slots[i].take() {
                return Ok(c);
            }
            let returned = self.done.as_ref().and_then(|d| d.recv().ok());
            let (j, c) = returned.ok_or_else(|| self.link.send_failure(self.op, None))?;
            chunks.slots[j] = Some(c);
        }
    }

    fn read(&self, dst: &mut [u8], part: Part) -> Result<(), String> {
        (&self.link.recv)
            .read_exact(dst)
            .map_err(|e| self.link.recv_failure(&e, self.op, part))
    }

    /// Reads `dst.len()` floats and adds them in, a cache-sized piece at a time.
    fn read_add(&mut self, dst: &mut [f32], part: Part) -> Result<(), String> {
        for piece in dst.chunks_mut(READ_PIECE / 4) {
            let bytes = &mut self.rbuf[..piece.len() * 4];
            (&self.link.recv)
                .read_exact(bytes)
                .map_err(|e| self.link.recv_failure(&e, self.op, part))?;
            add_le(piece, bytes);
        }
        Ok(())
    }

    /// Every call starts with a header, so ranks that disagree on the call fail with a clear
    /// message instead of mixing up streams.
    fn exchange_header(&mut self) -> Result<(), String> {
        let (op, ours) = (self.op, self.op.encode());
        self.push(Job::Header(ours))?;
        let mut theirs = [0u8; HEADER_BYTES];
        self.read(&mut theirs, Part::Header)?;
        if theirs == ours {
            return Ok(());
        }
        let field = |i: usize| {
            u64::from_le_bytes(theirs[8 + 8 * i..16 + 8 * i].try_into().expect("8 bytes"))
        };
        let kind = u32::from_le_bytes(theirs[4..8].try_into().expect("4 bytes"));
        Err(format!(
            "{op} (chunks of {} floats): rank {} is in a different call (kind {kind}, #{}, {} floats, \
             root {}, chunks of {} floats); every rank must make the same collective calls in the \
             same order with the same lengths and chunk size",
            op.chunk_elems,
            self.link.prev,
            field(0),
            field(1),
            field(2),
            field(3)
        ))
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Peers see the connection end at once instead of waiting for their timeout.
        self.shared.shutdown();
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
            Kind::AllReduce | Kind::Barrier => link.all_reduce(buf, rank, n, op),
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
/// started together behind a barrier. Returns `(bytes, median milliseconds)` per size.
pub fn bench_rank(
    cfg: RingConfig,
    listener: TcpListener,
    sizes_bytes: &[usize],
    iters: usize,
) -> Result<Vec<(usize, f64)>> {
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
        ms.sort_by(f64::total_cmp);
        out.push((bytes, ms[ms.len() / 2]));
    }
    Ok(out)
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
                for t in 0..s(r).steps() {
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
