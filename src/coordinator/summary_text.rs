//! The job's summary for people: the lines `launch`, the coordinator and `tandem summary`
//! print (summary.json holds the same, and more, for programs).

use std::path::Path;

use super::{StageSummary, Summary};

/// "accuracy 0.583 (best epoch 5, exported; last epoch 0.533) · majority-class baseline accuracy 0.500"
fn dev_line(metrics: &serde_json::Value, baseline: Option<f64>) -> String {
    let metric = metrics["metric"].as_str().unwrap_or("score");
    let last = metrics["final"][metric].as_f64();
    let mut out = match (metrics.get("best"), last) {
        (Some(best), last) => format!(
            "{metric} {:.3} (best epoch {}, exported; last epoch {})",
            best["score"].as_f64().unwrap_or(0.0),
            best["epoch"],
            last.map(|v| format!("{v:.3}"))
                .unwrap_or_else(|| "?".into())
        ),
        (None, Some(v)) => format!("{metric} {v:.3}"),
        (None, None) => "no metrics".into(),
    };
    if let Some(b) = baseline {
        out += &format!(" · majority-class baseline accuracy {b:.3}");
    }
    out
}

/// One stage's line of the summary: what its kind measures.
pub fn stage_line(st: &StageSummary) -> String {
    if st.kind != "pretrain" {
        return format!(
            "stage {:?} ({}): {} steps, {} examples · train loss {:.3}{} · dev {} · replicas identical: {}",
            st.name, st.kind, st.steps, st.examples, st.loss,
            st.train_accuracy.map(|a| format!(" · train accuracy {a:.3}")).unwrap_or_default(),
            dev_line(&st.metrics, st.majority_baseline), st.replicas_identical
        );
    }
    format!(
        "stage {:?} ({}): {} steps, {} examples, {} documents · loss {:.3} (MLM {:.3}, NSP {:.3}) · MLM accuracy {:.3} (chance ≈ 0) · NSP accuracy {:.3} (chance 0.5) · {:.1} samples/s · replicas identical: {}",
        st.name, st.kind, st.steps, st.examples, st.documents.unwrap_or(0), st.loss,
        st.mlm_loss.unwrap_or(f32::NAN), st.nsp_loss.unwrap_or(f32::NAN),
        st.mlm_accuracy.unwrap_or(f32::NAN), st.nsp_accuracy.unwrap_or(f32::NAN),
        st.samples_per_s, st.replicas_identical
    )
}

/// The job's summary as `launch`, the coordinator and `tandem summary` print it.
pub fn human_summary(s: &Summary, state_dir: &Path) -> String {
    let corpus = if s.shards == 0 {
        "no corpus (every stage fine-tunes)".to_string()
    } else {
        format!(
            "corpus {} documents in {} shards",
            s.corpus_documents, s.shards
        )
    };
    let mut out = format!(
        "\njob {:?} {} in {:.1} s · {} worker(s) · {} generation(s) · {corpus}\n",
        s.job, s.status, s.wall_s, s.world_size, s.generations
    );
    if !s.reason.is_empty() {
        out += &format!("reason: {}\n", s.reason);
    }
    for st in &s.stages {
        out += &stage_line(st);
        out.push('\n');
    }
    if let Some(f) = &s.final_checkpoint {
        out += &format!("final model (HF layout): {}\n", f.display());
    }
    out += &format!("summary: {}", state_dir.join("summary.json").display());
    out
}

/// `tandem summary STATE_DIR`: the human summary from summary.json, or, for a job still
/// running or stopped before writing one, its recorded status.
pub fn summary_of(state_dir: &Path) -> anyhow::Result<String> {
    // Absolute, as the coordinator (whose state_dir comes from its config) prints it.
    let abs = std::path::absolute(state_dir);
    let state_dir = abs.as_deref().unwrap_or(state_dir);
    let path = state_dir.join("summary.json");
    match std::fs::read(&path) {
        Ok(b) => {
            let s: Summary = serde_json::from_slice(&b)
                .map_err(|e| anyhow::anyhow!("{}: not a tandem summary: {e}", path.display()))?;
            Ok(human_summary(&s, state_dir))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            match super::JobRecord::load(state_dir)? {
                Some(r) => Ok(format!(
                    "job {:?} is {} (generation {}, stage {}); it has written no summary yet",
                    r.job, r.status, r.generation, r.stage_index
                )),
                None => anyhow::bail!(
                    "{}: no summary.json and no job record: not a tandem state dir",
                    state_dir.display()
                ),
            }
        }
        Err(e) => Err(anyhow::anyhow!("reading {}: {e}", path.display())),
    }
}
