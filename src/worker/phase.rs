//! What a rank is doing, as its progress reports (and so the coordinator's stall and failure
//! messages) name it: one spelling for each phase.

use std::fmt;

use crate::train::CollectiveCall;

/// A rank's phase within its assignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    ConnectingRing,
    ConnectingNccl,
    PreparingData,
    InitialisingModel,
    RestoringCheckpoint,
    /// Between collectives of a step (data, forward, backward, optimiser).
    Training,
    /// Inside a collective call of a step: a stall there names the call.
    Collective(CollectiveCall),
    Evaluating,
    Checkpoint,
    Finishing,
    Done,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Phase::ConnectingRing => "connecting ring",
            Phase::ConnectingNccl => "connecting NCCL",
            Phase::PreparingData => "preparing data",
            Phase::InitialisingModel => "initialising model",
            Phase::RestoringCheckpoint => "restoring checkpoint",
            Phase::Training => "training",
            Phase::Collective(c) => {
                return write!(
                    f,
                    "{} {} of step {} ({} floats)",
                    c.what, c.index, c.step, c.floats
                )
            }
            Phase::Evaluating => "evaluating",
            Phase::Checkpoint => "checkpoint",
            Phase::Finishing => "finishing",
            Phase::Done => "done",
        };
        f.write_str(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_collective_phase_names_the_call() {
        let c = CollectiveCall {
            what: "all-reduce",
            step: 41,
            index: 3,
            floats: 6553600,
            tensors: false,
        };
        assert_eq!(
            Phase::Collective(c).to_string(),
            "all-reduce 3 of step 41 (6553600 floats)"
        );
        assert_eq!(Phase::PreparingData.to_string(), "preparing data");
    }
}
