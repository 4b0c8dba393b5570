//! Fault tolerance with real processes on 127.0.0.1: a killed worker, a stalled worker, a
//! killed coordinator, an interrupted job resumed by hand over a corrupt checkpoint. Every
//! wait is bounded; every job must finish with every instance of every epoch used once.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const LONG: Duration = Duration::from_secs(240);

fn final_loss(s: &serde_json::Value) -> f64 {
    s["stages"][0]["loss"].as_f64().unwrap()
}

fn fingerprint(s: &serde_json::Value) -> String {
    s["stages"][0]["param_hashes"][0]
        .as_str()
        .unwrap()
        .to_string()
}

fn launch_cmd(dir: &std::path::Path, extra: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.arg("launch")
        .arg(dir.join("job.toml"))
        .arg("--no-progress")
        .args(extra)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("launch.log")).unwrap());
    c
}

fn launch(dir: &std::path::Path, extra: &[&str]) -> std::process::Child {
    launch_cmd(dir, extra).spawn().unwrap()
}

fn coordinator_url(dir: &std::path::Path) -> String {
    let addr = std::fs::read_to_string(dir.join("state/coordinator.addr")).unwrap();
    format!("https://{}", addr.trim())
}

/// The pid of the launched worker `local-{i}` of the job whose coordinator is at `url`.
fn worker_pid(url: &str, i: usize) -> Option<i32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.iter().any(|a| a == "worker")
            && args.iter().any(|a| a == url)
            && args.iter().any(|a| *a == format!("local-{i}"))
        {
            return Some(pid);
        }
    }
    None
}

#[test]
fn killed_worker_is_restarted_and_every_instance_is_used_once() {
    let cluster = "max_restarts = 3\njoin_window_s = 3";
    let stage = "epochs = 3";
    let base = job_dir("kill-base", 2, 3, cluster, stage, 32);
    assert!(wait_with_timeout(
        &mut launch(&base, &["--set", "checkpoint.every_steps=5"]),
        LONG
    )
    .success());
    let uninterrupted = summary(&base);

    let dir = job_dir("kill", 2, 3, cluster, stage, 32);
    let mut child = launch(&dir, &["--set", "checkpoint.every_steps=5"]);
    wait_for("the first checkpoint", LONG, || {
        !checkpoints(&dir).is_empty()
    });
    let pid = worker_pid(&coordinator_url(&dir), 1).expect("worker local-1 is running");
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    let status = wait_with_timeout(&mut child, LONG);
    let log = std::fs::read_to_string(dir.join("launch.log")).unwrap();
    assert!(status.success(), "{log}");
    assert!(
        log.contains("starting it again"),
        "the local agent restarts the worker:\n{log}"
    );
    let s = summary(&dir);
    assert_eq!(s["status"], "completed", "{s:#}");
    // One kill, one restart: the coordinator lets the failure settle, so the generation
    // after it does not include the dead worker (and fail at once) while its disconnect is
    // still unnoticed.
    assert_eq!(s["generations"], 2, "{s:#}");
    assert_eq!(s["restarts"], 1, "{s:#}");
    assert!(
        s["history"][0]["outcome"]
            .as_str()
            .unwrap()
            .contains("rank"),
        "{s:#}"
    );
    assert_exactly_once(&s);
    // The stage ran under several generations, and metrics.jsonl shows the replay: steps after
    // the checkpoint appear once per generation that trained them. A generation may fail
    // before its first step (one assigned while a killed worker's disconnect was not yet
    // noticed fails at once), so only the first and the last must have logged steps.
    let gens = s["stages"][0]["generations"].as_array().unwrap();
    assert!(gens.len() >= 2, "{s:#}");
    let metrics = std::fs::read_to_string(dir.join("state/metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for g in [&gens[0], gens.last().unwrap()] {
        assert!(
            lines.iter().any(|v| &v["generation"] == g),
            "no logged step of generation {g}"
        );
    }
    assert!(
        lines.iter().any(|v| v["step"] == 1),
        "the steps before the kill's checkpoint were logged"
    );
    let last = lines.iter().map(|v| v["step"].as_u64().unwrap()).max();
    assert_eq!(last, s["stages"][0]["steps"].as_u64());
    let (a, b) = (final_loss(&s), final_loss(&uninterrupted));
    assert!(
        (a - b).abs() <= 0.05 * b,
        "final loss {a} vs uninterrupted {b}"
    );
    std::fs::remove_dir_all(base).unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn stalled_worker_is_detected_named_and_the_job_recovers() {
    let dir = job_dir(
        "stall",
        2,
        3,
        "heartbeat_timeout_s = 3\njoin_window_s = 1",
        "epochs = 3",
        32,
    );
    let log = dir.join("coordinator.log");
    let token = "stall-test-token-0001";
    let (mut coord, url) = coordinator(&dir, "127.0.0.1:0", token, false, &log);
    let mut workers: Vec<_> = (0..3)
        .map(|i| {
            worker(
                &url,
                token,
                &format!("w{i}"),
                &dir.join(format!("w{i}.log")),
            )
        })
        .collect();
    // Let training start, then freeze one worker (a stall, not a death).
    wait_for("training to start", LONG, || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("assigned ranks")
    });
    std::thread::sleep(Duration::from_millis(800));
    signal(&workers[2], libc::SIGSTOP);
    let status = wait_with_timeout(&mut coord, LONG);
    signal(&workers[2], libc::SIGCONT);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{text}");
    assert!(
        text.contains("stalled") && text.contains("(worker w2)"),
        "the log names the stalled rank:\n{text}"
    );
    let s = summary(&dir);
    assert_eq!(s["status"], "completed");
    assert!(s["generations"].as_u64().unwrap() >= 2);
    assert_exactly_once(&s);
    for w in &mut workers {
        let _ = w.kill();
        let _ = w.wait();
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// A coordinator on a free port and `n` workers started by hand on the job in `dir`, with a
/// checkpoint every `every_steps`: the coordinator, its listen address and log, the workers.
fn start_by_hand(
    dir: &std::path::Path,
    token: &str,
    n: usize,
    every_steps: u64,
) -> (
    std::process::Child,
    String,
    std::path::PathBuf,
    Vec<std::process::Child>,
) {
    let toml = std::fs::read_to_string(dir.join("job.toml")).unwrap()
        + &format!("[checkpoint]\nevery_steps = {every_steps}\n");
    std::fs::write(dir.join("job.toml"), toml).unwrap();
    let log = dir.join("coordinator.log");
    let listen = format!("127.0.0.1:{}", free_port());
    let (coord, url) = coordinator(dir, &listen, token, false, &log);
    let workers = (0..n)
        .map(|i| {
            worker(
                &url,
                token,
                &format!("w{i}"),
                &dir.join(format!("w{i}.log")),
            )
        })
        .collect();
    (coord, listen, log, workers)
}

#[test]
fn coordinator_restart_resumes_from_the_last_checkpoint() {
    let dir = job_dir("coord", 2, 2, "", "epochs = 4", 48);
    let token = "coord-test-token-0001";
    let (mut coord, listen, log, mut workers) = start_by_hand(&dir, token, 2, 4);
    wait_for("a checkpoint", LONG, || !checkpoints(&dir).is_empty());
    let _ = coord.kill();
    let _ = coord.wait();
    // Without --resume, a coordinator refuses a state_dir that holds a job.
    let refused = secure(&mut Command::new(bin()))
        .args(["coordinator", "--listen", "127.0.0.1:0", "--config"])
        .arg(dir.join("job.toml"))
        .env("TANDEM_TOKEN", token)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--resume"));
    let (mut coord, _) = coordinator(&dir, &listen, token, true, &log);
    let status = wait_with_timeout(&mut coord, LONG);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{text}");
    assert!(text.contains("resuming job"), "{text}");
    let s = summary(&dir);
    assert_eq!(s["status"], "completed");
    assert!(
        s["history"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["start_checkpoint"]
                .as_str()
                .unwrap()
                .starts_with("stage0-step")),
        "{s:#}"
    );
    assert_exactly_once(&s);
    for w in &mut workers {
        assert!(wait_with_timeout(w, Duration::from_secs(30)).success());
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn interrupted_job_resumes_bit_identically_past_a_corrupt_checkpoint() {
    let stage = "epochs = 6";
    let base = job_dir("resume-base", 2, 2, "", stage, 48);
    assert!(wait_with_timeout(
        &mut launch(&base, &["--set", "checkpoint.every_steps=4"]),
        LONG
    )
    .success());
    let uninterrupted = summary(&base);

    let dir = job_dir("resume", 2, 2, "", stage, 48);
    let mut child = launch(&dir, &["--set", "checkpoint.every_steps=4"]);
    wait_for("two checkpoints", LONG, || checkpoints(&dir).len() >= 2);
    signal(&child, libc::SIGINT);
    let status = wait_with_timeout(&mut child, Duration::from_secs(30));
    assert_eq!(status.code(), Some(130), "interrupted launch exits 130");
    assert!(!dir.join("state/summary.json").exists() || summary(&dir)["status"] != "completed");
    // Corrupt the newest checkpoint: resume must fall back to the one before, with a warning.
    let newest = checkpoints(&dir)
        .into_iter()
        .max_by_key(|n| n.clone())
        .unwrap();
    let f = dir
        .join("state/checkpoints")
        .join(&newest)
        .join("model.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0xff;
    std::fs::write(&f, bytes).unwrap();

    let mut resumed = Command::new(bin())
        .args(["launch", "--no-progress", "--resume"])
        .arg(dir.join("state"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("resume.log")).unwrap())
        .spawn()
        .unwrap();
    let status = wait_with_timeout(&mut resumed, LONG);
    let log = std::fs::read_to_string(dir.join("resume.log")).unwrap();
    assert!(status.success(), "{log}");
    assert!(log.contains("unusable, falling back"), "{log}");
    let s = summary(&dir);
    assert_eq!(s["status"], "completed");
    assert_exactly_once(&s);
    assert_eq!(
        fingerprint(&s),
        fingerprint(&uninterrupted),
        "resumed run must end bit-identical to the uninterrupted one"
    );

    // Resuming a finished job says so and does not retrain.
    let again = Command::new(bin())
        .args(["launch", "--no-progress", "--resume"])
        .arg(dir.join("state"))
        .output()
        .unwrap();
    assert!(again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already finished"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    std::fs::remove_dir_all(base).unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

/// A generation fails while rank 0's checkpoint is still arriving (its first upload is held
/// for 10 s after the first chunk): the new generation waits for it and resumes from it,
/// instead of starting from an older checkpoint (here: from scratch) and redoing those steps.
#[test]
fn a_new_generation_waits_for_a_checkpoint_still_arriving() {
    let dir = job_dir("upload-wait", 2, 2, "max_restarts = 3", "epochs = 1", 32);
    let mut child = launch_cmd(&dir, &["--set", "checkpoint.every_steps=5"])
        .env("TANDEM_TEST_UPLOAD_PAUSE_MS", "10000")
        .spawn()
        .unwrap();
    // Rank 0 sends its logged steps before every checkpoint: step 5 in metrics.jsonl means
    // the first checkpoint's upload has begun.
    wait_for("step 5 in metrics.jsonl", LONG, || {
        std::fs::read_to_string(dir.join("state/metrics.jsonl"))
            .is_ok_and(|m| m.contains("\"step\":5,") || m.contains("\"step\":5}"))
    });
    assert!(checkpoints(&dir).is_empty(), "the upload was not held");
    // Kill the worker that is not rank 0 (ranks follow the join order), so the upload goes on.
    let log = std::fs::read_to_string(dir.join("launch.log")).unwrap();
    let rank0_addr = log
        .lines()
        .find_map(|l| l.split("peers=[\"").nth(1)?.split('"').next())
        .expect("the assignment is logged")
        .to_string();
    let rank0 = log
        .lines()
        .find(|l| l.contains("worker joined") && l.contains(&format!("ring={rank0_addr}")))
        .and_then(|l| l.split("worker=local-").nth(1)?.chars().next())
        .expect("rank 0's worker joined");
    let other = if rank0 == '0' { 1 } else { 0 };
    let pid = worker_pid(&coordinator_url(&dir), other).expect("the other worker is running");
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    let status = wait_with_timeout(&mut child, LONG);
    let log = std::fs::read_to_string(dir.join("launch.log")).unwrap();
    assert!(status.success(), "{log}");
    assert!(log.contains("checkpoint upload is still arriving"), "{log}");
    let s = summary(&dir);
    assert_eq!(s["status"], "completed", "{s:#}");
    assert_eq!(
        s["history"][1]["start_checkpoint"], "stage0-step000005",
        "{s:#}"
    );
    assert_exactly_once(&s);
    std::fs::remove_dir_all(dir).unwrap();
}

/// A worker lost for good mid-epoch: the next generation has one rank fewer and resumes from
/// the last checkpoint, whose cursor keeps the epoch's three partitions (dealt over two ranks
/// now); every instance is still used exactly once and the replicas end identical.
#[test]
fn a_lost_worker_shrinks_the_world_mid_epoch_and_no_instance_is_lost() {
    let cluster = "max_restarts = 3\njoin_window_s = 2";
    let dir = job_dir("shrink", 2, 3, cluster, "epochs = 2", 32);
    let (mut coord, _, log, mut workers) = start_by_hand(&dir, "shrink-test-token-0001", 3, 3);
    wait_for("a checkpoint", LONG, || !checkpoints(&dir).is_empty());
    let _ = workers[2].kill();
    let _ = workers[2].wait();
    let status = wait_with_timeout(&mut coord, LONG);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{text}");
    let s = summary(&dir);
    assert_eq!(s["status"], "completed", "{s:#}");
    let history = s["history"].as_array().unwrap();
    assert_eq!(history[0]["world_size"], 3, "{s:#}");
    let last = history.last().unwrap();
    assert_eq!(last["world_size"], 2, "{s:#}");
    assert!(
        last["start_checkpoint"]
            .as_str()
            .unwrap()
            .starts_with("stage0-step"),
        "the smaller world resumes mid-stage: {s:#}"
    );
    let stage = &s["stages"][0];
    assert_eq!(stage["replicas_identical"], true, "{s:#}");
    assert_eq!(stage["param_hashes"].as_array().unwrap().len(), 2, "{s:#}");
    assert_exactly_once(&s);
    for w in &mut workers[..2] {
        assert!(wait_with_timeout(w, Duration::from_secs(30)).success());
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// A short pre-training stage, then a sentiment-like classification stage of 1200 examples
/// (global batch 12: 100 steps an epoch, 2 epochs) checkpointed every 5 steps, on 3 workers.
fn finetune_job(name: &str) -> std::path::PathBuf {
    let cluster = "max_restarts = 3\njoin_window_s = 3";
    let dir = job_dir(name, 3, 3, cluster, "max_steps = 3\nepochs = 1", 32);
    let words = ["food", "service", "room", "view", "staff", "price"];
    let rows = |n: usize, off: usize| -> String {
        (0..n)
            .map(|i| {
                let (w, l) = if (i + off) % 2 == 0 {
                    ("good", "pos")
                } else {
                    ("bad", "neg")
                };
                let a = words[i % words.len()];
                let b = words[(i / 6) % words.len()];
                format!("{{\"text\": \"the {a} was {w} and the {b}\", \"label\": \"{l}\"}}\n")
            })
            .collect()
    };
    std::fs::write(dir.join("train.jsonl"), rows(1200, 0)).unwrap();
    std::fs::write(dir.join("dev.jsonl"), rows(30, 1)).unwrap();
    let toml = std::fs::read_to_string(dir.join("job.toml")).unwrap()
        + &format!(
            "\n[[stages]]\nname = \"sentiment\"\nkind = \"sequence_classification\"\n\
             init_from = \"previous\"\ntrain = \"{}\"\ndev = \"{}\"\nmax_seq_length = 16\n\
             epochs = 2\nbatch_size = 4\nlr = 1e-3\n",
            dir.join("train.jsonl").display(),
            dir.join("dev.jsonl").display()
        );
    std::fs::write(dir.join("job.toml"), toml).unwrap();
    dir
}

/// Fine-tuning has pre-training's fault tolerance: a worker killed (-9) mid-epoch costs only
/// the steps since the last step checkpoint; the stage resumes from it with every example of
/// every epoch used exactly once, and ends bit-identical to an uninterrupted run.
#[test]
fn a_fine_tuning_stage_killed_mid_epoch_resumes_from_its_last_step_checkpoint() {
    let every = ["--set", "checkpoint.every_steps=5"];
    let base = finetune_job("ft-kill-base");
    assert!(wait_with_timeout(&mut launch(&base, &every), LONG).success());
    let uninterrupted = summary(&base);

    let dir = finetune_job("ft-kill");
    let mut child = launch(&dir, &every);
    wait_for("a step checkpoint of the fine-tuning stage", LONG, || {
        checkpoints(&dir)
            .iter()
            .any(|c| c.starts_with("stage1-step"))
    });
    let pid = worker_pid(&coordinator_url(&dir), 1).expect("worker local-1 is running");
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    let status = wait_with_timeout(&mut child, LONG);
    let log = std::fs::read_to_string(dir.join("launch.log")).unwrap();
    assert!(status.success(), "{log}");
    let s = summary(&dir);
    assert_eq!(s["status"], "completed", "{s:#}");
    assert_eq!(s["restarts"], 1, "{s:#}");
    // The generation after the kill started from a step checkpoint of the fine-tuning stage
    // (mid-epoch: the epoch has 100 steps), not from the stage's start.
    let resumed: Vec<&str> = s["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|h| h["start_checkpoint"].as_str())
        .filter(|c| c.starts_with("stage1-step"))
        .collect();
    assert!(!resumed.is_empty(), "{s:#}");
    let st = &s["stages"][1];
    assert!(st["generations"].as_array().unwrap().len() >= 2, "{st:#}");
    assert_eq!(st["replicas_identical"], true, "{st:#}");
    let ledger = st["epochs_ledger"].as_array().unwrap();
    assert_eq!(ledger.len(), 2, "{st:#}");
    for e in ledger {
        assert_eq!(e["instances_planned"], 1200, "{e}");
        assert_eq!(e["instances_consumed"], 1200, "{e}");
        assert_eq!(e["instances_repeated"], 0, "{e}");
    }
    let hash = |s: &serde_json::Value| s["stages"][1]["param_hashes"][0].clone();
    assert_eq!(
        hash(&s),
        hash(&uninterrupted),
        "resumed run vs uninterrupted run"
    );
    assert_eq!(st["steps"], uninterrupted["stages"][1]["steps"]);
    std::fs::remove_dir_all(base).unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}
