//! smelt's tasks: what a user runs, built from the model, data and training layers.

pub mod allocator;
pub mod classify;
pub mod error;
pub mod lm;
pub mod lm_train;
pub mod model_dir;
mod run_dir;
pub mod vision;

pub use error::{Result, TaskError};
