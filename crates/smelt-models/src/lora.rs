//! LoRA adapters on a [`CausalLm`]: attaching them, the PEFT file layout
//! (`adapter_config.json`, `adapter_model.safetensors`) and merging into the base weights.

use crate::causal::{Arch, Block, CausalLm, Linear, Lora};
use crate::dropout::Dropout;
use crate::error::{ModelError, Result};
use crate::fsutil::write_atomic;
use crate::weights::{tensor_from_vec, write_safetensors, NamedTensor, WeightFile};
use burn::module::{Module, Param};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use std::path::Path;

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// What to adapt and how.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// Module names as PEFT's `target_modules` (`q_proj`, `v_proj`, `c_fc`, ...): a layer is
    /// adapted when its dotted name ends with one of them.
    pub targets: Vec<String>,
}

impl LoraConfig {
    /// PEFT's defaults for the architecture: rank 8, alpha 16, dropout 0.05, the query and
    /// value projections of Llama models; GPT-2's projections other than the fused `c_attn`.
    pub fn defaults(arch: Arch) -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            dropout: 0.05,
            targets: default_targets(arch),
        }
    }

    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    fn validate(&self, arch: Arch) -> Result<()> {
        let bad = |field: &str, message: String| {
            Err(ModelError::Unsupported(format!("LoRA {field}: {message}")))
        };
        if self.rank == 0 {
            return bad("rank", "must be at least 1".into());
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return bad("alpha", format!("{} is not a positive number", self.alpha));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad("dropout", format!("{} is not in [0, 1)", self.dropout));
        }
        if self.targets.is_empty() {
            return bad("target modules", "none given".into());
        }
        let known = module_names(arch);
        for t in &self.targets {
            if arch == Arch::Gpt2 && t.ends_with("c_attn") {
                return bad(
                    "target modules",
                    "GPT-2's fused `c_attn` projection cannot carry an adapter in smelt; \
                     target `c_proj` and `c_fc`"
                        .into(),
                );
            }
            if !known.iter().any(|k| matches(k, t)) {
                return bad(
                    "target modules",
                    format!(
                        "`{t}` names no layer of a {} model (layers: {})",
                        arch.name(),
                        known.join(", ")
                    ),
                );
            }
        }
        Ok(())
    }
}

/// Per-architecture default target modules.
pub fn default_targets(arch: Arch) -> Vec<String> {
    match arch {
        Arch::Llama => vec!["q_proj".into(), "v_proj".into()],
        Arch::Gpt2 => vec!["c_proj".into(), "c_fc".into()],
    }
}

/// Names of the adaptable layers of a block, relative to the block, in PEFT's naming.
fn module_names(arch: Arch) -> &'static [&'static str] {
    match arch {
        Arch::Llama => &[
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ],
        Arch::Gpt2 => &["attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
    }
}

/// PEFT's suffix rule: `target` matches the whole name or a dotted tail of it.
fn matches(name: &str, target: &str) -> bool {
    name == target || name.ends_with(&format!(".{target}"))
}

fn layer_mut<'a>(block: &'a mut Block, name: &str) -> Option<&'a mut Linear> {
    match name {
        "self_attn.q_proj" => Some(&mut block.q),
        "self_attn.k_proj" => Some(&mut block.k),
        "self_attn.v_proj" => Some(&mut block.v),
        "self_attn.o_proj" | "attn.c_proj" => Some(&mut block.o),
        "mlp.gate_proj" => block.gate.as_mut(),
        "mlp.up_proj" | "mlp.c_fc" => Some(&mut block.up),
        "mlp.down_proj" | "mlp.c_proj" => Some(&mut block.down),
        _ => None,
    }
}

fn layer<'a>(block: &'a Block, name: &str) -> Option<&'a Linear> {
    match name {
        "self_attn.q_proj" => Some(&block.q),
        "self_attn.k_proj" => Some(&block.k),
        "self_attn.v_proj" => Some(&block.v),
        "self_attn.o_proj" | "attn.c_proj" => Some(&block.o),
        "mlp.gate_proj" => block.gate.as_ref(),
        "mlp.up_proj" | "mlp.c_fc" => Some(&block.up),
        "mlp.down_proj" | "mlp.c_proj" => Some(&block.down),
        _ => None,
    }
}

/// The PEFT name prefix of block `i`.
fn block_prefix(arch: Arch, i: usize) -> String {
    match arch {
        Arch::Llama => format!("base_model.model.model.layers.{i}"),
        Arch::Gpt2 => format!("base_model.model.transformer.h.{i}"),
    }
}

/// Freezes every base weight and attaches fresh adapters to the target layers: `A` drawn as
/// PEFT does (Kaiming-uniform with `a = √5`, i.e. U(±1/√d_in)), `B` zero, so the adapted
/// model starts equal to the base.
pub fn attach(model: CausalLm, config: &LoraConfig, seed: u64) -> Result<CausalLm> {
    let arch = model.config.arch;
    config.validate(arch)?;
    let device = model.device();
    let mut model = model.no_grad();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for block in model.blocks.iter_mut() {
        for name in module_names(arch) {
            if !config.targets.iter().any(|t| matches(name, t)) {
                continue;
            }
            let Some(linear) = layer_mut(block, name) else {
                continue;
            };
            let (d_in, d_out, r) = (linear.d_in, linear.d_out, config.rank);
            let bound = 1.0 / (d_in as f32).sqrt();
            let a: Vec<f32> = (0..d_in * r)
                .map(|_| rng.random_range(-bound..bound))
                .collect();
            linear.lora = Some(Lora {
                a: Param::from_tensor(tensor_from_vec(a, [d_in, r], &device)),
                b: Param::from_tensor(tensor_from_vec(vec![0.0; r * d_out], [r, d_out], &device)),
                dropout: Dropout::new(config.dropout).map_err(ModelError::Unsupported)?,
                scale: config.scale(),
            });
        }
    }
    Ok(model)
}

/// The adapters of `model` under PEFT's tensor names and layout.
pub fn adapter_tensors(model: &CausalLm) -> Result<Vec<NamedTensor>> {
    let arch = model.config.arch;
    let mut out = Vec::new();
    for (i, block) in model.blocks.iter().enumerate() {
        for name in module_names(arch) {
            let Some(lora) = layer(block, name).and_then(|l| l.lora.as_ref()) else {
                continue;
            };
            let p = format!("{}.{name}", block_prefix(arch, i));
            let a = lora.a.val().transpose();
            let b = lora.b.val().transpose();
            out.push(NamedTensor::from_tensor(format!("{p}.lora_A.weight"), a)?);
            out.push(NamedTensor::from_tensor(format!("{p}.lora_B.weight"), b)?);
        }
    }
    Ok(out)
}

/// `adapter_config.json` as PEFT writes it.
pub fn adapter_config_json(config: &LoraConfig, arch: Arch, base: &str) -> Value {
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": config.targets,
        "bias": "none",
        "fan_in_fan_out": arch == Arch::Gpt2,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
        "modules_to_save": null,
        "layers_to_transform": null,
        "revision": null,
    })
}

/// Writes the adapter files into `dir` (each atomically).
pub fn save_adapter(model: &CausalLm, config: &LoraConfig, base: &str, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let tensors = adapter_tensors(model)?;
    if tensors.is_empty() {
        return Err(ModelError::Unsupported(
            "the model carries no adapter".into(),
        ));
    }
    write_safetensors(&dir.join(ADAPTER_WEIGHTS), &tensors, None)?;
    let text = serde_json::to_vec_pretty(&adapter_config_json(config, model.config.arch, base))
        .map_err(|e| ModelError::Unsupported(format!("adapter config: {e}")))?;
    write_atomic(&dir.join(ADAPTER_CONFIG), &text)
}

/// Reads `adapter_config.json`.
pub fn read_adapter_config(dir: &Path) -> Result<LoraConfig> {
    let path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| ModelError::Json {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let field = |name: &str, message: &str| ModelError::Config {
        path: path.clone(),
        field: name.into(),
        message: message.into(),
    };
    match v.get("peft_type").and_then(Value::as_str) {
        Some("LORA") => {}
        Some(other) => {
            return Err(field(
                "peft_type",
                &format!("`{other}` adapters are not supported; expected LORA"),
            ))
        }
        None => return Err(field("peft_type", "missing; expected \"LORA\"")),
    }
    let rank = v
        .get("r")
        .and_then(Value::as_u64)
        .ok_or_else(|| field("r", "expected a positive integer"))? as usize;
    let alpha = v
        .get("lora_alpha")
        .and_then(Value::as_f64)
        .ok_or_else(|| field("lora_alpha", "expected a number"))?;
    let dropout = v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0);
    let targets = match v.get("target_modules") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|t| {
                t.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| field("target_modules", "expected a list of strings"))
            })
            .collect::<Result<Vec<_>>>()?,
        Some(Value::String(s)) => vec![s.clone()],
        _ => return Err(field("target_modules", "expected a list of module names")),
    };
    if v.get("use_dora").and_then(Value::as_bool) == Some(true) {
        return Err(field("use_dora", "DoRA adapters are not supported"));
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        if v.get(key)
            .and_then(Value::as_object)
            .is_some_and(|m| !m.is_empty())
        {
            return Err(field(key, "per-layer ranks or alphas are not supported"));
        }
    }
    if v.get("layers_to_transform").is_some_and(|l| !l.is_null()) {
        return Err(field(
            "layers_to_transform",
            "adapters on a subset of layers are not supported",
        ));
    }
    if v.get("use_rslora").and_then(Value::as_bool) == Some(true) {
        return Err(field("use_rslora", "rank-stabilised LoRA is not supported"));
    }
    Ok(LoraConfig {
        rank,
        alpha,
        dropout,
        targets,
    })
}

/// Loads a PEFT adapter directory onto `model`, checking that it fits: every target layer
/// must have its two matrices with this model's sizes, and no tensor may be left unused.
pub fn load_adapter(model: CausalLm, dir: &Path) -> Result<(CausalLm, LoraConfig)> {
    let config = read_adapter_config(dir)?;
    let arch = model.config.arch;
    config.validate(arch).map_err(|e| {
        let message = e.to_string();
        let (field, message) = if message.contains("target modules") {
            (
                "target_modules",
                format!("{message}: the adapter was trained for a different base model"),
            )
        } else {
            ("r, lora_alpha or lora_dropout", message)
        };
        ModelError::Config {
            path: dir.join(ADAPTER_CONFIG),
            field: field.into(),
            message,
        }
    })?;
    let path = dir.join(ADAPTER_WEIGHTS);
    let file = WeightFile::open(&path)?;
    let mut used = 0;
    let device = model.device();
    let mut model = model.no_grad();
    for (i, block) in model.blocks.iter_mut().enumerate() {
        for name in module_names(arch) {
            if !config.targets.iter().any(|t| matches(name, t)) {
                continue;
            }
            let Some(linear) = layer_mut(block, name) else {
                continue;
            };
            let p = format!("{}.{name}", block_prefix(arch, i));
            let (d_in, d_out, r) = (linear.d_in, linear.d_out, config.rank);
            let a_name = format!("{p}.lora_A.weight");
            let b_name = format!("{p}.lora_B.weight");
            let mismatch = |name: &str, expected: Vec<usize>| -> ModelError {
                match file.shape(name) {
                    None => ModelError::Unsupported(format!(
                        "{}: tensor `{name}` is missing: the adapter was trained for a \
                         different base model (its config targets {:?})",
                        path.display(),
                        config.targets
                    )),
                    Some(found) => ModelError::Unsupported(format!(
                        "{}: tensor `{name}` has shape {found:?}, but this base model needs \
                         {expected:?}: the adapter was trained for a different base model",
                        path.display()
                    )),
                }
            };
            if file.shape(&a_name) != Some(vec![r, d_in]) {
                return Err(mismatch(&a_name, vec![r, d_in]));
            }
            if file.shape(&b_name) != Some(vec![d_out, r]) {
                return Err(mismatch(&b_name, vec![d_out, r]));
            }
            let a = file.tensor::<2>(&a_name, [r, d_in], &device)?.transpose();
            let b = file.tensor::<2>(&b_name, [d_out, r], &device)?.transpose();
            linear.lora = Some(Lora {
                a: Param::from_tensor(a),
                b: Param::from_tensor(b),
                dropout: Dropout::new(config.dropout).map_err(ModelError::Unsupported)?,
                scale: config.scale(),
            });
            used += 2;
        }
    }
    let total = file.names().len();
    if used != total {
        let layers = model.blocks.len();
        return Err(ModelError::Unsupported(format!(
            "{}: {} of its {total} tensors fit no layer of this {layers}-layer {} model: the \
             adapter was trained for a different base model",
            path.display(),
            total - used,
            arch.name()
        )));
    }
    Ok((model, config))
}

/// Folds every adapter into its layer's weight: `W += scale · (A·B)ᵀ`. Adapted layers become
/// f32; the others keep their encoding.
pub fn merge(mut model: CausalLm) -> Result<CausalLm> {
    let device = model.device();
    for block in model.blocks.iter_mut() {
        let mut layers: Vec<&mut Linear> = vec![
            &mut block.q,
            &mut block.k,
            &mut block.v,
            &mut block.o,
            &mut block.up,
            &mut block.down,
        ];
        if let Some(g) = block.gate.as_mut() {
            layers.push(g);
        }
        for linear in layers {
            let Some(lora) = linear.lora.take() else {
                continue;
            };
            let mut w = linear.weight_out_in()?;
            for (wi, di) in w.iter_mut().zip(lora.delta_out_in()?) {
                *wi += di;
            }
            let bias = linear.bias_values()?;
            *linear = Linear::dense(&w, bias, linear.d_in, linear.d_out, &device);
        }
    }
    Ok(model)
}

/// Number of trainable adapter values.
pub fn adapter_parameters(model: &CausalLm) -> usize {
    model
        .blocks
        .iter()
        .flat_map(|b| {
            [&b.q, &b.k, &b.v, &b.o, &b.up, &b.down]
                .into_iter()
                .chain(b.gate.as_ref())
        })
        .filter_map(|l| l.lora.as_ref())
        .map(|l| l.a.dims().iter().product::<usize>() + l.b.dims().iter().product::<usize>())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::causal::{random_gpt2, KvCache, LmConfig, Step};
    use burn::tensor::Device;

    fn tiny() -> CausalLm {
        let config = LmConfig {
            arch: Arch::Gpt2,
            vocab_size: 50,
            hidden: 16,
            intermediate: 64,
            layers: 2,
            heads: 2,
            kv_heads: 2,
            context: 32,
            norm_eps: 1e-5,
            rope_theta: 10000.0,
            tie_embeddings: true,
        };
        random_gpt2(config, 1, &Device::flex())
    }

    fn logits(m: &CausalLm) -> Vec<f32> {
        let step = Step::single(&[1, 2, 3, 4], 0);
        let l = m.last_logits(&step, &mut KvCache::new()).unwrap();
        crate::weights::tensor_to_vec(l).unwrap()
    }

    #[test]
    fn a_fresh_adapter_changes_nothing_and_a_merged_one_matches_the_adapted_model() {
        let base = tiny();
        let before = logits(&base);
        let config = LoraConfig {
            dropout: 0.0,
            ..LoraConfig::defaults(Arch::Gpt2)
        };
        let mut adapted = attach(base, &config, 3).unwrap();
        assert_eq!(logits(&adapted), before);
        // Give B values so the adapter does something.
        for b in adapted.blocks.iter_mut() {
            let lora = b.up.lora.as_mut().unwrap();
            let [r, d] = lora.b.dims();
            let v: Vec<f32> = (0..r * d).map(|i| (i as f32 * 0.3).sin() * 0.1).collect();
            lora.b = Param::from_tensor(tensor_from_vec(v, [r, d], &Device::flex()));
        }
        let with = logits(&adapted);
        assert!(with.iter().zip(&before).any(|(a, b)| (a - b).abs() > 1e-3));
        let dir = tempfile::tempdir().unwrap();
        save_adapter(&adapted, &config, "tiny", dir.path()).unwrap();
        let (reloaded, read) = load_adapter(tiny(), dir.path()).unwrap();
        assert_eq!(read, config);
        assert_eq!(logits(&reloaded), with);
        let merged = merge(reloaded).unwrap();
        for (a, b) in logits(&merged).iter().zip(&with) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn bad_targets_and_mismatched_adapters_are_refused() {
        let mut config = LoraConfig::defaults(Arch::Gpt2);
        config.targets = vec!["c_attn".into()];
        let e = attach(tiny(), &config, 1).unwrap_err().to_string();
        assert!(e.contains("c_attn"), "{e}");
        config.targets = vec!["nope".into()];
        let e = attach(tiny(), &config, 1).unwrap_err().to_string();
        assert!(e.contains("`nope` names no layer"), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let config = LoraConfig::defaults(Arch::Gpt2);
        let adapted = attach(tiny(), &config, 1).unwrap();
        save_adapter(&adapted, &config, "tiny", dir.path()).unwrap();
        let mut wider = tiny().config.clone();
        wider.hidden = 32;
        let other = random_gpt2(wider, 1, &Device::flex());
        let e = load_adapter(other, dir.path()).unwrap_err().to_string();
        assert!(e.contains("different base model"), "{e}");
    }
}
