//! IDX files, the MNIST / Fashion-MNIST layout: a big-endian header (two zero bytes, the
//! element type, the number of dimensions, then each dimension as a u32) followed by the
//! values. Images are `[count, rows, cols]` unsigned bytes, labels `[count]`. Files may be
//! gzipped (detected by their first bytes, not their name).

use crate::error::{DataError, Result};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Grayscale images stored row-major, one byte per pixel.
#[derive(Debug, Clone)]
pub struct IdxImages {
    pub count: usize,
    pub rows: usize,
    pub cols: usize,
    pub pixels: Vec<u8>,
}

impl IdxImages {
    /// The pixels of image `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.rows * self.cols;
        &self.pixels[i * n..(i + 1) * n]
    }
}

/// Images with their labels: one split of an IDX data set.
#[derive(Debug, Clone)]
pub struct IdxSplit {
    pub images: IdxImages,
    pub labels: Vec<u8>,
}

fn bad(path: &Path, message: impl Into<String>) -> DataError {
    DataError::Invalid(format!("{}: {}", path.display(), message.into()))
}

/// The bytes of a file, gunzipped when it starts with the gzip magic.
fn contents(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| bad(path, format!("not a valid gzip file: {e}")))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parses the header: `(dimensions, offset of the data)`; the element type must be
/// unsigned bytes (0x08) and the dimension count `expected_dims`.
fn header(bytes: &[u8], expected_dims: usize, path: &Path) -> Result<(Vec<usize>, usize)> {
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(bad(
            path,
            "not an IDX file (it must start with two zero bytes, a type byte and a dimension count)",
        ));
    }
    if bytes[2] != 0x08 {
        return Err(bad(
            path,
            format!(
                "IDX element type 0x{:02x}; smelt reads unsigned bytes (0x08)",
                bytes[2]
            ),
        ));
    }
    let dims = bytes[3] as usize;
    if dims != expected_dims {
        return Err(bad(
            path,
            format!("{dims} dimensions, expected {expected_dims} (images: 3, labels: 1)"),
        ));
    }
    let start = 4 + 4 * dims;
    if bytes.len() < start {
        return Err(bad(path, "truncated header"));
    }
    let shape: Vec<usize> = (0..dims)
        .map(|i| {
            let b = &bytes[4 + 4 * i..8 + 4 * i];
            u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize
        })
        .collect();
    let expected = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad(path, format!("dimensions {shape:?} overflow")))?;
    let found = bytes.len() - start;
    if found != expected {
        return Err(bad(
            path,
            format!(
                "the header announces {shape:?} = {expected} values but the file holds {found} \
                 (truncated or not this layout)"
            ),
        ));
    }
    Ok((shape, start))
}

/// Reads an images file (`*-images-idx3-ubyte[.gz]`).
pub fn read_images(path: &Path) -> Result<IdxImages> {
    let bytes = contents(path)?;
    let (shape, start) = header(&bytes, 3, path)?;
    if shape[1] == 0 || shape[2] == 0 {
        return Err(bad(
            path,
            format!("images of {}x{} pixels", shape[1], shape[2]),
        ));
    }
    Ok(IdxImages {
        count: shape[0],
        rows: shape[1],
        cols: shape[2],
        pixels: bytes[start..].to_vec(),
    })
}

/// Reads a labels file (`*-labels-idx1-ubyte[.gz]`).
pub fn read_labels(path: &Path) -> Result<Vec<u8>> {
    let bytes = contents(path)?;
    let (_, start) = header(&bytes, 1, path)?;
    Ok(bytes[start..].to_vec())
}

/// The file of `prefix` (`train` or `t10k`) and `kind` (`images` or `labels`) in `dir`,
/// gzipped or not.
fn find(dir: &Path, prefix: &str, kind: &str) -> Result<PathBuf> {
    let dims = if kind == "images" { 3 } else { 1 };
    let stem = format!("{prefix}-{kind}-idx{dims}-ubyte");
    for name in [format!("{stem}.gz"), stem.clone()] {
        let p = dir.join(&name);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(bad(
        dir,
        format!("no {stem} or {stem}.gz (an IDX folder holds train-* and t10k-* pairs)"),
    ))
}

/// Whether `dir` holds an IDX pair set (`train-images-idx3-ubyte[.gz]` at least).
pub fn is_idx_dir(dir: &Path) -> bool {
    dir.is_dir() && find(dir, "train", "images").is_ok()
}

/// One split of an IDX folder: `train` (for training and pretraining) or `t10k` (the test
/// split, for evaluation). Images and labels must agree in number.
pub fn read_split(dir: &Path, prefix: &str) -> Result<IdxSplit> {
    let images_path = find(dir, prefix, "images")?;
    let labels_path = find(dir, prefix, "labels")?;
    let images = read_images(&images_path)?;
    let labels = read_labels(&labels_path)?;
    if labels.len() != images.count {
        return Err(bad(
            &labels_path,
            format!(
                "{} labels for the {} images of {}",
                labels.len(),
                images.count,
                images_path.display()
            ),
        ));
    }
    Ok(IdxSplit { images, labels })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fashion_mnist() {
        let dir = crate::assets::locate("data/fashion-mnist").expect("fashion-mnist asset");
        assert!(is_idx_dir(&dir));
        let test = read_split(&dir, "t10k").unwrap();
        assert_eq!(
            (test.images.count, test.images.rows, test.images.cols),
            (10_000, 28, 28)
        );
        let mut counts = [0usize; 10];
        for &l in &test.labels {
            counts[l as usize] += 1;
        }
        // Fashion-MNIST's test split is balanced: 1,000 images per class.
        assert_eq!(counts, [1000; 10]);
        assert!(test.images.image(0).iter().any(|&p| p > 0));
    }

    #[test]
    fn damaged_files_are_named() {
        let tmp = tempfile::tempdir().unwrap();
        let write = |name: &str, bytes: &[u8]| {
            let p = tmp.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        };
        let mut good = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 2];
        good.extend([1u8; 8]);
        assert_eq!(read_images(&write("ok", &good)).unwrap().count, 2);
        let cases: [(&str, Vec<u8>, &str); 5] = [
            ("short", good[..20].to_vec(), "holds 4"),
            ("png", b"\x89PNG\r\n".to_vec(), "not an IDX file"),
            (
                "float",
                vec![0, 0, 0x0d, 3, 0, 0, 0, 1],
                "element type 0x0d",
            ),
            (
                "dims",
                vec![0, 0, 8, 1, 0, 0, 0, 1, 7],
                "1 dimensions, expected 3",
            ),
            ("gz", vec![0x1f, 0x8b, 8, 0, 1, 2], "not a valid gzip file"),
        ];
        for (name, bytes, needle) in cases {
            let e = read_images(&write(name, &bytes)).unwrap_err().to_string();
            assert!(e.contains(needle) && e.contains(name), "{name}: {e}");
        }
        let e = read_split(tmp.path(), "train").unwrap_err().to_string();
        assert!(e.contains("no train-images-idx3-ubyte"), "{e}");
    }
}
