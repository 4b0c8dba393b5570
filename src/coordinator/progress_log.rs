//! The coordinator's progress line, every `cluster.progress_log_s` seconds while a stage
//! trains: what an operator watching a multi-host job's coordinator needs (`launch` shows the
//! same in its progress bar).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::state::Shared;
use crate::proto::StatusResponse;

/// Where the current stage's step rate is measured from.
struct Since {
    stage_index: u32,
    generation: u64,
    at: Instant,
    step: u64,
}

/// Logs a progress line every `every` while the job runs and its step advances; the
/// coordinator aborts the task when the job ends.
pub(super) async fn run(shared: Arc<Shared>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    let (mut since, mut logged) = (None::<Since>, 0u64);
    loop {
        tick.tick().await;
        let s = shared.status();
        if s.phase != "running" || s.step == 0 || s.step == logged {
            continue;
        }
        // A new stage or generation restarts the rate (a restart replays from a checkpoint).
        let fresh = since
            .as_ref()
            .is_none_or(|b| b.stage_index != s.stage_index || b.generation != s.generation);
        if fresh {
            since = Some(Since {
                stage_index: s.stage_index,
                generation: s.generation,
                at: Instant::now(),
                step: s.step,
            });
        }
        tracing::info!("{}", line(&s, since.as_ref().expect("set above")));
        logged = s.step;
    }
}

/// "progress: stage pretrain (1/2) · step 143/510 · epoch 9/30 · loss 7.775 · 249.6 samples/s ·
/// ETA 50 s · generation 1 · 2 worker(s)"
fn line(s: &StatusResponse, since: &Since) -> String {
    let secs = since.at.elapsed().as_secs_f64();
    let done = s.step.saturating_sub(since.step);
    let eta = if done > 0 && secs > 0.0 && s.total_steps > s.step {
        let left = (s.total_steps - s.step) as f64 * secs / done as f64;
        format!(" · ETA {}", human_secs(left))
    } else {
        String::new()
    };
    format!(
        "progress: stage {} ({}/{}) · step {}/{} · epoch {}/{} · loss {:.3} · {:.1} samples/s{eta} · generation {} · {} worker(s)",
        s.stage_name,
        s.stage_index + 1,
        s.stages,
        s.step,
        s.total_steps,
        (s.epoch + 1).min(s.epochs.max(1)),
        s.epochs,
        s.loss,
        s.samples_per_s,
        s.generation,
        s.workers
    )
}

/// 42 s, 3 min 5 s, 2 h 10 min.
fn human_secs(s: f64) -> String {
    let s = s.round() as u64;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_names_stage_step_rate_and_eta() {
        let s = StatusResponse {
            phase: "running".into(),
            stage_name: "pretrain".into(),
            stage_index: 0,
            stages: 2,
            step: 150,
            total_steps: 510,
            epoch: 8,
            epochs: 30,
            loss: 7.7754,
            samples_per_s: 249.61,
            generation: 1,
            workers: 2,
            ..Default::default()
        };
        // 100 steps in ~10 s: 360 left take ~36 s.
        let since = Since {
            stage_index: 0,
            generation: 1,
            at: Instant::now() - Duration::from_secs(10),
            step: 50,
        };
        let l = line(&s, &since);
        assert!(
            l.starts_with("progress: stage pretrain (1/2) · step 150/510 · epoch 9/30 · loss 7.775 · 249.6 samples/s · ETA 36 s · generation 1 · 2 worker(s)"),
            "{l}"
        );
        assert_eq!(human_secs(185.0), "3 min 5 s");
        assert_eq!(human_secs(7800.0), "2 h 10 min");
    }
}
