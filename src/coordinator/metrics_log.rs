//! `state_dir/metrics.jsonl`: one JSON object per logged step (every
//! `cluster.progress_every` steps), appended as rank 0's progress reports bring them.
//!
//! Each line: `stage`, `stage_index`, `generation`, `epoch`, `step`, `loss`, `mlm_loss` and
//! `nsp_loss` (pre-training), `lr`, `samples_per_s`. After a failure the steps since the last
//! checkpoint are trained again by the next generation and logged again under its number, so
//! the file is the history of what ran, not only of what was kept.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::proto;

pub const METRICS_FILE: &str = "metrics.jsonl";

pub struct MetricsLog {
    path: PathBuf,
    file: Option<std::fs::File>,
    /// Highest step written per (generation, stage): a report resent after a lost
    /// acknowledgement carries steps already written.
    last: HashMap<(u64, u32), u64>,
}

impl MetricsLog {
    pub fn new(state_dir: &Path) -> Self {
        MetricsLog {
            path: state_dir.join(METRICS_FILE),
            file: None,
            last: HashMap::new(),
        }
    }

    /// Appends the records of one report of rank 0.
    pub fn append(
        &mut self,
        stage_index: u32,
        stage: &str,
        pretrain: bool,
        generation: u64,
        records: &[proto::StepRecord],
    ) -> std::io::Result<()> {
        let last = self.last.entry((generation, stage_index)).or_insert(0);
        let mut lines = String::new();
        for r in records {
            if r.step <= *last {
                continue;
            }
            let mut v = serde_json::json!({
                "stage": stage,
                "stage_index": stage_index,
                "generation": generation,
                "epoch": r.epoch,
                "step": r.step,
                "loss": short(r.loss),
                "lr": short(r.lr),
                "samples_per_s": short(r.samples_per_s),
            });
            if pretrain {
                v["mlm_loss"] = short(r.mlm_loss).into();
                v["nsp_loss"] = short(r.nsp_loss).into();
            }
            lines.push_str(&v.to_string());
            lines.push('\n');
            *last = r.step;
        }
        if lines.is_empty() {
            return Ok(());
        }
        if self.file.is_none() {
            self.file = Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)?,
            );
        }
        let f = self.file.as_mut().expect("opened above");
        f.write_all(lines.as_bytes())?;
        f.flush()
    }
}

/// An f32 as the f64 of its shortest decimal form, so the file says `7.593369`, as
/// summary.json does, rather than `7.593369007110596`.
fn short(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(x as f64)
}

/// The loss of a stage's first logged step (the lowest step number, earliest line) and of its
/// last line, from `metrics.jsonl` (both `None` when the stage logged nothing).
pub fn first_and_last_loss(state_dir: &Path, stage_index: u32) -> (Option<f32>, Option<f32>) {
    let Ok(text) = std::fs::read_to_string(state_dir.join(METRICS_FILE)) else {
        return (None, None);
    };
    let mut first: Option<(u64, f32)> = None;
    let mut last = None;
    for v in text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["stage_index"].as_u64() == Some(stage_index as u64))
    {
        let (Some(step), Some(loss)) = (v["step"].as_u64(), v["loss"].as_f64()) else {
            continue;
        };
        if first.is_none_or(|(s, _)| step < s) {
            first = Some((step, loss as f32));
        }
        last = Some(loss as f32);
    }
    (first.map(|(_, l)| l), last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(step: u64, loss: f32) -> proto::StepRecord {
        proto::StepRecord {
            step,
            loss,
            ..Default::default()
        }
    }

    #[test]
    fn appends_skips_resent_steps_and_finds_first_and_last() {
        let dir = std::env::temp_dir().join(format!("tandem-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut log = MetricsLog::new(&dir);
        log.append(0, "pretrain", true, 1, &[rec(10, 5.0), rec(20, 4.0)])
            .unwrap();
        // Resent (lost acknowledgement): step 20 again, then 30.
        log.append(0, "pretrain", true, 1, &[rec(20, 4.0), rec(30, 3.5)])
            .unwrap();
        // The next generation replays from its checkpoint (step 20) after a failure.
        log.append(0, "pretrain", true, 2, &[rec(30, 3.4), rec(40, 3.0)])
            .unwrap();
        log.append(1, "finetune", false, 2, &[rec(10, 0.7)])
            .unwrap();
        let text = std::fs::read_to_string(dir.join(METRICS_FILE)).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let steps: Vec<u64> = lines.iter().map(|v| v["step"].as_u64().unwrap()).collect();
        assert_eq!(steps, vec![10, 20, 30, 30, 40, 10]);
        assert_eq!(lines[3]["generation"], 2);
        assert!(lines[0]["mlm_loss"].is_number());
        assert!(
            lines[5].get("mlm_loss").is_none(),
            "fine-tuning has no MLM loss"
        );
        assert_eq!(first_and_last_loss(&dir, 0), (Some(5.0), Some(3.0)));
        assert_eq!(first_and_last_loss(&dir, 1), (Some(0.7), Some(0.7)));
        assert_eq!(first_and_last_loss(&dir, 2), (None, None));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
