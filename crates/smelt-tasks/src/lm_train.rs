//! Training causal language models: fine-tuning on prompt/completion pairs or chats (full,
//! or LoRA adapters over a frozen and possibly quantized base), and GPT-2 style models from
//! scratch on plain text. All of it runs through the shared training loop.

use crate::error::{Result, TaskError};
use crate::lm::LanguageModel;
use crate::run_dir::{fnv1a, FNV_START};
use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use smelt_data::batch::{epoch_batches, inference_batches, Batching};
use smelt_data::lm_data::{read_lm_jsonl, text_blocks, tokenize_lm, LmSequence};
use smelt_data::lm_tokenizer::LmTokenizer;
use smelt_models::causal::{hf_config_json, random_gpt2, Arch, CausalLm, KvCache, LmConfig, Step};
use smelt_models::lora::{self, LoraConfig};
use smelt_models::weights::{tensor_to_vec, write_safetensors};
use smelt_train::trainer::{self, Evaluation, Task, TrainConfig, TrainSummary};
use std::path::{Path, PathBuf};

/// The architecture of a model trained from scratch (`--config small.toml`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ScratchConfig {
    pub layers: usize,
    pub heads: usize,
    pub hidden: usize,
    /// Context length (positions) and training block length.
    pub context: usize,
    /// MLP width; 4 × hidden when absent.
    pub intermediate: Option<usize>,
}

impl ScratchConfig {
    /// Reads and checks a TOML file.
    pub fn read(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|e| smelt_models::ModelError::io(path, e))?;
        let c: ScratchConfig = toml::from_str(&text)
            .map_err(|e| TaskError::Invalid(format!("{}: {e}", path.display())))?;
        let bad = |field: &str, message: String| {
            Err(TaskError::Invalid(format!(
                "{}: field `{field}`: {message}",
                path.display()
            )))
        };
        for (field, v) in [
            ("layers", c.layers),
            ("heads", c.heads),
            ("hidden", c.hidden),
            ("context", c.context),
        ] {
            if v == 0 {
                return bad(field, "must be at least 1".into());
            }
        }
        if c.hidden % c.heads != 0 {
            return bad(
                "heads",
                format!(
                    "{} heads do not divide the width of {} (hidden must be a multiple of heads)",
                    c.heads, c.hidden
                ),
            );
        }
        if c.intermediate == Some(0) {
            return bad("intermediate", "must be at least 1".into());
        }
        Ok(c)
    }

    pub fn lm_config(&self, vocab_size: usize) -> LmConfig {
        LmConfig {
            arch: Arch::Gpt2,
            vocab_size,
            hidden: self.hidden,
            intermediate: self.intermediate.unwrap_or(4 * self.hidden),
            layers: self.layers,
            heads: self.heads,
            kv_heads: self.heads,
            context: self.context,
            norm_eps: 1e-5,
            rope_theta: 10000.0,
            tie_embeddings: true,
        }
    }
}

/// What is trained.
#[derive(Debug, Clone, Serialize)]
pub enum Mode {
    /// Every weight of a pretrained model.
    Full,
    /// Adapters over a frozen base.
    Lora(LoraOptions),
    /// A new model.
    Scratch(ScratchConfig),
}

/// LoRA settings as given on the command line (the serialisable part of [`LoraConfig`]).
#[derive(Debug, Clone, Serialize)]
pub struct LoraOptions {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// PEFT module names; empty for the architecture's defaults.
    pub targets: Vec<String>,
}

impl LoraOptions {
    /// The adapter configuration; no targets means the architecture's defaults.
    fn config(&self, arch: Arch) -> LoraConfig {
        LoraConfig {
            rank: self.rank,
            alpha: self.alpha,
            dropout: self.dropout,
            targets: if self.targets.is_empty() {
                lora::default_targets(arch)
            } else {
                self.targets.clone()
            },
        }
    }
}

/// Options of `lm train`.
#[derive(Debug, Clone, Serialize)]
pub struct LmTrainOptions {
    /// The base model (fine-tuning); `None` from scratch.
    pub model: Option<PathBuf>,
    /// Tokenizer file or directory; required from scratch.
    pub tokenizer: Option<PathBuf>,
    pub mode: Mode,
    pub train_files: Vec<PathBuf>,
    pub valid_file: Option<PathBuf>,
    pub out: PathBuf,
    pub batch_size: usize,
    pub eval_batch_size: usize,
    /// Longest sequence in tokens (fine-tuning); the model's context when absent.
    pub max_length: Option<usize>,
    pub batching: Batching,
    pub training: TrainConfig,
    /// Prompts continued at each evaluation, from scratch.
    pub sample_prompts: Vec<String>,
    pub sample_tokens: usize,
}

/// Outcome of `lm train`.
#[derive(Debug, Serialize)]
pub struct LmTrainReport {
    pub summary: TrainSummary,
    pub train_sequences: usize,
    pub train_targets: usize,
    pub valid_sequences: usize,
    pub truncated: usize,
    pub trainable_parameters: usize,
}

struct LmTask<'a> {
    options: &'a LmTrainOptions,
    device: Device,
    eval_device: Device,
    tokenizer: LmTokenizer,
    pad: u32,
    train: Vec<LmSequence>,
    valid: Option<Vec<LmSequence>>,
    /// The frozen base, kept to rebuild the model when resuming LoRA training.
    base: Option<&'a Path>,
}

/// Right-padded tokens of `rows` and, for every predicted token, its flat position in the
/// batch and its id.
struct Packed {
    step: Step,
    rows: Vec<usize>,
    targets: Vec<u32>,
}

fn pack(seqs: &[LmSequence], batch: &[usize], pad: u32) -> Packed {
    let t = batch.iter().map(|&i| seqs[i].ids.len()).max().unwrap_or(0) - 1;
    let b = batch.len();
    let mut tokens = vec![pad; b * t];
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (r, &i) in batch.iter().enumerate() {
        let s = &seqs[i];
        let n = s.ids.len() - 1;
        tokens[r * t..r * t + n].copy_from_slice(&s.ids[..n]);
        for p in s.target_from..s.ids.len() {
            rows.push(r * t + p - 1);
            targets.push(s.ids[p]);
        }
    }
    Packed {
        step: Step {
            tokens,
            batch: b,
            len: t,
            positions: (0..b).flat_map(|_| 0..t).collect(),
            key_valid: None,
        },
        rows,
        targets,
    }
}

/// Mean next-token loss over the target positions of a batch.
fn batch_loss(model: &CausalLm, packed: &Packed, device: &Device) -> Result<Tensor<1>> {
    let hidden = model.forward_hidden(&packed.step, &mut KvCache::new())?;
    let [b, t, d] = hidden.dims();
    let rows = Tensor::<1, Int>::from_data(
        TensorData::new(
            packed.rows.iter().map(|&r| r as i64).collect::<Vec<_>>(),
            [packed.rows.len()],
        ),
        device,
    );
    let picked = hidden.reshape([b * t, d]).select(0, rows);
    let logits = model.logits(picked);
    Ok(smelt_models::fused::cross_entropy(logits, &packed.targets))
}

/// Mean next-token loss over the completion tokens of `seqs` as one right-padded batch
/// (what one training micro-batch computes), tracked for gradients on an autodiff device.
pub fn sequence_loss(model: &CausalLm, seqs: &[LmSequence], pad: u32) -> Result<Tensor<1>> {
    if seqs.is_empty() || seqs.iter().any(|s| s.targets() == 0 || s.target_from == 0) {
        return Err(TaskError::Invalid(
            "a loss needs sequences with at least one target after one input token".into(),
        ));
    }
    let all: Vec<usize> = (0..seqs.len()).collect();
    batch_loss(model, &pack(seqs, &all, pad), &model.device())
}

impl Task for LmTask<'_> {
    type Model = CausalLm;
    type Batch = Vec<usize>;

    fn device(&self) -> Device {
        self.device.clone()
    }

    fn epoch_batches(&self, epoch: usize) -> Vec<Vec<usize>> {
        let lengths: Vec<usize> = self.train.iter().map(|s| s.ids.len()).collect();
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

    fn loss(&self, model: &CausalLm, batch: &Vec<usize>) -> smelt_train::Result<Tensor<1>> {
        let packed = pack(&self.train, batch, self.pad);
        Ok(batch_loss(model, &packed, &self.device)?)
    }

    fn evaluate(&self, model: &CausalLm) -> smelt_train::Result<Option<Evaluation>> {
        let Some(valid) = &self.valid else {
            return Ok(None);
        };
        let (mut total, mut count) = (0f64, 0usize);
        let lengths: Vec<usize> = valid.iter().map(|s| s.ids.len()).collect();
        for batch in inference_batches(&lengths, self.options.eval_batch_size) {
            let packed = pack(valid, &batch, self.pad);
            let loss = batch_loss(model, &packed, &self.eval_device)?;
            let n = packed.targets.len();
            total += loss.into_scalar::<f32>() as f64 * n as f64;
            count += n;
        }
        let loss = total / count.max(1) as f64;
        let mut record = Map::new();
        record.insert("perplexity".into(), json!(loss.exp()));
        record.insert("tokens".into(), json!(count));
        if matches!(self.options.mode, Mode::Scratch(_)) && self.options.sample_tokens > 0 {
            let mut samples = Vec::new();
            for (i, prompt) in self.options.sample_prompts.iter().enumerate() {
                let text = sample(
                    model,
                    &self.tokenizer,
                    prompt,
                    self.options.sample_tokens,
                    self.options.training.seed + i as u64,
                )?;
                tracing::info!("sample: {prompt}{text}");
                samples.push(json!({"prompt": prompt, "completion": text}));
            }
            record.insert("samples".into(), Value::Array(samples));
        }
        Ok(Some(Evaluation {
            loss,
            score: -loss,
            score_name: "neg_loss",
            record,
        }))
    }

    fn save(&self, model: &CausalLm, dir: &Path) -> smelt_train::Result<()> {
        match &self.options.mode {
            Mode::Lora(l) => {
                let base = self
                    .base
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                lora::save_adapter(model, &l.config(model.config.arch), &base, dir)?;
            }
            Mode::Full | Mode::Scratch(_) => save_hf(model, &self.tokenizer, dir)?,
        }
        Ok(())
    }

    fn load(&self, dir: &Path) -> smelt_train::Result<CausalLm> {
        let model = match &self.options.mode {
            Mode::Lora(_) => {
                let base = self.base.expect("LoRA training has a base model");
                let lm =
                    LanguageModel::load(base, self.options.tokenizer.as_deref(), &self.device)?;
                let (model, _) = lora::load_adapter(lm.model, dir)?;
                model
            }
            Mode::Full | Mode::Scratch(_) => CausalLm::load_hf(dir, &self.device)?,
        };
        Ok(model)
    }
}

/// Writes a Hugging Face directory: `config.json`, `model.safetensors`, `tokenizer.json` and
/// `tokenizer_config.json` (special tokens and chat template). Quantized weights are written
/// dequantized.
pub fn save_hf(model: &CausalLm, tokenizer: &LmTokenizer, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| smelt_models::ModelError::io(dir, e))?;
    write_safetensors(&dir.join("model.safetensors"), &model.export_hf()?, None)?;
    let write_json = |name: &str, v: &Value| -> Result<()> {
        let text = serde_json::to_vec_pretty(v).map_err(|e| TaskError::Invalid(e.to_string()))?;
        Ok(smelt_models::fsutil::write_atomic(&dir.join(name), &text)?)
    };
    let mut config = hf_config_json(&model.config);
    if let Value::Object(map) = &mut config {
        if let Some(eos) = tokenizer.eos {
            map.insert("eos_token_id".into(), json!(eos));
        }
        if let Some(bos) = tokenizer.bos {
            map.insert("bos_token_id".into(), json!(bos));
        }
    }
    write_json("config.json", &config)?;
    let text = tokenizer
        .inner()
        .to_string(true)
        .map_err(|e| TaskError::Invalid(format!("tokenizer: {e}")))?;
    smelt_models::fsutil::write_atomic(&dir.join("tokenizer.json"), text.as_bytes())?;
    let name = |id: Option<u32>| id.and_then(|i| tokenizer.id_to_token(i));
    let mut tc = Map::new();
    tc.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    if let Some(e) = name(tokenizer.eos) {
        tc.insert("eos_token".into(), json!(e));
    }
    if let Some(b) = name(tokenizer.bos) {
        tc.insert("bos_token".into(), json!(b));
    }
    tc.insert("add_bos_token".into(), json!(tokenizer.add_bos));
    if let Some(t) = &tokenizer.chat_template {
        tc.insert("chat_template".into(), json!(t));
    }
    write_json("tokenizer_config.json", &Value::Object(tc))
}

/// A seeded sampled continuation (top-k 40, temperature 0.8) of `prompt`.
fn sample(
    model: &CausalLm,
    tokenizer: &LmTokenizer,
    prompt: &str,
    tokens: usize,
    seed: u64,
) -> Result<String> {
    let mut ids = tokenizer.encode(prompt, tokenizer.add_bos)?;
    if ids.is_empty() {
        ids = tokenizer.eos.into_iter().collect();
    }
    let mut sampler = crate::lm::Sampler::new(crate::lm::Sampling {
        temperature: 0.8,
        top_k: 40,
        top_p: 1.0,
        min_p: 0.0,
        repetition_penalty: 1.0,
        seed,
    });
    let mut cache = KvCache::new();
    let start = ids.len();
    let mut next = ids.clone();
    for _ in 0..tokens {
        if cache.len() + next.len() > model.config.context {
            break;
        }
        let logits = model.last_logits(&Step::single(&next, cache.len()), &mut cache)?;
        let mut row = tensor_to_vec(logits)?;
        let id = sampler.sample(&mut row, &ids);
        if tokenizer.stop_ids.contains(&id) {
            break;
        }
        ids.push(id);
        next = vec![id];
    }
    Ok(tokenizer.decode(&ids[start..], true)?)
}

/// FNV-1a over the options and the bytes of the data files (and the size and first MiB of
/// the base model), so that a resume with other options or data is refused.
fn fingerprint(options: &LmTrainOptions) -> Result<String> {
    let mut o = options.clone();
    o.out = PathBuf::new();
    let text = serde_json::to_string(&o).map_err(|e| TaskError::Invalid(e.to_string()))?;
    let mut hash = fnv1a(FNV_START, text.as_bytes());
    for path in options.train_files.iter().chain(&options.valid_file) {
        let bytes = std::fs::read(path).map_err(|e| smelt_models::ModelError::io(path, e))?;
        hash = fnv1a(hash, &bytes);
    }
    if let Some(m) = &options.model {
        let file = if m.is_dir() {
            m.join("model.safetensors")
        } else {
            m.clone()
        };
        if let Ok(meta) = std::fs::metadata(&file) {
            hash = fnv1a(hash, &meta.len().to_le_bytes());
            let mut head = vec![0u8; 1 << 20];
            use std::io::Read;
            if let Ok(mut f) = std::fs::File::open(&file) {
                let n = f.read(&mut head).unwrap_or(0);
                hash = fnv1a(hash, &head[..n]);
            }
        }
    }
    Ok(format!("{hash:016x}"))
}

/// Trains as `options` say. Everything is read and checked before the output is touched.
pub fn train(options: &LmTrainOptions, resume: bool, device: &Device) -> Result<LmTrainReport> {
    if options.batch_size == 0 || options.eval_batch_size == 0 {
        return Err(TaskError::Invalid(
            "--batch-size and --eval-batch-size must be at least 1".into(),
        ));
    }
    if options.train_files.is_empty() {
        return Err(TaskError::Invalid("no --train file given".into()));
    }
    options.training.validate()?;
    let ad_device = device.clone().autodiff();

    // The model and its tokenizer.
    let (model, tokenizer) = match (&options.mode, &options.model) {
        (Mode::Scratch(config), _) => {
            let tok_path = options.tokenizer.as_deref().ok_or_else(|| {
                TaskError::Invalid("training from scratch needs --tokenizer FILE".into())
            })?;
            let tokenizer = LmTokenizer::from_hf(tok_path)?;
            let lm_config = config.lm_config(tokenizer.vocab_size());
            let model = random_gpt2(lm_config, options.training.seed, &ad_device);
            (model, tokenizer)
        }
        (_, None) => {
            return Err(TaskError::Invalid(
                "fine-tuning needs --model PATH (or --from-scratch --config FILE)".into(),
            ))
        }
        (mode, Some(path)) => {
            let lm = LanguageModel::load(path, options.tokenizer.as_deref(), &ad_device)?;
            let model = match mode {
                Mode::Lora(l) => {
                    let config = l.config(lm.model.config.arch);
                    lora::attach(lm.model, &config, options.training.seed)?
                }
                _ => {
                    let quantized = lm.model.storage_summary().iter().any(|(t, _)| t != "F32");
                    if quantized {
                        tracing::warn!(
                            "{}: full fine-tuning decodes the quantized weights to f32 \
                             (LoRA keeps them quantized: pass --lora-rank)",
                            path.display()
                        );
                    }
                    lm.model.to_dense()?
                }
            };
            (model, lm.tokenizer)
        }
    };
    let context = model.config.context;
    let vocab = model.config.vocab_size;
    let max_length = options.max_length.unwrap_or(context);
    if max_length > context || max_length < 2 {
        return Err(TaskError::Invalid(format!(
            "--max-length {max_length} must be in 2..={context} (the model's context)"
        )));
    }

    // Data.
    let (train, valid, truncated) = match &options.mode {
        Mode::Scratch(_) => {
            let (train, tokens) = text_blocks(&options.train_files, &tokenizer, max_length, vocab)?;
            let valid_files: Vec<PathBuf> = options.valid_file.iter().cloned().collect();
            let valid = if valid_files.is_empty() {
                None
            } else {
                Some(text_blocks(&valid_files, &tokenizer, max_length, vocab)?.0)
            };
            tracing::info!("{tokens} training tokens in {} blocks", train.len());
            (train, valid, 0)
        }
        _ => {
            let mut train = Vec::new();
            let mut truncated = 0;
            for f in &options.train_files {
                let t = tokenize_lm(&read_lm_jsonl(f)?, &tokenizer, max_length, vocab, f)?;
                truncated += t.truncated;
                train.extend(t.sequences);
            }
            let valid = match &options.valid_file {
                Some(f) => {
                    let t = tokenize_lm(&read_lm_jsonl(f)?, &tokenizer, max_length, vocab, f)?;
                    truncated += t.truncated;
                    Some(t.sequences)
                }
                None => None,
            };
            (train, valid, truncated)
        }
    };
    if train.is_empty() {
        return Err(TaskError::Invalid(format!(
            "{}: no training sequences (a text shorter than one block of {max_length} tokens?)",
            options.train_files[0].display()
        )));
    }
    if valid.as_ref().is_some_and(|v| v.is_empty()) {
        return Err(TaskError::Invalid(
            "the validation data gives no sequences".into(),
        ));
    }
    if truncated > 0 {
        tracing::warn!("{truncated} completions were cut to {max_length} tokens");
    }
    if valid.is_none() && options.training.patience.is_some() {
        return Err(TaskError::Invalid("--patience needs --valid".into()));
    }

    crate::run_dir::prepare_out(&options.out, resume)?;
    let trainable_parameters = match options.mode {
        Mode::Lora(_) => lora::adapter_parameters(&model),
        _ => model.num_params(),
    };
    let run_config =
        serde_json::to_value(options).map_err(|e| TaskError::Invalid(e.to_string()))?;
    let fingerprint = fingerprint(options)?;
    let pad = tokenizer.eos.filter(|&e| (e as usize) < vocab).unwrap_or(0);
    let task = LmTask {
        options,
        device: ad_device,
        eval_device: device.clone(),
        tokenizer,
        pad,
        train,
        valid,
        base: options.model.as_deref(),
    };
    let train_targets = task.train.iter().map(LmSequence::targets).sum();
    let summary = trainer::train(
        &task,
        model,
        &options.training,
        &options.out,
        resume,
        &fingerprint,
        &run_config,
    )?;
    Ok(LmTrainReport {
        summary,
        train_sequences: task.train.len(),
        train_targets,
        valid_sequences: task.valid.as_ref().map_or(0, Vec::len),
        truncated,
        trainable_parameters,
    })
}

/// Outcome of `lm merge`.
#[derive(Debug, Serialize)]
pub struct MergeReport {
    pub merged_layers: usize,
    pub out: PathBuf,
    pub format: &'static str,
}

/// Folds the adapter in `adapter` into the base `model` and writes the result: a GGUF file
/// when `out` ends in `.gguf` (the base must then be a GGUF file: its metadata and untouched
/// tensors are copied; merged matrices are written as `merged_type`), otherwise a Hugging
/// Face directory.
pub fn merge(
    model: &Path,
    tokenizer: Option<&Path>,
    adapter: &Path,
    out: &Path,
    merged_type: smelt_models::quant::GgmlType,
) -> Result<MergeReport> {
    use smelt_models::gguf::{write_gguf, GgufFile, GgufTensor};
    use smelt_models::quant::{quantize, GgmlType};
    let device = Device::flex();
    let lm = LanguageModel::load(model, tokenizer, &device)?;
    let (adapted, _) = lora::load_adapter(lm.model, adapter)?;
    let mut touched = Vec::new();
    for (i, b) in adapted.blocks.iter().enumerate() {
        let layers = [
            ("attn_q", &b.q),
            ("attn_k", &b.k),
            ("attn_v", &b.v),
            ("attn_output", &b.o),
            ("ffn_up", &b.up),
            ("ffn_down", &b.down),
        ];
        for (name, l) in layers
            .into_iter()
            .chain(b.gate.as_ref().map(|g| ("ffn_gate", g)))
        {
            if l.lora.is_some() {
                touched.push((i, name));
            }
        }
    }
    let merged = lora::merge(adapted)?;
    let is_gguf = out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    if !is_gguf {
        save_hf(&merged, &lm.tokenizer, out)?;
        return Ok(MergeReport {
            merged_layers: touched.len(),
            out: out.to_path_buf(),
            format: "huggingface",
        });
    }
    if model.is_dir() {
        return Err(TaskError::Invalid(format!(
            "{}: a GGUF output needs a GGUF base model (its tokenizer and metadata are copied); \
             write a Hugging Face directory instead (an --out without .gguf)",
            model.display()
        )));
    }
    if merged_type.is_quantized() && quantize(merged_type, &[0.0; 256]).is_none() {
        return Err(TaskError::Invalid(format!(
            "--merged-type {}: smelt writes F32, F16, Q8_0, Q5_0, Q5_1, Q4_0 and Q4_1",
            merged_type.name()
        )));
    }
    let file = GgufFile::open(model)?;
    let c = &merged.config;
    let metadata: Vec<(String, smelt_models::gguf::Value)> = file
        .metadata
        .iter()
        .filter(|(k, _)| k.as_str() != "general.alignment")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut tensors = Vec::with_capacity(file.tensors.len());
    for info in &file.tensors {
        let hit = touched
            .iter()
            .find(|(i, name)| info.name == format!("blk.{i}.{name}.weight"));
        let tensor = match hit {
            None => GgufTensor {
                name: info.name.clone(),
                dims: info.dims.clone(),
                ty: info.ty,
                data: file.tensor_bytes(info).to_vec(),
            },
            Some(&(i, name)) => {
                let b = &merged.blocks[i];
                let (l, heads) = match name {
                    "attn_q" => (&b.q, Some(c.heads)),
                    "attn_k" => (&b.k, Some(c.kv_heads)),
                    "attn_v" => (&b.v, None),
                    "attn_output" => (&b.o, None),
                    "ffn_up" => (&b.up, None),
                    "ffn_down" => (&b.down, None),
                    _ => (b.gate.as_ref().expect("a gated MLP"), None),
                };
                let hf = l.weight_out_in()?;
                let cols = l.d_in;
                // Back to GGUF's pair-permuted row order for Q and K.
                let values = match heads {
                    Some(h) => {
                        let order = smelt_models::causal::unpermute_order(h, c.head_dim());
                        let mut g = vec![0f32; hf.len()];
                        for (k, &src) in order.iter().enumerate() {
                            g[src * cols..(src + 1) * cols]
                                .copy_from_slice(&hf[k * cols..(k + 1) * cols]);
                        }
                        g
                    }
                    None => hf,
                };
                if merged_type.row_bytes(cols).is_none() {
                    return Err(TaskError::Invalid(format!(
                        "cannot encode {} as {}: its width {cols} is not a multiple of the \
                         block size {}",
                        info.name,
                        merged_type.name(),
                        merged_type.block_size()
                    )));
                }
                let data = match merged_type {
                    GgmlType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    ty => quantize(ty, &values).ok_or_else(|| {
                        TaskError::Invalid(format!(
                            "cannot encode {} as {}: its width {cols} is not a multiple of the \
                             block size",
                            info.name,
                            ty.name()
                        ))
                    })?,
                };
                GgufTensor {
                    name: info.name.clone(),
                    dims: info.dims.clone(),
                    ty: merged_type,
                    data,
                }
            }
        };
        tensors.push(tensor);
    }
    write_gguf(out, &metadata, &tensors)?;
    Ok(MergeReport {
        merged_layers: touched.len(),
        out: out.to_path_buf(),
        format: "gguf",
    })
}
