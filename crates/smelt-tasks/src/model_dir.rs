//! A Hugging Face model directory: `config.json`, `model.safetensors`, tokenizer files.

use smelt_models::{ModelError, Result};
use std::path::{Path, PathBuf};

/// Tokenizer files copied next to a saved model when the source has them.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// The checked paths of a model directory.
#[derive(Debug, Clone)]
pub struct ModelDir {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub weights: PathBuf,
}

impl ModelDir {
    /// Checks that `dir` holds `config.json` and `model.safetensors`. A directory with only
    /// a pickle checkpoint is refused with an explanation.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(ModelError::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "model directory not found"),
            ));
        }
        let config = dir.join("config.json");
        if !config.is_file() {
            return Err(ModelError::io(
                &config,
                std::io::Error::new(std::io::ErrorKind::NotFound, "missing config.json"),
            ));
        }
        let weights = dir.join("model.safetensors");
        if !weights.is_file() {
            for pickle in ["pytorch_model.bin", "model.bin", "pytorch_model.pt"] {
                if dir.join(pickle).is_file() {
                    return Err(ModelError::Pickle {
                        path: dir.join(pickle),
                    });
                }
            }
            return Err(ModelError::NoWeights {
                dir: dir.to_path_buf(),
            });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            weights,
        })
    }

    /// Copies the tokenizer files of this directory into `dest`.
    pub fn copy_tokenizer(&self, dest: &Path) -> Result<()> {
        for name in TOKENIZER_FILES {
            let src = self.dir.join(name);
            if src.is_file() {
                let bytes = std::fs::read(&src).map_err(|e| ModelError::io(&src, e))?;
                smelt_models::fsutil::write_atomic(&dest.join(name), &bytes)?;
            }
        }
        Ok(())
    }
}
