//! Security across hosts with real processes on 127.0.0.1: mutual TLS on the control plane
//! (clients without the job's certificate are refused; a capture of the traffic holds neither
//! the token nor anything readable) and the sealed gradient ring (a relay that flips one bit
//! fails the generation, the tampering is named, and the job recovers).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::*;

const LONG: Duration = Duration::from_secs(240);

fn log_of(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A `tandem worker` of the job at `url` with the given TLS settings; it must fail within its
/// connect timeout. Returns its stderr.
fn refused_worker(url: &str, token: &str, tls: &[&str], env: Option<&std::path::Path>) -> String {
    let mut cmd = Command::new(bin());
    cmd.args(["worker", "--connect-timeout-s", "4", "--coordinator", url])
        .args(tls)
        .env("TANDEM_TOKEN", token)
        .env_remove("TANDEM_TLS_DIR");
    if let Some(dir) = env {
        cmd.env("TANDEM_TLS_DIR", dir);
    }
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_with_timeout(&mut child, Duration::from_secs(60));
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(
        !status.success(),
        "a worker was let in with {tls:?} {env:?}:\n{err}"
    );
    err
}

#[test]
fn the_coordinator_needs_certificates_or_an_explicit_insecure() {
    let dir = job_dir("sec-start", 1, 1, "", "max_steps = 1", 32);
    let out = Command::new(bin())
        .args(["coordinator", "--listen", "127.0.0.1:0", "--config"])
        .arg(dir.join("job.toml"))
        .env("TANDEM_TOKEN", "a-long-enough-job-token")
        .env_remove("TANDEM_TLS_DIR")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("no TLS certificates")
            && err.contains("tandem certs init")
            && err.contains("--insecure"),
        "{err}"
    );
    // A TLS dir without the coordinator's files names what it looked for.
    let empty = dir.join("empty-tls");
    std::fs::create_dir_all(&empty).unwrap();
    let out = Command::new(bin())
        .args(["coordinator", "--listen", "127.0.0.1:0", "--config"])
        .arg(dir.join("job.toml"))
        .arg("--tls-dir")
        .arg(&empty)
        .env("TANDEM_TOKEN", "a-long-enough-job-token")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("ca.pem, ca.crt") && err.contains("empty-tls"),
        "{err}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// Plaintext, a certificate from another CA (as a client, and trusting the wrong CA), and no
/// client certificate at all: each is refused, and the coordinator keeps serving.
#[test]
fn clients_without_the_jobs_certificate_are_refused() {
    let dir = job_dir(
        "sec-refuse",
        1,
        1,
        "join_timeout_s = 120",
        "max_steps = 1",
        32,
    );
    let token = "refusal-test-token-0001";
    let log = dir.join("coordinator.log");
    let (coord, url) = coordinator(&dir, "127.0.0.1:0", token, false, &log);
    let mut coord = Reap(coord);

    // Plaintext HTTP/2 against the TLS port.
    let plain_url = url.replace("https://", "http://");
    let err = refused_worker(&plain_url, token, &["--insecure"], None);
    assert!(err.contains("does the coordinator use TLS?"), "{err}");

    // Another job's CA and certificates: the worker does not trust the coordinator either.
    let other = dir.join("other-ca");
    let (ok, _, e) = tandem(&["certs", "init", "--dir", other.to_str().unwrap()]);
    assert!(ok, "{e}");
    let err = refused_worker(&url, token, &[], Some(&other));
    assert!(err.to_lowercase().contains("certificate"), "{err}");

    // Our CA trusted, but a client certificate from the other CA: the coordinator refuses it.
    let mixed = dir.join("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    std::fs::copy(shared_tls().join("ca.pem"), mixed.join("ca.pem")).unwrap();
    for f in ["worker.pem", "worker.key"] {
        std::fs::copy(other.join(f), mixed.join(f)).unwrap();
    }
    // TLS 1.3 checks the client's certificate after the client's handshake ends, so the worker
    // sees the alert (then the hint) or, in a race, only the closed connection.
    let err = refused_worker(&url, token, &[], Some(&mixed));
    assert!(
        err.contains("refused this worker's certificate") || err.contains("connection closed"),
        "{err}"
    );

    // A coordinator certificate cannot stand in for a worker's (it is for servers only).
    let server_as_client = dir.join("server-as-client");
    std::fs::create_dir_all(&server_as_client).unwrap();
    std::fs::copy(shared_tls().join("ca.pem"), server_as_client.join("ca.pem")).unwrap();
    std::fs::copy(
        shared_tls().join("coordinator.pem"),
        server_as_client.join("worker.pem"),
    )
    .unwrap();
    std::fs::copy(
        shared_tls().join("coordinator.key"),
        server_as_client.join("worker.key"),
    )
    .unwrap();
    refused_worker(&url, token, &[], Some(&server_as_client));

    // No client certificate at all, through tonic directly: the call fails in the handshake.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let no_identity = rt.block_on(async {
        let tls = tonic::transport::ClientTlsConfig::new().ca_certificate(
            tonic::transport::Certificate::from_pem(
                std::fs::read(shared_tls().join("ca.pem")).unwrap(),
            ),
        );
        let ch = tonic::transport::Endpoint::from_shared(url.clone())
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await;
        match ch {
            Err(e) => Err(e.to_string()),
            Ok(ch) => {
                let mut c = tandem::proto::coordinator_client::CoordinatorClient::new(ch);
                c.status(tandem::proto::StatusRequest {})
                    .await
                    .map(|_| ())
                    .map_err(|s| s.to_string())
            }
        }
    });
    assert!(
        no_identity.is_err(),
        "a client without a certificate got an answer"
    );

    // The coordinator is still serving: a worker with the job's certificate completes the job.
    let mut good = worker(&url, token, "good", &dir.join("good.log"));
    let status = wait_with_timeout(&mut coord.0, LONG);
    assert!(status.success(), "{}", log_of(&log));
    assert!(wait_with_timeout(&mut good, Duration::from_secs(30)).success());
    std::fs::remove_dir_all(dir).unwrap();
}

/// What a relay saw: every connection's two directions, each as one byte stream.
type Streams = Arc<Mutex<Vec<Arc<Mutex<Vec<u8>>>>>>;

/// Forwards every connection made to `listen` to `to`, recording each direction of each
/// connection into `seen`; `tamper` may change what the client sends (offset of the piece's
/// first byte within its connection, the piece) and is applied until it returns true once.
fn relay(
    listen: SocketAddr,
    to: SocketAddr,
    seen: Streams,
    tamper: impl Fn(usize, &mut [u8]) -> bool + Send + Sync + 'static,
) -> SocketAddr {
    let listener = TcpListener::bind(listen).unwrap();
    let addr = listener.local_addr().unwrap();
    let tamper = Arc::new(tamper);
    let done = Arc::new(AtomicBool::new(false));
    thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { break };
            let Ok(server) = TcpStream::connect(to) else {
                continue;
            };
            let pipe = |mut a: TcpStream, mut b: TcpStream, forward: bool| {
                let record = Arc::new(Mutex::new(Vec::new()));
                seen.lock().unwrap().push(record.clone());
                let (tamper, done) = (tamper.clone(), done.clone());
                thread::spawn(move || {
                    let mut buf = vec![0u8; 1 << 16];
                    let mut at = 0;
                    while let Ok(n) = a.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        record.lock().unwrap().extend_from_slice(&buf[..n]);
                        if forward && !done.load(Ordering::SeqCst) && tamper(at, &mut buf[..n]) {
                            done.store(true, Ordering::SeqCst);
                        }
                        at += n;
                        if b.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = b.shutdown(std::net::Shutdown::Both);
                });
            };
            pipe(
                client.try_clone().unwrap(),
                server.try_clone().unwrap(),
                true,
            );
            pipe(server, client, false);
        }
    });
    addr
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Walks `stream` as TLS records (type 20–23, version 3.x, length ≤ 2^14 + 256): returns
/// how many application-data records it holds, or where it stops being TLS. A stream cut off
/// mid-record (the connection closed) ends cleanly.
fn tls_records(stream: &[u8]) -> Result<usize, String> {
    let (mut at, mut app) = (0, 0);
    while at + 5 <= stream.len() {
        let (kind, major) = (stream[at], stream[at + 1]);
        let len = u16::from_be_bytes([stream[at + 3], stream[at + 4]]) as usize;
        if !(20..=23).contains(&kind) || major != 3 || len > (1 << 14) + 256 {
            return Err(format!("not a TLS record at byte {at} of {}", stream.len()));
        }
        app += usize::from(kind == 23);
        at += 5 + len;
    }
    Ok(app)
}

/// A job run through a recording relay on the control plane: with mutual TLS the capture holds
/// neither the token nor any readable field; the same job with `--insecure` shows both (the
/// control that proves the capture sees the traffic).
#[test]
fn a_capture_of_the_control_plane_shows_nothing_readable() {
    for insecure in [false, true] {
        let name = if insecure {
            "sec-capture-plain"
        } else {
            "sec-capture-tls"
        };
        let dir = job_dir(name, 1, 1, "", "max_steps = 3", 32);
        let token = "capture-test-token-SECRET-42";
        let log = dir.join("coordinator.log");
        let addr_file = dir.join("addr");
        let mut cmd = Command::new(bin());
        cmd.args(["coordinator", "--listen", "127.0.0.1:0", "--config"])
            .arg(dir.join("job.toml"))
            .arg("--addr-file")
            .arg(&addr_file)
            .env("TANDEM_TOKEN", token)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if insecure {
            cmd.arg("--insecure").env_remove("TANDEM_TLS_DIR");
        } else {
            secure(&mut cmd);
        }
        let mut coord = cmd.spawn().unwrap();
        wait_for("the coordinator's address", Duration::from_secs(60), || {
            addr_file.exists()
        });
        let coord_addr: SocketAddr = std::fs::read_to_string(&addr_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let seen: Streams = Default::default();
        let proxy = relay(
            "127.0.0.1:0".parse().unwrap(),
            coord_addr,
            seen.clone(),
            |_, _| false,
        );
        let scheme = if insecure { "http" } else { "https" };
        let url = format!("{scheme}://{proxy}");
        let mut w = Command::new(bin());
        w.args([
            "worker",
            "--worker-id",
            "capture-worker-id",
            "--coordinator",
            &url,
        ])
        .env("TANDEM_TOKEN", token)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("w.log")).unwrap());
        if insecure {
            w.arg("--insecure").env_remove("TANDEM_TLS_DIR");
        } else {
            secure(&mut w);
        }
        let mut w = w.spawn().unwrap();
        let status = wait_with_timeout(&mut coord, LONG);
        assert!(status.success(), "{}", log_of(&log));
        wait_with_timeout(&mut w, Duration::from_secs(30));
        let streams: Vec<Vec<u8>> = seen
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.lock().unwrap().clone())
            .collect();
        let all: Vec<u8> = streams.concat();
        assert!(
            all.len() > 100_000,
            "{name}: only {} bytes captured",
            all.len()
        );
        // Fields of the requests and of the checkpoint the worker uploads (its safetensors
        // header). The token header is HPACK-coded (Huffman) even in clear, so it is covered
        // by the record walk below rather than by a search.
        let readable: [&[u8]; 3] = [b"capture-worker-id", b"pretrain", b"\"dtype\":\"F32\""];
        for needle in readable {
            assert_eq!(
                contains(&all, needle),
                insecure,
                "{name}: {:?} in the capture",
                String::from_utf8_lossy(needle)
            );
        }
        assert!(
            !contains(&all, token.as_bytes()),
            "{name}: the token in clear"
        );
        // With TLS every byte of every stream is inside a TLS record, nearly all of them
        // encrypted application data; in clear the streams are HTTP/2, not TLS.
        for (i, s) in streams.iter().enumerate() {
            match tls_records(s) {
                Ok(app) => assert!(
                    !insecure && (app > 0 || s.len() < 4096),
                    "{name}: stream {i} ({} bytes)",
                    s.len()
                ),
                Err(e) => assert!(insecure, "{name}: stream {i}: {e}"),
            }
        }
        if insecure {
            assert!(log_of(&log).contains("--insecure: the control plane is plaintext"));
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}

/// Two workers whose ring connection from rank 0 to rank 1 runs through a relay that flips one
/// bit once: rank 1 refuses the sealed frame and names the tampering, the generation fails,
/// and the job recovers (the next generation's connection is clean) and completes.
#[test]
fn a_relay_on_the_ring_that_flips_a_bit_fails_the_generation_and_the_job_recovers() {
    let dir = job_dir(
        "sec-ring-relay",
        2,
        2,
        "ring_transport = \"tcp\"\nmax_restarts = 3\njoin_window_s = 1",
        "max_steps = 6",
        32,
    );
    let token = "ring-relay-test-token-01";
    let log = dir.join("coordinator.log");
    let (mut coord, url) = coordinator(&dir, "127.0.0.1:0", token, false, &log);
    // Worker b listens on 127.0.0.1:P but is advertised at 127.0.0.2:P, where the relay is.
    let port = free_port();
    let seen: Streams = Default::default();
    relay(
        format!("127.0.0.2:{port}").parse().unwrap(),
        format!("127.0.0.1:{port}").parse().unwrap(),
        seen,
        |at, piece| {
            const AT: usize = 20_000; // well past the handshake, inside the first gradients
            if (at..at + piece.len()).contains(&AT) {
                piece[AT - at] ^= 0x01;
                return true;
            }
            false
        },
    );
    let start = |id: &str, extra: &[String]| {
        secure(&mut Command::new(bin()))
            .args([
                "worker",
                "--connect-timeout-s",
                "60",
                "--worker-id",
                id,
                "--coordinator",
                &url,
            ])
            .args(extra)
            .env("TANDEM_TOKEN", token)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join(format!("{id}.log"))).unwrap())
            .spawn()
            .unwrap()
    };
    let mut a = start("a", &[]);
    // Joining second makes b rank 1, the one rank 0 dials through the relay.
    wait_for("worker a to join", Duration::from_secs(60), || {
        log_of(&log).contains("worker joined")
    });
    let mut b = start(
        "b",
        &[
            "--ring-listen".into(),
            format!("127.0.0.1:{port}"),
            "--advertise-host".into(),
            "127.0.0.2".into(),
        ],
    );
    let status = wait_with_timeout(&mut coord, LONG);
    let text = log_of(&log);
    let blog = log_of(&dir.join("b.log"));
    let alog = log_of(&dir.join("a.log"));
    assert!(status.success(), "{text}\n--- b:\n{blog}");
    for w in [&mut a, &mut b] {
        wait_with_timeout(w, Duration::from_secs(30));
    }
    assert!(
        (blog + &alog).contains("failed authentication: the sealed frame was altered"),
        "the tampering is named"
    );
    assert!(
        text.contains("failed authentication"),
        "the coordinator names it too:\n{text}"
    );
    let s = summary(&dir);
    assert_eq!(s["status"], "completed");
    assert!(s["generations"].as_u64().unwrap() >= 2, "{s}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A second coordinator on the same state dir is refused while the first runs (it would
/// overwrite the job's record, checkpoints and summary), naming the first one's pid.
#[test]
fn one_coordinator_per_state_dir() {
    let dir = job_dir("sec-lock", 1, 1, "join_timeout_s = 60", "max_steps = 1", 32);
    let token = "lock-test-token-000001";
    let log = dir.join("coordinator.log");
    let (first, _) = coordinator(&dir, "127.0.0.1:0", token, false, &log);
    let first = Reap(first);
    let out = secure(&mut Command::new(bin()))
        .args([
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--resume-if-present",
            "--config",
        ])
        .arg(dir.join("job.toml"))
        .env("TANDEM_TOKEN", token)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("another coordinator") && err.contains(&format!("pid {}", first.0.id())),
        "{err}"
    );
    drop(first);
    std::fs::remove_dir_all(dir).unwrap();
}

/// A client with the job token and a worker certificate, but not a member: its spoofed
/// "rank 0 is done" report and its upload of a stage's final checkpoint are refused for want
/// of the member secret, and the job runs on to its own end.
#[test]
fn a_token_holder_cannot_act_as_another_rank() {
    let dir = job_dir("sec-spoof", 1, 1, "", "epochs = 30", 32);
    let token = "spoof-test-token-000001";
    let log = dir.join("coordinator.log");
    let (coord, url) = coordinator(&dir, "127.0.0.1:0", token, false, &log);
    let mut coord = Reap(coord);
    let mut w = Reap(worker(&url, token, "member", &dir.join("w.log")));
    wait_for("training to start", LONG, || {
        log_of(&log).contains("assigned ranks")
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (report, upload) = rt.block_on(async {
        let access = tandem::worker::Access {
            token: token.into(),
            security: tandem::tls::Security::Mutual(
                tandem::tls::TlsFiles::find(&shared_tls(), tandem::tls::Role::Worker).unwrap(),
            ),
            server_name: None,
        };
        let mut c = tandem::worker::connect(&url, &access, Duration::from_secs(10))
            .await
            .unwrap();
        let st = c
            .status(tandem::proto::StatusRequest {})
            .await
            .unwrap()
            .into_inner();
        let report = c
            .report_progress(tandem::proto::ProgressReport {
                job_id: st.job_id.clone(),
                generation: st.generation,
                rank: 0,
                done: true,
                ..Default::default()
            })
            .await
            .unwrap_err();
        let chunk = tandem::proto::CheckpointChunk {
            job_id: st.job_id.clone(),
            generation: st.generation,
            name: "stage0-final".into(),
            file: "model.safetensors".into(),
            data: b"not a model".to_vec(),
            sha256: String::new(),
            last_of_file: true,
            member_secret: "00".repeat(32),
        };
        let upload = c
            .put_checkpoint(tokio_stream::iter(vec![chunk]))
            .await
            .unwrap_err();
        (report, upload)
    });
    for e in [&report, &upload] {
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
        assert!(e.message().contains("wrong member secret"), "{e}");
    }
    assert!(
        wait_with_timeout(&mut coord.0, LONG).success(),
        "{}",
        log_of(&log)
    );
    wait_with_timeout(&mut w.0, Duration::from_secs(30));
    let s = summary(&dir);
    assert_eq!(s["status"], "completed");
    // The spoofed "done" ended nothing early: every epoch used every instance once.
    assert_eq!(s["stages"][0]["epochs"], 30, "{s}");
    assert_exactly_once(&s);
    std::fs::remove_dir_all(dir).unwrap();
}

/// Every rank reports the stage done but rank 0's final checkpoint never arrived (a premature
/// "done"): the coordinator fails the generation instead of the job, and the next generation
/// finishes the stage with its checkpoint.
#[test]
fn a_done_without_the_final_checkpoint_fails_the_generation_not_the_job() {
    let dir = job_dir(
        "sec-premature",
        1,
        1,
        "max_restarts = 2",
        "max_steps = 6",
        32,
    );
    let token = "premature-test-token-01";
    let log = dir.join("coordinator.log");
    let (coord, url) = coordinator(&dir, "127.0.0.1:0", token, false, &log);
    let mut coord = Reap(coord);
    let mut w = Command::new(bin());
    secure(&mut w);
    w.args(["worker", "--worker-id", "w", "--coordinator", &url])
        .env("TANDEM_TOKEN", token)
        .env("TANDEM_TEST_SKIP_FINAL_UPLOAD", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("w.log")).unwrap());
    let mut w = Reap(w.spawn().unwrap());
    let status = wait_with_timeout(&mut coord.0, LONG);
    let text = log_of(&log);
    assert!(status.success(), "{text}");
    assert!(
        text.contains("reported stage 0 done, but its final checkpoint is not usable"),
        "{text}"
    );
    wait_with_timeout(&mut w.0, Duration::from_secs(30));
    let s = summary(&dir);
    assert_eq!(s["status"], "completed");
    assert!(s["generations"].as_u64().unwrap() >= 2, "{s}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// `launch --insecure` runs in plaintext (warned by every process), whatever TLS settings the
/// shell's environment holds: its children take their security from launch's arguments only.
#[test]
fn launch_insecure_ignores_the_environments_tls_settings() {
    let dir = job_dir("sec-launch-insecure", 1, 1, "", "max_steps = 2", 32);
    let out = Command::new(bin())
        .arg("launch")
        .arg(dir.join("job.toml"))
        .args(["--no-progress", "--insecure"])
        .env("TANDEM_TLS_DIR", shared_tls())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("[coordinator]")
            && err.contains("coordinator: --insecure: the control plane is plaintext"),
        "{err}"
    );
    assert!(
        !dir.join("state/tls").exists(),
        "no certificates are made for a plaintext job"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// A worker presents the job it was assigned when it rejoins: a coordinator that comes back on
/// the same address running another job (with the same token and CA) refuses it, naming both.
#[test]
fn a_worker_rejoins_only_its_own_job() {
    let dir = job_dir("sec-job-a", 1, 1, "", "epochs = 200", 32);
    let other = job_dir("sec-job-b", 1, 1, "join_timeout_s = 120", "epochs = 1", 32);
    let token = "job-id-test-token-000001";
    let listen = format!("127.0.0.1:{}", free_port());
    let log = dir.join("coordinator.log");
    let (a, url) = coordinator(&dir, &listen, token, false, &log);
    let mut a = Reap(a);
    let mut w = Reap(worker(&url, token, "w", &dir.join("w.log")));
    // Training means the worker has taken its assignment's job as its own.
    wait_for("the worker to train", LONG, || {
        log_of(&dir.join("w.log")).contains("stage planned")
    });
    let _ = a.0.kill();
    let _ = a.0.wait();
    let (b, _) = coordinator(
        &other,
        &listen,
        token,
        false,
        &other.join("coordinator.log"),
    );
    let _b = Reap(b);
    let status = wait_with_timeout(&mut w.0, Duration::from_secs(120));
    let wlog = log_of(&dir.join("w.log"));
    assert!(!status.success(), "{wlog}");
    assert!(
        wlog.contains("this coordinator runs job")
            && wlog.contains("sec-job-b")
            && wlog.contains("not \\\"sec-job-a"),
        "{wlog}"
    );
    std::fs::remove_dir_all(dir).unwrap();
    std::fs::remove_dir_all(other).unwrap();
}
