//! The ring collective on 127.0.0.1: ranks are threads of this process, each with its own
//! listener. Peers at loopback addresses connect over local (Unix-domain) sockets by default;
//! the tests that matter run over both transports. Every test bounds its own duration, so a
//! hang fails instead of stalling CI.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use tandem::comm::ring::{Encryption, RingListener, Transport};
use tandem::comm::{owned_segment, Collective, Ring, RingConfig};

const TOKEN: &str = "test-job-token";
const GENERATION: u64 = 7;
/// No test may take longer than this, whatever the ring does.
const LIMIT: Duration = Duration::from_secs(60);

/// Bound before any rank starts, as a worker binds its listener before it joins, so every
/// local companion socket exists before a peer dials it.
fn listeners(n: usize) -> (Vec<RingListener>, Vec<SocketAddr>) {
    let ls: Vec<RingListener> = (0..n)
        .map(|_| RingListener::from(TcpListener::bind("127.0.0.1:0").unwrap()))
        .collect();
    let addrs = ls.iter().map(|l| l.local_addr().unwrap()).collect();
    (ls, addrs)
}

fn config(rank: usize, peers: &[SocketAddr], chunk_bytes: usize, timeout: Duration) -> RingConfig {
    let mut c = RingConfig::new(rank, peers.len(), peers.to_vec(), TOKEN, GENERATION);
    c.chunk_bytes = chunk_bytes;
    c.timeout = timeout;
    c
}

/// What `Ring::transport` must say for a world of `n` over `t`.
fn expected_transport(n: usize, t: Transport) -> &'static str {
    match (n, t) {
        (1, _) => "none",
        (_, Transport::Tcp) => "tcp",
        (_, Transport::Auto) if cfg!(target_os = "linux") => "local",
        _ => "tcp",
    }
}

/// [`per_rank_via`] over the default transport.
fn per_rank<T, F>(n: usize, chunk_bytes: usize, timeout: Duration, f: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(usize, RingConfig, RingListener) -> T + Send + Sync + 'static,
{
    per_rank_via(Transport::Auto, n, chunk_bytes, timeout, f)
}

/// Runs `f(rank, cfg, listener)` on one thread per rank and returns the results in rank order;
/// panics if a thread panics or if they are not all done within [`LIMIT`].
fn per_rank_via<T, F>(
    transport: Transport,
    n: usize,
    chunk_bytes: usize,
    timeout: Duration,
    f: F,
) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(usize, RingConfig, RingListener) -> T + Send + Sync + 'static,
{
    let (ls, addrs) = listeners(n);
    let f = Arc::new(f);
    let (tx, rx) = mpsc::channel();
    let handles: Vec<_> = ls
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let (f, tx, mut cfg) = (
                f.clone(),
                tx.clone(),
                config(rank, &addrs, chunk_bytes, timeout),
            );
            cfg.transport = transport;
            thread::spawn(move || {
                let out = f(rank, cfg, l);
                let _ = tx.send((rank, out));
            })
        })
        .collect();
    let start = Instant::now();
    let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
    loop {
        // A thread sends its result before it finishes: look at `finished` first.
        let finished: Vec<bool> = handles.iter().map(|h| h.is_finished()).collect();
        while let Ok((rank, v)) = rx.try_recv() {
            out[rank] = Some(v);
        }
        if out.iter().all(Option::is_some) {
            break;
        }
        if let Some(rank) = (0..n).find(|&r| finished[r] && out[r].is_none()) {
            let h = handles.into_iter().nth(rank).unwrap();
            match h.join() {
                Err(panic) => std::panic::resume_unwind(panic),
                Ok(()) => panic!("rank {rank} ended without a result"),
            }
        }
        assert!(
            start.elapsed() < LIMIT,
            "ranks still running after {LIMIT:?}"
        );
        thread::sleep(Duration::from_millis(5));
    }
    out.into_iter().map(Option::unwrap).collect()
}

/// Floats of mixed signs and magnitudes, so that summation order would show in the bits.
fn data(rank: usize, len: usize, salt: u64) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let mut h = (rank as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i as u64) ^ salt;
            h = (h ^ (h >> 29)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            h ^= h >> 32;
            let mantissa = (h % 20_001) as f32 / 10_000.0 - 1.0;
            mantissa * 10f32.powi((h >> 40) as i32 % 9 - 4)
        })
        .collect()
}

/// Checks every rank's result against the f64 sum, and that all ranks agree bit for bit.
fn check_sum(results: &[Vec<f32>], n: usize, len: usize, salt: u64) {
    let inputs: Vec<Vec<f32>> = (0..n).map(|r| data(r, len, salt)).collect();
    for i in 0..len {
        let exact: f64 = inputs.iter().map(|v| v[i] as f64).sum();
        let scale: f64 = inputs.iter().map(|v| (v[i] as f64).abs()).sum();
        let got = results[0][i] as f64;
        assert!(
            (got - exact).abs() <= 1e-6 * scale + 1e-30,
            "n {n} len {len} index {i}: got {got}, expected {exact}"
        );
    }
    for (r, v) in results.iter().enumerate() {
        let same = v
            .iter()
            .zip(&results[0])
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(
            same && v.len() == len,
            "rank {r} differs from rank 0 (n {n} len {len})"
        );
    }
}

const LENGTHS: [usize; 6] = [0, 1, 2, 7, 1000, 100_003];

/// Also the all-reduce's two halves as calls of their own: reduce-scatter leaves each rank's
/// own segment summed, bit for bit what the all-reduce gives there; all-gather then hands
/// every rank every rank's own segment, so together they are the all-reduce; the own
/// segments tile the buffer.
#[test]
fn all_reduce_is_the_sum_and_bit_identical() {
    // 12-byte chunks cut segments into many uneven chunks; 1 MiB leaves each segment whole.
    // TCP connections are sealed by default (AES-256-GCM frames of 64 KiB), local ones not;
    // 100_003 floats span several frames per chunk at 1 MiB chunks.
    for (transport, encryption, chunk_bytes) in [
        (Transport::Auto, Encryption::Tcp, 12),
        (Transport::Auto, Encryption::Tcp, 4096),
        (Transport::Auto, Encryption::Tcp, 1 << 20),
        (Transport::Auto, Encryption::All, 12),
        (Transport::Tcp, Encryption::Tcp, 12),
        (Transport::Tcp, Encryption::Tcp, 1 << 20),
        (Transport::Tcp, Encryption::Off, 12),
        (Transport::Tcp, Encryption::Off, 1 << 20),
    ] {
        for n in 1..=4 {
            let results = per_rank_via(
                transport,
                n,
                chunk_bytes,
                Duration::from_secs(10),
                move |rank, mut cfg, l| {
                    cfg.encryption = encryption;
                    let mut ring = Ring::connect(cfg, l).unwrap();
                    assert_eq!((ring.rank(), ring.world_size()), (rank, n));
                    let kind = expected_transport(n, transport);
                    assert_eq!(ring.transport(), kind);
                    let sealed = n > 1
                        && (encryption == Encryption::All
                            || (encryption == Encryption::Tcp && kind == "tcp"));
                    assert_eq!(ring.sealed(), sealed, "{transport:?} {encryption:?} n {n}");
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    LENGTHS
                        .iter()
                        .map(|&len| {
                            let mut v = data(rank, len, len as u64);
                            ring.all_reduce_sum(&mut v).unwrap();
                            let mut half = data(rank, len, len as u64);
                            ring.reduce_scatter_sum(&mut half).unwrap();
                            let own = owned_segment(len, n, rank);
                            assert_eq!(bits(&half[own.clone()]), bits(&v[own.clone()]));
                            // Only the own part counts: the rest may be anything.
                            half[..own.start].fill(f32::NAN);
                            half[own.end..].fill(f32::NAN);
                            ring.all_gather(&mut half).unwrap();
                            assert_eq!(bits(&half), bits(&v), "rank {rank} n {n} len {len}");
                            (v, own)
                        })
                        .collect::<Vec<_>>()
                },
            );
            for (k, &len) in LENGTHS.iter().enumerate() {
                let per: Vec<Vec<f32>> = results.iter().map(|r| r[k].0.clone()).collect();
                check_sum(&per, n, len, len as u64);
                let mut owns: Vec<_> = results.iter().map(|r| r[k].1.clone()).collect();
                owns.sort_by_key(|r| r.start);
                assert_eq!(owns.iter().map(|r| r.len()).sum::<usize>(), len);
                for w in owns.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                }
            }
        }
    }
}

/// The trait's default halves (an all-reduce each) agree with the ring's own.
#[test]
fn default_halves_of_a_collective_agree_with_the_ring() {
    /// A collective that only has the all-reduce (its halves are the trait's defaults).
    struct Plain(Ring);
    impl Collective for Plain {
        fn rank(&self) -> usize {
            self.0.rank()
        }
        fn world_size(&self) -> usize {
            self.0.world_size()
        }
        fn all_reduce_sum(&mut self, buf: &mut [f32]) -> tandem::Result<()> {
            self.0.all_reduce_sum(buf)
        }
        fn all_reduce_sum_tensors(
            &mut self,
            ts: &[candle_core::Tensor],
        ) -> tandem::Result<Vec<candle_core::Tensor>> {
            tandem::comm::tensors_through_host(self, ts)
        }
        fn broadcast(&mut self, buf: &mut [f32], root: usize) -> tandem::Result<()> {
            self.0.broadcast(buf, root)
        }
        fn barrier(&mut self) -> tandem::Result<()> {
            self.0.barrier()
        }
    }
    let n = 3;
    let results = per_rank(n, 4096, Duration::from_secs(10), move |rank, cfg, l| {
        let mut c = Plain(Ring::connect(cfg, l).unwrap());
        let mut v = data(rank, 1001, 5);
        c.reduce_scatter_sum(&mut v).unwrap();
        let own = owned_segment(v.len(), n, rank);
        v[..own.start].fill(7.0);
        c.all_gather(&mut v).unwrap();
        v
    });
    check_sum(&results, n, 1001, 5);
}

#[test]
fn consecutive_all_reduces_reuse_one_ring() {
    let n = 3;
    let rounds: Vec<(usize, u64)> = (0..25).map(|k| ((k * 7919) % 5000, k as u64)).collect();
    let rounds2 = rounds.clone();
    let results = per_rank(n, 1000, Duration::from_secs(10), move |rank, cfg, l| {
        let mut ring = Ring::connect(cfg, l).unwrap();
        rounds2
            .iter()
            .map(|&(len, salt)| {
                let mut v = data(rank, len, salt);
                ring.all_reduce_sum(&mut v).unwrap();
                if salt % 5 == 0 {
                    ring.barrier().unwrap();
                }
                v
            })
            .collect::<Vec<_>>()
    });
    for (k, &(len, salt)) in rounds.iter().enumerate() {
        let per: Vec<Vec<f32>> = results.iter().map(|r| r[k].clone()).collect();
        check_sum(&per, n, len, salt);
    }
}

#[test]
fn broadcast_from_a_nonzero_root_and_barrier() {
    for n in [1, 2, 3, 4] {
        let root = n - 1;
        let results = per_rank(n, 4096, Duration::from_secs(10), move |rank, cfg, l| {
            let mut ring = Ring::connect(cfg, l).unwrap();
            let mut out = Vec::new();
            for len in LENGTHS {
                let mut v = data(rank, len, 99);
                ring.barrier().unwrap();
                ring.broadcast(&mut v, root).unwrap();
                out.push(v);
            }
            ring.barrier().unwrap();
            assert!(ring.broadcast(&mut [0.0], n).is_err(), "root out of range");
            out
        });
        for (k, &len) in LENGTHS.iter().enumerate() {
            let want: Vec<u32> = data(root, len, 99).iter().map(|x| x.to_bits()).collect();
            for (rank, r) in results.iter().enumerate() {
                let got: Vec<u32> = r[k].iter().map(|x| x.to_bits()).collect();
                assert!(
                    got == want,
                    "n {n} len {len}: rank {rank} differs from root {root}"
                );
            }
        }
    }
}

#[test]
fn barrier_waits_for_the_slowest_rank() {
    let n = 3;
    let exits = per_rank(n, 4096, Duration::from_secs(10), |rank, cfg, l| {
        let mut ring = Ring::connect(cfg, l).unwrap();
        ring.barrier().unwrap();
        if rank == 1 {
            thread::sleep(Duration::from_millis(300));
        }
        let entered = Instant::now();
        ring.barrier().unwrap();
        (rank, entered.elapsed())
    });
    for (rank, waited) in exits {
        if rank != 1 {
            assert!(
                waited >= Duration::from_millis(200),
                "rank {rank} passed the barrier early"
            );
        }
    }
}

/// Rank 1's slot is first taken by an impostor (`bad` alters its config); the real rank 1
/// arrives later. The impostor must be refused and the real ring must still form.
fn impostor_is_refused(bad: fn(&mut RingConfig)) -> String {
    let (mut ls, addrs) = listeners(2);
    let (impostor_l, impostor_addr) = listeners(1);
    let l1 = ls.pop().unwrap();
    let l0 = ls.pop().unwrap();
    let mut icfg = config(
        1,
        &[addrs[0], impostor_addr[0]],
        4096,
        Duration::from_secs(1),
    );
    bad(&mut icfg);
    let started = Instant::now();
    let impostor = thread::spawn(move || {
        Ring::connect(icfg, impostor_l.into_iter().next().unwrap()).map(|_| ())
    });
    let cfg0 = config(0, &addrs, 4096, Duration::from_secs(10));
    let cfg1 = config(1, &addrs, 4096, Duration::from_secs(10));
    let r0 = thread::spawn(move || {
        let mut ring = Ring::connect(cfg0, l0)?;
        let mut v = vec![1.0f32, 2.0];
        ring.all_reduce_sum(&mut v).map(|_| v)
    });
    thread::sleep(Duration::from_millis(300));
    let r1 = thread::spawn(move || {
        let mut ring = Ring::connect(cfg1, l1)?;
        let mut v = vec![10.0f32, 20.0];
        ring.all_reduce_sum(&mut v).map(|_| v)
    });
    let err = impostor
        .join()
        .unwrap()
        .expect_err("the impostor must be refused");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(r0.join().unwrap().unwrap(), vec![11.0, 22.0]);
    assert_eq!(r1.join().unwrap().unwrap(), vec![11.0, 22.0]);
    err.to_string()
}

#[test]
fn peer_with_wrong_token_is_refused() {
    let msg = impostor_is_refused(|c| c.token = "another-job".into());
    assert!(msg.contains("rank 0") && msg.contains("job token"), "{msg}");
}

#[test]
fn peer_from_another_generation_is_refused() {
    let msg = impostor_is_refused(|c| c.generation = GENERATION - 1);
    assert!(msg.contains("generation"), "{msg}");
}

#[test]
fn ring_that_cannot_form_errors_within_the_timeout() {
    let start = Instant::now();
    let errs = per_rank(2, 4096, Duration::from_secs(1), |rank, mut cfg, l| {
        if rank == 1 {
            cfg.token = "wrong".into();
        }
        Ring::connect(cfg, l).err().map(|e| e.to_string())
    });
    assert!(start.elapsed() < Duration::from_secs(10));
    for (rank, e) in errs.iter().enumerate() {
        let e = e
            .as_deref()
            .unwrap_or_else(|| panic!("rank {rank} formed a ring"));
        assert!(
            e.contains(&format!("rank {rank}")) && e.contains("within 1 s"),
            "{e}"
        );
    }
}

/// A flood of silent connections, more than the listener handshakes at once, only delays the
/// ring by the listener's per-handshake patience (3 s), not the ring's deadline (30 s here).
#[test]
fn a_flood_of_silent_connections_does_not_stop_the_ring_forming() {
    let started = Instant::now();
    let results = per_rank_via(
        Transport::Tcp,
        2,
        4096,
        Duration::from_secs(30),
        |rank, cfg, l| {
            let mut flood = vec![];
            if rank == 0 {
                for _ in 0..40 {
                    flood.push(TcpStream::connect(cfg.peers[1]).unwrap());
                }
            } else {
                thread::sleep(Duration::from_millis(200));
            }
            let mut ring = Ring::connect(cfg, l).unwrap();
            let mut v = vec![rank as f32 + 1.0];
            ring.all_reduce_sum(&mut v).unwrap();
            drop(flood);
            v
        },
    );
    assert_eq!(results, vec![vec![3.0], vec![3.0]]);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the ring took {:?} to form behind the flood",
        started.elapsed()
    );
}

#[test]
fn silent_and_garbage_connections_do_not_block_the_ring() {
    for transport in [Transport::Auto, Transport::Tcp] {
        let results = per_rank_via(
            transport,
            2,
            4096,
            Duration::from_secs(10),
            |rank, cfg, l| {
                if rank == 0 {
                    // Strangers on rank 1's port: one silent, one speaking nonsense.
                    let silent = TcpStream::connect(cfg.peers[1]).unwrap();
                    let mut noisy = TcpStream::connect(cfg.peers[1]).unwrap();
                    std::io::Write::write_all(&mut noisy, &[0xAB; 100]).unwrap();
                    let mut ring = Ring::connect(cfg, l).unwrap();
                    let mut v = vec![1.0f32];
                    ring.all_reduce_sum(&mut v).unwrap();
                    drop((silent, noisy));
                    v
                } else {
                    thread::sleep(Duration::from_millis(100));
                    let mut ring = Ring::connect(cfg, l).unwrap();
                    let mut v = vec![2.0f32];
                    ring.all_reduce_sum(&mut v).unwrap();
                    v
                }
            },
        );
        assert_eq!(results, vec![vec![3.0], vec![3.0]], "{transport:?}");
    }
}

#[test]
fn mismatched_calls_fail_clearly() {
    let errs = per_rank(2, 4096, Duration::from_secs(5), |rank, cfg, l| {
        let mut ring = Ring::connect(cfg, l).unwrap();
        let mut v = vec![0.0f32; 10 + rank];
        let e = ring.all_reduce_sum(&mut v).unwrap_err().to_string();
        // The ring is unusable afterwards, and says why.
        let again = ring.barrier().unwrap_err().to_string();
        assert!(again.contains("earlier failure"), "{again}");
        e
    });
    assert!(
        errs.iter().any(|e| e.contains("different call")),
        "{errs:?}"
    );
}

/// Ranks 0 and 1 all-reduce twice; rank 2 leaves according to `leave`. The survivors must get
/// an error naming a rank within well under ten seconds (timeout 2 s).
fn survivors_fail_fast(transport: Transport, leave: fn(&mut Ring)) -> Vec<String> {
    let out = per_rank_via(
        transport,
        3,
        64 << 10,
        Duration::from_secs(2),
        move |rank, cfg, l| {
            let mut ring = Ring::connect(cfg, l).unwrap();
            let mut v = data(rank, 1 << 20, 1);
            ring.all_reduce_sum(&mut v).unwrap();
            if rank == 2 {
                leave(&mut ring);
                return None;
            }
            let start = Instant::now();
            let e = ring.all_reduce_sum(&mut v).expect_err("rank 2 is gone");
            Some((start.elapsed(), e.to_string()))
        },
    );
    out.into_iter()
        .flatten()
        .map(|(took, e)| {
            assert!(took < Duration::from_secs(10), "error after {took:?}: {e}");
            assert!(e.contains("rank"), "{e}");
            e
        })
        .collect()
}

#[test]
fn a_dead_peer_makes_the_others_fail_not_hang() {
    // Rank 2 returns (its ring is dropped) while the others start a 4 MiB all-reduce.
    for transport in [Transport::Auto, Transport::Tcp] {
        let errs = survivors_fail_fast(transport, |_| ());
        assert_eq!(errs.len(), 2, "{transport:?}");
    }
}

#[test]
fn a_stalled_peer_makes_the_others_time_out() {
    for transport in [Transport::Auto, Transport::Tcp] {
        let errs = survivors_fail_fast(transport, |_| thread::sleep(Duration::from_secs(4)));
        assert!(
            errs.iter()
                .any(|e| e.contains("timed out after 2 s") && e.contains("from rank 2")),
            "{transport:?}: {errs:?}"
        );
    }
}

#[test]
fn a_peer_dying_mid_reduce_fails_the_others() {
    // Rank 2 aborts its own ring from another thread while inside a large all-reduce.
    for transport in [Transport::Auto, Transport::Tcp] {
        let out = per_rank_via(
            transport,
            3,
            64 << 10,
            Duration::from_secs(2),
            |rank, cfg, l| {
                let mut ring = Ring::connect(cfg, l).unwrap();
                let mut v = data(rank, 8 << 20, 1);
                if rank == 2 {
                    let h = ring.abort_handle();
                    thread::spawn(move || {
                        thread::sleep(Duration::from_millis(5));
                        h.abort();
                    });
                }
                let start = Instant::now();
                // Rank 2 may finish before its abort lands; then the others still fail on the next.
                let r = ring
                    .all_reduce_sum(&mut v)
                    .and_then(|_| ring.all_reduce_sum(&mut v));
                (start.elapsed(), r.map_err(|e| e.to_string()))
            },
        );
        for (rank, (took, r)) in out.into_iter().enumerate() {
            let e = r.expect_err("a rank died mid-reduce");
            assert!(
                took < Duration::from_secs(10),
                "rank {rank}: error after {took:?}"
            );
            assert!(e.contains(&format!("rank {rank}")), "{e}");
        }
    }
}

#[test]
fn abort_handle_unblocks_a_blocked_all_reduce() {
    let out = per_rank(2, 4096, Duration::from_secs(30), |rank, cfg, l| {
        let mut ring = Ring::connect(cfg, l).unwrap();
        if rank == 1 {
            // Never joins the all-reduce, so rank 0 blocks until aborted.
            thread::sleep(Duration::from_secs(2));
            return None;
        }
        let h = ring.abort_handle();
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(200));
            h.abort();
        });
        let start = Instant::now();
        let e = ring
            .all_reduce_sum(&mut [1.0; 1000])
            .unwrap_err()
            .to_string();
        let took = start.elapsed();
        let again = ring.barrier().unwrap_err().to_string();
        Some((took, e, again))
    });
    let (took, e, again) = out[0].clone().unwrap();
    assert!(took < Duration::from_secs(5), "abort took {took:?}");
    assert!(e.contains("aborted") && e.contains("rank 1"), "{e}");
    assert!(again.contains("aborted"), "{again}");
}

#[test]
fn an_abort_stops_joining_a_ring_whose_peer_never_comes() {
    // Rank 1 of 2 never shows up (its address is bound and silent); rank 0 would wait for it
    // until its 30 s timeout, but the worker's abort flag ends the wait at once.
    for transport in [Transport::Auto, Transport::Tcp] {
        let (mut ls, peers) = listeners(2);
        let _silent = ls.pop().unwrap();
        let mut cfg = config(0, &peers, 1 << 20, Duration::from_secs(30));
        cfg.transport = transport;
        let abort = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = abort.clone();
        let t0 = Instant::now();
        let setter = thread::spawn(move || {
            thread::sleep(Duration::from_millis(300));
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        let err = Ring::connect_abortable(cfg, ls.pop().unwrap(), abort)
            .err()
            .expect("no ring without rank 1")
            .to_string();
        setter.join().unwrap();
        let took = t0.elapsed();
        assert!(err.contains("aborted"), "{transport:?}: {err}");
        assert!(
            took < Duration::from_secs(5),
            "{transport:?}: the abort took {took:?}"
        );
    }
}

/// A TCP relay between a dialling rank and its peer's listener: forwards both ways, records
/// what the dialler sends, and applies `tamper` to each piece of it (with the offset of its
/// first byte) before passing it on. Returns its address and the recording.
fn relay(
    to: SocketAddr,
    tamper: impl Fn(usize, &mut [u8]) + Send + 'static,
) -> (SocketAddr, Arc<std::sync::Mutex<Vec<u8>>>) {
    use std::io::{Read, Write};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    thread::spawn(move || {
        let (mut from_dialler, _) = listener.accept().unwrap();
        let mut to_listener = TcpStream::connect(to).unwrap();
        let (mut back_in, mut back_out) = (
            to_listener.try_clone().unwrap(),
            from_dialler.try_clone().unwrap(),
        );
        thread::spawn(move || std::io::copy(&mut back_in, &mut back_out));
        let mut buf = vec![0u8; 1 << 16];
        let mut at = 0;
        while let Ok(n) = from_dialler.read(&mut buf) {
            if n == 0 {
                break;
            }
            record.lock().unwrap().extend_from_slice(&buf[..n]);
            tamper(at, &mut buf[..n]);
            at += n;
            if to_listener.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to_listener.shutdown(std::net::Shutdown::Both);
    });
    (addr, seen)
}

/// Two ranks over TCP where rank 0 reaches rank 1 through `relay`; each all-reduces
/// `[rank + 1.25; len]` once. Returns each rank's result (or error) and the relay's recording.
fn through_relay(
    encryption: Encryption,
    len: usize,
    tamper: impl Fn(usize, &mut [u8]) + Send + 'static,
) -> (Vec<Result<Vec<f32>, String>>, Vec<u8>) {
    let (ls, addrs) = listeners(2);
    let (relay_addr, seen) = relay(addrs[1], tamper);
    let results = via_relay(
        ls,
        &addrs,
        relay_addr,
        Duration::from_secs(10),
        encryption,
        len,
    );
    let seen = seen.lock().unwrap().clone();
    (results, seen)
}

/// Two ranks over TCP, rank 0 reaching rank 1 at `relay_addr`; each all-reduces
/// `[rank + 1.25; len]` once. Returns each rank's result or error, within [`LIMIT`].
fn via_relay(
    ls: Vec<RingListener>,
    addrs: &[SocketAddr],
    relay_addr: SocketAddr,
    timeout: Duration,
    encryption: Encryption,
    len: usize,
) -> Vec<Result<Vec<f32>, String>> {
    let handles: Vec<_> = ls
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let mut peers = addrs.to_vec();
            if rank == 0 {
                peers[1] = relay_addr;
            }
            let mut cfg = config(rank, &peers, 1 << 20, timeout);
            cfg.transport = Transport::Tcp;
            cfg.encryption = encryption;
            thread::spawn(move || {
                let mut ring = Ring::connect(cfg, l).map_err(|e| e.to_string())?;
                let mut v = vec![rank as f32 + 1.25; len];
                ring.all_reduce_sum(&mut v).map_err(|e| e.to_string())?;
                Ok(v)
            })
        })
        .collect();
    let start = Instant::now();
    while !handles.iter().all(|h| h.is_finished()) {
        assert!(
            start.elapsed() < LIMIT,
            "ranks still running after {LIMIT:?}"
        );
        thread::sleep(Duration::from_millis(5));
    }
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Bytes past the handshake (hello 56, proof 32) that the relay tampers with.
const PAST_HANDSHAKE: usize = 4096;

/// A relay that forwards the handshake and then flips one bit: on a sealed ring the receiving
/// rank refuses the frame and names the tampering, and both ranks fail (the generation would
/// end); without sealing the same bit silently changes the sum (the attack this prevents).
#[test]
fn a_relay_flipping_one_bit_is_caught_on_a_sealed_ring() {
    let flip = |at: usize, piece: &mut [u8]| {
        if (at..at + piece.len()).contains(&PAST_HANDSHAKE) {
            piece[PAST_HANDSHAKE - at] ^= 0x40;
        }
    };
    let (results, _) = through_relay(Encryption::Tcp, 100_000, flip);
    let errs: Vec<String> = results.iter().map(|r| r.clone().unwrap_err()).collect();
    assert!(
        errs[1].contains("from rank 0 failed authentication") && errs[1].contains("altered"),
        "{errs:?}"
    );
    assert!(!errs[0].is_empty());

    let (results, _) = through_relay(Encryption::Off, 100_000, flip);
    let sums: Vec<Vec<f32>> = results.into_iter().map(Result::unwrap).collect();
    assert!(
        sums.iter().any(|v| v.iter().any(|&x| x != 3.5)),
        "in clear, the flipped bit goes unnoticed into the sum"
    );
}

/// What crosses the wire of a sealed ring holds no run of the floats sent; in clear it does.
#[test]
fn sealed_ring_traffic_shows_no_floats() {
    let pattern: Vec<u8> = std::iter::repeat_n(1.25f32.to_le_bytes(), 8)
        .flatten()
        .collect();
    let holds = |seen: &[u8]| seen.windows(pattern.len()).any(|w| w == &pattern[..]);
    let (results, seen) = through_relay(Encryption::Tcp, 100_000, |_, _| {});
    for r in results {
        assert!(r.unwrap().iter().all(|&x| x == 3.5));
    }
    assert!(seen.len() > 100_000 * 4 / 2, "{} bytes", seen.len());
    assert!(!holds(&seen), "sealed traffic shows the floats");
    let (_, seen) = through_relay(Encryption::Off, 100_000, |_, _| {});
    assert!(holds(&seen), "the control: in clear, the floats are there");
}

/// A relay that drops a frame's worth of bytes or replays earlier ones is caught as well.
#[test]
fn a_relay_replaying_bytes_is_caught_on_a_sealed_ring() {
    // Replace 64 bytes past the handshake with the 64 before them: a replay of sealed bytes.
    let replay = |at: usize, piece: &mut [u8]| {
        let (lo, hi) = (PAST_HANDSHAKE, PAST_HANDSHAKE + 64);
        if at <= lo - 64 && at + piece.len() >= hi {
            let (a, b) = (lo - 64 - at, lo - at);
            piece.copy_within(a..b, b);
        }
    };
    let (results, _) = through_relay(Encryption::Tcp, 100_000, replay);
    let err = results[1].clone().unwrap_err();
    assert!(err.contains("failed authentication"), "{err}");
}

/// A relay that passes the handshake, then forwards one byte at a time just inside the socket
/// timeout: no single read ever times out, yet the call ends at its deadline (4 × the timeout)
/// with a message that says so, instead of lasting for ever.
#[test]
fn a_trickling_peer_cannot_hold_a_call_past_its_deadline() {
    use std::io::{Read, Write};
    let timeout = Duration::from_millis(1000);
    let (ls, addrs) = listeners(2);
    let relay = TcpListener::bind("127.0.0.1:0").unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let to = addrs[1];
    thread::spawn(move || {
        let (mut from, _) = relay.accept().unwrap();
        let mut onward = TcpStream::connect(to).unwrap();
        let (mut back_in, mut back_out) = (onward.try_clone().unwrap(), from.try_clone().unwrap());
        thread::spawn(move || std::io::copy(&mut back_in, &mut back_out));
        // The dialler's hello (56 bytes) and proof (32) go at once; then a byte per 0.8 s.
        for n in [56, 32] {
            let mut part = vec![0u8; n];
            from.read_exact(&mut part).unwrap();
            onward.write_all(&part).unwrap();
        }
        let mut byte = [0u8; 1];
        while from.read_exact(&mut byte).is_ok() {
            thread::sleep(Duration::from_millis(800));
            if onward.write_all(&byte).is_err() {
                break;
            }
        }
    });
    let started = Instant::now();
    let errs: Vec<String> = via_relay(ls, &addrs, relay_addr, timeout, Encryption::Tcp, 1000)
        .into_iter()
        .map(Result::unwrap_err)
        .collect();
    let took = started.elapsed();
    assert!(
        errs[1].contains("did not finish within its deadline (4 s = 4 × the timeout)"),
        "{errs:?}"
    );
    assert!(took < Duration::from_secs(12), "took {took:?}");
}
