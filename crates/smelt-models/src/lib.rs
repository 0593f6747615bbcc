//! smelt's tensor and model layer: weight files, devices and Transformer models written
//! against burn's backend-agnostic tensors.

#[macro_use]
mod simd;

pub mod bert;
pub mod causal;
pub mod device;
pub mod dropout;
pub mod error;
pub mod fsutil;
pub mod fused;
pub mod fused_linear;
pub mod fused_optim;
pub mod gguf;
pub mod host_decode;
pub mod init;
pub mod layers;
pub mod lora;
pub mod qop;
pub mod quant;
pub mod team;
pub mod vit;
pub mod weights;

pub use burn;
pub use error::{ModelError, Result};
