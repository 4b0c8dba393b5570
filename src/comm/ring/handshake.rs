//! Connection set-up: dialling the right neighbour and accepting the left one, each side
//! proving it knows the job token (HMAC over fresh nonces) for this generation and rank.

use super::*;

pub(super) const DIAL_DOMAIN: &[u8] = b"tandem-ring/v1/dial";
pub(super) const ACCEPT_DOMAIN: &[u8] = b"tandem-ring/v1/accept";
pub(super) const STATUS_OK: u8 = 0;
/// How long a handshake over the local socket may take before the dialler tries TCP.
const LOCAL_PATIENCE: Duration = Duration::from_secs(10);
/// How long the listener gives one incoming handshake: a few seconds, so silent or trickling
/// connections free their slot long before the ring's deadline and the real peer gets in.
const ACCEPT_PATIENCE: Duration = Duration::from_secs(3);
pub(super) const STATUS_GENERATION: u8 = 1;
pub(super) const STATUS_RANKS: u8 = 2;
pub(super) const STATUS_TOKEN: u8 = 3;

/// The fresh nonces of one handshake (the dialler's, the listener's): with the token they key
/// the connection's sealed frames (`seal.rs`).
#[derive(Clone, Copy, Debug)]
pub(super) struct Nonces {
    pub(super) dial: [u8; 16],
    pub(super) accept: [u8; 16],
}

/// An authenticated connection and its handshake's nonces.
pub(super) type Authenticated = (Stream, Nonces);

pub(super) fn refusal(code: u8) -> &'static str {
    match code {
        STATUS_GENERATION => "a different generation",
        STATUS_RANKS => "unexpected ranks or world size",
        STATUS_TOKEN => "a wrong job token",
        _ => "an unknown reason",
    }
}

/// HMAC-SHA256 (RFC 2104, RustCrypto's `hmac`) of the concatenated `parts`.
pub(super) fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    use hmac::Mac;
    let mut mac =
        hmac::Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// Proof that the sender knows the token, bound to its role, generation, rank, world size and
/// the other side's fresh nonce (so it cannot be replayed or reflected).
pub(super) fn proof(cfg: &RingConfig, domain: &[u8], rank: usize, nonce: &[u8; 16]) -> [u8; 32] {
    let fields = [cfg.generation, rank as u64, cfg.world_size as u64].map(u64::to_le_bytes);
    hmac(
        cfg.token.as_bytes(),
        &[domain, &fields[0], &fields[1], &fields[2], nonce],
    )
}

/// Equality of two proofs in constant time (`subtle`).
pub(super) fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    subtle::ConstantTimeEq::ct_eq(&a[..], &b[..]).into()
}

pub(super) fn set_timeouts(s: &Stream, deadline: Instant) -> io::Result<()> {
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    s.set_read_timeout(Some(left))?;
    s.set_write_timeout(Some(left))
}

pub(super) fn handshake_failure(e: io::Error) -> String {
    match e.kind() {
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => {
            "the peer hung up during the handshake (did it reject our token or generation?)".into()
        }
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "the handshake timed out".into(),
        _ => format!("handshake: {e}"),
    }
}

/// The dialling side of the handshake, on a fresh connection to `to`.
pub(super) fn dial_handshake(
    s: Stream,
    cfg: &RingConfig,
    to: usize,
    deadline: Instant,
) -> Result<Authenticated, String> {
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
    (&s).write_all(&hello).map_err(io)?;
    let mut status = [0u8; 1];
    (&s).read_exact(&mut status).map_err(io)?;
    if status[0] != STATUS_OK {
        return Err(format!("refused: it expects {}", refusal(status[0])));
    }
    let mut reply = [0u8; 48];
    (&s).read_exact(&mut reply).map_err(io)?;
    let their_nonce: [u8; 16] = reply[..16].try_into().expect("16 bytes");
    let their_proof: [u8; 32] = reply[16..].try_into().expect("32 bytes");
    if !ct_eq(&their_proof, &proof(cfg, ACCEPT_DOMAIN, to, &nonce)) {
        return Err(format!(
            "the listener failed to prove the job token for generation {} (another job or generation?)",
            cfg.generation
        ));
    }
    (&s).write_all(&proof(cfg, DIAL_DOMAIN, cfg.rank, &their_nonce))
        .map_err(io)?;
    (&s).read_exact(&mut status).map_err(io)?;
    if status[0] != STATUS_OK {
        return Err(format!("refused: it expects {}", refusal(status[0])));
    }
    let nonces = Nonces {
        dial: nonce,
        accept: their_nonce,
    };
    Ok((s, nonces))
}

/// The accepting side of the handshake: only rank `from` of our job and generation passes.
pub(super) fn accept_handshake(
    s: Stream,
    cfg: &RingConfig,
    from: usize,
    deadline: Instant,
) -> Result<Authenticated, String> {
    let io = handshake_failure;
    s.set_nonblocking(false).map_err(io)?;
    set_timeouts(&s, deadline).map_err(io)?;
    let mut hello = [0u8; 56];
    (&s).read_exact(&mut hello).map_err(io)?;
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
        let _ = (&s).write_all(&[code]);
        return Err(format!(
            "refused a peer claiming rank {their_rank} -> {to} of {world} in generation {generation}: {}",
            refusal(code)
        ));
    }
    let ours: [u8; 16] = rand::random();
    let mut reply = vec![STATUS_OK];
    reply.extend_from_slice(&ours);
    reply.extend_from_slice(&proof(cfg, ACCEPT_DOMAIN, cfg.rank, &nonce));
    (&s).write_all(&reply).map_err(io)?;
    let mut theirs = [0u8; 32];
    (&s).read_exact(&mut theirs).map_err(io)?;
    if !ct_eq(&theirs, &proof(cfg, DIAL_DOMAIN, from, &ours)) {
        let _ = (&s).write_all(&[STATUS_TOKEN]);
        return Err(format!(
            "refused a peer claiming rank {from}: it failed to prove the job token"
        ));
    }
    (&s).write_all(&[STATUS_OK]).map_err(io)?;
    let nonces = Nonces {
        dial: nonce,
        accept: ours,
    };
    Ok((s, nonces))
}

/// Connects to rank `to`, retrying with backoff (the peer may not listen yet, or a stale
/// process may hold its address) until `deadline`, `cancel` or `abort`. A peer at a loopback address is
/// dialled over its local socket first (see `stream.rs`); after a refusal or no answer there,
/// the next attempt goes over TCP, so a foreign process holding the local name cannot lock us
/// out.
pub(super) fn dial(
    cfg: &RingConfig,
    to: usize,
    deadline: Instant,
    cancel: &AtomicBool,
    abort: &AtomicBool,
) -> Result<Authenticated, String> {
    let addr = cfg.peers[to];
    let mut backoff = Duration::from_millis(5);
    let mut last = String::from("no attempt finished");
    // A handshake refusal says more than the connection errors that may follow it.
    let mut refused: Option<String> = None;
    let mut try_local = cfg.transport == Transport::Auto;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let gave_up = if cancel.load(Ordering::SeqCst) || abort.load(Ordering::SeqCst) {
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
        let local = if try_local { connect_local(addr) } else { None };
        let was_local = local.is_some();
        let stream = match local {
            Some(s) => Ok(s),
            None => {
                TcpStream::connect_timeout(&addr, left.min(Duration::from_secs(1))).map(Stream::Tcp)
            }
        };
        try_local = cfg.transport == Transport::Auto;
        // Over the local socket the answer must come within LOCAL_PATIENCE (a third of the
        // timeout at most): a process squatting the name never answers, and the next attempt
        // then goes over TCP. A peer that is merely late is reached over TCP then.
        let patience = LOCAL_PATIENCE.min(cfg.timeout / 3);
        let until = if was_local {
            deadline.min(Instant::now() + patience)
        } else {
            deadline
        };
        match stream {
            Ok(s) => match dial_handshake(s, cfg, to, until) {
                Ok(s) => return Ok(s),
                Err(e) => {
                    let via = if was_local { " (local socket)" } else { "" };
                    tracing::warn!(rank = cfg.rank, peer = to, %addr, "ring connection refused{via}: {e}");
                    refused = Some(e.clone());
                    last = e;
                    try_local &= !was_local;
                }
            },
            Err(e) => last = format!("connect: {e}"),
        }
        thread::sleep(backoff.min(deadline.saturating_duration_since(Instant::now())));
        backoff = (backoff * 2).min(Duration::from_millis(250));
    }
}

/// Accepts the authenticated connection from rank `from` (until `deadline` or `abort`);
/// handshakes run on their own threads so a silent or hostile connection cannot hold the
/// listener up.
pub(super) fn accept_from(
    cfg: &RingConfig,
    listener: &RingListener,
    from: usize,
    deadline: Instant,
    abort: &AtomicBool,
) -> Result<Authenticated, String> {
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
        if abort.load(Ordering::SeqCst) {
            return Err(format!("waiting for rank {from} was aborted"));
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
                let until = deadline.min(Instant::now() + ACCEPT_PATIENCE);
                thread::spawn(move || {
                    let res =
                        accept_handshake(s, &cfg, from, until).map_err(|e| format!("{addr}: {e}"));
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
