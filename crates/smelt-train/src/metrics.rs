//! Classification metrics and the `metrics.jsonl` log.

use crate::error::{Result, TrainError};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Accuracy, macro-F1, per-class precision and recall, and the confusion matrix.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClassMetrics {
    pub accuracy: f64,
    pub macro_f1: f64,
    pub precision: Vec<f64>,
    pub recall: Vec<f64>,
    pub f1: Vec<f64>,
    /// `confusion_matrix[true][predicted]`
    pub confusion_matrix: Vec<Vec<u64>>,
    pub support: Vec<u64>,
}

impl ClassMetrics {
    /// Computes the metrics of `predicted` against `truth` for `classes` classes. A class
    /// with no prediction (or no example) has precision (or recall) 0, as scikit-learn's
    /// `zero_division=0`.
    pub fn compute(truth: &[usize], predicted: &[usize], classes: usize) -> Self {
        let mut confusion = vec![vec![0u64; classes]; classes];
        for (&t, &p) in truth.iter().zip(predicted) {
            confusion[t][p] += 1;
        }
        let correct: u64 = (0..classes).map(|c| confusion[c][c]).sum();
        let total = truth.len().max(1) as f64;
        let mut precision = Vec::with_capacity(classes);
        let mut recall = Vec::with_capacity(classes);
        let mut f1 = Vec::with_capacity(classes);
        let mut support = Vec::with_capacity(classes);
        for (c, row) in confusion.iter().enumerate() {
            let tp = row[c] as f64;
            let predicted_c: u64 = (0..classes).map(|t| confusion[t][c]).sum();
            let actual_c: u64 = row.iter().sum();
            let p = if predicted_c > 0 {
                tp / predicted_c as f64
            } else {
                0.0
            };
            let r = if actual_c > 0 {
                tp / actual_c as f64
            } else {
                0.0
            };
            precision.push(p);
            recall.push(r);
            f1.push(if p + r > 0.0 {
                2.0 * p * r / (p + r)
            } else {
                0.0
            });
            support.push(actual_c);
        }
        let macro_f1 = f1.iter().sum::<f64>() / classes.max(1) as f64;
        Self {
            accuracy: correct as f64 / total,
            macro_f1,
            precision,
            recall,
            f1,
            confusion_matrix: confusion,
            support,
        }
    }
}

/// Appends JSON objects, one per line, to `metrics.jsonl`; each line is flushed as written.
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    /// Opens the log. On a fresh run the file is truncated; on resume, lines after
    /// `keep_up_to_step` (written after the checkpoint the run resumes from) are dropped.
    pub fn open(path: &Path, keep_up_to_step: Option<u64>) -> Result<Self> {
        let kept = match keep_up_to_step {
            None => String::new(),
            Some(step) => match std::fs::read_to_string(path) {
                Ok(text) => text,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
                Err(e) => return Err(TrainError::io(path, e)),
            }
            .lines()
            .filter(|line| {
                serde_json::from_str::<serde_json::Value>(line)
                    .ok()
                    .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                    .is_some_and(|s| s <= step)
            })
            .map(|l| format!("{l}\n"))
            .collect(),
        };
        smelt_models::fsutil::write_atomic(path, kept.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| TrainError::io(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn write(&mut self, record: &serde_json::Value) -> Result<()> {
        let line = format!("{record}\n");
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.flush())
            .map_err(|e| TrainError::io(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_match_hand_computed_values() {
        // truth:     0 0 0 1 1 2
        // predicted: 0 0 1 1 2 2
        let m = ClassMetrics::compute(&[0, 0, 0, 1, 1, 2], &[0, 0, 1, 1, 2, 2], 3);
        assert!((m.accuracy - 4.0 / 6.0).abs() < 1e-12);
        assert_eq!(
            m.confusion_matrix,
            vec![vec![2, 1, 0], vec![0, 1, 1], vec![0, 0, 1]]
        );
        assert_eq!(m.precision, vec![1.0, 0.5, 0.5]);
        assert!((m.recall[0] - 2.0 / 3.0).abs() < 1e-12);
        let f1_0 = 2.0 * 1.0 * (2.0 / 3.0) / (1.0 + 2.0 / 3.0);
        let f1_1 = 0.5;
        let f1_2 = 2.0 * 0.5 * 1.0 / 1.5;
        assert!((m.macro_f1 - (f1_0 + f1_1 + f1_2) / 3.0).abs() < 1e-12);
    }
}
