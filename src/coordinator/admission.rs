//! What the coordinator lets a member do beyond holding the job token: each report and upload
//! for a rank carries the secret of the member assigned that rank, uploads are named for the
//! current stage, and an upload is bounded by the stage's model.

use tonic::Status;

use super::service::shown;

/// Bounds on one checkpoint upload, so a client cannot make the coordinator hold unbounded
/// bytes: the weights and both AdamW moments of the stage's model with a quarter to spare, plus
/// 64 MiB for the small files (config, tokenizer, state), in at most 32 files.
#[derive(Debug, Clone, Copy)]
pub(super) struct UploadCap {
    bytes: u64,
    files: usize,
}

impl Default for UploadCap {
    fn default() -> Self {
        UploadCap {
            bytes: 64 << 20,
            files: 32,
        }
    }
}

impl UploadCap {
    pub(super) fn for_model(m: &crate::model::BertConfig) -> Self {
        // Pre-training's parameters (the encoder, the MLM and NSP heads) bound every task
        // model of the same encoder but a token-classification head with a huge label set;
        // the fixed allowance covers such heads.
        let params: u64 = crate::model::bert::pretraining_specs(m)
            .iter()
            .map(|s| s.shape.iter().product::<usize>() as u64)
            .sum();
        UploadCap {
            bytes: params.saturating_mul(12).saturating_mul(5) / 4 + (64 << 20),
            files: 32,
        }
    }

    pub(super) fn check(&self, bytes: u64, files: usize, name: &str) -> Result<(), Status> {
        if bytes > self.bytes || files > self.files {
            return Err(Status::resource_exhausted(format!(
                "checkpoint upload {}: more than {} MiB or {} files, the most this job's model \
                 needs",
                shown(name),
                self.bytes >> 20,
                self.files
            )));
        }
        Ok(())
    }
}

/// Whether `name` is one rank 0 uploads in stage `stage`: `stageS-stepNNNNNN`, `stageS-best`,
/// `stageS-final`.
pub(super) fn upload_name_of_stage(name: &str, stage: u32) -> bool {
    name.strip_prefix(&format!("stage{stage}-"))
        .is_some_and(|rest| {
            rest == "best"
                || rest == "final"
                || rest
                    .strip_prefix("step")
                    .is_some_and(|n| n.len() >= 6 && n.bytes().all(|b| b.is_ascii_digit()))
        })
}

/// A report or upload for `rank` must carry the secret its member was assigned (compared in
/// constant time): the job token alone does not let a client act as another rank.
pub(super) fn check_secret(expected: &str, got: &str, rank: u32) -> Result<(), Status> {
    let same: bool = subtle::ConstantTimeEq::ct_eq(expected.as_bytes(), got.as_bytes()).into();
    if expected.is_empty() || !same {
        return Err(Status::permission_denied(format!(
            "rank {rank}: wrong member secret (only the member assigned rank {rank} in this \
             generation may report or upload for it)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploads_are_named_for_the_current_stage_only() {
        for ok in [
            "stage2-step000100",
            "stage2-step1234567",
            "stage2-best",
            "stage2-final",
        ] {
            assert!(upload_name_of_stage(ok, 2), "{ok}");
        }
        for bad in [
            "stage1-final",
            "stage2-init",
            "stage2-step12",
            "stage2-step00010x",
            "stage22-final",
            "../stage2-final",
            "stage2-final/../../x",
            "",
        ] {
            assert!(!upload_name_of_stage(bad, 2), "{bad}");
        }
    }

    #[test]
    fn uploads_are_capped_by_the_model_size() {
        let cfg = crate::model::BertConfig::preset(crate::model::Preset::Tiny);
        let cap = UploadCap::for_model(&cfg);
        let params: u64 = crate::model::bert::pretraining_specs(&cfg)
            .iter()
            .map(|s| s.shape.iter().product::<usize>() as u64)
            .sum();
        // Weights and both moments fit, with room to spare; far more does not.
        cap.check(params * 12, 5, "stage0-final").unwrap();
        let e = cap.check(cap.bytes + 1, 5, "stage0-final").unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().contains("stage0-final"), "{e}");
        assert!(cap.bytes < params * 16 + (64 << 20));
        assert!(cap.check(1, 33, "x").is_err());
    }

    #[test]
    fn only_the_assigned_secret_passes() {
        check_secret("ab12", "ab12", 0).unwrap();
        for (want, got) in [
            ("ab12", "ab13"),
            ("ab12", ""),
            ("", ""),
            ("ab12", "ab12ab12"),
        ] {
            let e = check_secret(want, got, 3).unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied);
            assert!(e.message().contains("rank 3: wrong member secret"), "{e}");
        }
    }
}
