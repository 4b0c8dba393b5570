//! The fused CPU kernels the model runs on (see README.md in this folder): each a candle
//! custom op with its own backward on the CPU, and the same computation composed from
//! differentiable candle ops on other devices.

pub mod attention;
pub mod gemm;
pub mod linear;
pub mod norm;
pub mod ops;
pub mod vmath;
