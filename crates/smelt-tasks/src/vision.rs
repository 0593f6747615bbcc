//! Image classification with ViT (train, evaluate, predict), contrastive pretraining of the
//! encoder (SimCLR's NT-Xent over two augmented views) and linear probes of its features.

use crate::classify::{argmax, class_evaluation, metrics_record, score, softmax_row};
use crate::error::{Result, TaskError};
use crate::run_dir::{fnv1a, FNV_START};
use burn::module::Module;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use smelt_data::augment::{beta_symmetric, image_rng, prepare, Augment, Prefetcher, Preprocess};
use smelt_data::batch::{epoch_batches, Batching};
use smelt_data::images::{stratified_sample, ImageSet, OnBadImage, ReadImages, Split};
use smelt_models::fsutil::write_atomic;
use smelt_models::init::HostInit;
use smelt_models::layers::Dense;
use smelt_models::vit::{encoder_prefix, VitClassifier, VitConfig, VitModel, PRESETS};
use smelt_models::weights::{tensor_from_vec, tensor_to_vec, write_safetensors, WeightFile};
use smelt_models::ModelError;
use smelt_train::trainer::{self, Evaluation, Task, TrainConfig, TrainSummary};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

const CONFIG: &str = "config.json";
const WEIGHTS: &str = "model.safetensors";
const PREPROCESSOR: &str = "preprocessor_config.json";
const PROJECTION: &str = "projection_head.safetensors";
const NEGATIVES: &str = "negatives.safetensors";

/// The `[model]` table of a vision config file: a preset or explicit sizes, and the input.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// `tiny`, `small` or `base`; explicit sizes below override it.
    pub preset: Option<String>,
    pub image_size: Option<usize>,
    pub patch_size: Option<usize>,
    pub num_channels: Option<usize>,
    pub hidden_size: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub num_attention_heads: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub hidden_dropout_prob: Option<f64>,
    pub attention_probs_dropout_prob: Option<f64>,
}

/// The `[data]` table: normalisation statistics.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    pub image_mean: Option<Vec<f32>>,
    pub image_std: Option<Vec<f32>>,
}

/// A vision config file (TOML): `[model]`, `[data]` and `[augment]` tables, all optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VisionSpec {
    #[serde(default)]
    pub model: ModelSpec,
    #[serde(default)]
    pub data: DataSpec,
    pub augment: Option<Augment>,
}

impl VisionSpec {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let spec: Self = toml::from_str(&text)
            .map_err(|e| TaskError::Invalid(format!("{}: {e}", path.display())))?;
        if let Some(a) = &spec.augment {
            a.validate()
                .map_err(|e| TaskError::Invalid(format!("{}: [augment] {e}", path.display())))?;
        }
        Ok(spec)
    }

    /// The architecture for new training on `data`: sizes from the preset or the file, the
    /// input side and channels from the file or the images themselves.
    pub fn vit_config(&self, data: &ImageSet) -> Result<VitConfig> {
        let m = &self.model;
        let mut sizes = [128, 6, 4, 256];
        if let Some(name) = &m.preset {
            sizes = PRESETS
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, s)| *s)
                .ok_or_else(|| {
                    let names: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
                    TaskError::Invalid(format!(
                        "[model] preset `{name}` is unknown; expected one of {}",
                        names.join(", ")
                    ))
                })?;
        }
        for (slot, v) in sizes.iter_mut().zip([
            m.hidden_size,
            m.num_hidden_layers,
            m.num_attention_heads,
            m.intermediate_size,
        ]) {
            if let Some(v) = v {
                *slot = v;
            }
        }
        let first = &data.images[0];
        let same_square = data
            .images
            .iter()
            .all(|i| i.width == first.width && i.height == first.height)
            && first.width == first.height;
        let image_size = m.image_size.unwrap_or(if same_square && first.width <= 64 {
            first.width
        } else {
            224
        });
        let patch_size = m
            .patch_size
            .unwrap_or(if image_size <= 64 { 4 } else { 16 });
        let gray = data.images.iter().all(|i| i.channels == 1);
        let channels = m.num_channels.unwrap_or(if gray { 1 } else { 3 });
        let mut config = VitConfig::new(image_size, patch_size, channels, sizes)?;
        config.hidden_dropout_prob = m.hidden_dropout_prob.unwrap_or(0.0);
        config.attention_probs_dropout_prob = m.attention_probs_dropout_prob.unwrap_or(0.0);
        for p in [
            config.hidden_dropout_prob,
            config.attention_probs_dropout_prob,
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(TaskError::Invalid(format!(
                    "[model] dropout probabilities must be in [0, 1), found {p}"
                )));
            }
        }
        Ok(config)
    }

    /// Preprocessing for a new model of `config`.
    pub fn preprocess(&self, config: &VitConfig) -> Result<Preprocess> {
        let c = config.num_channels;
        let pre = Preprocess {
            size: config.image_size,
            channels: c,
            mean: self.data.image_mean.clone().unwrap_or(vec![0.5; c]),
            std: self.data.image_std.clone().unwrap_or(vec![0.5; c]),
        };
        pre.validate()
            .map_err(|e| TaskError::Invalid(format!("[data] {e}")))?;
        Ok(pre)
    }
}

/// Reads a `preprocessor_config.json` (the Hugging Face image processor's): the resize
/// target and normalisation. Without the file: the model's size, mean and std 0.5.
pub fn read_preprocess(dir: &Path, config: &VitConfig) -> Result<Preprocess> {
    let c = config.num_channels;
    let path = dir.join(PREPROCESSOR);
    let mut pre = Preprocess {
        size: config.image_size,
        channels: c,
        mean: vec![0.5; c],
        std: vec![0.5; c],
    };
    if !path.exists() {
        pre.validate()
            .map_err(|e| TaskError::Invalid(format!("{}: {e}", dir.display())))?;
        return Ok(pre);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    let value: Value = serde_json::from_str(&text).map_err(|e| ModelError::Json {
        path: path.clone(),
        message: format!("not valid JSON: {e}"),
    })?;
    let bad = |field: &str, message: String| {
        TaskError::Invalid(format!("{}: field `{field}`: {message}", path.display()))
    };
    // smelt always resizes and scales bytes by 1/255; a processor that does otherwise would
    // be silently misread.
    if value.get("do_resize").and_then(Value::as_bool) == Some(false) {
        return Err(bad("do_resize", "only `true` is supported".into()));
    }
    if value.get("do_rescale").and_then(Value::as_bool) == Some(false) {
        return Err(bad("do_rescale", "only `true` is supported".into()));
    }
    if let Some(f) = value.get("rescale_factor") {
        if f.as_f64().is_none_or(|f| (f - 1.0 / 255.0).abs() > 1e-9) {
            return Err(bad(
                "rescale_factor",
                format!("only 1/255 is supported, found {f}"),
            ));
        }
    }
    if let Some(size) = value.get("size") {
        let side = |k: &str| size.get(k).and_then(Value::as_u64);
        match (side("height"), side("width"), size.as_u64()) {
            (Some(h), Some(w), _) if h == w && h as usize == config.image_size => {}
            (None, None, Some(s)) if s as usize == config.image_size => {}
            _ => {
                return Err(bad(
                    "size",
                    format!(
                        "expected {{\"height\": {0}, \"width\": {0}}} (the model's image_size), \
                         found {size}",
                        config.image_size
                    ),
                ))
            }
        }
    }
    let stats = |field: &str| -> Result<Option<Vec<f32>>> {
        let Some(v) = value.get(field) else {
            return Ok(None);
        };
        let values: Option<Vec<f32>> = match v {
            Value::Array(a) => a.iter().map(|x| x.as_f64().map(|x| x as f32)).collect(),
            Value::Number(n) => n.as_f64().map(|x| vec![x as f32]),
            _ => None,
        };
        let mut values = values
            .filter(|v| !v.is_empty())
            .ok_or_else(|| bad(field, format!("expected a list of numbers, found {v}")))?;
        // A gray model saved with one statistic repeated for three channels.
        if values.len() != c && values.iter().all(|x| *x == values[0]) {
            values = vec![values[0]; c];
        }
        if values.len() != c {
            return Err(bad(
                field,
                format!("{} values for a {c}-channel model", values.len()),
            ));
        }
        Ok(Some(values))
    };
    if value.get("do_normalize").and_then(Value::as_bool) != Some(false) {
        if let Some(m) = stats("image_mean")? {
            pre.mean = m;
        }
        if let Some(s) = stats("image_std")? {
            pre.std = s;
        }
    } else {
        pre.mean = vec![0.0; c];
        pre.std = vec![1.0; c];
    }
    pre.validate()
        .map_err(|e| TaskError::Invalid(format!("{}: {e}", path.display())))?;
    Ok(pre)
}

/// The Hugging Face image processor config for `pre`.
pub fn preprocess_json(pre: &Preprocess) -> Value {
    json!({
        "image_processor_type": "ViTImageProcessor",
        "do_resize": true,
        "size": {"height": pre.size, "width": pre.size},
        "resample": 2,
        "do_rescale": true,
        "rescale_factor": 1.0 / 255.0,
        "do_normalize": true,
        "image_mean": pre.mean,
        "image_std": pre.std,
    })
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| TaskError::Invalid(e.to_string()))?;
    write_atomic(path, &bytes)?;
    Ok(())
}

/// A loaded image classifier with its preprocessing and class names.
pub struct VisionModel {
    pub model: VitClassifier,
    pub config: VitConfig,
    pub pre: Preprocess,
    pub labels: Vec<String>,
}

impl VisionModel {
    /// Loads a `ViTForImageClassification` (or bare `ViTModel`) directory. With `labels`
    /// (training a new head), the checkpoint's classifier is kept only if it names the same
    /// classes; without, the directory must hold a trained classifier.
    pub fn load(
        dir: &Path,
        labels: Option<Vec<String>>,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let config_path = dir.join(CONFIG);
        let weights = dir.join(WEIGHTS);
        if !dir.is_dir() {
            return Err(TaskError::Invalid(format!(
                "{}: not a model directory (expected config.json and model.safetensors)",
                dir.display()
            )));
        }
        if !weights.exists() && dir.join("pytorch_model.bin").exists() {
            return Err(ModelError::Pickle {
                path: dir.join("pytorch_model.bin"),
            }
            .into());
        }
        let config = VitConfig::from_file(&config_path)?;
        let pre = read_preprocess(dir, &config)?;
        let reuse = match &labels {
            Some(l) => config.id2label.as_ref() == Some(l),
            None => true,
        };
        let predicting = labels.is_none();
        let labels = match labels {
            Some(l) => l,
            None => config.id2label.clone().ok_or_else(|| {
                TaskError::Invalid(format!(
                    "{}: no id2label: this is not a trained image classifier (train one with \
                     `smelt vision train`)",
                    config_path.display()
                ))
            })?,
        };
        let file = WeightFile::open(&weights)?;
        let (model, report) =
            VitClassifier::load(&config, &file, labels.len(), reuse, seed, device)?;
        if predicting && report.created_classifier {
            return Err(TaskError::Invalid(format!(
                "{}: no trained classifier for the {} labels of config.json (tensor \
                 `classifier.weight` [{}, {}] expected)",
                weights.display(),
                labels.len(),
                labels.len(),
                config.hidden_size
            )));
        }
        if !report.unused.is_empty() {
            tracing::warn!(
                "{}: {} tensors not used by the model (first: {})",
                weights.display(),
                report.unused.len(),
                report.unused[0]
            );
        }
        Ok(Self {
            model,
            config,
            pre,
            labels,
        })
    }
}

/// Writes a `ViTForImageClassification` directory into `dir`.
pub fn save_classifier(
    model: &VitClassifier,
    config: &VitConfig,
    pre: &Preprocess,
    labels: &[String],
    dir: &Path,
) -> Result<()> {
    write_safetensors(&dir.join(WEIGHTS), &model.export()?, pt_metadata())?;
    write_json(
        &dir.join(CONFIG),
        &config.to_json("ViTForImageClassification", Some(labels)),
    )?;
    write_json(&dir.join(PREPROCESSOR), &preprocess_json(pre))
}

fn pt_metadata() -> Option<std::collections::HashMap<String, String>> {
    Some([("format".to_string(), "pt".to_string())].into())
}

/// Images of `set` prepared without augmentation, in batches made on worker threads; `f`
/// gets each batch as a `[n, channels, size, size]` tensor and returns one row per image.
fn map_batches(
    set: &Arc<ImageSet>,
    pre: &Preprocess,
    batch_size: usize,
    workers: usize,
    device: &Device,
    mut f: impl FnMut(Tensor<4>) -> Result<Vec<Vec<f32>>>,
) -> Result<Vec<Vec<f32>>> {
    let n = set.len();
    let batches = n.div_ceil(batch_size.max(1));
    let (set2, pre2) = (set.clone(), pre.clone());
    let make: Arc<dyn Fn(usize) -> Vec<f32> + Send + Sync> = Arc::new(move |b| {
        let range = b * batch_size..((b + 1) * batch_size).min(set2.len());
        let mut pixels = Vec::with_capacity(range.len() * pre2.image_len());
        for i in range {
            pixels.extend(prepare(
                &set2.images[i],
                &pre2,
                None,
                &mut image_rng(0, 0, i),
            ));
        }
        pixels
    });
    let fetch = Prefetcher::start(0, batches, workers, 4, make);
    let mut out = Vec::with_capacity(n);
    for b in 0..batches {
        let pixels = fetch.take(b);
        let rows = pixels.len() / pre.image_len();
        let images = tensor_from_vec(pixels, [rows, pre.channels, pre.size, pre.size], device);
        out.extend(f(images)?);
    }
    Ok(out)
}

fn rows(t: Tensor<2>) -> Result<Vec<Vec<f32>>> {
    let cols = t.dims()[1];
    let values = tensor_to_vec(t)?;
    Ok(values.chunks(cols.max(1)).map(|c| c.to_vec()).collect())
}

/// Class logits of every image of `set`.
pub fn logits_of(
    model: &VitClassifier,
    set: &Arc<ImageSet>,
    pre: &Preprocess,
    batch_size: usize,
    workers: usize,
    device: &Device,
) -> Result<Vec<Vec<f32>>> {
    map_batches(set, pre, batch_size, workers, device, |x| {
        rows(model.forward(x))
    })
}

/// The encoder's class-token features of every image of `set`.
pub fn features_of(
    encoder: &VitModel,
    set: &Arc<ImageSet>,
    pre: &Preprocess,
    batch_size: usize,
    workers: usize,
    device: &Device,
) -> Result<Vec<Vec<f32>>> {
    map_batches(set, pre, batch_size, workers, device, |x| {
        rows(encoder.features(x))
    })
}

/// How to read images, shared by the vision commands.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageOptions {
    pub on_bad: OnBadImage,
    /// Decoding and augmentation threads.
    pub workers: usize,
}

/// How far decoded images are shrunk for a model input of `size`: twice the input, so
/// that crops keep detail, and never below 64 pixels.
fn kept_side(size: usize) -> usize {
    (2 * size).max(64)
}

impl ImageOptions {
    fn read(&self, path: &Path, split: Split, size: usize) -> Result<ImageSet> {
        let options = ReadImages {
            split,
            on_bad: self.on_bad,
            max_side: kept_side(size),
            workers: self.workers,
        };
        let set = ImageSet::read(path, &options)?;
        if !set.skipped.is_empty() {
            tracing::warn!(
                "{}: skipped {} unreadable images",
                path.display(),
                set.skipped.len()
            );
        }
        Ok(set)
    }
}

/// Everything `smelt vision train` needs; written to `run_config.json` as resolved.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VisionTrainOptions {
    pub data: PathBuf,
    pub valid: Option<PathBuf>,
    /// A vision config file (architecture, normalisation, augmentation).
    pub config: Option<PathBuf>,
    /// Fine-tune this ViT directory instead of training a new model.
    pub model: Option<PathBuf>,
    /// Train on this class-balanced fraction of the training images (seeded).
    pub label_fraction: f64,
    /// Target smoothing: the true class gets `1 - s`, the rest share `s`.
    pub label_smoothing: f64,
    /// Mixup with this Beta(alpha, alpha) parameter (0 disables).
    pub mixup: f64,
    pub batch_size: usize,
    pub eval_batch_size: usize,
    pub images: ImageOptions,
    pub training: TrainConfig,
    pub out: PathBuf,
}

/// One batch of a training epoch, as the loop sees it.
#[derive(Debug, Clone)]
pub struct BatchRef {
    epoch: usize,
    index: usize,
    len: usize,
}

/// A batch ready for the model.
struct Prepared {
    pixels: Vec<f32>,
    images: usize,
    /// Hard class targets.
    targets: Vec<u32>,
    /// Soft targets `[images, classes]` with smoothing or mixup.
    soft: Option<Vec<f32>>,
}

/// What a batch job needs, shared with the worker threads.
struct Source {
    set: Arc<ImageSet>,
    labels: Arc<Vec<usize>>,
    classes: usize,
    pre: Preprocess,
    augment: Option<Augment>,
    seed: u64,
    batch_size: usize,
    smoothing: f64,
    mixup: f64,
    /// Two augmented views per image (contrastive pretraining).
    two_views: bool,
}

impl Source {
    fn batches(&self, epoch: usize) -> Vec<Vec<usize>> {
        let mut batches = epoch_batches(
            Batching::Random,
            &vec![1; self.set.len()],
            self.batch_size,
            self.seed,
            epoch,
        );
        // A lone image has no negatives: its contrastive loss is zero, so it is left out.
        if self.two_views {
            batches.retain(|b| b.len() > 1);
        }
        batches
    }

    fn make(&self, epoch: usize, batch: &[usize], index: usize) -> Prepared {
        let base = index * self.batch_size;
        let views = if self.two_views { 2 } else { 1 };
        let mut pixels = Vec::with_capacity(views * batch.len() * self.pre.image_len());
        for view in 0..views {
            for (k, &i) in batch.iter().enumerate() {
                let position = views * (base + k) + view;
                let mut rng = image_rng(self.seed, epoch, position);
                pixels.extend(prepare(
                    &self.set.images[i],
                    &self.pre,
                    self.augment.as_ref(),
                    &mut rng,
                ));
            }
        }
        let targets: Vec<u32> = if self.labels.is_empty() {
            Vec::new()
        } else {
            batch.iter().map(|&i| self.labels[i] as u32).collect()
        };
        let mut soft = None;
        if !targets.is_empty() && (self.smoothing > 0.0 || self.mixup > 0.0) {
            let k = self.classes;
            let s = self.smoothing as f32;
            let mut t = vec![s / k as f32; batch.len() * k];
            for (row, &c) in targets.iter().enumerate() {
                t[row * k + c as usize] += 1.0 - s;
            }
            if self.mixup > 0.0 && batch.len() > 1 {
                // Each image mixed with the next one of the batch, with one weight per batch.
                let mut rng = image_rng(self.seed ^ 0x006D_6978_7570, epoch, index);
                let lambda = beta_symmetric(&mut rng, self.mixup) as f32;
                let len = self.pre.image_len();
                let (orig_px, orig_t) = (pixels.clone(), t.clone());
                let n = batch.len();
                for row in 0..n {
                    let other = (row + 1) % n;
                    for j in 0..len {
                        pixels[row * len + j] = lambda * orig_px[row * len + j]
                            + (1.0 - lambda) * orig_px[other * len + j];
                    }
                    for j in 0..k {
                        t[row * k + j] =
                            lambda * orig_t[row * k + j] + (1.0 - lambda) * orig_t[other * k + j];
                    }
                }
            }
            soft = Some(t);
        }
        Prepared {
            pixels,
            images: views * batch.len(),
            targets,
            soft,
        }
    }
}

/// Batches of one epoch made ahead on worker threads.
struct Loader {
    epoch: usize,
    next: usize,
    fetch: Prefetcher<Prepared>,
}

/// The prefetching batch pipeline shared by supervised and contrastive training.
struct Pipeline {
    source: Arc<Source>,
    workers: usize,
    loader: Mutex<Option<Loader>>,
}

impl Pipeline {
    fn new(source: Source, workers: usize) -> Self {
        Self {
            source: Arc::new(source),
            workers,
            loader: Mutex::new(None),
        }
    }

    fn epoch_batches(&self, epoch: usize) -> Vec<BatchRef> {
        self.source
            .batches(epoch)
            .iter()
            .enumerate()
            .map(|(index, b)| BatchRef {
                epoch,
                index,
                len: b.len(),
            })
            .collect()
    }

    /// The prepared batch `r`; (re)starts the workers when the loop is not where they are.
    fn take(&self, r: &BatchRef) -> Prepared {
        let mut guard = self.loader.lock().unwrap_or_else(|e| e.into_inner());
        let in_step = guard
            .as_ref()
            .is_some_and(|l| l.epoch == r.epoch && l.next == r.index);
        if !in_step {
            let batches = Arc::new(self.source.batches(r.epoch));
            let source = self.source.clone();
            let epoch = r.epoch;
            let count = batches.len();
            let make: Arc<dyn Fn(usize) -> Prepared + Send + Sync> =
                Arc::new(move |i| source.make(epoch, &batches[i], i));
            *guard = Some(Loader {
                epoch,
                next: r.index,
                fetch: Prefetcher::start(r.index, count, self.workers, 2 * self.workers, make),
            });
        }
        let loader = guard.as_mut().expect("loader set above");
        loader.next += 1;
        loader.fetch.take(r.index)
    }
}

/// Mean cross-entropy against soft targets `[n, classes]`.
fn soft_cross_entropy(logits: Tensor<2>, targets: Vec<f32>) -> Tensor<1> {
    let [n, k] = logits.dims();
    let t = tensor_from_vec(targets, [n, k], &logits.device());
    (log_softmax(logits, 1) * t)
        .sum()
        .neg()
        .div_scalar(n as f64)
}

struct VitTask<'a> {
    device: Device,
    eval_device: Device,
    options: &'a VisionTrainOptions,
    pipeline: Pipeline,
    valid: Option<(Arc<ImageSet>, Vec<i64>)>,
    config: VitConfig,
    pre: Preprocess,
    labels: Vec<String>,
}

impl Task for VitTask<'_> {
    type Model = VitClassifier;
    type Batch = BatchRef;

    fn device(&self) -> Device {
        self.device.clone()
    }

    fn epoch_batches(&self, epoch: usize) -> Vec<BatchRef> {
        self.pipeline.epoch_batches(epoch)
    }

    fn batch_len(&self, batch: &BatchRef) -> usize {
        batch.len
    }

    fn loss(&self, model: &VitClassifier, batch: &BatchRef) -> smelt_train::Result<Tensor<1>> {
        let p = self.pipeline.take(batch);
        let pre = &self.pre;
        let images = tensor_from_vec(
            p.pixels,
            [p.images, pre.channels, pre.size, pre.size],
            &self.device,
        );
        let logits = model.forward(images);
        Ok(match p.soft {
            Some(soft) => soft_cross_entropy(logits, soft),
            None => smelt_models::fused::cross_entropy(logits, &p.targets),
        })
    }

    fn evaluate(&self, model: &VitClassifier) -> smelt_train::Result<Option<Evaluation>> {
        let Some((set, truth)) = &self.valid else {
            return Ok(None);
        };
        let logits = logits_of(
            model,
            set,
            &self.pre,
            self.options.eval_batch_size,
            self.options.images.workers,
            &self.eval_device,
        )
        .map_err(smelt_train::TrainError::from)?;
        Ok(Some(class_evaluation(&logits, truth, &self.labels)))
    }

    fn save(&self, model: &VitClassifier, dir: &Path) -> smelt_train::Result<()> {
        save_classifier(model, &self.config, &self.pre, &self.labels, dir)?;
        Ok(())
    }

    fn load(&self, dir: &Path) -> smelt_train::Result<VitClassifier> {
        let file = WeightFile::open(&dir.join(WEIGHTS))?;
        let (model, report) = VitClassifier::load(
            &self.config,
            &file,
            self.labels.len(),
            true,
            self.options.training.seed,
            &self.device,
        )?;
        if report.created_classifier {
            return Err(smelt_train::TrainError::Checkpoint {
                path: dir.to_path_buf(),
                message: "the checkpoint lacks the classifier".into(),
            });
        }
        Ok(model)
    }
}

/// FNV-1a over the resolved run config (without the output directory) and the images'
/// names, labels and decoded pixels, so that a resume with other options or other data is
/// refused.
fn fingerprint(run_config: &Value, sets: &[&ImageSet]) -> Result<String> {
    let mut config = run_config.clone();
    if let Some(options) = config.get_mut("options").and_then(Value::as_object_mut) {
        options.remove("out");
    }
    let text = serde_json::to_string(&config).map_err(|e| TaskError::Invalid(e.to_string()))?;
    let mut hash = fnv1a(FNV_START, text.as_bytes());
    for set in sets {
        for (i, image) in set.images.iter().enumerate() {
            hash = fnv1a(hash, set.names[i].as_bytes());
            hash = fnv1a(hash, set.labels.get(i).map_or(&[][..], |l| l.as_bytes()));
            hash = fnv1a(hash, &image.pixels);
        }
    }
    Ok(format!("{hash:016x}"))
}

/// With `--model`, the architecture and normalisation come from that directory: a config
/// that sets them would be ignored, so it is refused.
fn check_model_tables(from_model: bool, spec: &VisionSpec) -> Result<()> {
    if from_model && (spec.model != ModelSpec::default() || spec.data != DataSpec::default()) {
        return Err(TaskError::Invalid(
            "--model continues an existing model, whose architecture and preprocessing come \
             from its directory; the config's [model] and [data] tables would be ignored: \
             remove them or --model"
                .into(),
        ));
    }
    Ok(())
}

fn check_common(batch_size: usize, eval_batch_size: usize, workers: usize) -> Result<()> {
    if batch_size == 0 {
        return Err(TaskError::Invalid("--batch-size must be at least 1".into()));
    }
    if eval_batch_size == 0 {
        return Err(TaskError::Invalid(
            "--eval-batch-size must be at least 1".into(),
        ));
    }
    if workers == 0 {
        return Err(TaskError::Invalid("--workers must be at least 1".into()));
    }
    Ok(())
}

fn check_fraction(fraction: f64) -> Result<()> {
    if !(fraction > 0.0 && fraction <= 1.0) {
        return Err(TaskError::Invalid(format!(
            "--label-fraction must be in (0, 1], found {fraction}"
        )));
    }
    Ok(())
}

/// Outcome of `vision train`.
#[derive(Debug, Serialize)]
pub struct VisionTrainReport {
    pub summary: TrainSummary,
    pub labels: Vec<String>,
    pub train_images: usize,
    pub valid_images: usize,
    pub parameters: usize,
}

/// Trains (or fine-tunes) a ViT classifier. All inputs are read and checked before anything
/// is written.
pub fn train(
    options: &VisionTrainOptions,
    resume: bool,
    device: &Device,
) -> Result<VisionTrainReport> {
    check_common(
        options.batch_size,
        options.eval_batch_size,
        options.images.workers,
    )?;
    check_fraction(options.label_fraction)?;
    if !(0.0..1.0).contains(&options.label_smoothing) {
        return Err(TaskError::Invalid(
            "--label-smoothing must be in [0, 1)".into(),
        ));
    }
    if !(options.mixup >= 0.0 && options.mixup.is_finite()) {
        return Err(TaskError::Invalid(
            "--mixup must be 0 (off) or a positive Beta parameter".into(),
        ));
    }
    options.training.validate()?;
    let spec = match &options.config {
        Some(p) => VisionSpec::read(p)?,
        None => VisionSpec::default(),
    };
    check_model_tables(options.model.is_some(), &spec)?;
    let side_hint = spec.model.image_size.unwrap_or(224);
    let train_set = options
        .images
        .read(&options.data, Split::Train, side_hint)?;
    let valid_set = options
        .valid
        .as_deref()
        .map(|p| options.images.read(p, Split::Test, side_hint))
        .transpose()?;
    if train_set.labels.is_empty() {
        return Err(TaskError::Invalid(format!(
            "{}: training needs labelled images",
            options.data.display()
        )));
    }
    let labels = train_set.classes();
    if labels.len() < 2 {
        return Err(TaskError::Invalid(format!(
            "{}: {} class(es); classification needs at least 2",
            options.data.display(),
            labels.len()
        )));
    }
    let mut train_labels = train_set.label_indices(&labels)?;
    let train_set = if options.label_fraction < 1.0 {
        let keep = stratified_sample(&train_labels, options.label_fraction, options.training.seed);
        train_labels = keep.iter().map(|&i| train_labels[i]).collect();
        train_set.subset(&keep)
    } else {
        train_set
    };
    let valid = valid_set
        .map(|v| {
            let truth = v.label_indices(&labels)?;
            Ok::<_, TaskError>((v, truth.into_iter().map(|t| t as i64).collect::<Vec<_>>()))
        })
        .transpose()?;
    if valid.is_none() && options.training.patience.is_some() {
        return Err(TaskError::Invalid(
            "--patience needs validation data (--valid)".into(),
        ));
    }

    let ad_device = device.clone().autodiff();
    let (model, config, pre) = match &options.model {
        Some(dir) => {
            let loaded =
                VisionModel::load(dir, Some(labels.clone()), options.training.seed, &ad_device)?;
            (loaded.model, loaded.config, loaded.pre)
        }
        None => {
            let config = spec.vit_config(&train_set)?;
            let pre = spec.preprocess(&config)?;
            let model =
                VitClassifier::init(&config, labels.len(), options.training.seed, &ad_device)?;
            (model, config, pre)
        }
    };
    let augment = spec.augment.clone();
    let parameters = model.num_params();
    tracing::info!(
        "ViT {}x{} patch {} ({} channels), width {}, {} layers, {} heads: {} parameters",
        config.image_size,
        config.image_size,
        config.patch_size,
        config.num_channels,
        config.hidden_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        parameters
    );

    crate::run_dir::prepare_out(&options.out, resume)?;
    let run_config = json!({"options": options, "model": config.to_json("ViTForImageClassification", Some(&labels)), "preprocess": pre, "augment": augment});
    let mut sets = vec![&train_set];
    if let Some((v, _)) = &valid {
        sets.push(v);
    }
    let fingerprint = fingerprint(&run_config, &sets)?;
    let train_images = train_set.len();
    let source = Source {
        set: Arc::new(train_set),
        labels: Arc::new(train_labels),
        classes: labels.len(),
        pre: pre.clone(),
        augment,
        seed: options.training.seed,
        batch_size: options.batch_size,
        smoothing: options.label_smoothing,
        mixup: options.mixup,
        two_views: false,
    };
    let task = VitTask {
        device: ad_device,
        eval_device: device.clone(),
        options,
        pipeline: Pipeline::new(source, options.images.workers),
        valid: valid.map(|(v, t)| (Arc::new(v), t)),
        config,
        pre,
        labels: labels.clone(),
    };
    let valid_images = task.valid.as_ref().map_or(0, |v| v.0.len());
    let summary = trainer::train(
        &task,
        model,
        &options.training,
        &options.out,
        resume,
        &fingerprint,
        &run_config,
    )?;
    Ok(VisionTrainReport {
        summary,
        labels,
        train_images,
        valid_images,
        parameters,
    })
}

/// Accuracy and per-class metrics of a classifier on labelled images (the test split of an
/// IDX folder).
pub fn evaluate(
    model_dir: &Path,
    data: &Path,
    images: &ImageOptions,
    batch_size: usize,
    device: &Device,
) -> Result<Value> {
    check_common(batch_size, batch_size, images.workers)?;
    let m = VisionModel::load(model_dir, None, 0, device)?;
    let set = images.read(data, Split::Test, m.pre.size)?;
    let truth: Vec<i64> = set
        .label_indices(&m.labels)?
        .into_iter()
        .map(|t| t as i64)
        .collect();
    let set = Arc::new(set);
    let logits = logits_of(&m.model, &set, &m.pre, batch_size, images.workers, device)?;
    let (loss, metrics) = score(&logits, &truth, m.labels.len());
    let mut record = metrics_record(loss, &metrics, &m.labels);
    record.insert("images".into(), json!(set.len()));
    record.insert("skipped".into(), json!(set.skipped.len()));
    Ok(Value::Object(record))
}

/// The best classes of one image.
#[derive(Debug, Serialize)]
pub struct ImagePrediction {
    pub image: String,
    /// `(label, probability)`, most probable first.
    pub top: Vec<(String, f32)>,
}

/// Top-`k` classes of each image file.
pub fn predict(
    model_dir: &Path,
    files: &[PathBuf],
    k: usize,
    images: &ImageOptions,
    device: &Device,
) -> Result<Vec<ImagePrediction>> {
    if k == 0 {
        return Err(TaskError::Invalid("--top-k must be at least 1".into()));
    }
    let m = VisionModel::load(model_dir, None, 0, device)?;
    let options = ReadImages {
        split: Split::Test,
        on_bad: images.on_bad,
        max_side: kept_side(m.pre.size),
        workers: images.workers,
    };
    let set = Arc::new(ImageSet::read_files(files, &options)?);
    let logits = logits_of(&m.model, &set, &m.pre, 32, images.workers, device)?;
    Ok(set
        .names
        .iter()
        .zip(&logits)
        .map(|(name, row)| {
            let probs = softmax_row(row);
            let mut order: Vec<usize> = (0..probs.len()).collect();
            order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
            ImagePrediction {
                image: name.clone(),
                top: order
                    .into_iter()
                    .take(k)
                    .map(|i| (m.labels[i].clone(), probs[i]))
                    .collect(),
            }
        })
        .collect())
}

/// The encoder with SimCLR's projection head (two layers with a ReLU between).
#[derive(Module, Debug)]
pub struct Contrastive {
    pub vit: VitModel,
    pub projection_hidden: Dense,
    pub projection_out: Dense,
}

impl Contrastive {
    /// L2-normalised projections `[batch, dim]`.
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        let h = self.vit.features(images);
        let z = self.projection_out.forward(burn::tensor::activation::relu(
            self.projection_hidden.forward(h),
        ));
        let norm = z.clone().powf_scalar(2.0).sum_dim(1).sqrt().clamp_min(1e-6);
        z / norm
    }
}

/// NT-Xent of `z` `[2n, d]` (views of image `i` at rows `i` and `n + i`), with extra
/// negatives `[m, d]` when given.
pub fn nt_xent(z: Tensor<2>, negatives: Option<Tensor<2>>, temperature: f64) -> Tensor<1> {
    let [rows, _] = z.dims();
    let n = rows / 2;
    let device = z.device();
    let mut logits = z
        .clone()
        .matmul(z.clone().transpose())
        .div_scalar(temperature);
    // Each row's own similarity never counts as a candidate.
    let mut eye = vec![0.0f32; rows * rows];
    for i in 0..rows {
        eye[i * rows + i] = -1e9;
    }
    logits = logits + tensor_from_vec(eye, [rows, rows], &device);
    if let Some(q) = negatives {
        logits = Tensor::cat(
            vec![logits, z.matmul(q.transpose()).div_scalar(temperature)],
            1,
        );
    }
    let targets: Vec<u32> = (0..rows)
        .map(|i| if i < n { i + n } else { i - n } as u32)
        .collect();
    smelt_models::fused::cross_entropy(logits, &targets)
}

/// Everything `smelt vision pretrain` needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PretrainOptions {
    pub data: PathBuf,
    pub config: Option<PathBuf>,
    /// Start from this ViT directory's encoder instead of a new one.
    pub model: Option<PathBuf>,
    pub temperature: f64,
    /// Width of the projection head's output.
    pub projection_dim: usize,
    /// Keep this many past projections as extra negatives (0: in-batch negatives only).
    pub queue: usize,
    pub batch_size: usize,
    pub images: ImageOptions,
    pub training: TrainConfig,
    pub out: PathBuf,
}

struct PretrainTask<'a> {
    device: Device,
    options: &'a PretrainOptions,
    pipeline: Pipeline,
    config: VitConfig,
    pre: Preprocess,
    /// Past projections, newest last (host, detached).
    queue: Mutex<Vec<f32>>,
}

impl PretrainTask<'_> {
    fn dim(&self) -> usize {
        self.options.projection_dim
    }
}

impl Task for PretrainTask<'_> {
    type Model = Contrastive;
    type Batch = BatchRef;

    fn device(&self) -> Device {
        self.device.clone()
    }

    fn epoch_batches(&self, epoch: usize) -> Vec<BatchRef> {
        self.pipeline.epoch_batches(epoch)
    }

    fn batch_len(&self, batch: &BatchRef) -> usize {
        batch.len
    }

    fn loss(&self, model: &Contrastive, batch: &BatchRef) -> smelt_train::Result<Tensor<1>> {
        let p = self.pipeline.take(batch);
        let pre = &self.pre;
        let images = tensor_from_vec(
            p.pixels,
            [p.images, pre.channels, pre.size, pre.size],
            &self.device,
        );
        let z = model.forward(images);
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let d = self.dim();
        let negatives = (!queue.is_empty()).then(|| {
            let m = queue.len() / d;
            tensor_from_vec(queue.clone(), [m, d], &self.device)
        });
        let loss = nt_xent(z.clone(), negatives, self.options.temperature);
        if self.options.queue > 0 {
            let fresh = tensor_to_vec(z.inner()).map_err(smelt_train::TrainError::Model)?;
            queue.extend_from_slice(&fresh);
            let cap = self.options.queue * d;
            if queue.len() > cap {
                let cut = queue.len() - cap;
                queue.drain(..cut);
            }
        }
        Ok(loss)
    }

    fn evaluate(&self, _: &Contrastive) -> smelt_train::Result<Option<Evaluation>> {
        Ok(None)
    }

    fn save(&self, model: &Contrastive, dir: &Path) -> smelt_train::Result<()> {
        save_encoder(&model.vit, &self.config, &self.pre, dir)?;
        let mut head = Vec::new();
        model
            .projection_hidden
            .export("projection.hidden", &mut head)?;
        model.projection_out.export("projection.out", &mut head)?;
        write_safetensors(&dir.join(PROJECTION), &head, None)?;
        if self.options.queue > 0 {
            let queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            let d = self.dim();
            let t = smelt_models::weights::NamedTensor::new(
                "negatives",
                vec![queue.len() / d, d],
                queue.clone(),
            );
            write_safetensors(&dir.join(NEGATIVES), &[t], None)?;
        }
        Ok(())
    }

    fn load(&self, dir: &Path) -> smelt_train::Result<Contrastive> {
        let file = WeightFile::open(&dir.join(WEIGHTS))?;
        let (vit, _) = VitModel::load(&self.config, &file, encoder_prefix(&file), &self.device)?;
        let head = WeightFile::open(&dir.join(PROJECTION))?;
        let h = self.config.hidden_size;
        let model = Contrastive {
            vit,
            projection_hidden: Dense::load(&head, "projection.hidden", h, h, &self.device)?,
            projection_out: Dense::load(&head, "projection.out", h, self.dim(), &self.device)?,
        };
        let negatives = dir.join(NEGATIVES);
        if self.options.queue > 0 && negatives.exists() {
            let file = WeightFile::open(&negatives)?;
            let shape = file.shape("negatives").unwrap_or_default();
            let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            *queue = file.f32("negatives", &shape)?;
        }
        Ok(model)
    }
}

/// Writes an encoder as a `ViTModel` directory.
pub fn save_encoder(
    vit: &VitModel,
    config: &VitConfig,
    pre: &Preprocess,
    dir: &Path,
) -> Result<()> {
    let mut tensors = Vec::new();
    vit.export("", &mut tensors)?;
    write_safetensors(&dir.join(WEIGHTS), &tensors, pt_metadata())?;
    write_json(&dir.join(CONFIG), &config.to_json("ViTModel", None))?;
    write_json(&dir.join(PREPROCESSOR), &preprocess_json(pre))
}

/// Outcome of `vision pretrain`.
#[derive(Debug, Serialize)]
pub struct PretrainReport {
    pub summary: TrainSummary,
    pub images: usize,
    pub parameters: usize,
}

/// Contrastive pretraining of a ViT encoder on unlabelled images.
pub fn pretrain(
    options: &PretrainOptions,
    resume: bool,
    device: &Device,
) -> Result<PretrainReport> {
    check_common(
        options.batch_size,
        options.batch_size,
        options.images.workers,
    )?;
    if options.batch_size < 2 {
        return Err(TaskError::Invalid(
            "contrastive pretraining needs --batch-size of at least 2 (other images are the \
             negatives)"
                .into(),
        ));
    }
    if !(options.temperature.is_finite() && options.temperature > 0.0) {
        return Err(TaskError::Invalid("--temperature must be positive".into()));
    }
    if options.projection_dim == 0 {
        return Err(TaskError::Invalid(
            "--projection-dim must be at least 1".into(),
        ));
    }
    options.training.validate()?;
    let spec = match &options.config {
        Some(p) => VisionSpec::read(p)?,
        None => VisionSpec::default(),
    };
    check_model_tables(options.model.is_some(), &spec)?;
    let side_hint = spec.model.image_size.unwrap_or(224);
    let set = options
        .images
        .read(&options.data, Split::Train, side_hint)?;
    if set.len() < 2 {
        return Err(TaskError::Invalid(format!(
            "{}: contrastive pretraining needs at least 2 images (the others are the negatives)",
            options.data.display()
        )));
    }
    let ad_device = device.clone().autodiff();
    let seed = options.training.seed;
    let (vit, config, pre) = match &options.model {
        Some(dir) => {
            let config = VitConfig::from_file(&dir.join(CONFIG))?;
            let pre = read_preprocess(dir, &config)?;
            let file = WeightFile::open(&dir.join(WEIGHTS))?;
            let (vit, _) = VitModel::load(&config, &file, encoder_prefix(&file), &ad_device)?;
            (vit, config, pre)
        }
        None => {
            let config = spec.vit_config(&set)?;
            let pre = spec.preprocess(&config)?;
            let vit = VitModel::init(&config, &mut HostInit::new(seed), &ad_device)?;
            (vit, config, pre)
        }
    };
    let h = config.hidden_size;
    let mut init = HostInit::new(seed ^ 0x7072_6f6a);
    let std = config.initializer_range as f32;
    let model = Contrastive {
        vit,
        projection_hidden: Dense::init(&mut init, h, h, std, &ad_device),
        projection_out: Dense::init(&mut init, h, options.projection_dim, std, &ad_device),
    };
    let parameters = model.num_params();
    let augment = spec.augment.clone().unwrap_or_else(Augment::contrastive);
    crate::run_dir::prepare_out(&options.out, resume)?;
    let run_config = json!({"options": options, "model": config.to_json("ViTModel", None), "preprocess": pre, "augment": augment});
    let fingerprint = fingerprint(&run_config, &[&set])?;
    let images = set.len();
    let source = Source {
        set: Arc::new(set),
        labels: Arc::new(Vec::new()),
        classes: 0,
        pre: pre.clone(),
        augment: Some(augment),
        seed,
        batch_size: options.batch_size,
        smoothing: 0.0,
        mixup: 0.0,
        two_views: true,
    };
    let task = PretrainTask {
        device: ad_device,
        options,
        pipeline: Pipeline::new(source, options.images.workers),
        config,
        pre,
        queue: Mutex::new(Vec::new()),
    };
    let summary = trainer::train(
        &task,
        model,
        &options.training,
        &options.out,
        resume,
        &fingerprint,
        &run_config,
    )?;
    Ok(PretrainReport {
        summary,
        images,
        parameters,
    })
}

/// Everything `smelt vision probe` needs.
#[derive(Debug, Clone)]
pub struct ProbeOptions {
    pub encoder: PathBuf,
    /// Probe the encoder's architecture with fresh random weights instead of its own.
    pub random_init: bool,
    pub data: PathBuf,
    pub valid: PathBuf,
    pub label_fraction: f64,
    pub seed: u64,
    pub batch_size: usize,
    pub images: ImageOptions,
    /// Passes of the linear classifier over the features.
    pub epochs: usize,
    pub lr: f64,
    pub weight_decay: f64,
}

/// A linear probe: a frozen encoder's features, a softmax classifier fitted on a labelled
/// fraction of `data`, its accuracy on `valid`.
pub fn probe(options: &ProbeOptions, device: &Device) -> Result<Value> {
    check_common(
        options.batch_size,
        options.batch_size,
        options.images.workers,
    )?;
    check_fraction(options.label_fraction)?;
    let lr_ok = options.lr.is_finite() && options.lr > 0.0;
    if options.epochs == 0 || !lr_ok || options.weight_decay < 0.0 {
        return Err(TaskError::Invalid(
            "--probe-epochs must be at least 1, --probe-lr positive, --probe-weight-decay \
             not negative"
                .into(),
        ));
    }
    let dir = &options.encoder;
    let config = VitConfig::from_file(&dir.join(CONFIG))?;
    let pre = read_preprocess(dir, &config)?;
    let encoder = if options.random_init {
        VitModel::init(&config, &mut HostInit::new(options.seed), device)?
    } else {
        let file = WeightFile::open(&dir.join(WEIGHTS))?;
        VitModel::load(&config, &file, encoder_prefix(&file), device)?.0
    };
    let train = options.images.read(&options.data, Split::Train, pre.size)?;
    let valid = options.images.read(&options.valid, Split::Test, pre.size)?;
    let labels = train.classes();
    let train_labels = train.label_indices(&labels)?;
    let keep = stratified_sample(&train_labels, options.label_fraction, options.seed);
    let train = Arc::new(train.subset(&keep));
    let train_labels: Vec<usize> = keep.iter().map(|&i| train_labels[i]).collect();
    let valid_labels = valid.label_indices(&labels)?;
    let valid = Arc::new(valid);
    let w = options.images.workers;
    let start = std::time::Instant::now();
    let f_train = features_of(&encoder, &train, &pre, options.batch_size, w, device)?;
    let f_valid = features_of(&encoder, &valid, &pre, options.batch_size, w, device)?;
    let feature_seconds = start.elapsed().as_secs_f64();
    let probe = LinearProbe::fit(
        &f_train,
        &train_labels,
        labels.len(),
        options.epochs,
        options.lr,
        options.weight_decay,
        options.seed,
    );
    let logits: Vec<Vec<f32>> = f_valid.iter().map(|f| probe.logits(f)).collect();
    let truth: Vec<i64> = valid_labels.iter().map(|&t| t as i64).collect();
    let (loss, metrics) = score(&logits, &truth, labels.len());
    let train_accuracy = f_train
        .iter()
        .zip(&train_labels)
        .filter(|(f, &t)| argmax(&probe.logits(f)) == t)
        .count() as f64
        / f_train.len() as f64;
    let mut record: Map<String, Value> = metrics_record(loss, &metrics, &labels);
    record.insert("train_accuracy".into(), json!(train_accuracy));
    record.insert("train_images".into(), json!(f_train.len()));
    record.insert("valid_images".into(), json!(f_valid.len()));
    record.insert("feature_dim".into(), json!(config.hidden_size));
    record.insert("label_fraction".into(), json!(options.label_fraction));
    record.insert("encoder".into(), json!(dir.display().to_string()));
    record.insert("random_init".into(), json!(options.random_init));
    record.insert("feature_seconds".into(), json!(feature_seconds));
    Ok(Value::Object(record))
}

/// Multinomial logistic regression on standardised features, fitted on the host with
/// mini-batch AdamW (the features are small: images x width).
pub struct LinearProbe {
    mean: Vec<f32>,
    scale: Vec<f32>,
    /// `[dim, classes]`
    weight: Vec<f32>,
    bias: Vec<f32>,
    classes: usize,
}

impl LinearProbe {
    pub fn fit(
        features: &[Vec<f32>],
        labels: &[usize],
        classes: usize,
        epochs: usize,
        lr: f64,
        weight_decay: f64,
        seed: u64,
    ) -> Self {
        use rand::seq::SliceRandom;
        use rand::SeedableRng;
        let n = features.len();
        let d = features.first().map_or(0, |f| f.len());
        let mut mean = vec![0.0f64; d];
        let mut var = vec![0.0f64; d];
        for f in features {
            for (m, v) in mean.iter_mut().zip(f) {
                *m += *v as f64 / n as f64;
            }
        }
        for f in features {
            for j in 0..d {
                var[j] += (f[j] as f64 - mean[j]).powi(2) / n as f64;
            }
        }
        let mut probe = Self {
            mean: mean.iter().map(|m| *m as f32).collect(),
            scale: var
                .iter()
                .map(|v| 1.0 / (v.sqrt() as f32).max(1e-6))
                .collect(),
            weight: vec![0.0; d * classes],
            bias: vec![0.0; classes],
            classes,
        };
        let x: Vec<Vec<f32>> = features.iter().map(|f| probe.standardise(f)).collect();
        let params = d * classes + classes;
        let (mut m1, mut m2) = (vec![0.0f64; params], vec![0.0f64; params]);
        let mut order: Vec<usize> = (0..n).collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let batch = 256.min(n.max(1));
        let steps = epochs * n.div_ceil(batch);
        let mut step = 0usize;
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
        for _ in 0..epochs {
            order.shuffle(&mut rng);
            for chunk in order.chunks(batch) {
                let mut grad = vec![0.0f64; params];
                for &i in chunk {
                    let p = softmax_row(&probe.raw_logits(&x[i]));
                    for c in 0..classes {
                        let g = (p[c] - if c == labels[i] { 1.0 } else { 0.0 }) as f64
                            / chunk.len() as f64;
                        for j in 0..d {
                            grad[j * classes + c] += g * x[i][j] as f64;
                        }
                        grad[d * classes + c] += g;
                    }
                }
                step += 1;
                // Cosine decay over the whole fit.
                let rate =
                    lr * 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / steps as f64).cos());
                let (c1, c2) = (1.0 - b1.powi(step as i32), 1.0 - b2.powi(step as i32));
                for k in 0..params {
                    m1[k] = b1 * m1[k] + (1.0 - b1) * grad[k];
                    m2[k] = b2 * m2[k] + (1.0 - b2) * grad[k] * grad[k];
                    let update = rate * (m1[k] / c1) / ((m2[k] / c2).sqrt() + eps);
                    if k < d * classes {
                        let w = probe.weight[k] as f64;
                        probe.weight[k] = (w - update - rate * weight_decay * w) as f32;
                    } else {
                        probe.bias[k - d * classes] -= update as f32;
                    }
                }
            }
        }
        probe
    }

    fn standardise(&self, f: &[f32]) -> Vec<f32> {
        f.iter()
            .zip(&self.mean)
            .zip(&self.scale)
            .map(|((v, m), s)| (v - m) * s)
            .collect()
    }

    fn raw_logits(&self, x: &[f32]) -> Vec<f32> {
        let mut out = self.bias.clone();
        for (j, v) in x.iter().enumerate() {
            let row = &self.weight[j * self.classes..(j + 1) * self.classes];
            for (o, w) in out.iter_mut().zip(row) {
                *o += v * w;
            }
        }
        out
    }

    /// Class scores of raw (not standardised) features.
    pub fn logits(&self, features: &[f32]) -> Vec<f32> {
        self.raw_logits(&self.standardise(features))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nt_xent_is_low_when_views_agree_and_high_when_they_do_not() {
        let device = Device::default();
        // Four images, orthogonal directions; views identical.
        let mut z = vec![0.0f32; 8 * 4];
        for i in 0..4 {
            z[i * 4 + i] = 1.0;
            z[(i + 4) * 4 + i] = 1.0;
        }
        let agree =
            nt_xent(tensor_from_vec(z.clone(), [8, 4], &device), None, 0.1).into_scalar::<f32>();
        // Second views shuffled: each view's partner is another image.
        let swapped = {
            let mut w = z.clone();
            for i in 0..4 {
                let j = (i + 1) % 4;
                w[(i + 4) * 4..(i + 5) * 4].copy_from_slice(&z[j * 4..(j + 1) * 4]);
            }
            w
        };
        let disagree =
            nt_xent(tensor_from_vec(swapped, [8, 4], &device), None, 0.1).into_scalar::<f32>();
        assert!(agree < 0.01, "{agree}");
        assert!(disagree > 5.0, "{disagree}");
        // By hand: with identical views at temperature 1, row 0 has logits [-inf, 0, 0, 0, 1,
        // 0, 0, 0]: loss = log(6 + e) - 1.
        let t1 = nt_xent(tensor_from_vec(z, [8, 4], &device), None, 1.0).into_scalar::<f32>();
        let expected = (6.0f32 + 1f32.exp()).ln() - 1.0;
        assert!((t1 - expected).abs() < 1e-5, "{t1} vs {expected}");
    }

    fn source(smoothing: f64, mixup: f64, two_views: bool) -> Source {
        let images = (0..4)
            .map(|i| smelt_data::images::Image::new(4, 4, 1, vec![60 * i as u8; 16]))
            .collect();
        let set = ImageSet {
            source: PathBuf::from("mem"),
            images,
            names: (0..4).map(|i| i.to_string()).collect(),
            labels: (0..4).map(|i| (i % 2).to_string()).collect(),
            skipped: Vec::new(),
        };
        Source {
            set: Arc::new(set),
            labels: Arc::new(vec![0, 1, 0, 1]),
            classes: 2,
            pre: Preprocess {
                size: 4,
                channels: 1,
                mean: vec![0.0],
                std: vec![1.0],
            },
            augment: None,
            seed: 3,
            batch_size: 3,
            smoothing,
            mixup,
            two_views,
        }
    }

    #[test]
    fn smoothing_and_mixup_make_soft_targets_that_sum_to_one() {
        let plain = source(0.0, 0.0, false).make(0, &[0, 1, 2], 0);
        assert!(plain.soft.is_none());
        assert_eq!(plain.targets, vec![0, 1, 0]);

        let smooth = source(0.2, 0.0, false).make(0, &[0, 1, 2], 0);
        let expected = [0.9, 0.1, 0.1, 0.9, 0.9, 0.1];
        for (a, b) in smooth.soft.unwrap().iter().zip(expected) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }

        let mixed = source(0.0, 0.4, false).make(0, &[0, 1, 2], 0);
        let soft = mixed.soft.unwrap();
        for row in soft.chunks(2) {
            assert!((row[0] + row[1] - 1.0).abs() < 1e-6, "{row:?}");
        }
        // Image 0 (all 0) mixed with image 1 (all 60/255): the pixel weight is the weight of
        // image 0's class in its target.
        let lambda = soft[0];
        let pixel = mixed.pixels[0];
        assert!(
            (pixel - (1.0 - lambda) * 60.0 / 255.0).abs() < 1e-5,
            "{pixel} {lambda}"
        );
        // The same seed, epoch and batch give the same mix.
        let again = source(0.0, 0.4, false).make(0, &[0, 1, 2], 0);
        assert_eq!(again.pixels, mixed.pixels);
    }

    #[test]
    fn contrastive_batches_hold_two_views_and_never_a_lone_image() {
        let s = source(0.0, 0.0, true);
        // 4 images in batches of 3 would leave one image alone: that batch is dropped.
        let batches = s.batches(0);
        assert_eq!(batches.len(), 1);
        let p = s.make(0, &batches[0], 0);
        assert_eq!(p.images, 6);
        assert_eq!(p.pixels.len(), 6 * 16);
    }

    #[test]
    fn image_processor_settings_smelt_cannot_honour_are_refused() {
        let config = VitConfig::new(8, 4, 1, [16, 1, 2, 32]).unwrap();
        let dir = std::env::temp_dir().join(format!("smelt-pre-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cases = [
            (json!({"rescale_factor": 1.0}), "rescale_factor"),
            (json!({"do_resize": false}), "do_resize"),
            (json!({"size": {"height": 9, "width": 9}}), "size"),
            (json!({"image_mean": []}), "image_mean"),
            (json!({"image_mean": [0.1, 0.2]}), "image_mean"),
        ];
        for (value, field) in cases {
            std::fs::write(dir.join(PREPROCESSOR), value.to_string()).unwrap();
            let err = read_preprocess(&dir, &config).err().map(|e| e.to_string());
            assert!(
                err.as_deref().is_some_and(|e| e.contains(field)),
                "{value}: {err:?}"
            );
        }
        let ok = json!({"image_mean": [0.3, 0.3, 0.3], "image_std": [0.2], "size": 8});
        std::fs::write(dir.join(PREPROCESSOR), ok.to_string()).unwrap();
        let pre = read_preprocess(&dir, &config).unwrap();
        assert_eq!((pre.mean, pre.std), (vec![0.3], vec![0.2]));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn linear_probe_separates_separable_features() {
        let mut features = Vec::new();
        let mut labels = Vec::new();
        let mut init = HostInit::new(3);
        for i in 0..300 {
            let c = i % 3;
            let noise = init.normal(5, 0.3);
            let mut f: Vec<f32> = noise.iter().map(|v| v + 10.0).collect();
            f[c] += 2.0;
            features.push(f);
            labels.push(c);
        }
        let probe = LinearProbe::fit(&features, &labels, 3, 30, 0.05, 0.0, 1);
        let correct = features
            .iter()
            .zip(&labels)
            .filter(|(f, &l)| argmax(&probe.logits(f)) == l)
            .count();
        assert!(correct >= 290, "{correct}");
    }
}
