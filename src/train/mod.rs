//! Training: AdamW, learning-rate schedules and the data-parallel step, one trainer for every
//! stage kind.

#![warn(missing_docs)]

pub mod checkpoint;
pub mod kind;
pub mod optim;
pub mod schedule;
pub mod step;
pub mod traced;
pub mod update;

pub use kind::{StageModel, StepStats, TaskStats};
pub use optim::{AdamW, AdamWConfig};
pub use schedule::{Decay, Schedule};
pub use step::{StepOptions, Trainer};
pub use traced::{CollectiveCall, CollectiveHook};
pub use update::UpdatePlace;
