//! Errors of the model layer. Every variant names the file or tensor it is about.

use std::path::PathBuf;

/// Result alias of the model layer.
pub type Result<T> = std::result::Result<T, ModelError>;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        // Not marked as the error's source: the message already includes it, and `{:#}`
        // would print it twice.
        source: std::io::Error,
    },
    #[error("{path}: not a valid safetensors file: {message}")]
    BadWeights { path: PathBuf, message: String },
    #[error("{path}: not a valid GGUF file: {message}")]
    BadGguf { path: PathBuf, message: String },
    #[error(
        "{path}: this is a pickle checkpoint; smelt never executes pickle. Convert it to \
         model.safetensors (for example with `transformers`: \
         `AutoModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`)"
    )]
    Pickle { path: PathBuf },
    #[error("{dir}: no model.safetensors in this model directory")]
    NoWeights { dir: PathBuf },
    #[error("{path}: tensor `{name}` is missing")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor `{name}` has shape {found:?}, but the config implies {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{path}: tensor `{name}` has dtype {dtype}, expected F32, F16 or BF16")]
    UnsupportedDtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },
    #[error("{path}: field `{field}`: {message}")]
    Config {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error("{path}: {message}")]
    Json { path: PathBuf, message: String },
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("unknown device `{0}`: expected `cpu`{1}")]
    UnknownDevice(String, &'static str),
    #[error("tensor readback failed: {0}")]
    Readback(String),
}

impl ModelError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            source,
        }
    }
}
