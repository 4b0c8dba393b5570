//! The BERT model: configuration, parameters, encoder and heads, HF I/O; the fused CPU
//! kernels they run on are in [`kernels`].

#![warn(missing_docs)]

pub mod bert;
pub mod config;
pub mod dropout;
pub mod heads;
pub mod hf;
pub mod kernels;
pub mod params;
pub mod pretrain;

pub use bert::{BertForPreTraining, BertModel, Precision, PretrainOutput};
pub use config::{BertConfig, Preset};
pub use heads::{task_specs, TaskHead, TaskModel, TaskOutput};
pub use params::{ParamSpec, ParamStore};
pub use pretrain::PretrainModel;
