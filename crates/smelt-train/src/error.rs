//! Errors of the training layer.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, TrainError>;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] smelt_models::ModelError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the loss became {value} at step {step} (epoch {epoch}, batch {batch}); training stopped. \
         Lower the learning rate, or check the data of that batch"
    )]
    NonFiniteLoss {
        step: u64,
        epoch: usize,
        batch: usize,
        value: f32,
    },
    #[error(
        "the gradient norm became {value} at step {step} (epoch {epoch}, batch {batch}); \
         training stopped before the update. Lower the learning rate"
    )]
    NonFiniteGradient {
        step: u64,
        epoch: usize,
        batch: usize,
        value: f32,
    },
    #[error("{path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error("invalid training option `{field}`: {message}")]
    Config { field: String, message: String },
    #[error("{0}")]
    Task(String),
}

impl TrainError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TrainError::Io {
            path: path.into(),
            source,
        }
    }
}
