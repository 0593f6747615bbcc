//! `smelt lm ...` and `smelt inspect`.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use smelt_data::examples::Columns;
use smelt_data::lm_tokenizer::Message;
use smelt_data::table::{Format, ReadOptions};
use smelt_models::device::Device;
use smelt_tasks::lm::{self, GenerateOptions, LanguageModel, Sampling};
use std::io::{BufRead, IsTerminal, Read, Write};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum LmCommand {
    /// Continue prompts (from --prompt, --file or stdin), streaming tokens as they are made.
    Generate(GenerateArgs),
    /// Chat with an instruction-tuned model through its chat template. Interactive on a
    /// terminal; otherwise every line of stdin is one user turn.
    Chat(ChatArgs),
    /// Few-shot classification: score each label's log-likelihood after a k-shot prompt.
    Classify(FewShotArgs),
    /// Perplexity of a text file, with a sliding window.
    Eval(EvalArgs),
    /// Fine-tune on prompt/completion pairs or chats (full or LoRA), or train a GPT-2 style
    /// model from scratch on text files.
    Train(Box<crate::lm_train_cmd::LmTrainArgs>),
    /// Fold a LoRA adapter into its base model; write a Hugging Face directory or a GGUF file.
    Merge(crate::lm_train_cmd::MergeArgs),
}

#[derive(Args, Clone)]
pub struct ModelArgs {
    /// A GGUF file or a Hugging Face directory (config.json, model.safetensors,
    /// tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// A tokenizer.json (or directory) to use instead of the model's own.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Quantize activations to 8 bits for the quantized kernels (integer dot products, as
    /// llama.cpp does); results no longer equal multiplying by the dequantized weights in f32.
    #[arg(long)]
    q8_activations: bool,
    /// A PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors) to
    /// apply to the model.
    #[arg(long)]
    adapter: Option<PathBuf>,
}

impl ModelArgs {
    fn load(&self, device: &Device) -> Result<LanguageModel> {
        smelt_models::quant::set_exact_activations(!self.q8_activations);
        let t = std::time::Instant::now();
        let mut lm = LanguageModel::load(&self.model, self.tokenizer.as_deref(), device)?;
        if let Some(adapter) = &self.adapter {
            lm = lm.with_adapter(adapter)?;
            tracing::info!("applied adapter {}", adapter.display());
        }
        tracing::info!(
            "loaded {} ({} layers, hidden {}) in {:.2} s",
            self.model.display(),
            lm.model.config.layers,
            lm.model.config.hidden,
            t.elapsed().as_secs_f64()
        );
        Ok(lm)
    }
}

#[derive(Args, Clone)]
pub struct SamplingArgs {
    /// Maximum number of tokens to generate.
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Softmax temperature; 0 is greedy decoding.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Sample among the K most likely tokens (0: no limit).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Nucleus sampling: the smallest set of tokens reaching this probability.
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Drop tokens less likely than this fraction of the most likely one.
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    /// Penalise tokens already in the text (1: off; 1.1 is a common choice).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop before this text (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Do not stop at end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
}

impl SamplingArgs {
    fn options(&self) -> GenerateOptions {
        GenerateOptions {
            max_new_tokens: self.max_new_tokens,
            sampling: Sampling {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                repetition_penalty: self.repetition_penalty,
                seed: self.seed,
            },
            stop: self.stop.clone(),
            ignore_eos: self.ignore_eos,
        }
    }
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt text (repeatable: several prompts are decoded as one batch).
    #[arg(long)]
    prompt: Vec<String>,
    /// Read the prompt from this file (the whole file is one prompt).
    #[arg(long)]
    file: Option<PathBuf>,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Print one JSON object per prompt (text, tokens, finish reason) instead of streaming.
    #[arg(long)]
    json: bool,
    /// Print prompt and generation speed to stderr.
    #[arg(long)]
    stats: bool,
}

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// System prompt.
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(Args)]
pub struct FewShotArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Labelled examples the shots are drawn from.
    #[arg(long)]
    examples: PathBuf,
    /// Number of examples in the prompt.
    #[arg(long, default_value_t = 4)]
    shots: usize,
    /// Labelled data to classify and score.
    #[arg(long)]
    data: PathBuf,
    /// Column holding the text (in both files).
    #[arg(long, default_value = "text")]
    text_column: String,
    /// Column holding the label (in both files).
    #[arg(long, default_value = "label")]
    label_column: String,
    /// File format; guessed from the extension (.csv, .tsv, .jsonl) when omitted.
    #[arg(long, value_parser = parse_format)]
    format: Option<Format>,
    /// Text encoding of the files (a WHATWG label); UTF-8 when omitted.
    #[arg(long)]
    encoding: Option<String>,
    /// The CSV/TSV files have no header row; name columns by position, from 1.
    #[arg(long)]
    no_header: bool,
    /// Seed for drawing the shots.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Text before the shots (default: "Classify each input as one of: <labels>.").
    #[arg(long)]
    instruction: Option<String>,
    /// Compare labels by mean per-token log-likelihood instead of the total.
    #[arg(long)]
    normalize: bool,
    /// Draw the shots at random regardless of label (default: labels take turns).
    #[arg(long)]
    unbalanced: bool,
    /// Classify only the first N rows of --data.
    #[arg(long)]
    limit: Option<usize>,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A UTF-8 text file.
    #[arg(long)]
    data: PathBuf,
    /// Tokens per window (default 1024, at most the model's context).
    #[arg(long)]
    window: Option<usize>,
    /// Tokens the window advances by (default half the window).
    #[arg(long)]
    stride: Option<usize>,
    /// Score only the first N tokens of the file.
    #[arg(long)]
    max_tokens: Option<usize>,
    #[arg(long)]
    json: bool,
}

fn parse_format(s: &str) -> std::result::Result<Format, String> {
    Format::parse(s).map_err(|e| e.to_string())
}

pub fn run(cmd: LmCommand, device: &Device) -> Result<()> {
    match cmd {
        LmCommand::Generate(a) => generate(a, device),
        LmCommand::Chat(a) => chat(a, device),
        LmCommand::Classify(a) => few_shot(a, device),
        LmCommand::Train(a) => crate::lm_train_cmd::train(*a, device),
        LmCommand::Merge(a) => crate::lm_train_cmd::merge(a),
        LmCommand::Eval(a) => {
            let lm = a.model.load(device)?;
            let report = lm::perplexity(
                &lm,
                &a.data,
                &lm::PerplexityOptions {
                    window: a.window,
                    stride: a.stride,
                    max_tokens: a.max_tokens,
                },
            )?;
            if a.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!(
                    "perplexity {:.4} (mean NLL {:.4}) over {} tokens, window {} stride {}, {:.1} s",
                    report.perplexity,
                    report.mean_nll,
                    report.scored_tokens,
                    report.window,
                    report.stride,
                    report.seconds
                );
            }
            Ok(())
        }
    }
}

fn generate(a: GenerateArgs, device: &Device) -> Result<()> {
    let mut prompts = a.prompt.clone();
    if let Some(f) = &a.file {
        prompts.push(
            std::fs::read_to_string(f)
                .with_context(|| format!("reading prompt file {}", f.display()))?,
        );
    }
    if prompts.is_empty() {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading the prompt from stdin")?;
        prompts.push(s);
    }
    let lm = a.model.load(device)?;
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| lm.tokenizer.encode(p, true))
        .collect::<std::result::Result<_, _>>()?;
    let options = a.sampling.options();
    let stream = !a.json && ids.len() == 1;
    let (gens, stats) = lm::generate(&lm, &ids, &options, |_, text| {
        if stream {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
        }
    })?;
    let mut out = std::io::stdout().lock();
    if a.json {
        for (p, g) in prompts.iter().zip(&gens) {
            let v = serde_json::json!({
                "prompt": p, "text": g.text, "tokens": g.tokens,
                "prompt_tokens": g.prompt_tokens, "finish": g.finish,
            });
            writeln!(out, "{v}")?;
        }
    } else if stream {
        writeln!(out)?;
    } else {
        for (i, g) in gens.iter().enumerate() {
            writeln!(out, "--- {}\n{}{}", i + 1, prompts[i], g.text)?;
        }
    }
    if a.stats {
        eprintln!(
            "prompt: {} tokens in {:.3} s ({:.1} tokens/s); generation: {} tokens in {:.3} s ({:.1} tokens/s)",
            stats.prompt_tokens,
            stats.prompt_seconds,
            stats.prompt_tokens as f64 / stats.prompt_seconds.max(1e-9),
            stats.generated_tokens,
            stats.generate_seconds,
            stats.generated_tokens as f64 / stats.generate_seconds.max(1e-9),
        );
    }
    Ok(())
}

fn chat(a: ChatArgs, device: &Device) -> Result<()> {
    let lm = a.model.load(device)?;
    if lm.tokenizer.chat_template.is_none() {
        bail!(
            "{}: the model has no chat template; use `smelt lm generate` instead",
            a.model.model.display()
        );
    }
    let interactive = std::io::stdin().is_terminal();
    let mut messages: Vec<Message> = Vec::new();
    if let Some(s) = &a.system {
        messages.push(Message::new("system", s));
    }
    let mut options = a.sampling.options();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let mut turn = 0u64;
    loop {
        if interactive {
            eprint!("> ");
            std::io::stderr().flush().ok();
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("reading stdin")?;
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        if interactive && (text == "/exit" || text == "/quit") {
            break;
        }
        messages.push(Message::new("user", text));
        let ids = lm::chat_prompt(&lm, &messages)?;
        if ids.len() + 1 >= lm.context() {
            bail!(
                "the conversation has grown past the model's context of {} tokens",
                lm.context()
            );
        }
        options.sampling.seed = a.sampling.seed.wrapping_add(turn);
        turn += 1;
        let (gens, _) = lm::generate(&lm, &[ids], &options, |_, t| {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(t.as_bytes());
            let _ = out.flush();
        })?;
        println!();
        let reply = gens.into_iter().next().map(|g| g.text).unwrap_or_default();
        messages.push(Message::new("assistant", reply.trim()));
    }
    Ok(())
}

fn few_shot(a: FewShotArgs, device: &Device) -> Result<()> {
    let lm = a.model.load(device)?;
    let options = lm::FewShotOptions {
        examples_file: a.examples.clone(),
        data_file: a.data.clone(),
        columns: Columns {
            text: a.text_column.clone(),
            text_pair: None,
            label: Some(a.label_column.clone()),
        },
        read: ReadOptions {
            format: a.format,
            encoding: a.encoding.clone(),
            no_header: a.no_header,
        },
        shots: a.shots,
        seed: a.seed,
        instruction: a.instruction.clone(),
        normalize: a.normalize,
        balanced: !a.unbalanced,
        limit: a.limit,
    };
    let report = lm::few_shot(&lm, &options)?;
    if a.json {
        let v = serde_json::json!({
            "accuracy": report.accuracy, "correct": report.correct, "total": report.total,
            "shots": report.shots, "labels": report.labels, "seconds": report.seconds,
            "prompt_tokens": report.prompt_tokens, "predicted_counts": report.predicted_counts,
        });
        println!("{v}");
    } else {
        println!(
            "{}-shot accuracy {:.2}% ({} of {}), labels {}, {:.1} s",
            report.shots,
            100.0 * report.accuracy,
            report.correct,
            report.total,
            report.labels.join("/"),
            report.seconds
        );
    }
    Ok(())
}

pub fn inspect(path: &std::path::Path) -> Result<()> {
    print!("{}", smelt_tasks::lm::inspect(path)?);
    Ok(())
}
