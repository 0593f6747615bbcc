//! What every training command does with its `--out` directory and its resume fingerprint.

use crate::error::{Result, TaskError};
use std::path::Path;

/// FNV-1a's offset basis: the start of a [`fnv1a`] chain.
pub(crate) const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

/// Folds `bytes` into the FNV-1a hash `h`.
pub(crate) fn fnv1a(h: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(h, |h, b| (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// Creates `out`, refusing one that already holds a run unless `resume` is set.
pub(crate) fn prepare_out(out: &Path, resume: bool) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| smelt_models::ModelError::io(out, e))?;
    let checkpoint = smelt_train::checkpoint::checkpoint_dir(out);
    if !resume && smelt_models::fsutil::recover_dir(&checkpoint).is_some() {
        return Err(TaskError::Invalid(format!(
            "{} already holds a training run; pass --resume to continue it, or choose another --out",
            out.display()
        )));
    }
    Ok(())
}
