//! Atomic file and directory writes: a reader never sees a half-written output.

use crate::error::{ModelError, Result};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

fn temp_sibling(path: &Path, tag: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{tag}-{}", std::process::id()))
}

/// Writes `bytes` to `path` through a temporary sibling file, fsynced, then renamed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() {
            fs::create_dir_all(parent).map_err(|e| ModelError::io(parent, e))?;
        }
    }
    let tmp = temp_sibling(path, "tmp");
    let result = (|| -> std::io::Result<()> {
        let mut file = fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(ModelError::io(path, e));
    }
    Ok(())
}

/// Fills a fresh directory with `fill`, then swaps it into place at `dir`.
///
/// The previous content of `dir`, if any, is kept as `dir.old` until the swap has
/// happened, so a crash at any point leaves either the old or the new directory complete.
pub fn write_dir_atomic(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let staging = temp_sibling(dir, "staging");
    if staging.exists() {
        fs::remove_dir_all(&staging).map_err(|e| ModelError::io(&staging, e))?;
    }
    fs::create_dir_all(&staging).map_err(|e| ModelError::io(&staging, e))?;
    if let Err(e) = fill(&staging) {
        let _ = fs::remove_dir_all(&staging);
        return Err(e);
    }
    let old = old_dir(dir);
    if dir.exists() {
        if old.exists() {
            fs::remove_dir_all(&old).map_err(|e| ModelError::io(&old, e))?;
        }
        fs::rename(dir, &old).map_err(|e| ModelError::io(dir, e))?;
    }
    fs::rename(&staging, dir).map_err(|e| ModelError::io(dir, e))?;
    if old.exists() {
        fs::remove_dir_all(&old).map_err(|e| ModelError::io(&old, e))?;
    }
    Ok(())
}

/// Where [`write_dir_atomic`] parks the previous version of `dir` during a swap.
pub fn old_dir(dir: &Path) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dir.with_file_name(format!("{name}.old"))
}

/// Returns `dir` if it exists, or the parked previous version left by an interrupted swap.
pub fn recover_dir(dir: &Path) -> Option<PathBuf> {
    if dir.is_dir() {
        return Some(dir.to_path_buf());
    }
    let old = old_dir(dir);
    old.is_dir().then_some(old)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_dir_replaces_content_and_leaves_no_staging() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("ckpt");
        write_dir_atomic(&dir, |d| write_atomic(&d.join("a"), b"1")).unwrap();
        write_dir_atomic(&dir, |d| write_atomic(&d.join("b"), b"2")).unwrap();
        assert!(!dir.join("a").exists());
        assert_eq!(fs::read(dir.join("b")).unwrap(), b"2");
        let names: Vec<_> = fs::read_dir(root.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "only the final directory remains");
    }

    #[test]
    fn failed_fill_keeps_previous_directory() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("ckpt");
        write_dir_atomic(&dir, |d| write_atomic(&d.join("a"), b"1")).unwrap();
        let err = write_dir_atomic(&dir, |_| Err(ModelError::Unsupported("boom".into())));
        assert!(err.is_err());
        assert_eq!(fs::read(dir.join("a")).unwrap(), b"1");
    }
}
