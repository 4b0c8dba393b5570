//! `tandem finetune`: one checkpoint fine-tuned on one task. The command writes the short job
//! config a user would write for it (no `[data]`, no `[model]`: both come from the checkpoint)
//! into the state dir, then runs that file exactly as `tandem launch` would.

#![warn(missing_docs)]

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::config::{JobConfig, StageKind};
use crate::launch::LaunchOptions;
use crate::launch::RunArgs;

/// What `tandem finetune` is asked for (its flags, less the ones `launch` shares).
#[derive(Debug, Clone, clap::Args)]
pub struct FinetuneJob {
    /// Checkpoint directory: config.json, model.safetensors and the tokenizer files.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// sequence_classification, pair_classification, token_classification or
    /// question_answering.
    #[arg(long, value_parser = parse_task)]
    pub task: StageKind,
    /// Training data (classification TSV/JSONL, CoNLL, SQuAD JSON).
    #[arg(long)]
    pub train: PathBuf,
    /// Dev data, evaluated after every epoch; the best epoch is exported.
    #[arg(long)]
    pub dev: PathBuf,
    /// Passes over the training data.
    #[arg(long, default_value_t = 3)]
    pub epochs: u32,
    /// Peak learning rate (warm-up over the first 10% of steps, then linear decay).
    #[arg(long, default_value_t = 3e-5)]
    pub lr: f64,
    /// Examples per worker per step.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Sequence length of the features.
    #[arg(long, default_value_t = 128)]
    pub max_seq_length: usize,
    /// Job name (default: the checkpoint's directory name and the task).
    #[arg(long)]
    pub name: Option<String>,
}

/// Workers when `--workers` is not given: as in the bundled job.
const DEFAULT_WORKERS: usize = 2;

impl FinetuneJob {
    /// The job's name: `--name`, or the checkpoint directory's name and the task.
    pub fn job_name(&self) -> String {
        if let Some(n) = &self.name {
            return n.clone();
        }
        let dir = std::path::absolute(&self.checkpoint).unwrap_or_else(|_| self.checkpoint.clone());
        let base = dir
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "checkpoint".into());
        let base: String = base
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        format!("{base}-{}", self.task.name())
    }

    /// The input paths must exist before anything starts; each error names its flag.
    fn check_inputs(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.checkpoint.join("config.json").is_file(),
            "--checkpoint {}: no config.json there (expected a checkpoint directory: \
             config.json, model.safetensors and the tokenizer files)",
            self.checkpoint.display()
        );
        for (flag, p) in [("--train", &self.train), ("--dev", &self.dev)] {
            anyhow::ensure!(p.is_file(), "{flag} {}: no such file", p.display());
        }
        Ok(())
    }

    /// The job config as TOML, with absolute paths (the file lives in the state dir).
    pub fn to_toml(&self, state_dir: &Path, workers: usize) -> anyhow::Result<String> {
        let abs = |p: &Path| -> anyhow::Result<String> {
            Ok(std::path::absolute(p)
                .with_context(|| format!("resolving {}", p.display()))?
                .display()
                .to_string())
        };
        let mut job = toml::Table::new();
        job.insert("name".into(), self.job_name().into());
        job.insert("state_dir".into(), abs(state_dir)?.into());
        let mut cluster = toml::Table::new();
        cluster.insert("min_workers".into(), (workers as i64).into());
        cluster.insert("max_workers".into(), (workers as i64).into());
        let mut stage = toml::Table::new();
        stage.insert("name".into(), self.task.name().into());
        stage.insert("kind".into(), self.task.name().into());
        stage.insert("init_from".into(), abs(&self.checkpoint)?.into());
        stage.insert("train".into(), abs(&self.train)?.into());
        stage.insert("dev".into(), abs(&self.dev)?.into());
        stage.insert("epochs".into(), i64::from(self.epochs).into());
        stage.insert("batch_size".into(), (self.batch_size as i64).into());
        stage.insert("lr".into(), self.lr.into());
        stage.insert("warmup_fraction".into(), 0.1.into());
        stage.insert("max_seq_length".into(), (self.max_seq_length as i64).into());
        let mut root = toml::Table::new();
        root.insert("job".into(), job.into());
        root.insert("cluster".into(), cluster.into());
        root.insert("stages".into(), toml::Value::Array(vec![stage.into()]));
        let header = format!(
            "# Written by `tandem finetune`; run it again with \
             `tandem launch {} --state-dir NEW_DIR`.\n",
            state_dir.join(CONFIG_FILE).display()
        );
        Ok(header + &toml::to_string(&root)?)
    }
}

/// The config's file name in the state dir.
pub const CONFIG_FILE: &str = "finetune.toml";

/// Writes the job's config into the state dir and runs it; returns the job's exit code.
pub async fn run(
    job: FinetuneJob,
    mut args: RunArgs,
    interrupt: impl std::future::Future<Output = ()>,
) -> anyhow::Result<i32> {
    job.check_inputs()?;
    let state_dir = args
        .state_dir
        .clone()
        .unwrap_or_else(|| Path::new("state").join(job.job_name()));
    crate::launch::refuse_existing_job(&state_dir)?;
    let text = job.to_toml(&state_dir, args.workers.unwrap_or(DEFAULT_WORKERS))?;
    JobConfig::from_toml(&text).context("the generated fine-tuning config")?;
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    let path = state_dir.join(CONFIG_FILE);
    crate::util::write_atomic(&path, text.as_bytes())?;
    eprintln!("tandem finetune: job config written to {}", path.display());
    args.state_dir = Some(state_dir);
    crate::launch::run(LaunchOptions::new(path, args), interrupt).await
}

/// A fine-tuning task, spelled as in a stage's `kind`.
pub(crate) fn parse_task(s: &str) -> Result<crate::config::StageKind, String> {
    use crate::config::StageKind;
    match serde_json::from_value(serde_json::Value::String(s.into())) {
        Ok(StageKind::Pretrain) => {
            Err("pretrain is not a fine-tuning task (use tandem launch)".into())
        }
        Ok(k) => Ok(k),
        Err(_) => Err(format!(
            "{s:?}: expected sequence_classification, pair_classification, \
             token_classification or question_answering"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(dir: &Path) -> FinetuneJob {
        FinetuneJob {
            checkpoint: dir.join("my ckpt"),
            task: StageKind::TokenClassification,
            train: dir.join("train.conll"),
            dev: dir.join("dev.conll"),
            epochs: 2,
            lr: 5e-5,
            batch_size: 8,
            max_seq_length: 64,
            name: None,
        }
    }

    #[test]
    fn the_written_config_is_the_short_fine_tuning_job() {
        let dir = Path::new("/data");
        let text = job(dir).to_toml(Path::new("/state/x"), 3).unwrap();
        let cfg = JobConfig::from_toml(&text).unwrap();
        assert_eq!(cfg.job.name, "my-ckpt-token_classification");
        assert_eq!(cfg.job.state_dir, Path::new("/state/x"));
        assert_eq!((cfg.cluster.min_workers, cfg.cluster.max_workers), (3, 3));
        assert_eq!(cfg.stages.len(), 1);
        let s = &cfg.stages[0];
        assert_eq!(s.kind, StageKind::TokenClassification);
        assert_eq!(s.init_from.as_deref(), Some("/data/my ckpt"));
        assert_eq!(s.train.as_deref(), Some(Path::new("/data/train.conll")));
        assert_eq!(s.dev.as_deref(), Some(Path::new("/data/dev.conll")));
        assert_eq!((s.epochs, s.batch_size, s.max_seq_length), (2, 8, 64));
        assert_eq!((s.lr, s.warmup_fraction), (5e-5, 0.1));
        assert!(cfg.data.corpus.is_empty() && cfg.model.preset.is_none());
        assert!(
            !text.contains("[data]") && !text.contains("[model]"),
            "{text}"
        );
    }

    #[test]
    fn missing_inputs_name_their_flag() {
        let dir = std::env::temp_dir().join(format!("tandem-ft-job-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("my ckpt")).unwrap();
        let j = job(&dir);
        let e = j.check_inputs().unwrap_err().to_string();
        assert!(
            e.starts_with("--checkpoint ") && e.contains("no config.json"),
            "{e}"
        );
        std::fs::write(dir.join("my ckpt/config.json"), "{}").unwrap();
        std::fs::write(&j.train, "").unwrap();
        let e = j.check_inputs().unwrap_err().to_string();
        assert!(e.starts_with("--dev ") && e.contains("dev.conll"), "{e}");
        std::fs::write(&j.dev, "").unwrap();
        j.check_inputs().unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }
}
