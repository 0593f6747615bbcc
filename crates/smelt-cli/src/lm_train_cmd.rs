//! `smelt lm train`, `smelt lm merge`, `smelt tokenizer train` and `smelt data chatterbot`.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use smelt_data::batch::Batching;
use smelt_models::device::Device;
use smelt_models::quant::GgmlType;
use smelt_tasks::lm_train::{self, LmTrainOptions, LoraOptions, Mode, ScratchConfig};
use smelt_train::optim::AdamWConfig;
use smelt_train::schedule::Decay;
use smelt_train::trainer::TrainConfig;
use std::path::PathBuf;

#[derive(Args)]
pub struct LmTrainArgs {
    /// Base model to fine-tune: a GGUF file or a Hugging Face directory.
    #[arg(long, required_unless_present = "from_scratch")]
    model: Option<PathBuf>,
    /// Train a new GPT-2 style model from --config instead of fine-tuning.
    #[arg(long, requires_all = ["config", "tokenizer"], conflicts_with = "model")]
    from_scratch: bool,
    /// Architecture of a model trained from scratch (TOML: layers, heads, hidden, context,
    /// optional intermediate).
    #[arg(long)]
    config: Option<PathBuf>,
    /// A tokenizer.json (from scratch: required; fine-tuning: overrides the model's).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Training data: JSONL of {"prompt", "completion"} or {"messages"} (fine-tuning), or
    /// plain text files (from scratch).
    #[arg(long, num_args = 1.., required = true)]
    train: Vec<PathBuf>,
    /// Validation data in the same form; its loss is measured before the first step and
    /// after each epoch.
    #[arg(long)]
    valid: Option<PathBuf>,
    /// Train LoRA adapters of this rank over the frozen base (full fine-tuning without it).
    #[arg(long)]
    lora_rank: Option<usize>,
    /// LoRA scaling numerator: adapters are scaled by alpha / rank (default 2 × rank).
    #[arg(long)]
    lora_alpha: Option<f64>,
    #[arg(long, default_value_t = 0.05)]
    lora_dropout: f64,
    /// Layers that get adapters, by PEFT module name (repeatable or comma-separated);
    /// default q_proj,v_proj for Llama models, c_proj,c_fc for GPT-2.
    #[arg(long, value_delimiter = ',')]
    lora_targets: Vec<String>,
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long, default_value_t = 8)]
    eval_batch_size: usize,
    /// Longest sequence in tokens (the model's context when omitted; the block length from
    /// scratch).
    #[arg(long)]
    max_length: Option<usize>,
    /// Batching: `bucketed` (similar lengths together) or `random`.
    #[arg(long, default_value = "bucketed")]
    batching: Batching,
    /// Peak learning rate (default 2e-4 with LoRA, 5e-5 for full fine-tuning, 1e-3 from
    /// scratch).
    #[arg(long)]
    lr: Option<f64>,
    /// AdamW decoupled weight decay (not applied to biases and norms).
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    #[arg(long, default_value_t = 0.05)]
    warmup_ratio: f64,
    /// Decay after warm-up: linear, cosine or constant.
    #[arg(long, default_value = "cosine")]
    schedule: Decay,
    /// Clip gradients to this global norm (0 disables).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f32,
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Stop after this many epochs without a lower validation loss.
    #[arg(long)]
    patience: Option<usize>,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    #[arg(long, default_value_t = 10)]
    log_every: u64,
    /// Also checkpoint every N updates (always at the end of each epoch).
    #[arg(long)]
    checkpoint_every: Option<u64>,
    /// From scratch: prompts continued at each evaluation (repeatable).
    #[arg(long)]
    sample_prompt: Vec<String>,
    /// From scratch: tokens generated per sample prompt (0 disables samples).
    #[arg(long, default_value_t = 40)]
    sample_tokens: usize,
    /// Output directory: adapter (PEFT layout) or model (Hugging Face layout), metrics.jsonl,
    /// run_config.json and checkpoint/.
    #[arg(long)]
    out: PathBuf,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    resume: bool,
}

pub fn train(a: LmTrainArgs, device: &Device) -> Result<()> {
    let mode = if a.from_scratch {
        let path = a
            .config
            .clone()
            .context("--from-scratch needs --config FILE")?;
        if a.lora_rank.is_some() {
            bail!("--lora-rank adapts a pretrained model; it cannot be used with --from-scratch");
        }
        Mode::Scratch(ScratchConfig::read(&path)?)
    } else if let Some(rank) = a.lora_rank {
        Mode::Lora(LoraOptions {
            rank,
            alpha: a.lora_alpha.unwrap_or(2.0 * rank as f64),
            dropout: a.lora_dropout,
            targets: a.lora_targets.clone(),
        })
    } else {
        if a.lora_alpha.is_some() || !a.lora_targets.is_empty() {
            bail!("--lora-alpha and --lora-targets configure LoRA; add --lora-rank N");
        }
        Mode::Full
    };
    let lr = a.lr.unwrap_or(match mode {
        Mode::Lora(_) => 2e-4,
        Mode::Full => 5e-5,
        Mode::Scratch(_) => 1e-3,
    });
    let max_length = match &mode {
        Mode::Scratch(c) => Some(a.max_length.unwrap_or(c.context)),
        _ => a.max_length,
    };
    let sample_prompts = if a.sample_prompt.is_empty() && a.from_scratch {
        vec!["It is a truth".to_string()]
    } else {
        a.sample_prompt.clone()
    };
    let options = LmTrainOptions {
        model: a.model,
        tokenizer: a.tokenizer,
        mode,
        train_files: a.train,
        valid_file: a.valid,
        out: a.out,
        batch_size: a.batch_size,
        eval_batch_size: a.eval_batch_size,
        max_length,
        batching: a.batching,
        training: TrainConfig {
            epochs: a.epochs,
            lr,
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
        sample_prompts,
        sample_tokens: a.sample_tokens,
    };
    let report = lm_train::train(&options, a.resume, device)?;
    eprintln!(
        "trained {} steps in {:.1} s on {} sequences ({} predicted tokens, {} trainable \
         parameters; {} validation sequences); best validation loss {}; written to {}",
        report.summary.steps,
        report.summary.seconds,
        report.train_sequences,
        report.train_targets,
        report.trainable_parameters,
        report.valid_sequences,
        report
            .summary
            .best_score
            .map_or("n/a".to_string(), |s| format!("{:.4}", -s)),
        options.out.display()
    );
    Ok(())
}

#[derive(Args)]
pub struct MergeArgs {
    /// The base model the adapter was trained on (GGUF file or Hugging Face directory).
    #[arg(long)]
    model: PathBuf,
    /// A tokenizer.json to use instead of the model's own.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// The PEFT adapter directory.
    #[arg(long)]
    adapter: PathBuf,
    /// Output: a `.gguf` file (from a GGUF base) or a Hugging Face directory.
    #[arg(long)]
    out: PathBuf,
    /// Encoding of the merged matrices in a GGUF output: f32, f16, q8_0, q5_0, q5_1, q4_0
    /// or q4_1 (untouched tensors keep theirs).
    #[arg(long, default_value = "f32", value_parser = parse_type)]
    merged_type: GgmlType,
}

fn parse_type(s: &str) -> std::result::Result<GgmlType, String> {
    let all = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q8_0,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
    ];
    all.into_iter()
        .find(|t| t.name().eq_ignore_ascii_case(s))
        .ok_or_else(|| format!("`{s}`: expected f32, f16, q8_0, q5_0, q5_1, q4_0 or q4_1"))
}

pub fn merge(a: MergeArgs) -> Result<()> {
    let report = lm_train::merge(
        &a.model,
        a.tokenizer.as_deref(),
        &a.adapter,
        &a.out,
        a.merged_type,
    )?;
    eprintln!(
        "merged {} layers; wrote {} ({})",
        report.merged_layers,
        report.out.display(),
        report.format
    );
    Ok(())
}

#[derive(Subcommand)]
pub enum TokenizerCommand {
    /// Train a byte-level BPE tokenizer on text files and write it as tokenizer.json.
    Train {
        /// Size of the vocabulary (256 byte tokens and <|endoftext|> included).
        #[arg(long)]
        vocab_size: usize,
        /// Merge only pairs seen at least this often.
        #[arg(long, default_value_t = 2)]
        min_frequency: u64,
        /// The tokenizer.json to write.
        #[arg(long)]
        out: PathBuf,
        /// Text files to learn from.
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
    },
}

pub fn tokenizer(cmd: TokenizerCommand) -> Result<()> {
    match cmd {
        TokenizerCommand::Train {
            vocab_size,
            min_frequency,
            out,
            inputs,
        } => {
            let t = std::time::Instant::now();
            let options = smelt_data::bpe_train::BpeOptions {
                vocab_size,
                min_frequency,
            };
            let tok = smelt_data::bpe_train::train_bpe(&inputs, &options)?;
            let text = smelt_data::bpe_train::tokenizer_json(&tok)?;
            if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
            }
            smelt_models::fsutil::write_atomic(&out, text.as_bytes())?;
            eprintln!(
                "trained a {}-token vocabulary on {} files in {:.1} s; wrote {}",
                tok.get_vocab_size(true),
                inputs.len(),
                t.elapsed().as_secs_f64(),
                out.display()
            );
            Ok(())
        }
    }
}

#[derive(Subcommand)]
pub enum DataCommand {
    /// Turn the chatterbot corpus (a folder of YAML files) into chat conversations:
    /// OUT/train.jsonl and OUT/valid.jsonl, every --valid-every-th exchange held out.
    Chatterbot {
        /// The folder of `*.yml` files.
        src: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 10)]
        valid_every: usize,
    },
}

pub fn data(cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Chatterbot {
            src,
            out,
            valid_every,
        } => {
            if valid_every < 2 {
                bail!("--valid-every must be at least 2");
            }
            let mut files: Vec<PathBuf> = std::fs::read_dir(&src)
                .with_context(|| format!("{}", src.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "yml" || e == "yaml"))
                .collect();
            files.sort();
            if files.is_empty() {
                bail!("{}: no .yml files", src.display());
            }
            let (mut train, mut valid) = (String::new(), String::new());
            let mut n = 0;
            for f in &files {
                let read = smelt_data::lm_data::chatterbot_pairs(f)?;
                for c in &read.skipped {
                    tracing::warn!(
                        "{}: conversation {c} is not a list of text turns; skipped",
                        f.display()
                    );
                }
                for (question, answer) in read.pairs {
                    let line = serde_json::json!({"messages": [
                        {"role": "user", "content": question},
                        {"role": "assistant", "content": answer},
                    ]});
                    let target = if n % valid_every == valid_every - 1 {
                        &mut valid
                    } else {
                        &mut train
                    };
                    target.push_str(&line.to_string());
                    target.push('\n');
                    n += 1;
                }
            }
            std::fs::create_dir_all(&out).with_context(|| format!("{}", out.display()))?;
            smelt_models::fsutil::write_atomic(&out.join("train.jsonl"), train.as_bytes())?;
            smelt_models::fsutil::write_atomic(&out.join("valid.jsonl"), valid.as_bytes())?;
            eprintln!(
                "{n} exchanges from {} files: {} for training, {} held out; wrote {}",
                files.len(),
                n - n / valid_every,
                n / valid_every,
                out.display()
            );
            Ok(())
        }
    }
}
