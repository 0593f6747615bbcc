//! `smelt vision`: train, pretrain, probe, eval and predict with ViT image models.

use anyhow::Result;
use clap::{Args, Subcommand};
use smelt_data::images::OnBadImage;
use smelt_models::device::Device;
use smelt_tasks::vision::{self, ImageOptions, PretrainOptions, ProbeOptions, VisionTrainOptions};
use smelt_train::optim::AdamWConfig;
use smelt_train::schedule::Decay;
use smelt_train::trainer::TrainConfig;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum VisionCommand {
    /// Train a ViT classifier from scratch (or fine-tune one with --model).
    Train(Box<TrainArgs>),
    /// Pretrain a ViT encoder without labels: two augmented views, NT-Xent loss.
    Pretrain(Box<PretrainArgs>),
    /// Fit a linear classifier on a frozen encoder's features and report its accuracy.
    Probe(Box<ProbeArgs>),
    /// Accuracy and per-class metrics on labelled images.
    Eval {
        /// A trained classifier directory.
        #[arg(long)]
        model: PathBuf,
        /// Images: a class-folder tree, a CSV of path,label, or an IDX folder (its test split).
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value_t = 256)]
        batch_size: usize,
        #[command(flatten)]
        images: ImageArgs,
        /// Print the metrics as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// The most probable classes of image files.
    Predict {
        #[arg(long)]
        model: PathBuf,
        /// How many classes to show per image.
        #[arg(long, default_value_t = 3)]
        top_k: usize,
        #[command(flatten)]
        images: ImageArgs,
        /// Print one JSON object per image.
        #[arg(long)]
        json: bool,
        /// Image files (PNG, JPEG, BMP, WebP).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

#[derive(Args, Clone)]
pub struct ImageArgs {
    /// Unreadable images: `fail` (stop, naming the file) or `skip` (warn and leave out).
    #[arg(long, default_value = "fail", value_parser = parse_on_bad)]
    on_bad_image: OnBadImage,
    /// Threads decoding and augmenting images.
    #[arg(long, default_value_t = 2)]
    workers: usize,
}

impl ImageArgs {
    fn options(&self) -> ImageOptions {
        ImageOptions {
            on_bad: self.on_bad_image,
            workers: self.workers,
        }
    }
}

fn parse_on_bad(s: &str) -> std::result::Result<OnBadImage, String> {
    match s {
        "fail" => Ok(OnBadImage::Fail),
        "skip" => Ok(OnBadImage::Skip),
        other => Err(format!("expected `fail` or `skip`, found `{other}`")),
    }
}

/// The optimisation settings shared by `train` and `pretrain`.
#[derive(Args, Clone)]
pub struct LoopArgs {
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// AdamW decoupled weight decay (not applied to biases and norms).
    #[arg(long, default_value_t = 0.05)]
    weight_decay: f64,
    #[arg(long, default_value_t = 0.05)]
    warmup_ratio: f64,
    /// Decay after warm-up: linear, cosine or constant.
    #[arg(long, default_value = "cosine")]
    schedule: Decay,
    /// Clip gradients to this global norm (0 disables).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f32,
    /// Micro-batches per optimizer update.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    #[arg(long, default_value_t = 20)]
    log_every: u64,
    /// Also checkpoint every N updates (always at the end of each epoch).
    #[arg(long)]
    checkpoint_every: Option<u64>,
    /// Output directory: the model (Hugging Face layout), metrics.jsonl, run_config.json
    /// and checkpoint/.
    #[arg(long)]
    out: PathBuf,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    resume: bool,
}

impl LoopArgs {
    fn config(&self, patience: Option<usize>) -> TrainConfig {
        TrainConfig {
            epochs: self.epochs,
            lr: self.lr,
            warmup_ratio: self.warmup_ratio,
            schedule: self.schedule,
            optimizer: AdamWConfig {
                weight_decay: self.weight_decay,
                ..AdamWConfig::default()
            },
            max_grad_norm: (self.max_grad_norm > 0.0).then_some(self.max_grad_norm),
            grad_accum: self.grad_accum,
            seed: self.seed,
            patience,
            log_every: self.log_every,
            checkpoint_every: self.checkpoint_every,
        }
    }
}

#[derive(Args)]
pub struct TrainArgs {
    /// Training images: a class-folder tree, a CSV of path,label, or an IDX folder (its
    /// training split).
    #[arg(long)]
    data: PathBuf,
    /// Validation images, evaluated after each epoch (an IDX folder: its test split).
    #[arg(long)]
    valid: Option<PathBuf>,
    /// A TOML file with [model] (preset or sizes, image_size, patch_size, num_channels,
    /// dropout), [data] (image_mean, image_std) and [augment] tables.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Fine-tune this ViT directory instead of training a new model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Train on this class-balanced fraction of the labelled images.
    #[arg(long, default_value_t = 1.0)]
    label_fraction: f64,
    #[arg(long, default_value_t = 0.0)]
    label_smoothing: f64,
    /// Mixup: Beta(alpha, alpha) mixing of image pairs and their targets (0 disables).
    #[arg(long, default_value_t = 0.0)]
    mixup: f64,
    #[arg(long, default_value_t = 256)]
    eval_batch_size: usize,
    /// Stop after this many epochs without a better validation accuracy.
    #[arg(long)]
    patience: Option<usize>,
    #[command(flatten)]
    images: ImageArgs,
    #[command(flatten)]
    train: LoopArgs,
}

#[derive(Args)]
pub struct PretrainArgs {
    /// Images (labels, if any, are not used).
    #[arg(long)]
    data: PathBuf,
    /// A TOML file with [model], [data] and [augment] tables (default augmentation: random
    /// resized crops, flips, colour jitter, grayscale, blur).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Continue pretraining this ViT directory's encoder.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Softmax temperature of the NT-Xent loss.
    #[arg(long, default_value_t = 0.2)]
    temperature: f64,
    #[arg(long, default_value_t = 128)]
    projection_dim: usize,
    /// Keep this many past projections as extra negatives (0: in-batch negatives only).
    #[arg(long, default_value_t = 0)]
    queue: usize,
    #[command(flatten)]
    images: ImageArgs,
    #[command(flatten)]
    train: LoopArgs,
}

#[derive(Args)]
pub struct ProbeArgs {
    /// A ViT directory (pretrained encoder or classifier).
    #[arg(long)]
    encoder: PathBuf,
    /// Use the encoder's architecture with fresh random weights (the baseline).
    #[arg(long)]
    random_init: bool,
    /// Labelled training images (an IDX folder: its training split).
    #[arg(long)]
    data: PathBuf,
    /// Labelled images to report accuracy on (an IDX folder: its test split).
    #[arg(long)]
    valid: PathBuf,
    /// Fit the classifier on this class-balanced fraction of --data.
    #[arg(long, default_value_t = 1.0)]
    label_fraction: f64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// Passes of the linear classifier over the features.
    #[arg(long, default_value_t = 100)]
    probe_epochs: usize,
    #[arg(long, default_value_t = 1e-2)]
    probe_lr: f64,
    #[arg(long, default_value_t = 1e-4)]
    probe_weight_decay: f64,
    #[command(flatten)]
    images: ImageArgs,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: VisionCommand, device: &Device) -> Result<()> {
    match cmd {
        VisionCommand::Train(a) => {
            let a = *a;
            let options = VisionTrainOptions {
                data: a.data,
                valid: a.valid,
                config: a.config,
                model: a.model,
                label_fraction: a.label_fraction,
                label_smoothing: a.label_smoothing,
                mixup: a.mixup,
                batch_size: a.train.batch_size,
                eval_batch_size: a.eval_batch_size,
                images: a.images.options(),
                training: a.train.config(a.patience),
                out: a.train.out.clone(),
            };
            let report = vision::train(&options, a.train.resume, device)?;
            eprintln!(
                "trained {} steps in {:.1} s on {} images ({} validation, {} classes, {} \
                 parameters); best accuracy {}; model written to {}",
                report.summary.steps,
                report.summary.seconds,
                report.train_images,
                report.valid_images,
                report.labels.len(),
                report.parameters,
                report
                    .summary
                    .best_score
                    .map_or("n/a".to_string(), |s| format!("{s:.4}")),
                options.out.display()
            );
            Ok(())
        }
        VisionCommand::Pretrain(a) => {
            let a = *a;
            let options = PretrainOptions {
                data: a.data,
                config: a.config,
                model: a.model,
                temperature: a.temperature,
                projection_dim: a.projection_dim,
                queue: a.queue,
                batch_size: a.train.batch_size,
                images: a.images.options(),
                training: a.train.config(None),
                out: a.train.out.clone(),
            };
            let report = vision::pretrain(&options, a.train.resume, device)?;
            eprintln!(
                "pretrained {} steps in {:.1} s on {} images ({} parameters with the \
                 projection head); encoder written to {}",
                report.summary.steps,
                report.summary.seconds,
                report.images,
                report.parameters,
                options.out.display()
            );
            Ok(())
        }
        VisionCommand::Probe(a) => {
            let options = ProbeOptions {
                encoder: a.encoder,
                random_init: a.random_init,
                data: a.data,
                valid: a.valid,
                label_fraction: a.label_fraction,
                seed: a.seed,
                batch_size: a.batch_size,
                images: a.images.options(),
                epochs: a.probe_epochs,
                lr: a.probe_lr,
                weight_decay: a.probe_weight_decay,
            };
            let report = vision::probe(&options, device)?;
            if a.json {
                println!("{report}");
            } else {
                println!(
                    "linear probe accuracy {:.4} (macro F1 {:.4}) on {} images, fitted on {} \
                     ({} features)",
                    report["accuracy"].as_f64().unwrap_or(f64::NAN),
                    report["macro_f1"].as_f64().unwrap_or(f64::NAN),
                    report["valid_images"],
                    report["train_images"],
                    report["feature_dim"]
                );
            }
            Ok(())
        }
        VisionCommand::Eval {
            model,
            data,
            batch_size,
            images,
            json,
        } => {
            let report = vision::evaluate(&model, &data, &images.options(), batch_size, device)?;
            if json {
                println!("{report}");
            } else {
                crate::print_eval(&report);
            }
            Ok(())
        }
        VisionCommand::Predict {
            model,
            top_k,
            images,
            json,
            files,
        } => {
            let predictions = vision::predict(&model, &files, top_k, &images.options(), device)?;
            for p in predictions {
                if json {
                    println!("{}", serde_json::to_string(&p)?);
                } else {
                    let top: Vec<String> = p
                        .top
                        .iter()
                        .map(|(label, prob)| format!("{label} {prob:.3}"))
                        .collect();
                    println!("{}\t{}", p.image, top.join("\t"));
                }
            }
            Ok(())
        }
    }
}
