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
    let dir = job_dir("operator", 2, 2, "progress_log_s = 0.3", "epochs = 3", 32);
    let log = dir.join("coordinator.log");
    let token = "operator-token";
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
    let out = Command::new(bin())
        .args(["summary"])
        .arg(dir.join("state"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), printed);
    // The coordinator recorded its config, so launch --resume knows the job.
    let out = Command::new(bin())
        .args(["launch", "--no-progress", "--resume"])
        .arg(dir.join("state"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("already finished"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// `tandem summary` on something that is not a state dir says so.
#[test]
fn summary_of_a_directory_without_a_job_says_so() {
    let dir = common::TmpDir::new("operator", "empty");
    let out = Command::new(bin())
        .arg("summary")
        .arg(&*dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a tandem state dir"), "{err}");
}
