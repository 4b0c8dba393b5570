//! Helpers shared by the tests that run the real binary on 127.0.0.1.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_tandem")
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs the tandem binary to its end; returns whether it succeeded, its stdout and stderr.
pub fn tandem<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> (bool, String, String) {
    let out = Command::new(bin()).args(args).output().unwrap();
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    (out.status.success(), text(out.stdout), text(out.stderr))
}

/// A fresh directory with a small job on the bundled corpus and a very small BERT.
/// `cluster` and `stage` are extra TOML lines for those sections.
pub fn job_dir(
    name: &str,
    min_workers: usize,
    max_workers: usize,
    cluster: &str,
    stage: &str,
    hidden: usize,
) -> PathBuf {
    // Defaults for the cluster keys that `cluster` does not set itself.
    let defaults: String = [
        ("join_timeout_s", "60"),
        ("heartbeat_timeout_s", "20"),
        ("collective_timeout_s", "20"),
    ]
    .iter()
    .filter(|(k, _)| !cluster.contains(k))
    .map(|(k, v)| format!("{k} = {v}\n"))
    .collect();
    let dir = std::env::temp_dir().join(format!("tandem-rt-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("model.json"),
        format!(
            r#"{{"vocab_size": 100, "hidden_size": {hidden}, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": {}, "max_position_embeddings": 64}}"#,
            hidden * 2
        ),
    )
    .unwrap();
    let corpus = repo().join("configs/data/corpus");
    std::fs::write(
        dir.join("job.toml"),
        format!(
            r#"
[job]
name = "{name}"
seed = 7
state_dir = "{state}"
[cluster]
min_workers = {min_workers}
max_workers = {max_workers}
{defaults}{cluster}
[model]
config = "{model}"
[data]
corpus = ["{corpus}"]
{tokenizer}
shard_size = "8KiB"
vocab_size = 1000
[data.instances]
max_seq_length = 48
max_predictions_per_seq = 8
[[stages]]
name = "pretrain"
kind = "pretrain"
batch_size = 8
lr = 1e-3
{stage}
"#,
            state = dir.join("state").display(),
            model = dir.join("model.json").display(),
            corpus = corpus.display(),
            tokenizer = shared_tokenizer(),
        ),
    )
    .unwrap();
    dir
}

pub fn wait_with_timeout(child: &mut Child, limit: Duration) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("process did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until `cond` holds, panicking after `limit`.
pub fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn summary(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("state/summary.json")).unwrap()).unwrap()
}

/// Every epoch of the first stage: every planned instance consumed exactly once.
pub fn assert_exactly_once(s: &Value) {
    let ledger = s["stages"][0]["epochs_ledger"].as_array().unwrap();
    assert!(!ledger.is_empty(), "{s:#}");
    for e in ledger {
        assert!(e["instances_planned"].as_u64().unwrap() > 0, "{e}");
        assert_eq!(e["instances_consumed"], e["instances_planned"], "{e}");
        assert_eq!(e["instances_repeated"], 0, "{e}");
    }
}

pub fn checkpoints(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("state/checkpoints"))
        .map(|it| {
            it.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The test jobs' certificates (`tandem certs init`), made once per test run and shared by
/// every process the tests start: each gets them through `TANDEM_TLS_DIR` ([`secure`]).
pub fn shared_tls() -> PathBuf {
    static TLS: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    TLS.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("test-tls-{}", std::process::id()));
        let (ok, _, err) = tandem(&[
            "certs".as_ref(),
            "init".as_ref(),
            "--force".as_ref(),
            "--dir".as_ref(),
            dir.as_os_str(),
        ]);
        assert!(ok, "{err}");
        dir
    })
    .clone()
}

/// Gives a `tandem` process the test jobs' certificates (mutual TLS, as by default).
pub fn secure(cmd: &mut Command) -> &mut Command {
    cmd.env("TANDEM_TLS_DIR", shared_tls())
}

/// Starts a coordinator on `listen` with the job's config; returns the child and its URL.
pub fn coordinator(
    dir: &Path,
    listen: &str,
    token: &str,
    resume: bool,
    log: &Path,
) -> (Child, String) {
    let addr_file = dir.join("addr");
    let _ = std::fs::remove_file(&addr_file);
    let mut cmd = Command::new(bin());
    secure(&mut cmd);
    cmd.args(["coordinator", "--listen", listen, "--config"])
        .arg(dir.join("job.toml"))
        .arg("--addr-file")
        .arg(&addr_file)
        .env("TANDEM_TOKEN", token)
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap(),
        );
    if resume {
        cmd.arg("--resume");
    }
    let mut child = cmd.spawn().unwrap();
    wait_for("the coordinator's address", Duration::from_secs(60), || {
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "the coordinator exited ({st}):\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        addr_file.exists()
    });
    let url = format!(
        "https://{}",
        std::fs::read_to_string(&addr_file).unwrap().trim()
    );
    (child, url)
}

pub fn worker(url: &str, token: &str, id: &str, log: &Path) -> Child {
    secure(&mut Command::new(bin()))
        .args([
            "worker",
            "--coordinator",
            url,
            "--worker-id",
            id,
            "--connect-timeout-s",
            "60",
        ])
        .env("TANDEM_TOKEN", token)
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap(),
        )
        .spawn()
        .unwrap()
}

/// Kills its process when dropped (a failed assertion leaves no process running).
pub struct Reap(pub Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn signal(child: &Child, sig: i32) {
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One WordPiece vocabulary for every test job: trained once, kept in cargo's target/tmp under
/// a name that follows the bundled corpus's bytes (so a changed corpus trains a new one), and
/// put in place by a rename (so a killed run leaves no half-written vocabulary behind).
fn shared_tokenizer() -> String {
    static TOK: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let dir = TOK.get_or_init(|| {
        let corpus = repo().join("configs/data/corpus");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&corpus)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        let mut bytes = Vec::new();
        for f in &files {
            bytes.extend(f.file_name().unwrap().as_encoded_bytes());
            bytes.extend(std::fs::read(f).unwrap());
        }
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "test-tokenizer-1000-{:016x}",
            tandem::util::fnv1a(&bytes)
        ));
        if !dir.join("tokenizer.json").exists() {
            let tmp = dir.with_extension(format!("part-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&tmp);
            let out = Command::new(bin())
                .args(["tokenizer", "train", "--vocab-size", "1000", "--corpus"])
                .arg(&corpus)
                .arg("--out")
                .arg(&tmp)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            // Another test binary may have won the race: then its copy is as good.
            if std::fs::rename(&tmp, &dir).is_err() {
                let _ = std::fs::remove_dir_all(&tmp);
            }
        }
        dir
    });
    format!("tokenizer = \"{}\"", dir.display())
}

/// A fresh directory under the system temp dir, removed when dropped — unless the test is
/// failing, so what it left can be inspected.
pub struct TmpDir(PathBuf);

impl TmpDir {
    /// `tandem-{prefix}-{name}-{pid}-{n}`, empty.
    pub fn new(prefix: &str, name: &str) -> TmpDir {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let d = std::env::temp_dir().join(format!(
            "tandem-{prefix}-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TmpDir(d)
    }
}

impl std::ops::Deref for TmpDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TmpDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
