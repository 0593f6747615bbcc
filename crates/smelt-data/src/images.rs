//! Labelled image collections: a folder with one sub-folder per class, a CSV of `path,label`,
//! an IDX pair set (MNIST layout), or loose image files. Images are decoded once (on worker
//! threads), kept in memory as bytes and shrunk so that their shorter side is at most
//! `max_side`; augmentation then works from these copies.

use crate::error::{DataError, Result};
use crate::idx;
use std::path::{Path, PathBuf};

/// A decoded image: `height x width x channels` bytes, row-major, channels 1 (gray) or 3 (RGB).
#[derive(Debug, Clone)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub pixels: Vec<u8>,
}

impl Image {
    pub fn new(width: usize, height: usize, channels: usize, pixels: Vec<u8>) -> Self {
        debug_assert_eq!(pixels.len(), width * height * channels);
        Self {
            width,
            height,
            channels,
            pixels,
        }
    }
}

/// Which split of an IDX folder to read; other sources have a single split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// `train-*`: for training and pretraining.
    Train,
    /// `t10k-*`: for evaluation.
    Test,
}

/// What to do with an image that cannot be read or decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnBadImage {
    /// Report it (path and reason) and go on without it.
    Skip,
    /// Stop with an error naming it.
    Fail,
}

/// How to read a collection.
#[derive(Debug, Clone)]
pub struct ReadImages {
    pub split: Split,
    pub on_bad: OnBadImage,
    /// Shrink larger images so that their shorter side is this many pixels.
    pub max_side: usize,
    /// Decoding threads.
    pub workers: usize,
}

impl Default for ReadImages {
    fn default() -> Self {
        Self {
            split: Split::Train,
            on_bad: OnBadImage::Fail,
            max_side: 256,
            workers: 2,
        }
    }
}

/// Images with their labels (empty when the source has none).
#[derive(Debug, Clone)]
pub struct ImageSet {
    pub source: PathBuf,
    pub images: Vec<Image>,
    /// Where each image came from, for reports (a path, or `file#index` for IDX).
    pub names: Vec<String>,
    /// One label per image, or none at all.
    pub labels: Vec<String>,
    /// Unreadable images that were skipped, with the reason.
    pub skipped: Vec<(String, String)>,
}

/// File extensions decoded from image folders and CSVs.
pub const IMAGE_EXTENSIONS: [&str; 5] = ["png", "jpg", "jpeg", "bmp", "webp"];

fn bad(path: &Path, message: impl Into<String>) -> DataError {
    DataError::Invalid(format!("{}: {}", path.display(), message.into()))
}

fn is_image_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

impl ImageSet {
    /// Reads a collection: an IDX folder, a folder of class folders, or a `.csv`.
    pub fn read(path: &Path, options: &ReadImages) -> Result<Self> {
        if idx::is_idx_dir(path) {
            return Self::read_idx(path, options.split);
        }
        if path.is_dir() {
            return Self::read_folder(path, options);
        }
        let is_csv = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
        if is_csv {
            return Self::read_csv(path, options);
        }
        if !path.exists() {
            return Err(bad(path, "no such file or folder"));
        }
        Err(bad(
            path,
            "expected a folder of class folders, a folder with IDX files \
             (train-images-idx3-ubyte[.gz] ...), or a CSV with `path` and `label` columns",
        ))
    }

    fn read_idx(dir: &Path, split: Split) -> Result<Self> {
        let prefix = match split {
            Split::Train => "train",
            Split::Test => "t10k",
        };
        let data = idx::read_split(dir, prefix)?;
        if data.images.count == 0 || data.images.rows == 0 || data.images.cols == 0 {
            return Err(bad(
                dir,
                format!("the {prefix} split holds no images (or images of zero size)"),
            ));
        }
        let (rows, cols) = (data.images.rows, data.images.cols);
        let images = (0..data.images.count)
            .map(|i| Image::new(cols, rows, 1, data.images.image(i).to_vec()))
            .collect();
        let names = (0..data.images.count)
            .map(|i| format!("{}/{prefix}#{i}", dir.display()))
            .collect();
        Ok(Self {
            source: dir.to_path_buf(),
            images,
            names,
            labels: data.labels.iter().map(|l| l.to_string()).collect(),
            skipped: Vec::new(),
        })
    }

    fn read_folder(dir: &Path, options: &ReadImages) -> Result<Self> {
        let mut classes = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
            let entry = entry.map_err(|e| DataError::io(dir, e))?;
            if entry.path().is_dir() {
                classes.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        classes.sort();
        if classes.is_empty() {
            return Err(bad(
                dir,
                "no class folders: expected one sub-folder of images per class",
            ));
        }
        let mut files = Vec::new();
        let mut ignored = 0usize;
        for class in &classes {
            let folder = dir.join(class);
            let mut paths: Vec<PathBuf> = std::fs::read_dir(&folder)
                .map_err(|e| DataError::io(&folder, e))?
                .map(|e| e.map(|e| e.path()).map_err(|e| DataError::io(&folder, e)))
                .collect::<Result<_>>()?;
            paths.sort();
            for path in paths {
                if is_image_file(&path) {
                    files.push((path, class.clone()));
                } else if path.is_file() {
                    ignored += 1;
                }
            }
        }
        if ignored > 0 {
            tracing::warn!(
                "{}: ignored {ignored} files without an image extension ({})",
                dir.display(),
                IMAGE_EXTENSIONS.join(", ")
            );
        }
        if files.is_empty() {
            return Err(bad(dir, "the class folders hold no image files"));
        }
        Self::decode_all(dir, files, options)
    }

    fn read_csv(path: &Path, options: &ReadImages) -> Result<Self> {
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(true)
            .from_path(path)
            .map_err(|e| bad(path, e.to_string()))?;
        let headers = reader
            .headers()
            .map_err(|e| bad(path, e.to_string()))?
            .clone();
        let column = |name: &str| {
            headers
                .iter()
                .position(|h| h.trim() == name)
                .ok_or_else(|| DataError::MissingColumn {
                    path: path.to_path_buf(),
                    column: name.into(),
                    available: headers.iter().collect::<Vec<_>>().join(", "),
                })
        };
        let path_col = column("path")?;
        let label_col = column("label")?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut files = Vec::new();
        for (i, record) in reader.records().enumerate() {
            let line = i + 2;
            let record = record.map_err(|e| DataError::Line {
                path: path.to_path_buf(),
                line,
                message: e.to_string(),
            })?;
            let field = |c: usize, what: &str| {
                record
                    .get(c)
                    .map(str::trim)
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| DataError::Line {
                        path: path.to_path_buf(),
                        line,
                        message: format!("empty `{what}`"),
                    })
            };
            let file = base.join(field(path_col, "path")?);
            files.push((file, field(label_col, "label")?.to_string()));
        }
        if files.is_empty() {
            return Err(DataError::Empty {
                path: path.to_path_buf(),
            });
        }
        Self::decode_all(path, files, options)
    }

    /// Loose image files, without labels (for prediction).
    pub fn read_files(paths: &[PathBuf], options: &ReadImages) -> Result<Self> {
        let files = paths.iter().map(|p| (p.clone(), String::new())).collect();
        let mut set = Self::decode_all(Path::new("."), files, options)?;
        set.labels.clear();
        Ok(set)
    }

    fn decode_all(
        source: &Path,
        files: Vec<(PathBuf, String)>,
        options: &ReadImages,
    ) -> Result<Self> {
        let workers = options.workers.max(1).min(files.len().max(1));
        let decoded: Vec<std::result::Result<Image, String>> = std::thread::scope(|scope| {
            let chunk = files.len().div_ceil(workers);
            let handles: Vec<_> = files
                .chunks(chunk.max(1))
                .map(|part| {
                    scope.spawn(move || {
                        part.iter()
                            .map(|(p, _)| decode(p, options.max_side))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_default())
                .collect()
        });
        if decoded.len() != files.len() {
            return Err(bad(source, "an image decoding thread failed"));
        }
        let mut set = Self {
            source: source.to_path_buf(),
            images: Vec::with_capacity(files.len()),
            names: Vec::with_capacity(files.len()),
            labels: Vec::with_capacity(files.len()),
            skipped: Vec::new(),
        };
        for ((path, label), image) in files.into_iter().zip(decoded) {
            match image {
                Ok(image) => {
                    set.images.push(image);
                    set.names.push(path.display().to_string());
                    set.labels.push(label);
                }
                Err(reason) => match options.on_bad {
                    OnBadImage::Fail => {
                        return Err(bad(
                            &path,
                            format!("{reason} (pass --on-bad-image skip to leave it out)"),
                        ))
                    }
                    OnBadImage::Skip => {
                        tracing::warn!("{}: skipped: {reason}", path.display());
                        set.skipped.push((path.display().to_string(), reason));
                    }
                },
            }
        }
        if set.images.is_empty() {
            return Err(bad(source, "no readable images"));
        }
        Ok(set)
    }

    pub fn len(&self) -> usize {
        self.images.len()
    }

    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// The distinct labels, sorted (numerically when every label is an integer).
    pub fn classes(&self) -> Vec<String> {
        let mut classes: Vec<String> = self.labels.clone();
        classes.sort();
        classes.dedup();
        if classes.iter().all(|c| c.parse::<i64>().is_ok()) {
            classes.sort_by_key(|c| c.parse::<i64>().unwrap_or_default());
        }
        classes
    }

    /// Label indices into `classes`; a label outside them is an error naming the image.
    pub fn label_indices(&self, classes: &[String]) -> Result<Vec<usize>> {
        if self.labels.is_empty() {
            return Err(bad(&self.source, "these images have no labels"));
        }
        self.labels
            .iter()
            .zip(&self.names)
            .map(|(label, name)| {
                classes.iter().position(|c| c == label).ok_or_else(|| {
                    DataError::Invalid(format!(
                        "{name}: label `{label}` is not one of the model's classes ({})",
                        classes.join(", ")
                    ))
                })
            })
            .collect()
    }

    /// The images at `indices`, in that order.
    pub fn subset(&self, indices: &[usize]) -> Self {
        Self {
            source: self.source.clone(),
            images: indices.iter().map(|&i| self.images[i].clone()).collect(),
            names: indices.iter().map(|&i| self.names[i].clone()).collect(),
            labels: if self.labels.is_empty() {
                Vec::new()
            } else {
                indices.iter().map(|&i| self.labels[i].clone()).collect()
            },
            skipped: Vec::new(),
        }
    }
}

/// A seeded class-balanced sample of `fraction` of the items (at least one per class).
pub fn stratified_sample(labels: &[usize], fraction: f64, seed: u64) -> Vec<usize> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let classes = labels.iter().copied().max().map_or(0, |m| m + 1);
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); classes];
    for (i, &l) in labels.iter().enumerate() {
        by_class[l].push(i);
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut picked = Vec::new();
    for members in &mut by_class {
        if members.is_empty() {
            continue;
        }
        members.shuffle(&mut rng);
        let n = ((members.len() as f64 * fraction).round() as usize).clamp(1, members.len());
        picked.extend_from_slice(&members[..n]);
    }
    picked.sort_unstable();
    picked
}

/// Decodes one file, shrinking it so that its shorter side is at most `max_side`.
pub fn decode(path: &Path, max_side: usize) -> std::result::Result<Image, String> {
    let reader = image::ImageReader::open(path)
        .map_err(|e| format!("cannot open: {e}"))?
        .with_guessed_format()
        .map_err(|e| format!("cannot read: {e}"))?;
    let decoded = reader
        .decode()
        .map_err(|e| format!("not a readable image: {e}"))?;
    let (w, h) = (decoded.width() as usize, decoded.height() as usize);
    if w == 0 || h == 0 {
        return Err("the image is empty".into());
    }
    let gray = !decoded.color().has_color();
    let shorter = w.min(h);
    let decoded = if shorter > max_side {
        let scale = max_side as f64 / shorter as f64;
        let nw = ((w as f64 * scale).round() as u32).max(1);
        let nh = ((h as f64 * scale).round() as u32).max(1);
        decoded.resize_exact(nw, nh, image::imageops::FilterType::Triangle)
    } else {
        decoded
    };
    let (w, h) = (decoded.width() as usize, decoded.height() as usize);
    Ok(if gray {
        Image::new(w, h, 1, decoded.into_luma8().into_raw())
    } else {
        Image::new(w, h, 3, decoded.into_rgb8().into_raw())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_png(path: &Path, w: u32, h: u32, seed: u8) {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x as u8).wrapping_mul(seed), y as u8, seed])
        });
        img.save(path).unwrap();
    }

    #[test]
    fn folders_read_with_classes_and_bad_files_reported_or_skipped() {
        let dir = tempfile::tempdir().unwrap();
        for (class, n) in [("cat", 2), ("dog", 3)] {
            std::fs::create_dir(dir.path().join(class)).unwrap();
            for i in 0..n {
                write_png(
                    &dir.path().join(class).join(format!("{i}.png")),
                    40,
                    30,
                    i + 1,
                );
            }
        }
        std::fs::write(dir.path().join("dog/notes.txt"), "not an image").unwrap();
        let options = ReadImages {
            max_side: 20,
            ..ReadImages::default()
        };
        let set = ImageSet::read(dir.path(), &options).unwrap();
        assert_eq!(set.len(), 5);
        assert_eq!(set.classes(), vec!["cat", "dog"]);
        assert_eq!(
            set.label_indices(&set.classes()).unwrap(),
            vec![0, 0, 1, 1, 1]
        );
        // Shrunk so that the shorter side is 20: 40x30 -> 27x20.
        assert_eq!((set.images[0].width, set.images[0].height), (27, 20));
        assert_eq!(set.images[0].channels, 3);

        // A truncated PNG: fatal by default, named; skipped on request.
        let broken = dir.path().join("dog/broken.png");
        let bytes = std::fs::read(dir.path().join("dog/0.png")).unwrap();
        std::fs::write(&broken, &bytes[..bytes.len() / 2]).unwrap();
        let err = ImageSet::read(dir.path(), &options)
            .unwrap_err()
            .to_string();
        assert!(err.contains("broken.png"), "{err}");
        let skip = ReadImages {
            on_bad: OnBadImage::Skip,
            ..options
        };
        let set = ImageSet::read(dir.path(), &skip).unwrap();
        assert_eq!(set.len(), 5);
        assert_eq!(set.skipped.len(), 1);
        assert!(set.skipped[0].0.ends_with("broken.png"));
    }

    #[test]
    fn csv_paths_are_relative_to_the_file_and_lines_are_named() {
        let dir = tempfile::tempdir().unwrap();
        write_png(&dir.path().join("a.png"), 8, 8, 3);
        write_png(&dir.path().join("b.png"), 8, 8, 5);
        let csv = dir.path().join("list.csv");
        std::fs::write(&csv, "path,label\na.png,shoe\nb.png,bag\n").unwrap();
        let set = ImageSet::read(&csv, &ReadImages::default()).unwrap();
        assert_eq!(set.labels, vec!["shoe", "bag"]);
        assert_eq!(set.classes(), vec!["bag", "shoe"]);

        std::fs::write(&csv, "path,label\na.png,shoe\nb.png,\n").unwrap();
        let err = ImageSet::read(&csv, &ReadImages::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 3") && err.contains("label"), "{err}");
        std::fs::write(&csv, "file,label\na.png,shoe\n").unwrap();
        let err = ImageSet::read(&csv, &ReadImages::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("no column `path`"), "{err}");
        std::fs::write(&csv, "path,label\nmissing.png,shoe\n").unwrap();
        let err = ImageSet::read(&csv, &ReadImages::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("missing.png") && err.contains("cannot open"),
            "{err}"
        );
    }

    #[test]
    fn stratified_samples_keep_every_class_in_proportion() {
        let labels: Vec<usize> = (0..1000).map(|i| i % 4).collect();
        let picked = stratified_sample(&labels, 0.1, 7);
        assert_eq!(picked.len(), 100);
        for c in 0..4 {
            assert_eq!(picked.iter().filter(|&&i| labels[i] == c).count(), 25);
        }
        assert_eq!(picked, stratified_sample(&labels, 0.1, 7));
        assert_ne!(picked, stratified_sample(&labels, 0.1, 8));
    }
}
