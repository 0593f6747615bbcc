//! Training checkpoints: the model in its own format, the optimizer moments and the loop's
//! position, written as one directory swapped into place atomically.

use crate::error::{Result, TrainError};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// Where the loop stands; everything else that decides what comes next (data order,
/// dropout masks) is derived from the seed and these counters.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    /// Epoch in progress (from 0).
    pub epoch: usize,
    /// Batches of `epoch` already consumed.
    pub batch_in_epoch: usize,
    /// Optimizer updates done.
    pub global_step: u64,
    /// Best validation score so far and the epoch (from 1) it came from.
    pub best_score: Option<f64>,
    pub best_epoch: Option<usize>,
    pub epochs_without_improvement: usize,
    /// Set once the run has ended (all epochs, or early stopping).
    pub finished: bool,
    /// Running sums behind the next train record and the epoch summary, so that a resumed
    /// run logs what an uninterrupted one would.
    pub window: LossWindow,
    pub epoch_window: LossWindow,
    /// Fingerprint of the settings that must not change across a resume.
    pub fingerprint: String,
}

/// Losses summed since the last record.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LossWindow {
    pub loss_sum: f64,
    pub batches: usize,
    pub examples: usize,
}

impl LossWindow {
    pub fn add(&mut self, loss: f64, examples: usize) {
        self.loss_sum += loss;
        self.batches += 1;
        self.examples += examples;
    }

    pub fn mean(&self) -> f64 {
        self.loss_sum / self.batches.max(1) as f64
    }
}

/// Reads the state of the checkpoint in `dir`.
pub fn read_state(dir: &Path) -> Result<TrainState> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io(&path, e))?;
    serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint {
        path,
        message: format!("not a valid trainer state: {e}"),
    })
}

/// Writes the state file into a checkpoint directory being filled.
pub fn write_state(dir: &Path, state: &TrainState) -> Result<()> {
    let json = serde_json::to_vec_pretty(state).map_err(|e| TrainError::Checkpoint {
        path: dir.join(STATE_FILE),
        message: e.to_string(),
    })?;
    smelt_models::fsutil::write_atomic(&dir.join(STATE_FILE), &json)?;
    Ok(())
}

/// The checkpoint directory of a run directory.
pub fn checkpoint_dir(out: &Path) -> PathBuf {
    out.join("checkpoint")
}
