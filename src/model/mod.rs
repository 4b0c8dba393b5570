//! The BERT model: configuration, fused kernels, parameters, encoder and heads, HF I/O.

pub mod attention;
pub mod bert;
pub mod config;
pub mod gemm;
pub mod heads;
pub mod hf;
pub mod linear;
pub mod norm;
pub mod ops;
pub mod params;
pub mod pretrain;
pub mod vmath;

pub use bert::{BertForPreTraining, BertModel, Precision, PretrainOutput};
pub use config::{BertConfig, Preset};
pub use heads::{task_specs, TaskHead, TaskModel, TaskOutput};
pub use params::{ParamSpec, ParamStore};
pub use pretrain::PretrainModel;
