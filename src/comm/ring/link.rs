//! The collectives on an established ring: the pipelined reduce-scatter + all-gather over
//! chunks, broadcast, and the sender thread that keeps both directions moving.

use super::*;

/// Writes one part of a call to the next rank, sealed on a sealed connection; the error says
/// what and to whom.
pub(super) fn write_part(bytes: &[u8], op: Op, part: Part, link: &Link) -> Result<(), String> {
    let fail = |e: io::Error| {
        let why = io_reason(&e, link.timeout);
        format!("{op}: {why} sending {part} to rank {}", link.next)
    };
    match &link.sealer {
        Some(sealer) => {
            let mut sealer = sealer
                .lock()
                .map_err(|_| format!("{op}: the sealer failed"))?;
            link.write_all(sealer.seal(bytes)).map_err(fail)
        }
        None => link.write_all(bytes).map_err(fail),
    }
}

/// A call's sender thread: writes the queued work in order and hands every chunk back once
/// written. On failure it records why and shuts both sockets down, so the calling thread fails
/// at once, then hands the rest back unwritten. Returns whether everything went out.
pub(super) fn send_loop<'a>(
    link: &Link,
    op: Op,
    jobs: mpsc::Receiver<Job<'a>>,
    done: mpsc::Sender<(usize, &'a mut [f32])>,
) -> bool {
    let mut ok = true;
    for job in jobs {
        let res = match &job {
            _ if !ok => Ok(()),
            Job::Header(h) => write_part(h, op, Part::Header, link),
            Job::Chunk(_, c, part) => write_part(bytes_of(c), op, *part, link),
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

impl Link {
    /// The link over two authenticated connections: from `prev` (receive) and to `next`
    /// (send), each sealed when `cfg.encryption` seals its kind, keyed by its handshake.
    pub(super) fn new(
        cfg: &RingConfig,
        (recv, recv_nonces): Authenticated,
        (send, send_nonces): Authenticated,
        shared: Arc<Shared>,
    ) -> Link {
        let (rank, n) = (cfg.rank, cfg.world_size);
        let (prev, next) = ((rank + n - 1) % n, (rank + 1) % n);
        let binding = |nonces: Nonces, from: usize, to: usize| Binding {
            token: &cfg.token,
            dial_nonce: nonces.dial,
            accept_nonce: nonces.accept,
            generation: cfg.generation,
            world: n,
            from,
            to,
        };
        let sealer = cfg
            .encryption
            .seals(send.kind())
            .then(|| Mutex::new(binding(send_nonces, rank, next).sealer()));
        let opener = cfg
            .encryption
            .seals(recv.kind())
            .then(|| Mutex::new(binding(recv_nonces, prev, rank).opener()));
        Link {
            prev,
            next,
            timeout: cfg.timeout,
            recv,
            send,
            rbuf: vec![0u8; READ_PIECE + TAG_BYTES],
            shared,
            sealer,
            opener,
            deadline: Instant::now(),
        }
    }

    /// Why sending failed: an abort, else `own` or the sender thread's error.
    pub(super) fn send_failure(&self, op: Op, own: Option<String>) -> String {
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

    pub(super) fn recv_failure(&self, e: &io::Error, op: Op, part: Part) -> String {
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
    pub(super) fn call<'a>(
        &mut self,
        op: Op,
        send_bytes: usize,
        body: impl FnOnce(&mut Caller<'_, 'a>) -> Result<(), String>,
    ) -> Result<(), String> {
        self.start_clock()
            .map_err(|e| format!("{op}: setting the socket timeouts: {e}"))?;
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

    /// Steps `steps` of the ring all-reduce's schedule ([`Schedule`]): all of them for an
    /// all-reduce, the first `n-1` for a reduce-scatter, the last `n-1` for an all-gather.
    pub(super) fn ring_steps(
        &mut self,
        buf: &mut [f32],
        rank: usize,
        n: usize,
        op: Op,
        steps: std::ops::Range<usize>,
    ) -> Result<(), String> {
        let ce = op.chunk_elems;
        let sched = Schedule {
            len: buf.len(),
            n,
            rank,
        };
        let count = move |seg: usize| n_chunks(&segment(sched.len, n, seg), ce);
        // Each step sends at most one segment of ceil(len / n) floats.
        let send_bytes = HEADER_BYTES + steps.len() * buf.len().div_ceil(n) * 4;
        let mut chunks = Chunks::split(buf, n, ce);
        self.call(op, send_bytes, move |io| {
            io.exchange_header()?;
            let (first, end) = (steps.start, steps.end);
            let (mut st, mut sc) = (first, 0); // next chunk to send: (step, chunk)
            let (mut rt, mut rc) = (first, 0); // next chunk to receive
            loop {
                // Queue, in wire order, every chunk whose data is final: all of the first
                // step, then chunk c of step t once chunk c of step t-1 has arrived. Only
                // receiving ever waits on a peer, so no cycle of waits can form around the ring.
                loop {
                    while st < end && sc >= count(sched.send_segment(st)) {
                        (st, sc) = (st + 1, 0);
                    }
                    if st == end || (st > first && (rt, rc) <= (st - 1, sc)) {
                        break;
                    }
                    let seg = sched.send_segment(st);
                    let i = chunks.first[seg] + sc;
                    let c = io.take(&mut chunks, i)?;
                    io.push(Job::Chunk(i, c, sched.part(st, sc, count(seg))))?;
                    sc += 1;
                }
                while rt < end && rc >= count(sched.recv_segment(rt)) {
                    (rt, rc) = (rt + 1, 0);
                }
                if rt == end {
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
    pub(super) fn broadcast(
        &mut self,
        buf: &mut [f32],
        rank: usize,
        n: usize,
        op: Op,
    ) -> Result<(), String> {
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
pub(super) struct Caller<'l, 'a> {
    pub(super) link: &'l Link,
    pub(super) rbuf: &'l mut [u8],
    /// The sender thread's queue and its returns; `None` when writing inline.
    pub(super) jobs: Option<mpsc::Sender<Job<'a>>>,
    pub(super) done: Option<mpsc::Receiver<(usize, &'a mut [f32])>>,
    /// Chunks written inline, to put back in the table.
    pub(super) back: Vec<(usize, &'a mut [f32])>,
    pub(super) op: Op,
}

impl<'a> Caller<'_, 'a> {
    pub(super) fn push(&mut self, job: Job<'a>) -> Result<(), String> {
        let (link, op) = (self.link, self.op);
        let Some(jobs) = &self.jobs else {
            let res = match job {
                Job::Header(h) => write_part(&h, op, Part::Header, link),
                Job::Chunk(i, c, part) => {
                    let res = write_part(bytes_of(c), op, part, link);
                    self.back.push((i, c));
                    res
                }
            };
            return res.map_err(|e| link.send_failure(op, Some(e)));
        };
        jobs.send(job).map_err(|_| link.send_failure(op, None))
    }

    /// Takes chunk `i` out of the table, collecting it from the sender if it still holds it.
    pub(super) fn take(
        &mut self,
        chunks: &mut Chunks<'a>,
        i: usize,
    ) -> Result<&'a mut [f32], String> {
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

    /// Reads one part into `dst` (through the staging buffer, opened, on a sealed connection).
    pub(super) fn read(&mut self, dst: &mut [u8], part: Part) -> Result<(), String> {
        if self.link.opener.is_none() {
            return self
                .link
                .read_exact(dst)
                .map_err(|e| self.link.recv_failure(&e, self.op, part));
        }
        for piece in dst.chunks_mut(seal::FRAME_BYTES) {
            let plain = self.read_frame(piece.len(), part)?;
            piece.copy_from_slice(plain);
        }
        Ok(())
    }

    /// Reads `dst.len()` floats and adds them in, a cache-sized piece (a frame, on a sealed
    /// connection) at a time.
    pub(super) fn read_add(&mut self, dst: &mut [f32], part: Part) -> Result<(), String> {
        for piece in dst.chunks_mut(READ_PIECE / 4) {
            if self.link.opener.is_some() {
                let plain = self.read_frame(piece.len() * 4, part)?;
                add_le(piece, plain);
                continue;
            }
            let bytes = &mut self.rbuf[..piece.len() * 4];
            self.link
                .read_exact(bytes)
                .map_err(|e| self.link.recv_failure(&e, self.op, part))?;
            add_le(piece, bytes);
        }
        Ok(())
    }

    /// Reads and opens the next sealed frame of `len` plaintext bytes into the staging buffer.
    fn read_frame(&mut self, len: usize, part: Part) -> Result<&[u8], String> {
        let (link, op) = (self.link, self.op);
        let frame = &mut self.rbuf[..len + seal::TAG_BYTES];
        link.read_exact(frame)
            .map_err(|e| link.recv_failure(&e, op, part))?;
        let opener = link.opener.as_ref().expect("a sealed connection");
        let mut opener = opener
            .lock()
            .map_err(|_| format!("{op}: the opener failed"))?;
        opener.open(frame).map_err(|()| {
            format!(
                "{op}: {part} from rank {} failed authentication: the sealed frame was altered, \
                 replayed, reordered or dropped on the way (or the peer holds another job \
                 token); the connection is not trusted any more",
                link.prev
            )
        })
    }

    /// Every call starts with a header, so ranks that disagree on the call fail with a clear
    /// message instead of mixing up streams.
    pub(super) fn exchange_header(&mut self) -> Result<(), String> {
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
