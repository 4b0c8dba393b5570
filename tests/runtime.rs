//! The real runtime: the built binary as coordinator and worker processes on 127.0.0.1.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{assert_exactly_once, bin, job_dir, secure, summary, wait_with_timeout};
use serde_json::Value;

fn check_completed(s: &Value, workers: u64) {
    assert_eq!(s["status"], "completed", "{s:#}");
    assert_eq!(s["world_size"], workers);
    let stage = &s["stages"][0];
    assert_eq!(stage["replicas_identical"], true, "{s:#}");
    let fps = stage["param_hashes"].as_array().unwrap();
    assert_eq!(fps.len() as u64, workers);
    assert!(fps.iter().all(|f| f == &fps[0]), "{fps:?}");
    assert_eq!(stage["kind"], "pretrain");
    assert!(stage["mlm_accuracy"].is_number() && stage["nsp_accuracy"].is_number());
    assert!(stage.get("train_accuracy").is_none(), "{stage:#}");
    assert!(stage["samples_per_s"].as_f64().unwrap() > 0.0, "{stage:#}");
    // One epoch: every document of the corpus consumed exactly once across ranks.
    assert_eq!(stage["documents"], s["corpus_documents"], "{s:#}");
    assert!(s["corpus_documents"].as_u64().unwrap() > 100);
    // The ranks' partitions are balanced by instance counts: the epoch takes as many steps
    // as one worker with the whole global batch (`job_dir`'s batch_size is 8 per worker), and
    // every step before the last trains on a full global batch.
    let planned = s["stages"][0]["epochs_ledger"][0]["instances_planned"]
        .as_u64()
        .unwrap();
    assert_eq!(stage["steps"], planned.div_ceil(8 * workers), "{s:#}");
    assert_eq!(stage["examples"], planned, "{s:#}");
    assert_eq!(stage["world_size"], workers);
    assert!(
        !stage["generations"].as_array().unwrap().is_empty(),
        "{s:#}"
    );
    // The data trained on, as create_pretraining_data.py makes it.
    let masked = stage["masked_fraction"].as_f64().unwrap();
    assert!((0.10..0.20).contains(&masked), "masked fraction {masked}");
    let is_next = stage["is_next_fraction"].as_f64().unwrap();
    assert!((0.3..0.7).contains(&is_next), "IsNext fraction {is_next}");
    // The coordinator's own cost is accounted: some CPU, never more than its wall time.
    let wall = stage["wall_s"].as_f64().unwrap();
    let cpu = stage["coordinator_cpu_s"].as_f64().unwrap();
    assert!(
        wall > 0.0 && cpu > 0.0 && cpu < wall,
        "wall {wall} cpu {cpu}"
    );
    let window = stage["training_window_s"].as_f64().unwrap();
    let in_window = stage["coordinator_cpu_training_s"].as_f64().unwrap();
    assert!(
        window <= wall && (0.0..=cpu).contains(&in_window),
        "{stage:#}"
    );
    assert_exactly_once(s);
}

/// metrics.jsonl holds one line per step of stage 0 (progress_every = 1), in order, with the
/// fields the summary's first and last loss come from.
fn check_metrics(dir: &std::path::Path, s: &Value) {
    let text = std::fs::read_to_string(dir.join("state/metrics.jsonl")).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &Value| v["stage_index"] == 0)
        .collect();
    let stage = &s["stages"][0];
    let steps: Vec<u64> = lines.iter().map(|v| v["step"].as_u64().unwrap()).collect();
    let want: Vec<u64> = (1..=stage["steps"].as_u64().unwrap()).collect();
    assert_eq!(steps, want, "one line per step");
    for v in &lines {
        assert_eq!(v["stage"], stage["name"]);
        for k in ["loss", "mlm_loss", "nsp_loss", "lr", "samples_per_s"] {
            assert!(v[k].is_number(), "{k} missing in {v}");
        }
    }
    assert_eq!(stage["first_loss"], lines[0]["loss"]);
    assert_eq!(stage["last_loss"], lines.last().unwrap()["loss"]);
}

#[test]
fn launch_runs_a_two_worker_job_to_completion() {
    let dir = job_dir("launch2", 2, 2, "", "epochs = 1", 32);
    let mut child = Command::new(bin())
        .arg("launch")
        .arg(dir.join("job.toml"))
        .arg("--no-progress")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_with_timeout(&mut child, Duration::from_secs(240));
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(status.success(), "{err}");
    assert!(
        err.contains("[rank 0]") && err.contains("[rank 1]"),
        "rank-prefixed logs:\n{err}"
    );
    assert!(err.contains("completed"), "{err}");
    check_completed(&summary(&dir), 2);
    check_metrics(&dir, &summary(&dir));
    // The final model is an HF directory that tandem itself can load.
    let out = Command::new(bin())
        .args(["tokenize", "--tokenizer"])
        .arg(dir.join("state/final"))
        .args(["--text", "나는 오늘 라면을 먹었다.", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.join("state/final/model.safetensors").exists());
    // Launching again into the same state dir explains the choices instead of clobbering it.
    let again = Command::new(bin())
        .arg("launch")
        .arg(dir.join("job.toml"))
        .arg("--no-progress")
        .output()
        .unwrap();
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains("already holds job") && err.contains("--resume"),
        "{err}"
    );
    assert!(
        dir.join("state/summary.json").exists(),
        "the finished job's summary is kept"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn coordinator_and_three_workers_started_by_hand() {
    let dir = job_dir("hand3", 3, 3, "", "epochs = 1", 32);
    let addr_file = dir.join("addr");
    // A guessable job token is refused before anything listens, saying how to make one.
    let short = secure(&mut Command::new(bin()))
        .args(["coordinator", "--listen", "127.0.0.1:0", "--config"])
        .arg(dir.join("job.toml"))
        .env("TANDEM_TOKEN", "secret")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&short.stderr);
    assert!(!short.status.success(), "{err}");
    assert!(
        err.contains("TANDEM_TOKEN has 6 characters; at least 16") && err.contains("openssl rand"),
        "{err}"
    );
    let token = "runtime-test-token-3";
    let mut coord = secure(&mut Command::new(bin()))
        .args(["coordinator", "--listen", "127.0.0.1:0", "--config"])
        .arg(dir.join("job.toml"))
        .arg("--addr-file")
        .arg(&addr_file)
        .env("TANDEM_TOKEN", token)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !addr_file.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "coordinator did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let url = format!(
        "https://{}",
        std::fs::read_to_string(&addr_file).unwrap().trim()
    );
    // A worker with the wrong token is refused and exits with an error.
    let bad = secure(&mut Command::new(bin()))
        .args(["worker", "--coordinator", &url, "--connect-timeout-s", "5"])
        .env("TANDEM_TOKEN", "wrong")
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("token"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    let mut workers: Vec<_> = (0..3)
        .map(|i| {
            secure(&mut Command::new(bin()))
                .args([
                    "worker",
                    "--coordinator",
                    &url,
                    "--worker-id",
                    &format!("w{i}"),
                ])
                .env("TANDEM_TOKEN", token)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let status = wait_with_timeout(&mut coord, Duration::from_secs(240));
    assert!(status.success());
    for w in &mut workers {
        assert!(wait_with_timeout(w, Duration::from_secs(30)).success());
    }
    check_completed(&summary(&dir), 3);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn every_bundled_config_is_valid() {
    let mut n = 0;
    for e in std::fs::read_dir(common::repo().join("configs"))
        .unwrap()
        .flatten()
    {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "toml") {
            // The Kubernetes jobs' inputs are in their pods; every other config's inputs
            // exist, found relative to the file from any working directory.
            let pod = p.file_name().unwrap().to_string_lossy().starts_with("k8s-");
            let mut cmd = Command::new(bin());
            cmd.args(["config", "check"]).arg(&p);
            if pod {
                cmd.arg("--skip-inputs");
            }
            let out = cmd.current_dir(std::env::temp_dir()).output().unwrap();
            assert!(
                out.status.success(),
                "{}: {}",
                p.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            n += 1;
        }
    }
    assert!(n >= 4, "found only {n} configs");
}

/// Two fresh runs of the same job — vocabulary trained from the corpus each time, seeded
/// initialisation, data order, masking and dropout — end with bit-identical parameters.
#[test]
fn two_fresh_runs_of_a_job_are_bit_identical() {
    let dir = job_dir("twice", 2, 2, "", "max_steps = 12\nepochs = 2", 32);
    let corpus = common::repo().join("configs/data/corpus");
    // With data.tokenizer set, --corpus keeps it: a tokenizer the user named is never
    // replaced. The runs below leave it unset, so each trains its own vocabulary.
    let job = std::fs::read_to_string(dir.join("job.toml")).unwrap();
    let configured = job
        .lines()
        .find_map(|l| l.strip_prefix("tokenizer = "))
        .expect("job_dir names a tokenizer")
        .trim_matches('"')
        .to_string();
    let out = Command::new(bin())
        .arg("launch")
        .arg(dir.join("job.toml"))
        .args(["--no-progress", "--max-steps", "1", "--corpus"])
        .arg(&corpus)
        .arg("--state-dir")
        .arg(dir.join("kept"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("training a WordPiece vocabulary"), "{err}");
    assert!(
        err.contains(&format!("using data.tokenizer {configured}")),
        "{err}"
    );
    // `tandem summary` prints what launch printed at the end; the coordinator's own copy
    // is not forwarded too (one stage line from the coordinator's log, one in the summary).
    let again = Command::new(bin())
        .arg("summary")
        .arg(dir.join("kept"))
        .output()
        .unwrap();
    assert!(again.status.success());
    let printed = String::from_utf8_lossy(&again.stdout);
    assert!(err.contains(printed.trim()), "{printed}\nnot in\n{err}");
    assert_eq!(err.matches("replicas identical").count(), 2, "{err}");
    let job: String = job
        .lines()
        .filter(|l| !l.starts_with("tokenizer = "))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(dir.join("job.toml"), job).unwrap();
    let run = |n: usize| -> Value {
        let state = dir.join(format!("run{n}"));
        let out = Command::new(bin())
            .arg("launch")
            .arg(dir.join("job.toml"))
            .args(["--no-progress", "--corpus"])
            .arg(&corpus)
            .arg("--state-dir")
            .arg(&state)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains("training a WordPiece vocabulary"));
        serde_json::from_slice(&std::fs::read(state.join("summary.json")).unwrap()).unwrap()
    };
    let (a, b) = (run(1), run(2));
    assert_eq!(
        std::fs::read(dir.join("run1/tokenizer/vocab.txt")).unwrap(),
        std::fs::read(dir.join("run2/tokenizer/vocab.txt")).unwrap()
    );
    assert_eq!(
        a["stages"][0]["param_hashes"],
        b["stages"][0]["param_hashes"]
    );
    assert_eq!(a["stages"][0]["loss"], b["stages"][0]["loss"]);
    std::fs::remove_dir_all(dir).unwrap();
}
