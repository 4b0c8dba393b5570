//! How a job stands, spelled the same in `job_state.json`, `summary.json`, the logs and the
//! workers' Stop directive.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::proto;

/// A job's status: running, or how it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// The job has not ended yet.
    #[default]
    Running,
    /// Every stage finished.
    Completed,
    /// Ended by an error (the summary's `reason` says which).
    Failed,
    /// Stopped by a signal; `launch --resume` (or `coordinator --resume`) continues it.
    Interrupted,
}

impl JobStatus {
    /// The status as the record, the summary and the logs spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Running => "running",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Interrupted => "interrupted",
        }
    }

    /// What the job's end tells its workers: an interrupted job can be resumed, so its
    /// workers wait to rejoin.
    pub(crate) fn stop_kind(self) -> proto::StopKind {
        match self {
            JobStatus::Completed => proto::StopKind::Finished,
            JobStatus::Interrupted => proto::StopKind::Paused,
            JobStatus::Running | JobStatus::Failed => proto::StopKind::Failed,
        }
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_reads_and_writes_as_the_record_spells_it() {
        for s in [
            JobStatus::Running,
            JobStatus::Completed,
            JobStatus::Failed,
            JobStatus::Interrupted,
        ] {
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{s}\""));
            assert_eq!(serde_json::from_str::<JobStatus>(&json).unwrap(), s);
        }
        assert!(serde_json::from_str::<JobStatus>("\"done\"").is_err());
        assert_eq!(JobStatus::Interrupted.stop_kind(), proto::StopKind::Paused);
    }
}
