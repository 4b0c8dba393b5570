//! Training: AdamW, learning-rate schedules and the data-parallel step.

pub mod checkpoint;
pub mod optim;
pub mod schedule;
pub mod step;
pub mod update;

pub use optim::{AdamW, AdamWConfig};
pub use schedule::{Decay, Schedule};
pub use step::{StepOptions, StepStats, Trainer};
pub use update::{UpdatePlace, Updater};
