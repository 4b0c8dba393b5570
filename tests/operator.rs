//! What an operator running the coordinator and workers by hand sees (issue: running a job
//! by hand across hosts): real processes on 127.0.0.1.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{bin, job_dir, wait_with_timeout};

/// The coordinator logs progress lines while a stage trains, each stage's line when it ends
/// and the human summary at the end; `tandem summary` prints the same summary from the
/// state dir, and `launch --resume` on that coordinator-made state dir says it is finished.
#[test]
fn a_hand_started_coordinator_shows_progress_and_the_summary() {
    let dir = job_dir("operator", 2, 2, "progress_log_s = 0.3", "epochs = 10", 32);
    let log = dir.join("coordinator.log");
    let token = "operator-test-token-1";
    let (mut coord, url) = common::coordinator(&dir, "127.0.0.1:0", token, false, &log);
    let mut workers: Vec<_> = (0..2)
        .map(|i| {
            common::worker(
                &url,
                token,
                &format!("w{i}"),
                &dir.join(format!("w{i}.log")),
            )
        })
        .collect();
    assert!(wait_with_timeout(&mut coord, Duration::from_secs(240)).success());
    for w in &mut workers {
        assert!(wait_with_timeout(w, Duration::from_secs(30)).success());
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let progress: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("progress: stage"))
        .collect();
    assert!(progress.len() >= 2, "{text}");
    let first = progress[0];
    for part in [
        "stage pretrain (1/1) · step ",
        " · epoch ",
        " · loss ",
        " samples/s",
        " · generation 1 · 2 worker(s)",
    ] {
        assert!(first.contains(part), "{part:?} not in {first}");
    }
    assert!(
        progress.iter().any(|l| l.contains(" · ETA ")),
        "{progress:#?}"
    );
    assert!(text.contains("stage \"pretrain\" (pretrain): "), "{text}");
    // The summary block the coordinator printed equals `tandem summary STATE_DIR`.
    let start = text
        .find("job \"operator\" completed in")
        .expect("the human summary");
    let end = start + text[start..].find("summary: ").unwrap();
    let end = end + text[end..].find('\n').unwrap();
    let printed = &text[start..end];
    let state = dir.join("state");
    let (ok, out, err) = common::tandem(&["summary".as_ref(), state.as_os_str()]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), printed);
    // The coordinator recorded its config, so launch --resume knows the job.
    let (ok, _, err) = common::tandem(&[
        "launch".as_ref(),
        "--no-progress".as_ref(),
        "--resume".as_ref(),
        state.as_os_str(),
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("already finished"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// `tandem summary` on something that is not a state dir says so.
#[test]
fn summary_of_a_directory_without_a_job_says_so() {
    let dir = common::TmpDir::new("operator", "empty");
    let (ok, _, err) = common::tandem(&["summary".as_ref(), dir.as_os_str()]);
    assert!(!ok && err.contains("not a tandem state dir"), "{err}");
}

/// A worker pointed at a port where nothing listens says so at once, with the reason and
/// when it gives up; a URL without a scheme is refused before any attempt.
#[test]
fn a_worker_that_cannot_reach_the_coordinator_says_why() {
    let port = common::free_port();
    let dir = common::TmpDir::new("operator", "dead-port");
    let log = dir.join("w.log");
    let mut w = common::secure(&mut Command::new(bin()))
        .args(["worker", "--connect-timeout-s", "30", "--coordinator"])
        .arg(format!("https://127.0.0.1:{port}"))
        .env("TANDEM_TOKEN", "t")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    common::wait_for("a retry line", Duration::from_secs(5), || {
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("retrying in")
    });
    let _ = w.kill();
    let _ = w.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains(&format!(
            "coordinator https://127.0.0.1:{port} not reachable"
        )) && text.to_lowercase().contains("connection refused")
            && text.contains("attempt 1, giving up in"),
        "{text}"
    );
    let t0 = std::time::Instant::now();
    let out = common::secure(&mut Command::new(bin()))
        .args(["worker", "--coordinator", &format!("127.0.0.1:{port}")])
        .env("TANDEM_TOKEN", "t")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(t0.elapsed() < Duration::from_secs(5));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid coordinator URL") && err.contains("https://"),
        "{err}"
    );
}

/// A join with the wrong token is logged by the coordinator (peer and reason), and the join
/// timeout names it.
#[test]
fn refused_joins_are_logged_and_named_by_the_join_timeout() {
    let dir = job_dir("refused", 2, 2, "join_timeout_s = 4", "epochs = 1", 32);
    let log = dir.join("coordinator.log");
    let (mut coord, url) =
        common::coordinator(&dir, "127.0.0.1:0", "the-right-job-token", false, &log);
    let good = common::worker(&url, "the-right-job-token", "good", &dir.join("good.log"));
    let bad = common::secure(&mut Command::new(bin()))
        .args(["worker", "--connect-timeout-s", "5", "--coordinator", &url])
        .env("TANDEM_TOKEN", "wrong")
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let status = wait_with_timeout(&mut coord, Duration::from_secs(60));
    assert!(!status.success());
    // The failed job's Stop makes its worker exit with an error, naming why.
    let mut good = good;
    assert!(!wait_with_timeout(&mut good, Duration::from_secs(30)).success());
    let wlog = std::fs::read_to_string(dir.join("good.log")).unwrap();
    assert!(
        wlog.contains("the job failed: only 1 of min_workers"),
        "{wlog}"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("refused a request: wrong job token") && text.contains("peer=127.0.0.1"),
        "{text}"
    );
    let s = common::summary(&dir);
    let reason = s["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("only 1 of min_workers = 2 joined within join_timeout_s = 4")
            && reason.contains("refused: wrong job token from 127.0.0.1 ("),
        "{reason}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// Config errors name their source (file and line, or the --set argument) and the valid
/// values; `config check` fails on an input that does not exist and resolves the file's
/// relative paths against the file's directory.
#[test]
fn config_errors_name_their_source_and_missing_inputs_fail_the_check() {
    let dir = common::TmpDir::new("operator", "config");
    let check = |file: &std::path::Path, sets: &[&str]| {
        let mut args = vec!["config".as_ref(), "check".as_ref(), file.as_os_str()];
        for s in sets {
            args.extend(["--set".as_ref(), std::ffi::OsStr::new(s)]);
        }
        common::tandem(&args)
    };
    std::fs::create_dir_all(dir.join("conf/data")).unwrap();
    std::fs::write(dir.join("conf/data/c.txt"), "one.\ntwo.\n").unwrap();
    let job = "[job]\nname = \"c\"\nstate_dir = \"../state\"\n[model]\npreset = \"tiny\"\n\
               [data]\ncorpus = [\"data\"]\n[[stages]]\nname = \"p\"\nkind = \"pretrain\"\nlr = 1e-3\n";
    let file = dir.join("conf/job.toml");
    std::fs::write(&file, job).unwrap();
    let (ok, out, err) = check(&file, &[]);
    assert!(ok, "{err}");
    let cfg: serde_json::Value = serde_json::from_str(&out).unwrap();
    let root = std::path::absolute(&*dir).unwrap();
    assert_eq!(
        cfg["data"]["corpus"][0],
        root.join("conf/data").display().to_string()
    );
    assert_eq!(
        cfg["job"]["state_dir"],
        root.join("state").display().to_string()
    );
    let (ok, _, err) = check(&file, &["stages[0].max_step=30"]);
    assert!(
        !ok && err.contains("--set stages[0].max_step=30: unknown field `max_step`"),
        "{err}"
    );
    std::fs::write(
        &file,
        job.replace("\"pretrain\"\nlr", "\"pretraining\"\nlr"),
    )
    .unwrap();
    let (ok, _, err) = check(&file, &[]);
    assert!(
        !ok && err.contains("job.toml: line 10, column 8: unknown variant `pretraining`, expected one of `pretrain`"),
        "{err}"
    );
    std::fs::write(&file, job.replace("[\"data\"]", "[\"corpus\"]")).unwrap();
    let (ok, _, err) = check(&file, &[]);
    assert!(!ok, "{err}");
    assert!(
        err.contains(&format!(
            "data.corpus[0]: input {}: no such file or directory",
            root.join("conf/corpus").display()
        )),
        "{err}"
    );
}

/// SIGTERM to the coordinator pauses the job: workers are told so and wait to rejoin (a
/// finished job's Stop makes them exit); a coordinator resumed on the same address gets them
/// back and the job completes.
#[test]
fn a_coordinator_stopped_by_sigterm_pauses_and_its_workers_rejoin_the_resumed_one() {
    let dir = job_dir("pause", 2, 2, "progress_log_s = 0.2", "epochs = 20", 32);
    let log = dir.join("coordinator.log");
    let token = "pause-test-token-0001";
    let listen = format!("127.0.0.1:{}", common::free_port());
    let (mut coord, url) = common::coordinator(&dir, &listen, token, false, &log);
    let logs: Vec<_> = (0..2).map(|i| dir.join(format!("w{i}.log"))).collect();
    let mut workers: Vec<_> = (0..2)
        .map(|i| common::worker(&url, token, &format!("w{i}"), &logs[i]))
        .collect();
    common::wait_for("training", Duration::from_secs(60), || {
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("progress: stage")
    });
    common::signal(&coord, libc::SIGTERM);
    assert!(!wait_with_timeout(&mut coord, Duration::from_secs(30)).success());
    let s = common::summary(&dir);
    assert_eq!(s["status"], "interrupted", "{s:#}");
    common::wait_for(
        "the workers to hear of the pause",
        Duration::from_secs(10),
        || {
            logs.iter().all(|l| {
                std::fs::read_to_string(l)
                    .unwrap()
                    .contains("the coordinator paused the job")
            })
        },
    );
    std::thread::sleep(Duration::from_secs(1));
    for w in &mut workers {
        assert!(w.try_wait().unwrap().is_none(), "a paused worker exited");
    }
    let (mut coord, _) = common::coordinator(&dir, &listen, token, true, &log);
    assert!(wait_with_timeout(&mut coord, Duration::from_secs(240)).success());
    for w in &mut workers {
        assert!(wait_with_timeout(w, Duration::from_secs(30)).success());
    }
    let s = common::summary(&dir);
    assert_eq!(s["status"], "completed", "{s:#}");
    for l in &logs {
        let text = std::fs::read_to_string(l).unwrap();
        assert!(
            text.contains("stop: job completed (job finished)"),
            "{text}"
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// README's multi-host example, run as written (in a copy of `configs/`, so that its
/// `state/local` is the test's own): the coordinator prints progress and the summary, and
/// `tandem summary` prints the same.
#[test]
fn the_readme_multi_host_example_runs_as_written() {
    let readme = std::fs::read_to_string(common::repo().join("README.md")).unwrap();
    let block = readme
        .split("A worked example on one machine")
        .nth(1)
        .and_then(|r| r.split("```sh\n").nth(1))
        .and_then(|r| r.split("```").next())
        .expect("README's worked example");
    // Shell lines, continuations joined; `'…'` quoting only.
    let joined = block.replace("\\\n", " ");
    let lines: Vec<Vec<String>> = joined
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            l.split_whitespace()
                .map(|w| w.trim_matches('\'').to_string())
                .collect()
        })
        .collect();
    let token = lines
        .iter()
        .find_map(|l| {
            (l[0] == "export").then(|| l[1].strip_prefix("TANDEM_TOKEN=").unwrap().to_string())
        })
        .unwrap();
    let commands: Vec<&Vec<String>> = lines.iter().filter(|l| l[0] == "tandem").collect();
    assert_eq!(commands.len(), 5, "{commands:?}");
    assert_eq!(
        commands.iter().map(|c| c[1].as_str()).collect::<Vec<_>>(),
        ["certs", "coordinator", "worker", "worker", "summary"]
    );
    let dir = common::TmpDir::new("operator", "readme");
    let status = Command::new("cp")
        .arg("-r")
        .arg(common::repo().join("configs"))
        .arg(&*dir)
        .status()
        .unwrap();
    assert!(status.success());
    let spawn = |args: &[String], log: &str| {
        Command::new(bin())
            .args(&args[1..])
            .current_dir(&*dir)
            .env("TANDEM_TOKEN", &token)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join(log)).unwrap())
            .spawn()
            .unwrap()
    };
    let certs = Command::new(bin())
        .args(&commands[0][1..])
        .current_dir(&*dir)
        .output()
        .unwrap();
    assert!(
        certs.status.success(),
        "{}",
        String::from_utf8_lossy(&certs.stderr)
    );
    let mut coord = common::Reap(spawn(commands[1], "coordinator.log"));
    let mut workers = [
        common::Reap(spawn(commands[2], "w1.log")),
        common::Reap(spawn(commands[3], "w2.log")),
    ];
    let ok = wait_with_timeout(&mut coord.0, Duration::from_secs(300)).success();
    let log = std::fs::read_to_string(dir.join("coordinator.log")).unwrap();
    assert!(ok, "{log}");
    for w in &mut workers {
        assert!(wait_with_timeout(&mut w.0, Duration::from_secs(30)).success());
    }
    assert!(
        log.contains("progress: stage pretrain (1/2) · step "),
        "{log}"
    );
    assert!(log.contains("job \"local\" completed in"), "{log}");
    let out = Command::new(bin())
        .args(&commands[4][1..])
        .current_dir(&*dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(log.contains(printed.trim()), "{printed}\nnot in\n{log}");
    assert!(
        printed.contains("stage \"sentiment\" (sequence_classification): 20 steps"),
        "{printed}"
    );
}

/// Relative `--state-dir` and `--corpus` are relative to the working directory of `launch`,
/// though the coordinator reads the job from the state dir's job.toml.
#[test]
fn launch_flags_with_relative_paths_mean_the_working_directory() {
    let dir = job_dir("relative", 2, 2, "", "max_steps = 2", 32);
    let cwd = dir.join("cwd");
    std::fs::create_dir_all(&cwd).unwrap();
    let status = Command::new("cp")
        .arg("-r")
        .arg(common::repo().join("configs/data/corpus"))
        .arg(cwd.join("mycorpus"))
        .status()
        .unwrap();
    assert!(status.success());
    let out = Command::new(bin())
        .arg("launch")
        .arg(dir.join("job.toml"))
        .args([
            "--no-progress",
            "--corpus",
            "mycorpus",
            "--state-dir",
            "out/state",
        ])
        .current_dir(&cwd)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(cwd.join("out/state/summary.json").exists(), "{err}");
    let job = std::fs::read_to_string(cwd.join("out/state/job.toml")).unwrap();
    let abs = std::path::absolute(&cwd).unwrap();
    assert!(
        job.contains(&abs.join("mycorpus").display().to_string()),
        "{job}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}
