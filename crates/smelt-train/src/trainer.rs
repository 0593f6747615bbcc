//! The training loop shared by every task: micro-batches, gradient accumulation, clipping,
//! AdamW, the schedule, evaluation each epoch, early stopping, the best model, checkpoints
//! and exact resume.

use crate::checkpoint::{self, TrainState, OPTIMIZER_FILE};
use crate::error::{Result, TrainError};
use crate::grads::{parameter_paths, GradStore};
use crate::metrics::MetricsLog;
use crate::optim::{AdamW, AdamWConfig};
use crate::progress::Progress;
use crate::schedule::{Decay, Schedule};
use burn::module::Module;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use smelt_models::fsutil::{recover_dir, write_dir_atomic};
use smelt_models::weights::{write_safetensors, WeightFile};
use std::path::Path;
use std::time::Instant;

/// Settings of the loop, with the defaults of a typical fine-tuning recipe.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainConfig {
    pub epochs: usize,
    pub lr: f64,
    /// Fraction of all updates spent warming up linearly from 0.
    pub warmup_ratio: f64,
    pub schedule: Decay,
    pub optimizer: AdamWConfig,
    /// Clip gradients to this global L2 norm; `None` disables clipping.
    pub max_grad_norm: Option<f32>,
    /// Micro-batches per optimizer update.
    pub grad_accum: usize,
    pub seed: u64,
    /// Stop after this many evaluations without improvement.
    pub patience: Option<usize>,
    /// Write a train record to `metrics.jsonl` every this many updates.
    pub log_every: u64,
    /// Also checkpoint every this many updates (always at the end of an epoch).
    pub checkpoint_every: Option<u64>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 3,
            lr: 5e-5,
            warmup_ratio: 0.1,
            schedule: Decay::Linear,
            optimizer: AdamWConfig::default(),
            max_grad_norm: Some(1.0),
            grad_accum: 1,
            seed: 42,
            patience: None,
            log_every: 10,
            checkpoint_every: None,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, message: &str| {
            Err(TrainError::Config {
                field: field.into(),
                message: message.into(),
            })
        };
        if self.epochs == 0 {
            return bad("epochs", "must be at least 1");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", "must be a positive number");
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return bad("warmup_ratio", "must be in [0, 1)");
        }
        if self.grad_accum == 0 {
            return bad("grad_accum", "must be at least 1");
        }
        if self
            .max_grad_norm
            .is_some_and(|n| !(n.is_finite() && n > 0.0))
        {
            return bad("max_grad_norm", "must be a positive number");
        }
        if self.log_every == 0 {
            return bad("log_every", "must be at least 1");
        }
        if self.checkpoint_every == Some(0) {
            return bad("checkpoint_every", "must be at least 1");
        }
        if self.patience == Some(0) {
            return bad("patience", "must be at least 1");
        }
        Ok(())
    }
}

/// A validation result: the loss, a score where higher is better, and everything to log.
pub struct Evaluation {
    pub loss: f64,
    pub score: f64,
    pub score_name: &'static str,
    pub record: Map<String, Value>,
}

/// What a task gives the loop.
pub trait Task {
    type Model: Module;
    type Batch;

    /// The autodiff device training runs on.
    fn device(&self) -> Device;
    /// The batches of `epoch`, in order; must be the same for the same epoch.
    fn epoch_batches(&self, epoch: usize) -> Vec<Self::Batch>;
    /// Number of examples in a batch.
    fn batch_len(&self, batch: &Self::Batch) -> usize;
    /// Mean loss of a batch, a `[1]` tensor tracked for gradients.
    fn loss(&self, model: &Self::Model, batch: &Self::Batch) -> Result<Tensor<1>>;
    /// Validation metrics of a model in inference mode; `None` without validation data.
    fn evaluate(&self, model: &Self::Model) -> Result<Option<Evaluation>>;
    /// Writes the model as a loadable directory (files written into `dir`).
    fn save(&self, model: &Self::Model, dir: &Path) -> Result<()>;
    /// Loads a model saved by [`Task::save`] onto the training device.
    fn load(&self, dir: &Path) -> Result<Self::Model>;
}

/// How a run ended.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    pub steps: u64,
    pub epochs_run: usize,
    pub best_score: Option<f64>,
    pub best_epoch: Option<usize>,
    pub stopped_early: bool,
    pub seconds: f64,
}

/// Mixes the run seed with a counter into a per-step seed.
fn step_seed(seed: u64, counter: u64) -> u64 {
    let mut z = seed ^ counter.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Runs training of `model` on `task`, writing into `out`: the model (the best by
/// validation score, or the last without validation data), `metrics.jsonl` and
/// `checkpoint/`. With `resume`, continues from `out/checkpoint`; `fingerprint` must match
/// the one the checkpoint was made with.
pub fn train<T: Task>(
    task: &T,
    model: T::Model,
    config: &TrainConfig,
    out: &Path,
    resume: bool,
    fingerprint: &str,
    run_config: &Value,
) -> Result<TrainSummary> {
    config.validate()?;
    let start = Instant::now();
    let device = task.device();
    let ckpt_dir = checkpoint::checkpoint_dir(out);

    let batches_per_epoch = task.epoch_batches(0).len();
    if batches_per_epoch == 0 {
        return Err(TrainError::Task("no training batches".into()));
    }
    let updates_per_epoch = batches_per_epoch.div_ceil(config.grad_accum) as u64;
    let total_steps = updates_per_epoch * config.epochs as u64;
    let schedule = Schedule {
        base_lr: config.lr,
        warmup_steps: (config.warmup_ratio * total_steps as f64).ceil() as u64,
        total_steps,
        decay: config.schedule,
    };

    let mut optim = AdamW::new(config.optimizer);
    let resumed_from = resume.then(|| recover_dir(&ckpt_dir)).flatten();
    let resumed = resumed_from.is_some();
    let (mut model, mut state) = match resumed_from {
        Some(dir) => {
            let state = checkpoint::read_state(&dir)?;
            if state.fingerprint != fingerprint {
                return Err(TrainError::Checkpoint {
                    path: dir,
                    message: "this checkpoint was made with different data, model or options; \
                              resume with the same command line, or start a new --out"
                        .into(),
                });
            }
            let model = task.load(&dir)?;
            let file = WeightFile::open(&dir.join(OPTIMIZER_FILE))?;
            optim.import(&file, &parameter_paths(&model), state.global_step, &device)?;
            tracing::info!(
                "resuming from {} at epoch {}, batch {}, step {}",
                dir.display(),
                state.epoch + 1,
                state.batch_in_epoch,
                state.global_step
            );
            (model, state)
        }
        None => {
            if resume {
                tracing::warn!(
                    "{}: no checkpoint to resume from; starting afresh",
                    out.display()
                );
            }
            let state = TrainState {
                fingerprint: fingerprint.to_string(),
                ..TrainState::default()
            };
            (model, state)
        }
    };
    if state.finished {
        tracing::info!("{}: this run has already finished", out.display());
    }
    let run_config_json = serde_json::to_vec_pretty(run_config)
        .map_err(|e| TrainError::Task(format!("run config: {e}")))?;
    smelt_models::fsutil::write_atomic(&out.join("run_config.json"), &run_config_json)?;
    let mut log = MetricsLog::open(
        &out.join("metrics.jsonl"),
        resumed.then_some(state.global_step),
    )?;

    let progress = Progress::new(total_steps, "train");
    progress.set_position(state.global_step);
    let mut stopped_early = false;

    // Baseline: validation before the first update of a fresh run.
    if state.global_step == 0 && state.batch_in_epoch == 0 && state.epoch == 0 {
        if let Some(eval) = task.evaluate(&model.valid())? {
            let mut record = json!({"step": 0, "epoch": 0, "split": "valid", "loss": eval.loss});
            extend(&mut record, &eval.record);
            log.write(&record)?;
        }
    }

    while state.epoch < config.epochs && !state.finished {
        let epoch = state.epoch;
        let batches = task.epoch_batches(epoch);
        let mut grads = GradStore::default();
        let mut window_start = Instant::now();

        for index in state.batch_in_epoch..batches.len() {
            let batch = &batches[index];
            let group_start = index - index % config.grad_accum;
            let group_len = config.grad_accum.min(batches.len() - group_start);
            // Dropout masks depend only on the seed and the position in the run.
            let micro = epoch as u64 * batches.len() as u64 + index as u64;
            let seed = step_seed(config.seed, micro);
            device.seed(seed);
            smelt_models::dropout::reseed(seed);

            let loss = task.loss(&model, batch)?;
            let value = loss.clone().into_scalar::<f32>();
            if !value.is_finite() {
                return Err(TrainError::NonFiniteLoss {
                    step: state.global_step + 1,
                    epoch: epoch + 1,
                    batch: index + 1,
                    value,
                });
            }
            let loss = if group_len > 1 {
                loss.div_scalar(group_len as f64)
            } else {
                loss
            };
            let backward = loss.backward();
            grads.accumulate(GradStore::collect(&model, &backward));
            state.window.add(value as f64, task.batch_len(batch));
            state.epoch_window.add(value as f64, task.batch_len(batch));

            let group_done = index + 1 == group_start + group_len;
            if !group_done {
                continue;
            }
            let grad_norm = match config.max_grad_norm {
                Some(max) => grads.clip_global_norm(max),
                None => grads.global_norm(),
            };
            if !grad_norm.is_finite() {
                return Err(TrainError::NonFiniteGradient {
                    step: state.global_step + 1,
                    epoch: epoch + 1,
                    batch: index + 1,
                    value: grad_norm,
                });
            }
            let lr = schedule.lr(state.global_step);
            model = optim.step(model, &grads, lr);
            grads = GradStore::default();
            state.global_step += 1;
            state.batch_in_epoch = index + 1;
            progress.inc(&format!("loss {:.4}", state.window.mean()));

            if state.global_step % config.log_every == 0 || index + 1 == batches.len() {
                let seconds = window_start.elapsed().as_secs_f64();
                log.write(&json!({
                    "step": state.global_step,
                    "epoch": epoch + 1,
                    "split": "train",
                    "loss": state.window.mean(),
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "examples_per_second": state.window.examples as f64 / seconds.max(1e-9),
                }))?;
                state.window = Default::default();
                window_start = Instant::now();
            }
            let periodic = config
                .checkpoint_every
                .is_some_and(|n| state.global_step % n == 0);
            if periodic && index + 1 < batches.len() {
                save_checkpoint(task, &model, &optim, &state, &ckpt_dir)?;
            }
        }

        // End of epoch: evaluate, keep the best, maybe stop, checkpoint.
        let mut summary = format!(
            "epoch {}/{}: train loss {:.4}",
            epoch + 1,
            config.epochs,
            state.epoch_window.mean()
        );
        state.epoch_window = Default::default();
        state.epoch += 1;
        state.batch_in_epoch = 0;
        match task.evaluate(&model.valid())? {
            Some(eval) => {
                let mut record = json!({
                    "step": state.global_step,
                    "epoch": epoch + 1,
                    "split": "valid",
                    "loss": eval.loss,
                });
                extend(&mut record, &eval.record);
                log.write(&record)?;
                summary.push_str(&format!(
                    ", valid loss {:.4}, {} {:.4}",
                    eval.loss, eval.score_name, eval.score
                ));
                if state.best_score.is_none_or(|best| eval.score > best) {
                    state.best_score = Some(eval.score);
                    state.best_epoch = Some(epoch + 1);
                    state.epochs_without_improvement = 0;
                    task.save(&model, out)?;
                    summary.push_str(" (best)");
                } else {
                    state.epochs_without_improvement += 1;
                    if config
                        .patience
                        .is_some_and(|p| state.epochs_without_improvement >= p)
                    {
                        stopped_early = true;
                        state.finished = true;
                        summary.push_str(", stopping early");
                    }
                }
            }
            None => task.save(&model, out)?,
        }
        if state.epoch == config.epochs {
            state.finished = true;
        }
        progress.println(&summary);
        save_checkpoint(task, &model, &optim, &state, &ckpt_dir)?;
    }
    progress.finish();

    Ok(TrainSummary {
        steps: state.global_step,
        epochs_run: state.epoch,
        best_score: state.best_score,
        best_epoch: state.best_epoch,
        stopped_early,
        seconds: start.elapsed().as_secs_f64(),
    })
}

fn extend(record: &mut Value, extra: &Map<String, Value>) {
    if let Value::Object(map) = record {
        for (k, v) in extra {
            map.insert(k.clone(), v.clone());
        }
    }
}

fn save_checkpoint<T: Task>(
    task: &T,
    model: &T::Model,
    optim: &AdamW,
    state: &TrainState,
    dir: &Path,
) -> Result<()> {
    let moments = optim.export()?;
    let mut result = Ok(());
    write_dir_atomic(dir, |staging| {
        if let Err(e) = task.save(model, staging) {
            result = Err(e);
            return Err(smelt_models::ModelError::Unsupported(
                "checkpoint not written".into(),
            ));
        }
        write_safetensors(&staging.join(OPTIMIZER_FILE), &moments, None)?;
        checkpoint::write_state(staging, state)
            .map_err(|e| smelt_models::ModelError::Unsupported(format!("trainer state: {e}")))
    })?;
    result
}
