//! smelt's training loop and its parts: AdamW with decoupled weight decay, learning-rate
//! schedules, gradient accumulation and clipping, checkpoints that resume exactly, metrics.

pub mod checkpoint;
pub mod error;
pub mod grads;
pub mod metrics;
pub mod optim;
pub mod progress;
pub mod schedule;
pub mod trainer;

pub use error::{Result, TrainError};
