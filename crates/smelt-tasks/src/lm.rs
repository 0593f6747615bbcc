//! Causal language models as a user meets them: load a GGUF file or a Hugging Face directory,
//! generate with sampling controls and stop strings, chat, score labels few-shot, and measure
//! perplexity.

use crate::error::{Result, TaskError};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use smelt_data::examples::{label_set, read_examples, Columns, TextExample};
use smelt_data::lm_tokenizer::{GgufVocab, LmTokenizer, Message};
use smelt_data::table::ReadOptions;
use smelt_models::causal::{is_cpu, CausalLm, KvCache, Step};
use smelt_models::gguf::{GgufFile, Value};
use smelt_models::host_decode::HostModel;
use smelt_models::weights::tensor_to_vec;
use smelt_models::ModelError;
use std::path::{Path, PathBuf};

/// A model with its tokenizer.
pub struct LanguageModel {
    pub model: CausalLm,
    pub tokenizer: LmTokenizer,
    pub source: PathBuf,
    host: std::sync::OnceLock<HostModel>,
}

impl LanguageModel {
    /// Loads `path`: a `.gguf` file (tokenizer from its metadata) or a Hugging Face directory
    /// (`config.json`, `model.safetensors`, `tokenizer.json`). `tokenizer` overrides where the
    /// tokenizer comes from.
    pub fn load(
        path: &Path,
        tokenizer: Option<&Path>,
        device: &smelt_models::device::Device,
    ) -> Result<Self> {
        if !path.exists() {
            return Err(TaskError::Invalid(format!(
                "{}: no such file or directory",
                path.display()
            )));
        }
        let (model, tok) = if path.is_dir() {
            let model = CausalLm::load_hf(path, device)?;
            let tok = LmTokenizer::from_hf(tokenizer.unwrap_or(path))?;
            (model, tok)
        } else {
            let file = GgufFile::open(path)?;
            let model = CausalLm::load_gguf(&file, device)?;
            let tok = match tokenizer {
                Some(t) => LmTokenizer::from_hf(t)?,
                None => gguf_tokenizer(&file)?,
            };
            (model, tok)
        };
        // Added special tokens may lie beyond the model's rows (as Whisper's do beyond GPT-2's);
        // they are refused when a text produces one.
        if tok.base_vocab_size() > model.config.vocab_size {
            return Err(TaskError::Invalid(format!(
                "{}: the tokenizer has {} tokens but the model's vocabulary is {}",
                tok.source.display(),
                tok.base_vocab_size(),
                model.config.vocab_size
            )));
        }
        Ok(Self {
            model,
            tokenizer: tok,
            source: path.to_path_buf(),
            host: std::sync::OnceLock::new(),
        })
    }

    /// Applies a PEFT LoRA adapter directory, folded into the weights (adapted layers become
    /// f32; the rest keep their encoding). Fails when the adapter does not fit the model.
    pub fn with_adapter(self, adapter: &Path) -> Result<Self> {
        let (adapted, _) = smelt_models::lora::load_adapter(self.model, adapter)?;
        Ok(Self {
            model: smelt_models::lora::merge(adapted)?,
            host: std::sync::OnceLock::new(),
            ..self
        })
    }

    pub fn context(&self) -> usize {
        self.model.config.context
    }

    /// The fused CPU path for single sequences (built on first use), when the model is on
    /// the CPU and `SMELT_TENSOR_DECODE` is not set.
    pub fn host(&self) -> Result<Option<&HostModel>> {
        if !is_cpu(&self.model.device()) || std::env::var_os("SMELT_TENSOR_DECODE").is_some() {
            return Ok(None);
        }
        if let Some(h) = self.host.get() {
            return Ok(Some(h));
        }
        let h = HostModel::new(&self.model)?;
        Ok(Some(self.host.get_or_init(|| h)))
    }
}

/// The tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.
pub fn gguf_tokenizer(file: &GgufFile) -> Result<LmTokenizer> {
    let strings = |key: &str| -> Result<Vec<String>> {
        Ok(file.require(key, "an array of strings", |v| {
            v.as_array()?
                .iter()
                .map(|s| s.as_str().map(str::to_string))
                .collect()
        })?)
    };
    let model = file.require("tokenizer.ggml.model", "a string", |v| {
        v.as_str().map(str::to_string)
    })?;
    let id = |key: &str| -> Result<Option<u32>> {
        match file.get(key) {
            None => Ok(None),
            Some(_) => Ok(Some(file.require(key, "a token id", |v| {
                v.as_u64().and_then(|n| u32::try_from(n).ok())
            })?)),
        }
    };
    let vocab = GgufVocab {
        model: &model,
        pre: file.get("tokenizer.ggml.pre").and_then(Value::as_str),
        tokens: strings("tokenizer.ggml.tokens")?,
        token_types: match file.get("tokenizer.ggml.token_type") {
            None => None,
            Some(_) => Some(file.require(
                "tokenizer.ggml.token_type",
                "an array of integers",
                |v| v.as_array()?.iter().map(Value::as_i64).collect(),
            )?),
        },
        merges: match file.get("tokenizer.ggml.merges") {
            None => Vec::new(),
            Some(_) => strings("tokenizer.ggml.merges")?,
        },
        bos: id("tokenizer.ggml.bos_token_id")?,
        eos: id("tokenizer.ggml.eos_token_id")?,
        add_bos: file
            .get("tokenizer.ggml.add_bos_token")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        chat_template: file
            .get("tokenizer.chat_template")
            .and_then(Value::as_str)
            .map(str::to_string),
    };
    Ok(LmTokenizer::from_gguf(file.path(), vocab)?)
}

/// Sampling controls. `temperature == 0` is greedy decoding.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p`; 1 keeps all.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 keeps all.
    pub min_p: f32,
    /// Divide (multiply, if negative) the logits of tokens already present; 1 is off.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl Sampling {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(TaskError::Invalid(m));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad(format!(
                "--temperature is {}, expected a number >= 0",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!(
                "--top-p is {}, expected a number in (0, 1]",
                self.top_p
            ));
        }
        if !(0.0..1.0).contains(&self.min_p) {
            return bad(format!(
                "--min-p is {}, expected a number in [0, 1)",
                self.min_p
            ));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(format!(
                "--repetition-penalty is {}, expected a number > 0",
                self.repetition_penalty
            ));
        }
        Ok(())
    }
}

/// Draws tokens from logits under [`Sampling`], with its own seeded generator.
pub struct Sampler {
    options: Sampling,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(options: Sampling) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(options.seed);
        Self { options, rng }
    }

    /// Picks the next token. `history` is every token of the sequence so far (prompt included)
    /// for the repetition penalty.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let o = &self.options;
        if o.repetition_penalty != 1.0 {
            let mut seen = history.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for &t in &seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / o.repetition_penalty
                    } else {
                        *l * o.repetition_penalty
                    };
                }
            }
        }
        if o.temperature < 1e-6 {
            return argmax(logits);
        }
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l / o.temperature))
            .collect();
        if cand.is_empty() {
            return argmax(logits);
        }
        let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if o.top_k > 0 && cand.len() > o.top_k {
            // Partition out the k best first: sorting the whole vocabulary every token costs
            // more than the rest of sampling.
            cand.select_nth_unstable_by(o.top_k - 1, order);
            cand.truncate(o.top_k);
        }
        cand.sort_unstable_by(order);
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|c| (c.1 - max).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if o.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= o.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
        }
        if o.min_p > 0.0 {
            let floor = probs[0] * o.min_p;
            let keep = probs.iter().take_while(|&&p| p >= floor).count().max(1);
            probs.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (i, p) in probs.iter().enumerate() {
            if r < *p {
                return cand[i].0;
            }
            r -= p;
        }
        cand[probs.len() - 1].0
    }
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Generation ends before the first occurrence of any of these.
    pub stop: Vec<String>,
    /// Keep going past end-of-sequence tokens (for benchmarks).
    pub ignore_eos: bool,
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    Length,
    Eos,
    Stop,
    Context,
}

/// A finished generation.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Generation {
    pub text: String,
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    pub finish: Finish,
}

/// Timing of a generation run.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct GenerateStats {
    pub prompt_tokens: usize,
    pub prompt_seconds: f64,
    pub generated_tokens: usize,
    pub generate_seconds: f64,
}

/// Text decoding that emits only what is final: no half UTF-8 characters, and nothing that
/// could still turn out to be the beginning of a stop string.
struct TextStream {
    ids: Vec<u32>,
    text: String,
    emitted: usize,
    stopped: bool,
}

impl TextStream {
    fn new() -> Self {
        Self {
            ids: Vec::new(),
            text: String::new(),
            emitted: 0,
            stopped: false,
        }
    }

    /// Adds a token; returns the newly final text.
    fn push(&mut self, tok: &LmTokenizer, id: u32, stop: &[String]) -> Result<String> {
        self.ids.push(id);
        let text = tok.decode(&self.ids, true)?;
        if text.ends_with('\u{fffd}') {
            return Ok(String::new());
        }
        self.text = text;
        if let Some(at) = stop.iter().filter_map(|s| self.text.find(s.as_str())).min() {
            self.text.truncate(at);
            self.stopped = true;
        }
        let mut safe = self.text.len();
        if !self.stopped {
            for s in stop {
                for k in (1..s.len()).rev() {
                    if s.is_char_boundary(k) && self.text.ends_with(&s[..k]) {
                        safe = safe.min(self.text.len() - k);
                        break;
                    }
                }
            }
        }
        let safe = safe.max(self.emitted);
        let out = self.text[self.emitted..safe].to_string();
        self.emitted = safe;
        Ok(out)
    }

    fn finish(&mut self) -> String {
        let out = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        out
    }
}

/// Generates a continuation of every prompt (token ids), decoding them as one batch: prompts
/// are left-padded, each row stops on its own. `on_text(row, text)` receives text as it
/// becomes final.
pub fn generate(
    lm: &LanguageModel,
    prompts: &[Vec<u32>],
    options: &GenerateOptions,
    on_text: impl FnMut(usize, &str) + Send,
) -> Result<(Vec<Generation>, GenerateStats)> {
    // Decoding runs hundreds of small parallel kernels per token. Running the loop on a worker
    // of the pool lets this thread take part in them instead of sleeping and waking for each.
    on_pool(|| generate_inner(lm, prompts, options, on_text))
}

/// Runs `f` on a thread of rayon's pool (the calling thread waits once, not per kernel).
pub fn on_pool<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    let mut out = None;
    rayon::scope(|s| s.spawn(|_| out = Some(f())));
    out.expect("the pool ran the job")
}

fn generate_inner(
    lm: &LanguageModel,
    prompts: &[Vec<u32>],
    options: &GenerateOptions,
    mut on_text: impl FnMut(usize, &str),
) -> Result<(Vec<Generation>, GenerateStats)> {
    options.sampling.validate()?;
    if options.stop.iter().any(String::is_empty) {
        return Err(TaskError::Invalid(
            "--stop is empty; give the text to stop before".into(),
        ));
    }
    let b = prompts.len();
    if b == 0 {
        return Ok((Vec::new(), GenerateStats::default()));
    }
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(TaskError::Invalid(format!(
                "prompt {} is empty: the model needs at least one token to continue",
                i + 1
            )));
        }
        if p.len() >= lm.context() {
            return Err(TaskError::Invalid(format!(
                "prompt {} has {} tokens; the model's context is {}",
                i + 1,
                p.len(),
                lm.context()
            )));
        }
    }
    let tok = &lm.tokenizer;
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let pad_id = tok.eos.unwrap_or(0);
    let mut tokens = Vec::with_capacity(b * longest);
    let mut positions = Vec::with_capacity(b * longest);
    let mut valid = vec![Vec::new(); b];
    for (r, p) in prompts.iter().enumerate() {
        let pad = longest - p.len();
        tokens.extend(std::iter::repeat_n(pad_id, pad).chain(p.iter().copied()));
        positions.extend((0..longest).map(|i| i.saturating_sub(pad)));
        valid[r] = (0..longest).map(|i| i >= pad).collect();
    }
    let padded = prompts.iter().any(|p| p.len() != longest);
    let key_valid = |valid: &[Vec<bool>]| {
        padded.then(|| valid.iter().flatten().copied().collect::<Vec<bool>>())
    };
    let mut cache = KvCache::new();
    let host = if b == 1 { lm.host()? } else { None };
    let mut host_cache = host.map(HostModel::new_cache);
    let start = std::time::Instant::now();
    let mut step = Step {
        tokens,
        batch: b,
        len: longest,
        positions,
        key_valid: key_valid(&valid),
    };
    let mut run = |step: &Step| -> Result<Vec<f32>> {
        match (host, host_cache.as_mut()) {
            (Some(h), Some(c)) => Ok(h.forward(&step.tokens, c)?),
            _ => Ok(tensor_to_vec(lm.model.last_logits(step, &mut cache)?)?),
        }
    };
    let mut logits = run(&step)?;
    let mut stats = GenerateStats {
        prompt_tokens: prompts.iter().map(Vec::len).sum(),
        prompt_seconds: start.elapsed().as_secs_f64(),
        ..Default::default()
    };
    let start = std::time::Instant::now();
    let mut samplers: Vec<Sampler> = (0..b)
        .map(|r| {
            Sampler::new(Sampling {
                seed: options.sampling.seed.wrapping_add(r as u64),
                ..options.sampling.clone()
            })
        })
        .collect();
    let mut history: Vec<Vec<u32>> = prompts.to_vec();
    let mut streams: Vec<TextStream> = (0..b).map(|_| TextStream::new()).collect();
    let mut finish: Vec<Option<Finish>> = vec![None; b];
    let mut next_pos: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let vocab = lm.model.config.vocab_size;
    for _ in 0..options.max_new_tokens {
        let host = &logits;
        let mut next = vec![pad_id; b];
        for r in 0..b {
            if finish[r].is_some() {
                continue;
            }
            let row = &mut host[r * vocab..(r + 1) * vocab].to_vec();
            let id = samplers[r].sample(row, &history[r]);
            history[r].push(id);
            stats.generated_tokens += 1;
            if !options.ignore_eos && tok.stop_ids.contains(&id) {
                finish[r] = Some(Finish::Eos);
                continue;
            }
            let text = streams[r].push(tok, id, &options.stop)?;
            if !text.is_empty() {
                on_text(r, &text);
            }
            if streams[r].stopped {
                finish[r] = Some(Finish::Stop);
                continue;
            }
            next[r] = id;
            if next_pos[r] + 1 >= lm.context() {
                finish[r] = Some(Finish::Context);
            }
        }
        if finish.iter().all(Option::is_some) {
            break;
        }
        for (r, v) in valid.iter_mut().enumerate() {
            v.push(finish[r].is_none());
        }
        step = Step {
            tokens: next,
            batch: b,
            len: 1,
            positions: next_pos.clone(),
            key_valid: key_valid(&valid),
        };
        // Finished rows are fed padding at a frozen position (their keys are masked), so they
        // never run past the context while other rows continue.
        for (p, f) in next_pos.iter_mut().zip(&finish) {
            if f.is_none() {
                *p += 1;
            }
        }
        logits = run(&step)?;
    }
    stats.generate_seconds = start.elapsed().as_secs_f64();
    let mut out = Vec::with_capacity(b);
    for r in 0..b {
        let rest = streams[r].finish();
        if !rest.is_empty() {
            on_text(r, &rest);
        }
        let generated = history[r][prompts[r].len()..].to_vec();
        out.push(Generation {
            text: streams[r].text.clone(),
            tokens: generated,
            prompt_tokens: prompts[r].len(),
            finish: finish[r].unwrap_or(Finish::Length),
        });
    }
    Ok((out, stats))
}

/// Renders a conversation with the model's chat template and tokenizes it, ready for the
/// assistant's reply.
pub fn chat_prompt(lm: &LanguageModel, messages: &[Message]) -> Result<Vec<u32>> {
    smelt_data::lm_tokenizer::validate_messages(messages, "chat")?;
    let text = lm.tokenizer.render_chat(messages, true)?;
    Ok(lm.tokenizer.encode(&text, false)?)
}

/// Few-shot classification settings.
#[derive(Clone, Debug)]
pub struct FewShotOptions {
    pub examples_file: PathBuf,
    pub data_file: PathBuf,
    pub columns: Columns,
    pub read: ReadOptions,
    pub shots: usize,
    pub seed: u64,
    /// Text before the shots; `None` lists the labels.
    pub instruction: Option<String>,
    /// Score labels by mean rather than total log-likelihood of their tokens.
    pub normalize: bool,
    /// Let every label appear about equally often among the shots.
    pub balanced: bool,
    /// Evaluate only the first N rows of the data file.
    pub limit: Option<usize>,
}

/// Accuracy of few-shot classification, with the predictions.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FewShotReport {
    pub accuracy: f64,
    pub correct: usize,
    pub total: usize,
    pub shots: usize,
    pub labels: Vec<String>,
    /// Predicted label of every evaluated row.
    pub predictions: Vec<String>,
    /// How often each label was predicted, in the order of `labels`.
    pub predicted_counts: Vec<usize>,
    pub prompt_tokens: usize,
    pub seconds: f64,
}

/// Indices of the `k` shots. Balanced: the labels take turns (as far as each has examples),
/// each example drawn at random, and the shots are then shuffled; otherwise a plain random
/// draw, which with few shots often over-represents one label and biases the model towards it.
fn draw_shots(
    examples: &[TextExample],
    labels: &[String],
    k: usize,
    balanced: bool,
    seed: u64,
) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut shuffle = |v: &mut Vec<usize>| {
        for i in (1..v.len()).rev() {
            let j = rng.random_range(0..=i);
            v.swap(i, j);
        }
    };
    let mut all: Vec<usize> = (0..examples.len()).collect();
    shuffle(&mut all);
    if !balanced {
        all.truncate(k);
        return all;
    }
    let mut by_label: Vec<std::collections::VecDeque<usize>> = labels
        .iter()
        .map(|l| {
            all.iter()
                .copied()
                .filter(|&i| examples[i].label.as_ref() == Some(l))
                .collect()
        })
        .collect();
    let mut out = Vec::with_capacity(k);
    let mut turn = 0;
    while out.len() < k && by_label.iter().any(|q| !q.is_empty()) {
        if let Some(i) = by_label[turn % labels.len()].pop_front() {
            out.push(i);
        }
        turn += 1;
    }
    shuffle(&mut out);
    out
}

fn shot_text(e: &TextExample) -> String {
    format!(
        "Input: {}\nLabel: {}\n\n",
        e.text.trim(),
        e.label.as_deref().unwrap_or("")
    )
}

/// GPT-3 style in-context classification: `shots` labelled examples (drawn with `seed`, the
/// same for every row) form a prompt; each row's predicted label is the candidate with the
/// highest log-likelihood after it.
pub fn few_shot(lm: &LanguageModel, o: &FewShotOptions) -> Result<FewShotReport> {
    let label_col = o
        .columns
        .label
        .clone()
        .ok_or_else(|| TaskError::Invalid("--label-column is required".into()))?;
    let columns = Columns {
        label: Some(label_col),
        ..o.columns.clone()
    };
    let examples = read_examples(&o.examples_file, &columns, &o.read, false)?;
    let data = read_examples(&o.data_file, &columns, &o.read, false)?;
    let labels = label_set(&examples.examples);
    if labels.len() < 2 {
        return Err(TaskError::Invalid(format!(
            "{}: few-shot classification needs at least two labels, found {:?}",
            o.examples_file.display(),
            labels
        )));
    }
    if let Some(e) = data
        .examples
        .iter()
        .find(|e| !labels.contains(e.label.as_ref().unwrap()))
    {
        return Err(TaskError::Invalid(format!(
            "{}: line {}: label `{}` is not among the labels of {} ({})",
            o.data_file.display(),
            e.line,
            e.label.as_deref().unwrap_or(""),
            o.examples_file.display(),
            labels.join(", ")
        )));
    }
    if o.shots > examples.examples.len() {
        return Err(TaskError::Invalid(format!(
            "--shots {} but {} has only {} examples",
            o.shots,
            o.examples_file.display(),
            examples.examples.len()
        )));
    }
    let shots = draw_shots(&examples.examples, &labels, o.shots, o.balanced, o.seed);
    let instruction = o
        .instruction
        .clone()
        .unwrap_or_else(|| format!("Classify each input as one of: {}.\n\n", labels.join(", ")));
    let mut prefix = instruction;
    for &i in &shots {
        prefix.push_str(&shot_text(&examples.examples[i]));
    }
    let tok = &lm.tokenizer;
    let prefix_ids = tok.encode(&prefix, true)?;
    if prefix_ids.is_empty() {
        return Err(TaskError::Invalid(
            "the few-shot prompt is empty (no BOS token, no --instruction, --shots 0); give an \
             --instruction or some shots"
                .into(),
        ));
    }
    let label_ids: Vec<Vec<u32>> = labels
        .iter()
        .map(|l| tok.encode(&format!(" {l}"), false))
        .collect::<std::result::Result<_, _>>()?;
    for (l, ids) in labels.iter().zip(&label_ids) {
        if ids.is_empty()
            || ids
                .iter()
                .any(|&t| t as usize >= lm.model.config.vocab_size)
        {
            return Err(TaskError::Invalid(format!(
                "label `{l}` tokenizes to {ids:?}, which the model cannot score (empty, or ids \
                 beyond its {} rows)",
                lm.model.config.vocab_size
            )));
        }
    }
    let start = std::time::Instant::now();
    let host = lm.host()?;
    let vocab = lm.model.config.vocab_size;
    // Extends a cached context (`past` positions) by `ids` and returns the log-probabilities
    // of the token after them, on the host path when there is one.
    enum Ctx {
        Host(smelt_models::host_decode::HostCache),
        Tensor(KvCache),
    }
    let extend = |ctx: &mut Ctx, ids: &[u32], past: usize| -> Result<Vec<f32>> {
        match ctx {
            Ctx::Host(c) => {
                let h = host.expect("host path");
                Ok(log_softmax(h.forward(ids, c)?, vocab))
            }
            Ctx::Tensor(c) => {
                let h = lm.model.forward_hidden(&Step::single(ids, past), c)?;
                log_softmax_last(lm, h)
            }
        }
    };
    let mut prefix = match host {
        Some(h) => Ctx::Host(h.new_cache()),
        None => Ctx::Tensor(KvCache::new()),
    };
    extend(&mut prefix, &prefix_ids, 0)?;
    let rows: Vec<&TextExample> = data
        .examples
        .iter()
        .take(o.limit.unwrap_or(usize::MAX))
        .collect();
    let mut predictions = Vec::with_capacity(rows.len());
    let mut correct = 0;
    let mut prompt_tokens = prefix_ids.len();
    for e in &rows {
        let query = tok.encode(&format!("Input: {}\nLabel:", e.text.trim()), false)?;
        let longest = label_ids.iter().map(Vec::len).max().unwrap_or(1);
        let needed = prefix_ids.len() + query.len() + longest;
        if needed > lm.context() {
            return Err(TaskError::Invalid(format!(
                "{}: line {}: the prompt needs {needed} tokens, more than the model's context of {}; \
                 use fewer --shots",
                o.data_file.display(),
                e.line,
                lm.context()
            )));
        }
        prompt_tokens += query.len();
        let mut ctx = match &prefix {
            Ctx::Host(c) => Ctx::Host(c.clone()),
            Ctx::Tensor(c) => Ctx::Tensor(c.clone()),
        };
        let first = extend(&mut ctx, &query, prefix_ids.len())?;
        let mut best = (f64::NEG_INFINITY, 0);
        for (li, ids) in label_ids.iter().enumerate() {
            let mut score = first[ids[0] as usize] as f64;
            let mut past = prefix_ids.len() + query.len();
            if ids.len() > 1 {
                let mut c = match &ctx {
                    Ctx::Host(c) => Ctx::Host(c.clone()),
                    Ctx::Tensor(c) => Ctx::Tensor(c.clone()),
                };
                for k in 1..ids.len() {
                    let lp = extend(&mut c, &ids[k - 1..k], past)?;
                    score += lp[ids[k] as usize] as f64;
                    past += 1;
                }
                prompt_tokens += ids.len() - 1;
            }
            if o.normalize {
                score /= ids.len() as f64;
            }
            if score > best.0 {
                best = (score, li);
            }
        }
        let predicted = labels[best.1].clone();
        if Some(&predicted) == e.label.as_ref() {
            correct += 1;
        }
        predictions.push(predicted);
    }
    let total = rows.len();
    let predicted_counts = labels
        .iter()
        .map(|l| predictions.iter().filter(|p| *p == l).count())
        .collect();
    Ok(FewShotReport {
        predicted_counts,
        accuracy: if total == 0 {
            0.0
        } else {
            correct as f64 / total as f64
        },
        correct,
        total,
        shots: o.shots,
        labels,
        predictions,
        prompt_tokens,
        seconds: start.elapsed().as_secs_f64(),
    })
}

fn log_softmax_last(lm: &LanguageModel, h: burn::tensor::Tensor<3>) -> Result<Vec<f32>> {
    let [b, t, d] = h.dims();
    let last = h.slice([0..b, t - 1..t, 0..d]).reshape([b, d]);
    let logits = tensor_to_vec(lm.model.logits(last))?;
    Ok(log_softmax(logits, lm.model.config.vocab_size))
}

fn log_softmax(mut v: Vec<f32>, vocab: usize) -> Vec<f32> {
    for row in v.chunks_exact_mut(vocab) {
        let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let lse = max
            + row
                .iter()
                .map(|x| ((x - max) as f64).exp())
                .sum::<f64>()
                .ln() as f32;
        row.iter_mut().for_each(|x| *x -= lse);
    }
    v
}

/// Perplexity settings: windows of `window` tokens, advancing by `stride`; each token is
/// scored once, with up to `window - stride` tokens of context before the new ones.
#[derive(Clone, Debug)]
pub struct PerplexityOptions {
    pub window: Option<usize>,
    pub stride: Option<usize>,
    pub max_tokens: Option<usize>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct PerplexityReport {
    pub perplexity: f64,
    pub mean_nll: f64,
    pub tokens: usize,
    pub scored_tokens: usize,
    pub window: usize,
    pub stride: usize,
    pub seconds: f64,
}

/// Perplexity of a text file under the model, with a sliding window.
pub fn perplexity(
    lm: &LanguageModel,
    path: &Path,
    o: &PerplexityOptions,
) -> Result<PerplexityReport> {
    let bytes = std::fs::read(path).map_err(|e| smelt_data::DataError::io(path, e))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let upto = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line = upto.iter().filter(|&&b| b == b'\n').count() + 1;
        TaskError::Invalid(format!(
            "{}: line {line} is not valid UTF-8",
            path.display()
        ))
    })?;
    let mut ids = lm.tokenizer.encode(&text, true)?;
    if let Some(m) = o.max_tokens {
        ids.truncate(m);
    }
    if ids.len() < 2 {
        return Err(TaskError::Invalid(format!(
            "{}: needs at least two tokens of text to measure perplexity",
            path.display()
        )));
    }
    let window = o.window.unwrap_or(1024).min(lm.context());
    let stride = o.stride.unwrap_or(window / 2).max(1);
    if window < 2 || stride > window {
        return Err(TaskError::Invalid(format!(
            "--window {window} and --stride {stride}: expected 2 <= window and stride <= window"
        )));
    }
    let vocab = lm.model.config.vocab_size;
    let start = std::time::Instant::now();
    let mut nll = 0f64;
    let mut scored = 0usize;
    let mut prev_end = 0usize;
    let mut begin = 0usize;
    loop {
        let end = (begin + window).min(ids.len());
        // Score targets prev_end.max(begin + 1)..end, predicted from the positions before them.
        let first_target = prev_end.max(begin + 1);
        let mut cache = KvCache::new();
        let h = lm
            .model
            .forward_hidden(&Step::single(&ids[begin..end], 0), &mut cache)?;
        let [_, t, d] = h.dims();
        let from = first_target - 1 - begin;
        let rows = h
            .slice([0..1, from..t - 1, 0..d])
            .reshape([t - 1 - from, d]);
        // Project in chunks to bound the memory of the logits.
        let chunk = 256;
        let n = t - 1 - from;
        let mut k = 0;
        while k < n {
            let m = chunk.min(n - k);
            let part = rows.clone().slice([k..k + m, 0..d]);
            let lp = log_softmax(tensor_to_vec(lm.model.logits(part))?, vocab);
            for j in 0..m {
                let target = ids[first_target + k + j] as usize;
                nll -= lp[j * vocab + target] as f64;
            }
            k += m;
        }
        scored += n;
        prev_end = end;
        if end == ids.len() {
            break;
        }
        begin += stride;
    }
    let mean = nll / scored as f64;
    Ok(PerplexityReport {
        perplexity: mean.exp(),
        mean_nll: mean,
        tokens: ids.len(),
        scored_tokens: scored,
        window,
        stride,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// What `smelt inspect` prints about a checkpoint.
pub fn inspect(path: &Path) -> Result<String> {
    use std::fmt::Write;
    let mut s = String::new();
    if path.is_dir() {
        let config_path = path.join("config.json");
        writeln!(s, "{}: Hugging Face directory", path.display()).ok();
        match smelt_models::causal::hf_config(&config_path) {
            Ok(c) => describe_config(&mut s, &c),
            Err(e) => match smelt_models::bert::BertConfig::from_file(&config_path) {
                Ok(b) => {
                    writeln!(
                        s,
                        "architecture: bert ({} layers, hidden {}, {} heads, intermediate {}, vocab {})",
                        b.num_hidden_layers, b.hidden_size, b.num_attention_heads,
                        b.intermediate_size, b.vocab_size
                    )
                    .ok();
                }
                Err(_) => return Err(e.into()),
            },
        }
        let weights_path = path.join("model.safetensors");
        if !weights_path.exists() && path.join("pytorch_model.bin").exists() {
            return Err(ModelError::Pickle {
                path: path.join("pytorch_model.bin"),
            }
            .into());
        }
        let weights = smelt_models::weights::WeightFile::open(&weights_path)?;
        let names = weights.names();
        let mut params = 0usize;
        let mut dtypes = std::collections::BTreeMap::new();
        for n in &names {
            let shape = weights.shape(n).unwrap_or_default();
            params += shape.iter().product::<usize>();
            let dt = weights.dtype(n).unwrap_or_else(|| "?".into());
            *dtypes.entry(dt).or_insert(0usize) += 1;
        }
        writeln!(s, "tensors: {} ({} values)", names.len(), params).ok();
        for (dt, n) in dtypes {
            writeln!(s, "  {dt}: {n}").ok();
        }
        return Ok(s);
    }
    let file = GgufFile::open(path)?;
    writeln!(s, "{}: GGUF version {}", path.display(), file.version).ok();
    // The metadata is enough to describe the model; its weights need not be loaded.
    match smelt_models::causal::gguf_config(&file) {
        Ok(c) => describe_config(&mut s, &c),
        Err(ModelError::Unsupported(e)) => {
            writeln!(s, "architecture: not loadable by smelt ({e})").ok();
        }
        Err(e) => return Err(e.into()),
    }
    let mut types = std::collections::BTreeMap::new();
    let mut bytes = 0usize;
    let mut values = 0usize;
    for t in &file.tensors {
        let e = types.entry(t.ty.name()).or_insert((0usize, 0usize));
        e.0 += 1;
        e.1 += t.bytes;
        bytes += t.bytes;
        values += t.elements();
    }
    writeln!(
        s,
        "tensors: {} ({} values, {:.1} MB, {:.2} bits per weight)",
        file.tensors.len(),
        values,
        bytes as f64 / 1e6,
        bytes as f64 * 8.0 / values.max(1) as f64
    )
    .ok();
    for (ty, (n, b)) in types {
        writeln!(s, "  {ty}: {n} tensors, {:.1} MB", b as f64 / 1e6).ok();
    }
    writeln!(s, "metadata:").ok();
    for (k, v) in &file.metadata {
        writeln!(s, "  {k} = {}", v.summary()).ok();
    }
    Ok(s)
}

fn describe_config(s: &mut String, c: &smelt_models::causal::LmConfig) {
    use std::fmt::Write;
    writeln!(
        s,
        "architecture: {} ({} layers, hidden {}, {} heads / {} key-value heads, MLP {}, vocab {}, \
         context {}, {} embeddings)",
        c.arch.name(),
        c.layers,
        c.hidden,
        c.heads,
        c.kv_heads,
        c.intermediate,
        c.vocab_size,
        c.context,
        if c.tie_embeddings { "tied" } else { "untied" }
    )
    .ok();
    writeln!(s, "parameters: {:.1} M", c.parameters() as f64 / 1e6).ok();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampler_filters_and_is_seeded() {
        let logits = vec![2.0, 1.0, 0.5, -1.0, -3.0];
        let opts = Sampling {
            temperature: 1.0,
            top_k: 2,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: 3,
        };
        let draw = |o: Sampling| {
            let mut s = Sampler::new(o);
            (0..200)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        let a = draw(opts.clone());
        assert!(a.iter().all(|&t| t < 2), "top-k keeps two tokens");
        assert!(a.contains(&0) && a.contains(&1));
        assert_eq!(a, draw(opts.clone()), "same seed, same draws");
        let nucleus = draw(Sampling {
            top_k: 0,
            top_p: 0.5,
            ..opts.clone()
        });
        assert!(
            nucleus.iter().all(|&t| t == 0),
            "top-p 0.5 keeps only the 0.55-probability token"
        );
        let minp = draw(Sampling {
            top_k: 0,
            min_p: 0.5,
            ..opts.clone()
        });
        assert!(
            minp.iter().all(|&t| t < 2),
            "min-p 0.5 drops tokens below half the best"
        );
        let mut s = Sampler::new(Sampling {
            repetition_penalty: 10.0,
            ..Sampling::greedy()
        });
        assert_eq!(
            s.sample(&mut logits.clone(), &[0]),
            1,
            "penalised token loses"
        );
    }

    #[test]
    fn balanced_shots_give_each_label_a_turn() {
        let ex = |label: &str| TextExample {
            line: 0,
            text: "t".into(),
            text_pair: None,
            label: Some(label.into()),
        };
        let mut examples: Vec<TextExample> = (0..10).map(|_| ex("pos")).collect();
        examples.extend((0..2).map(|_| ex("neg")));
        let labels = vec!["neg".to_string(), "pos".to_string()];
        for seed in 0..20 {
            let shots = draw_shots(&examples, &labels, 4, true, seed);
            let neg = shots
                .iter()
                .filter(|&&i| examples[i].label.as_deref() == Some("neg"))
                .count();
            assert_eq!((shots.len(), neg), (4, 2), "seed {seed}");
            let mut unique = shots.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(unique.len(), 4);
        }
        // Only two negatives exist: six shots take both and fill up with positives.
        let shots = draw_shots(&examples, &labels, 6, true, 1);
        assert_eq!(shots.len(), 6);
        assert_eq!(draw_shots(&examples, &labels, 3, false, 5).len(), 3);
    }
}
