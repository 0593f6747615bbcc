//! Text classification with a BERT-family encoder: fine-tune, evaluate, predict.

use crate::error::{Result, TaskError};
use crate::model_dir::ModelDir;
use crate::run_dir::{fnv1a, FNV_START};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use smelt_data::batch::{
    epoch_batches, inference_batches, pad, split_indices, Batching, PaddedBatch,
};
use smelt_data::examples::{label_indices, label_set, read_examples, Columns, ExampleSet};
use smelt_data::table::ReadOptions;
use smelt_data::tokenize::{Encoded, TextTokenizer};
use smelt_models::bert::{
    classifier_config_json, cross_entropy, labels_tensor, BertClassifier, BertConfig, EncoderInput,
};
use smelt_models::fsutil::write_atomic;
use smelt_models::weights::{write_safetensors, WeightFile};
use smelt_train::metrics::ClassMetrics;
use smelt_train::trainer::{self, Evaluation, Task, TrainConfig, TrainSummary};
use std::path::{Path, PathBuf};

/// Everything `smelt classify train` needs; written to `run_config.json` as resolved.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainOptions {
    pub model: PathBuf,
    pub train_file: PathBuf,
    pub valid_file: Option<PathBuf>,
    /// Without a validation file, this fraction of the training rows (seeded) validates.
    pub valid_fraction: f64,
    pub columns: Columns,
    pub read: ReadOptions,
    pub strict: bool,
    pub max_length: usize,
    pub batch_size: usize,
    pub eval_batch_size: usize,
    /// How training examples are grouped into batches.
    pub batching: Batching,
    pub training: TrainConfig,
    pub out: PathBuf,
    /// Run with every dropout probability set to 0.
    pub no_dropout: bool,
}

/// A loaded classifier with its tokenizer and class names.
pub struct Classifier {
    pub model: BertClassifier,
    pub config: BertConfig,
    pub tokenizer: TextTokenizer,
    pub labels: Vec<String>,
    pub source: ModelDir,
}

impl Classifier {
    /// Loads a model directory. Class names come from `labels` when given (training a new
    /// head), otherwise from the config's `id2label`.
    pub fn load(
        dir: &Path,
        labels: Option<Vec<String>>,
        seed: u64,
        no_dropout: bool,
        device: &Device,
    ) -> Result<Self> {
        let source = ModelDir::open(dir)?;
        let mut config = BertConfig::from_file(&source.config)?;
        if no_dropout {
            config = config.without_dropout();
        }
        let tokenizer = TextTokenizer::from_model_dir(dir)?;
        if tokenizer.vocab_size() > config.vocab_size {
            return Err(TaskError::Invalid(format!(
                "{}: the tokenizer has {} tokens but the model's vocab_size is {}",
                dir.display(),
                tokenizer.vocab_size(),
                config.vocab_size
            )));
        }
        let reuse = match &labels {
            // A new label set keeps the checkpoint's head only if it names the same classes.
            Some(l) => config.id2label.as_ref() == Some(l),
            None => true,
        };
        let predicting = labels.is_none();
        let labels = match labels {
            Some(l) => l,
            None => config.id2label.clone().ok_or_else(|| {
                TaskError::Invalid(format!(
                    "{}: config.json has no id2label: this is not a trained classifier \
                     (train one with `smelt classify train`)",
                    source.config.display()
                ))
            })?,
        };
        let file = WeightFile::open(&source.weights)?;
        let (model, report) =
            BertClassifier::load(&config, &file, labels.len(), reuse, seed, device)?;
        if predicting && (report.created_classifier || report.created_pooler) {
            return Err(TaskError::Invalid(format!(
                "{}: no trained classifier for the {} labels of config.json (tensors \
                 `classifier.weight` [{}, {}] and `bert.pooler.dense.weight` expected)",
                source.weights.display(),
                labels.len(),
                labels.len(),
                config.hidden_size
            )));
        }
        if report.created_pooler {
            tracing::info!("{}: no pooler weights; created a new pooler", dir.display());
        }
        if report.created_classifier {
            tracing::info!("new classifier head for {} classes", labels.len());
        }
        if !report.unused.is_empty() {
            tracing::warn!(
                "{}: {} tensors not used by the model (first: {})",
                source.weights.display(),
                report.unused.len(),
                report.unused[0]
            );
        }
        Ok(Self {
            model,
            config,
            tokenizer,
            labels,
            source,
        })
    }
}

/// Writes `model` as a `BertForSequenceClassification` directory into `dir`.
pub fn save_classifier(
    model: &BertClassifier,
    config: &BertConfig,
    labels: &[String],
    source: &ModelDir,
    dir: &Path,
) -> Result<()> {
    let tensors = model.export()?;
    write_safetensors(
        &dir.join("model.safetensors"),
        &tensors,
        Some([("format".to_string(), "pt".to_string())].into()),
    )?;
    let config_json = serde_json::to_vec_pretty(&classifier_config_json(config, labels))
        .map_err(|e| TaskError::Invalid(e.to_string()))?;
    write_atomic(&dir.join("config.json"), &config_json)?;
    source.copy_tokenizer(dir)?;
    Ok(())
}

fn to_input(batch: &PaddedBatch, device: &Device) -> EncoderInput {
    EncoderInput::from_host(
        batch.input_ids.clone(),
        batch.token_type_ids.clone(),
        batch.attention_mask.clone(),
        batch.batch,
        batch.seq,
        device,
    )
}

fn encode_set(
    tokenizer: &TextTokenizer,
    set: &ExampleSet,
    max_length: usize,
) -> Result<Vec<Encoded>> {
    Ok(tokenizer.encode_all(
        set.examples
            .iter()
            .map(|e| (e.text.as_str(), e.text_pair.as_deref())),
        max_length,
    )?)
}

/// Logits of every row, in the original order, computed in length-sorted batches on an
/// inference device.
pub fn logits_of(
    model: &BertClassifier,
    encoded: &[Encoded],
    pad_id: u32,
    batch_size: usize,
    device: &Device,
) -> Result<Vec<Vec<f32>>> {
    let lengths: Vec<usize> = encoded.iter().map(|e| e.ids.len()).collect();
    let mut out = vec![Vec::new(); encoded.len()];
    for indices in inference_batches(&lengths, batch_size) {
        let batch = pad(encoded, &indices, pad_id);
        let logits = model.forward(to_input(&batch, device));
        let classes = logits.dims()[1];
        let values = smelt_models::weights::tensor_to_vec(logits)?;
        for (row, &i) in indices.iter().enumerate() {
            out[i] = values[row * classes..(row + 1) * classes].to_vec();
        }
    }
    Ok(out)
}

/// Loss and metrics of `logits` against class indices.
pub fn score(logits: &[Vec<f32>], truth: &[i64], classes: usize) -> (f64, ClassMetrics) {
    let mut loss = 0.0f64;
    let mut predicted = Vec::with_capacity(logits.len());
    for (row, &t) in logits.iter().zip(truth) {
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let log_sum = row
            .iter()
            .map(|v| ((v - max) as f64).exp())
            .sum::<f64>()
            .ln()
            + max as f64;
        loss += log_sum - row[t as usize] as f64;
        predicted.push(argmax(row));
    }
    let truth: Vec<usize> = truth.iter().map(|&t| t as usize).collect();
    let metrics = ClassMetrics::compute(&truth, &predicted, classes);
    (loss / logits.len().max(1) as f64, metrics)
}

/// Softmax of one row of logits, computed stably on the host.
pub(crate) fn softmax_row(row: &[f32]) -> Vec<f32> {
    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = row.iter().map(|v| (v - max).exp()).collect();
    let total: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / total).collect()
}

pub(crate) fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 {
                (i, v)
            } else {
                best
            }
        })
        .0
}

pub(crate) fn metrics_record(loss: f64, m: &ClassMetrics, labels: &[String]) -> Map<String, Value> {
    let per_class: Map<String, Value> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| {
            (
                l.clone(),
                json!({"precision": m.precision[i], "recall": m.recall[i], "f1": m.f1[i],
                       "support": m.support[i]}),
            )
        })
        .collect();
    let mut map = Map::new();
    map.insert("loss".into(), json!(loss));
    map.insert("accuracy".into(), json!(m.accuracy));
    map.insert("macro_f1".into(), json!(m.macro_f1));
    map.insert("per_class".into(), Value::Object(per_class));
    map.insert("confusion_matrix".into(), json!(m.confusion_matrix));
    map.insert("labels".into(), json!(labels));
    map
}

/// The loop's validation result for class logits: loss, accuracy as the score, and the
/// per-class metrics and confusion matrix to log.
pub(crate) fn class_evaluation(
    logits: &[Vec<f32>],
    truth: &[i64],
    labels: &[String],
) -> Evaluation {
    let (loss, metrics) = score(logits, truth, labels.len());
    let mut record = metrics_record(loss, &metrics, labels);
    record.remove("loss");
    Evaluation {
        loss,
        score: metrics.accuracy,
        score_name: "accuracy",
        record,
    }
}

struct ClassifyTask<'a> {
    device: Device,
    eval_device: Device,
    options: &'a TrainOptions,
    config: BertConfig,
    tokenizer: TextTokenizer,
    labels: Vec<String>,
    source: ModelDir,
    train: Vec<Encoded>,
    train_labels: Vec<i64>,
    valid: Option<(Vec<Encoded>, Vec<i64>)>,
}

impl Task for ClassifyTask<'_> {
    type Model = BertClassifier;
    type Batch = Vec<usize>;

    fn device(&self) -> Device {
        self.device.clone()
    }

    fn epoch_batches(&self, epoch: usize) -> Vec<Vec<usize>> {
        let lengths: Vec<usize> = self.train.iter().map(|e| e.ids.len()).collect();
        epoch_batches(
            self.options.batching,
            &lengths,
            self.options.batch_size,
            self.options.training.seed,
            epoch,
        )
    }

    fn batch_len(&self, batch: &Vec<usize>) -> usize {
        batch.len()
    }

    fn loss(&self, model: &BertClassifier, batch: &Vec<usize>) -> smelt_train::Result<Tensor<1>> {
        let padded = pad(&self.train, batch, self.tokenizer.pad_id);
        let labels: Vec<i64> = batch.iter().map(|&i| self.train_labels[i]).collect();
        let logits = model.forward(to_input(&padded, &self.device));
        Ok(cross_entropy(logits, labels_tensor(&labels, &self.device)))
    }

    fn evaluate(&self, model: &BertClassifier) -> smelt_train::Result<Option<Evaluation>> {
        let Some((encoded, truth)) = &self.valid else {
            return Ok(None);
        };
        let logits = logits_of(
            model,
            encoded,
            self.tokenizer.pad_id,
            self.options.eval_batch_size,
            &self.eval_device,
        )
        .map_err(smelt_train::TrainError::from)?;
        Ok(Some(class_evaluation(&logits, truth, &self.labels)))
    }

    fn save(&self, model: &BertClassifier, dir: &Path) -> smelt_train::Result<()> {
        save_classifier(model, &self.config, &self.labels, &self.source, dir)?;
        Ok(())
    }

    fn load(&self, dir: &Path) -> smelt_train::Result<BertClassifier> {
        let file = WeightFile::open(&dir.join("model.safetensors"))?;
        let (model, report) = BertClassifier::load(
            &self.config,
            &file,
            self.labels.len(),
            true,
            self.options.training.seed,
            &self.device,
        )?;
        if report.created_classifier || report.created_pooler {
            return Err(smelt_train::TrainError::Checkpoint {
                path: dir.to_path_buf(),
                message: "the checkpoint lacks the classifier or pooler".into(),
            });
        }
        Ok(model)
    }
}

/// Outcome of `classify train`.
#[derive(Debug, Serialize)]
pub struct TrainReport {
    pub summary: TrainSummary,
    pub labels: Vec<String>,
    pub train_examples: usize,
    pub valid_examples: usize,
    pub skipped_empty: usize,
}

/// FNV-1a over the resolved options and the bytes of the data files and model config, so
/// that a resume with other options or edited data is refused.
fn fingerprint(options: &TrainOptions) -> Result<String> {
    let mut o = options.clone();
    o.out = PathBuf::new();
    let text = serde_json::to_string(&o).map_err(|e| TaskError::Invalid(e.to_string()))?;
    let mut hash = fnv1a(FNV_START, text.as_bytes());
    let model_config = options.model.join("config.json");
    let files = [
        Some(&options.train_file),
        options.valid_file.as_ref(),
        Some(&model_config),
    ];
    for path in files.into_iter().flatten() {
        let bytes = std::fs::read(path).map_err(|e| smelt_models::ModelError::io(path, e))?;
        hash = fnv1a(hash, &bytes);
    }
    Ok(format!("{hash:016x}"))
}

/// Fails when `max_length` cannot be honoured by the model's position table.
fn check_max_length(max_length: usize, config: &BertConfig) -> Result<()> {
    if max_length > config.max_position_embeddings {
        return Err(TaskError::Invalid(format!(
            "--max-length {max_length} exceeds the model's max_position_embeddings ({})",
            config.max_position_embeddings
        )));
    }
    Ok(())
}

/// Fine-tunes a classifier. All inputs are read and checked before anything is written.
pub fn train(options: &TrainOptions, resume: bool, device: &Device) -> Result<TrainReport> {
    if options.batch_size == 0 {
        return Err(TaskError::Invalid("--batch-size must be at least 1".into()));
    }
    if options.eval_batch_size == 0 {
        return Err(TaskError::Invalid(
            "--eval-batch-size must be at least 1".into(),
        ));
    }
    if options.max_length < 2 {
        return Err(TaskError::Invalid("--max-length must be at least 2".into()));
    }
    if !(0.0..1.0).contains(&options.valid_fraction) {
        return Err(TaskError::Invalid(
            "--valid-fraction must be in [0, 1)".into(),
        ));
    }
    options.training.validate()?;
    let columns = &options.columns;
    if columns.label.is_none() {
        return Err(TaskError::Invalid("training needs --label-column".into()));
    }

    // Read everything first: bad input fails before the output directory is touched.
    let train_set = read_examples(&options.train_file, columns, &options.read, options.strict)?;
    let valid_file_set = options
        .valid_file
        .as_deref()
        .map(|p| read_examples(p, columns, &options.read, options.strict))
        .transpose()?;
    let mut skipped = train_set.skipped_empty;

    let (train_set, valid_set) = match valid_file_set {
        Some(v) => {
            skipped += v.skipped_empty;
            (train_set, Some(v))
        }
        None if options.valid_fraction > 0.0 => {
            let (t, v) = split_indices(
                train_set.examples.len(),
                options.valid_fraction,
                options.training.seed,
            );
            let pick = |idx: &[usize]| ExampleSet {
                path: train_set.path.clone(),
                examples: idx.iter().map(|&i| train_set.examples[i].clone()).collect(),
                skipped_empty: 0,
            };
            (pick(&t), Some(pick(&v)))
        }
        None => (train_set, None),
    };
    if let Some(v) = &valid_set {
        if v.examples.is_empty() || train_set.examples.is_empty() {
            return Err(TaskError::Invalid(format!(
                "{}: {} rows are too few to hold out {:.0} % for validation; give --valid or \
                 --valid-fraction 0",
                options.train_file.display(),
                train_set.examples.len() + v.examples.len(),
                options.valid_fraction * 100.0
            )));
        }
    } else if options.training.patience.is_some() {
        return Err(TaskError::Invalid(
            "--patience needs validation data (--valid or --valid-fraction)".into(),
        ));
    }
    let labels = label_set(&train_set.examples);
    if labels.len() < 2 {
        return Err(TaskError::Invalid(format!(
            "{}: column `{}` has {} distinct label(s); classification needs at least 2",
            options.train_file.display(),
            columns.label.as_deref().unwrap_or_default(),
            labels.len()
        )));
    }
    let train_labels = label_indices(&train_set, &labels)?;
    let valid_labels = valid_set
        .as_ref()
        .map(|v| label_indices(v, &labels))
        .transpose()?;

    let ad_device = device.clone().autodiff();
    let classifier = Classifier::load(
        &options.model,
        Some(labels.clone()),
        options.training.seed,
        options.no_dropout,
        &ad_device,
    )?;
    check_max_length(options.max_length, &classifier.config)?;
    if columns.text_pair.is_some() && classifier.config.type_vocab_size < 2 {
        return Err(TaskError::Invalid(format!(
            "{}: sentence pairs need two token types, but type_vocab_size is {}",
            classifier.source.config.display(),
            classifier.config.type_vocab_size
        )));
    }
    let train_encoded = encode_set(&classifier.tokenizer, &train_set, options.max_length)?;
    let valid = match (&valid_set, valid_labels) {
        (Some(set), Some(l)) => Some((
            encode_set(&classifier.tokenizer, set, options.max_length)?,
            l,
        )),
        _ => None,
    };

    crate::run_dir::prepare_out(&options.out, resume)?;
    let run_config =
        serde_json::to_value(options).map_err(|e| TaskError::Invalid(e.to_string()))?;
    let fingerprint = fingerprint(options)?;

    let Classifier {
        model,
        config,
        tokenizer,
        labels: _,
        source,
    } = classifier;
    let task = ClassifyTask {
        device: ad_device.clone(),
        eval_device: device.clone(),
        options,
        config,
        tokenizer,
        labels: labels.clone(),
        source,
        train: train_encoded,
        train_labels,
        valid,
    };
    let valid_examples = task.valid.as_ref().map_or(0, |v| v.0.len());
    let summary = trainer::train(
        &task,
        model,
        &options.training,
        &options.out,
        resume,
        &fingerprint,
        &run_config,
    )?;
    Ok(TrainReport {
        summary,
        labels,
        train_examples: task.train.len(),
        valid_examples,
        skipped_empty: skipped,
    })
}

/// Options of `classify eval`.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub model: PathBuf,
    pub data: PathBuf,
    pub columns: Columns,
    pub read: ReadOptions,
    pub strict: bool,
    pub max_length: usize,
    pub batch_size: usize,
}

/// Evaluates a trained classifier on labelled data; returns the JSON report.
pub fn evaluate(options: &EvalOptions, device: &Device) -> Result<Value> {
    let set = read_examples(
        &options.data,
        &options.columns,
        &options.read,
        options.strict,
    )?;
    let classifier = Classifier::load(&options.model, None, 0, false, device)?;
    check_max_length(options.max_length, &classifier.config)?;
    let truth = label_indices(&set, &classifier.labels)?;
    let encoded = encode_set(&classifier.tokenizer, &set, options.max_length)?;
    let logits = logits_of(
        &classifier.model,
        &encoded,
        classifier.tokenizer.pad_id,
        options.batch_size,
        device,
    )?;
    let (loss, metrics) = score(&logits, &truth, classifier.labels.len());
    let mut record = metrics_record(loss, &metrics, &classifier.labels);
    record.insert("examples".into(), json!(set.examples.len()));
    record.insert("skipped_empty".into(), json!(set.skipped_empty));
    Ok(Value::Object(record))
}

/// One prediction.
#[derive(Debug, Serialize)]
pub struct Prediction {
    pub text: String,
    pub label: String,
    pub probabilities: Map<String, Value>,
    /// Raw class scores, in label order (only when asked for).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logits: Option<Vec<f32>>,
}

/// Predicts the class of each text.
pub fn predict(
    model_dir: &Path,
    texts: &[String],
    max_length: usize,
    batch_size: usize,
    with_logits: bool,
    device: &Device,
) -> Result<Vec<Prediction>> {
    let classifier = Classifier::load(model_dir, None, 0, false, device)?;
    check_max_length(max_length, &classifier.config)?;
    let encoded = classifier
        .tokenizer
        .encode_all(texts.iter().map(|t| (t.as_str(), None)), max_length)?;
    let logits = logits_of(
        &classifier.model,
        &encoded,
        classifier.tokenizer.pad_id,
        batch_size,
        device,
    )?;
    let mut out = Vec::with_capacity(texts.len());
    for (text, row) in texts.iter().zip(&logits) {
        let probs = softmax_row(row);
        let best = argmax(&probs);
        out.push(Prediction {
            text: text.clone(),
            label: classifier.labels[best].clone(),
            probabilities: classifier
                .labels
                .iter()
                .zip(&probs)
                .map(|(l, p)| (l.clone(), json!(p)))
                .collect(),
            logits: with_logits.then(|| row.clone()),
        });
    }
    Ok(out)
}
