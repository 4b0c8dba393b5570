//! `config check` (and `launch`, and the coordinator, before anything starts): every input
//! the config names exists. Outputs (`state_dir`) need not.

use std::path::Path;

use super::{ConfigError, JobConfig, StageKind};

impl JobConfig {
    /// Every path the job reads, checked at once; the error lists each missing one by key.
    pub fn check_paths(&self) -> Result<(), ConfigError> {
        let mut missing = Vec::new();
        let mut need = |key: String, p: &Path, what: &str| {
            if !p.exists() {
                missing.push(format!("{key} {}: no such {what}", p.display()));
            }
        };
        // TANDEM_TOKEN wins over the file, which is then never read.
        let token_env = std::env::var("TANDEM_TOKEN").is_ok_and(|t| !t.is_empty());
        if let Some(f) = self.job.token_file.as_ref().filter(|_| !token_env) {
            need("job.token_file".into(), f, "file");
        }
        if let Some(f) = &self.model.config {
            need("model.config".into(), f, "file");
        }
        if let Some(t) = &self.data.tokenizer {
            need("data.tokenizer".into(), t, "file or directory");
        }
        for (i, s) in self.stages.iter().enumerate() {
            for (k, p) in [("train", &s.train), ("dev", &s.dev)] {
                if let Some(p) = p {
                    need(format!("stages[{i}].{k}"), p, "file");
                }
            }
            if let Some(dir) = s.init_from.as_deref().filter(|d| *d != "previous") {
                need(
                    format!("stages[{i}].init_from"),
                    &Path::new(dir).join("config.json"),
                    "file (a checkpoint directory has config.json and model.safetensors)",
                );
            }
        }
        if self.stages.iter().any(|s| s.kind == StageKind::Pretrain) {
            for (i, c) in self.data.corpus.iter().enumerate() {
                if let Err(e) = crate::data::corpus::resolve_inputs(std::slice::from_ref(c)) {
                    let e = e.to_string();
                    let e = e.strip_prefix("data: ").unwrap_or(&e);
                    missing.push(format!("data.corpus[{i}]: {e}"));
                }
            }
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Missing(missing))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_missing_input_is_named_by_its_key() {
        let cfg = JobConfig::from_toml(
            "[job]\nname = \"t\"\nstate_dir = \"/nonexistent/state\"\n[model]\npreset = \"tiny\"\n\
             [data]\ncorpus = [\"/nonexistent/corpus\", \"/nonexistent/*.txt\"]\n\
             [[stages]]\nname = \"p\"\nkind = \"pretrain\"\nlr = 1e-3\n\
             [[stages]]\nname = \"f\"\nkind = \"sequence_classification\"\ntrain = \"/nonexistent/t\"\n\
             dev = \"/nonexistent/d\"\ninit_from = \"/nonexistent/ckpt\"\nlr = 1e-3\n",
        )
        .unwrap();
        let e = cfg.check_paths().unwrap_err().to_string();
        for part in [
            "data.corpus[0]: input /nonexistent/corpus: no such file or directory",
            "data.corpus[1]: input pattern `/nonexistent/*.txt` matches no file",
            "stages[1].train /nonexistent/t: no such file",
            "stages[1].dev /nonexistent/d: no such file",
            "stages[1].init_from /nonexistent/ckpt/config.json: no such file",
        ] {
            assert!(e.contains(part), "{part:?} not in {e}");
        }
        assert!(!e.contains("state_dir"), "{e}");
    }
}
