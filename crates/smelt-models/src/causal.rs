//! Decoder-only language models: the Llama family (RMSNorm, rotary positions, grouped-query
//! attention, SwiGLU) and GPT-2 (learned positions, LayerNorm, tanh-GELU, `Conv1D` layout),
//! loaded from GGUF files or Hugging Face directories, with a key/value cache for generation.
//!
//! One block type serves both architectures; the differences are data (which norms have a
//! bias, whether the MLP is gated, how positions enter). Linear layers hold either an f32
//! matrix or a quantized one ([`QMatrix`]) that is multiplied in its own encoding.

use crate::error::{ModelError, Result};
use crate::gguf::{GgufFile, Value as GgufValue};
use crate::quant::{GgmlType, QMatrix};
use crate::weights::{tensor_from_vec, tensor_to_vec, transpose, NamedTensor, WeightFile};
use burn::module::{Module, Param};
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor, TensorData};
use serde_json::Value;
use std::path::Path;
use std::sync::Arc;

/// The two decoder layouts smelt implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Gpt2,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Gpt2 => "gpt2",
        }
    }
}

/// Sizes and constants of a decoder.
#[derive(Clone, Debug, PartialEq)]
pub struct LmConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub context: usize,
    pub norm_eps: f64,
    pub rope_theta: f64,
    pub tie_embeddings: bool,
}

impl LmConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// Checks the relations between sizes that the model code relies on.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |field: &str, message: String| ModelError::Config {
            path: path.to_path_buf(),
            field: field.to_string(),
            message,
        };
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden),
            ("num_hidden_layers", self.layers),
            ("num_attention_heads", self.heads),
            ("num_key_value_heads", self.kv_heads),
            ("intermediate_size", self.intermediate),
            ("max_position_embeddings", self.context),
        ] {
            if v == 0 || v > 1 << 24 {
                return Err(bad(field, format!("is {v}, expected 1 to {}", 1 << 24)));
            }
        }
        if self.hidden % self.heads != 0 {
            return Err(bad(
                "num_attention_heads",
                format!(
                    "{} heads do not divide the width {}",
                    self.heads, self.hidden
                ),
            ));
        }
        if self.heads % self.kv_heads != 0 {
            return Err(bad(
                "num_key_value_heads",
                format!(
                    "{} key/value heads do not divide {} attention heads",
                    self.kv_heads, self.heads
                ),
            ));
        }
        if self.arch == Arch::Llama && self.head_dim() % 2 != 0 {
            return Err(bad(
                "hidden_size",
                format!(
                    "head size {} is odd; rotary embeddings need pairs",
                    self.head_dim()
                ),
            ));
        }
        if !(self.norm_eps > 0.0 && self.norm_eps < 1.0) {
            return Err(bad(
                "rms_norm_eps",
                format!("is {}, expected in (0, 1)", self.norm_eps),
            ));
        }
        if self.arch == Arch::Llama && !(self.rope_theta > 1.0) {
            return Err(bad(
                "rope_theta",
                format!("is {}, expected > 1", self.rope_theta),
            ));
        }
        Ok(())
    }

    /// Parameters of the model (embeddings counted once when tied).
    pub fn parameters(&self) -> usize {
        let (h, f, v) = (self.hidden, self.intermediate, self.vocab_size);
        let kv = self.kv_heads * self.head_dim();
        let per_layer = match self.arch {
            Arch::Llama => h * (h + 2 * kv) + h * h + 3 * h * f + 2 * h,
            Arch::Gpt2 => 3 * h * h + 3 * h + h * h + h + 2 * h * f + f + h + 4 * h,
        };
        let head = if self.tie_embeddings { 0 } else { v * h };
        let positions = if self.arch == Arch::Gpt2 {
            self.context * h
        } else {
            0
        };
        v * h
            + positions
            + self.layers * per_layer
            + head
            + h * (1 + (self.arch == Arch::Gpt2) as usize)
    }
}

/// A matrix that is either f32 (`[d_in, d_out]`, trainable) or quantized (`[d_out, d_in]` in
/// GGUF row layout, multiplied by the quantized kernels).
#[derive(Module, Debug)]
pub struct Linear {
    pub weight: Option<Param<Tensor<2>>>,
    #[module(skip)]
    pub quant: Option<Arc<QMatrix>>,
    pub bias: Option<Param<Tensor<1>>>,
    #[module(skip)]
    pub d_in: usize,
    #[module(skip)]
    pub d_out: usize,
    /// A trainable low-rank adapter added to the product.
    pub lora: Option<Lora>,
}

/// A low-rank adapter (LoRA): `y += dropout(x) · A · B · scale`, as in PEFT.
#[derive(Module, Debug)]
pub struct Lora {
    /// `[d_in, rank]`; PEFT's `lora_A.weight` is its transpose.
    pub a: Param<Tensor<2>>,
    /// `[rank, d_out]`; PEFT's `lora_B.weight` is its transpose.
    pub b: Param<Tensor<2>>,
    pub dropout: crate::dropout::Dropout,
    /// `alpha / rank`.
    #[module(skip)]
    pub scale: f64,
}

impl Lora {
    pub fn rank(&self) -> usize {
        self.a.dims()[1]
    }

    fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let x = self.dropout.forward(x);
        let low = crate::fused_linear::linear(x, self.a.val(), None);
        crate::fused_linear::linear(low, self.b.val(), None) * self.scale
    }

    /// `scale · (A · B)ᵀ` as row-major `[d_out, d_in]`: what merging adds to the weight.
    pub fn delta_out_in(&self) -> Result<Vec<f32>> {
        let ab = self.a.val().matmul(self.b.val()) * self.scale;
        let [d_in, d_out] = ab.dims();
        Ok(transpose(&tensor_to_vec(ab)?, d_in, d_out))
    }
}

impl Linear {
    /// From a row-major `[d_out, d_in]` f32 matrix (Hugging Face `nn.Linear` layout).
    pub fn dense(
        w_out_in: &[f32],
        bias: Option<Vec<f32>>,
        d_in: usize,
        d_out: usize,
        device: &Device,
    ) -> Self {
        Self::dense_in_out(transpose(w_out_in, d_out, d_in), bias, d_in, d_out, device)
    }

    /// From a row-major `[d_in, d_out]` f32 matrix (GPT-2 `Conv1D` layout).
    pub fn dense_in_out(
        w_in_out: Vec<f32>,
        bias: Option<Vec<f32>>,
        d_in: usize,
        d_out: usize,
        device: &Device,
    ) -> Self {
        Self {
            weight: Some(Param::from_tensor(tensor_from_vec(
                w_in_out,
                [d_in, d_out],
                device,
            ))),
            quant: None,
            bias: bias.map(|b| Param::from_tensor(tensor_from_vec(b, [d_out], device))),
            d_in,
            d_out,
            lora: None,
        }
    }

    /// From a GGUF matrix. On the CPU it stays in its encoding; other devices get it
    /// dequantized, since the quantized kernels are CPU kernels.
    pub fn from_quant(m: QMatrix, bias: Option<Vec<f32>>, device: &Device) -> Self {
        let (d_in, d_out) = (m.cols, m.rows);
        if m.ty == GgmlType::F32 || !is_cpu(device) {
            return Self::dense(&m.dequantize(), bias, d_in, d_out, device);
        }
        Self {
            weight: None,
            quant: Some(Arc::new(m)),
            bias: bias.map(|b| Param::from_tensor(tensor_from_vec(b, [d_out], device))),
            d_in,
            d_out,
            lora: None,
        }
    }

    /// `[..., d_in]` to `[..., d_out]`.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let y = match &self.weight {
            Some(w) => {
                crate::fused_linear::linear(x.clone(), w.val(), self.bias.as_ref().map(|b| b.val()))
            }
            None => Self::quantized(&[self], x.clone())
                .pop()
                .expect("one output per layer"),
        };
        match &self.lora {
            Some(lora) => y + lora.forward(x),
            None => y,
        }
    }

    /// Several layers applied to the same input. Quantized layers on the CPU are computed in
    /// one parallel pass (one activation readback, one 8-bit quantization of it).
    pub fn forward_group<const D: usize>(layers: &[&Linear], x: Tensor<D>) -> Vec<Tensor<D>> {
        if layers
            .iter()
            .all(|l| l.weight.is_none() && l.lora.is_none())
        {
            Self::quantized(layers, x)
        } else {
            layers.iter().map(|l| l.forward(x.clone())).collect()
        }
    }

    /// Quantized layers (all with `weight == None`) applied to `x`: on the host, or, when `x`
    /// is tracked for gradients, through the differentiable quantized product.
    fn quantized<const D: usize>(layers: &[&Linear], x: Tensor<D>) -> Vec<Tensor<D>> {
        let quant: Vec<&Arc<QMatrix>> = layers
            .iter()
            .map(|l| l.quant.as_ref().expect("a Linear holds a matrix"))
            .collect();
        let dims = x.dims();
        let device = x.device();
        let n: usize = dims[..D - 1].iter().product();
        let with_bias = |l: &Linear, y: Tensor<D>| match &l.bias {
            Some(b) => y + b.val().unsqueeze(),
            None => y,
        };
        if x.is_tracked() {
            let x2: Tensor<2> = x.reshape([n, dims[D - 1]]);
            return layers
                .iter()
                .zip(quant)
                .map(|(l, q)| {
                    let mut out_dims = dims;
                    out_dims[D - 1] = l.d_out;
                    with_bias(l, crate::qop::quant_linear(x2.clone(), q).reshape(out_dims))
                })
                .collect();
        }
        let host = x
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .expect("f32 activations");
        let plain: Vec<&QMatrix> = quant.iter().map(|q| q.as_ref()).collect();
        let outs = crate::quant::matmul_group(&plain, &host, n);
        layers
            .iter()
            .zip(outs)
            .map(|(l, y)| {
                let mut out_dims = dims;
                out_dims[D - 1] = l.d_out;
                with_bias(l, Tensor::from_data(TensorData::new(y, out_dims), &device))
            })
            .collect()
    }

    /// Weight as row-major `[d_out, d_in]` f32 (dequantized when quantized).
    pub fn weight_out_in(&self) -> Result<Vec<f32>> {
        match (&self.weight, &self.quant) {
            (Some(w), _) => Ok(transpose(&tensor_to_vec(w.val())?, self.d_in, self.d_out)),
            (None, Some(q)) => Ok(q.dequantize()),
            (None, None) => unreachable!("a Linear holds a matrix"),
        }
    }

    pub fn bias_values(&self) -> Result<Option<Vec<f32>>> {
        self.bias
            .as_ref()
            .map(|b| tensor_to_vec(b.val()))
            .transpose()
    }

    /// The encoding of the weight: `F32`, or the GGML type it is kept in.
    pub fn storage(&self) -> GgmlType {
        self.quant.as_ref().map(|q| q.ty).unwrap_or(GgmlType::F32)
    }
}

/// Whether `device` is the CPU (burn's flex backend), where quantized kernels run.
pub fn is_cpu(device: &Device) -> bool {
    device.clone().without_autodiff() == Device::flex()
}

/// RMSNorm (Llama) or LayerNorm (GPT-2) over the last dimension.
#[derive(Module, Debug)]
pub struct LmNorm {
    pub weight: Param<Tensor<1>>,
    pub bias: Option<Param<Tensor<1>>>,
    #[module(skip)]
    pub eps: f64,
}

impl LmNorm {
    fn new(weight: Vec<f32>, bias: Option<Vec<f32>>, eps: f64, device: &Device) -> Self {
        let n = weight.len();
        Self {
            weight: Param::from_tensor(tensor_from_vec(weight, [n], device)),
            bias: bias.map(|b| Param::from_tensor(tensor_from_vec(b, [n], device))),
            eps,
        }
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        match &self.bias {
            Some(b) => crate::fused::layer_norm(x, self.weight.val(), b.val(), self.eps),
            None => {
                let ms = x.clone().powi_scalar(2).mean_dim(2);
                let inv = (ms + self.eps).sqrt().recip();
                x * inv * self.weight.val().unsqueeze()
            }
        }
    }
}

/// One decoder block.
#[derive(Module, Debug)]
pub struct Block {
    pub attn_norm: LmNorm,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub mlp_norm: LmNorm,
    /// The gate of a SwiGLU MLP; `None` for GPT-2's plain MLP.
    pub gate: Option<Linear>,
    pub up: Linear,
    pub down: Linear,
}

/// Keys and values of the positions seen so far, per layer: `[batch, kv_heads, len, head_dim]`.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
    len: usize,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The input of one forward pass: `batch` rows of `len` new tokens each.
#[derive(Clone, Debug)]
pub struct Step {
    pub tokens: Vec<u32>,
    pub batch: usize,
    pub len: usize,
    /// Position of every new token (`batch × len`), for rotary or learned position embeddings.
    pub positions: Vec<usize>,
    /// Which keys may be attended to, for every row over cache + new positions
    /// (`batch × (cache + len)`); `None` when all are valid (no padding).
    pub key_valid: Option<Vec<bool>>,
}

impl Step {
    /// One unpadded sequence continuing after `start` cached positions.
    pub fn single(tokens: &[u32], start: usize) -> Self {
        Self {
            tokens: tokens.to_vec(),
            batch: 1,
            len: tokens.len(),
            positions: (start..start + tokens.len()).collect(),
            key_valid: None,
        }
    }
}

/// A decoder-only language model.
#[derive(Module, Debug)]
pub struct CausalLm {
    /// Token embeddings `[vocab, hidden]`, f32 or quantized.
    pub embed: Linear,
    /// GPT-2's learned positions `[context, hidden]`.
    pub positions: Option<Param<Tensor<2>>>,
    pub blocks: Vec<Block>,
    pub final_norm: LmNorm,
    /// Output projection; `None` when tied to `embed`.
    pub lm_head: Option<Linear>,
    #[module(skip)]
    pub config: LmConfig,
}

impl CausalLm {
    /// Hidden states after the final norm for the new tokens of `step`: `[batch, len, hidden]`.
    /// Appends the new keys and values to `cache`.
    pub fn forward_hidden(&self, step: &Step, cache: &mut KvCache) -> Result<Tensor<3>> {
        let c = &self.config;
        let device = self.device();
        let (b, t) = (step.batch, step.len);
        let past = cache.len;
        if b == 0 || t == 0 {
            return Err(ModelError::Unsupported(
                "a forward pass needs at least one token".into(),
            ));
        }
        if step.tokens.len() != b * t || step.positions.len() != b * t {
            return Err(ModelError::Unsupported(
                "step tokens and positions must be batch × len".into(),
            ));
        }
        if let Some(&bad) = step.tokens.iter().find(|&&id| id as usize >= c.vocab_size) {
            return Err(ModelError::Unsupported(format!(
                "token id {bad} is outside the vocabulary of {} tokens",
                c.vocab_size
            )));
        }
        if let Some(&p) = step.positions.iter().max() {
            if p >= c.context {
                return Err(ModelError::Unsupported(format!(
                    "position {p} is beyond the model's context of {} tokens",
                    c.context
                )));
            }
        }
        if cache.layers.is_empty() {
            cache.layers = vec![None; c.layers];
        }
        let mut x = self.embed_tokens(&step.tokens, [b, t], &device)?;
        if let Some(pos) = &self.positions {
            let ids = Tensor::<1, burn::tensor::Int>::from_data(
                TensorData::new(
                    step.positions.iter().map(|&p| p as i64).collect::<Vec<_>>(),
                    [b * t],
                ),
                &device,
            );
            x = x + pos.val().select(0, ids).reshape([b, t, c.hidden]);
        }
        let total = past + t;
        let groups = c.heads / c.kv_heads;
        // The fused CPU kernel masks on the fly; other devices get an additive mask.
        let fusable = crate::fused::is_fusable(&device);
        let mask = (!fusable)
            .then(|| attention_mask(step, past, groups, &device))
            .flatten();
        let spec = crate::fused::AttentionSpec {
            scale: 1.0 / (c.head_dim() as f32).sqrt(),
            causal_past: Some(past),
            key_valid: step.key_valid.clone().map(Arc::new),
            dropout: None,
        };
        let rope = (c.arch == Arch::Llama).then(|| rope_tables(step, c, &device));
        for (i, block) in self.blocks.iter().enumerate() {
            let h = block.attn_norm.forward(x.clone());
            let hd = c.head_dim();
            let q = block
                .q
                .forward(h.clone())
                .reshape([b, t, c.heads, hd])
                .swap_dims(1, 2);
            let k = block
                .k
                .forward(h.clone())
                .reshape([b, t, c.kv_heads, hd])
                .swap_dims(1, 2);
            let v = block
                .v
                .forward(h)
                .reshape([b, t, c.kv_heads, hd])
                .swap_dims(1, 2);
            let (q, k) = match &rope {
                Some((cos, sin)) => (
                    apply_rope(q, cos.clone(), sin.clone()),
                    apply_rope(k, cos.clone(), sin.clone()),
                ),
                None => (q, k),
            };
            let (k, v) = match cache.layers[i].take() {
                Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
                None => (k, v),
            };
            cache.layers[i] = Some((k.clone(), v.clone()));
            let context = if fusable {
                crate::fused::attention(q, k, v, spec.clone())
            } else {
                // Grouped-query attention without copying keys: the query heads that share a
                // key/value head are stacked along the sequence axis.
                let q = q.reshape([b, c.kv_heads, groups * t, hd]);
                let scores = q.matmul(k.swap_dims(2, 3)) * (1.0 / (hd as f64).sqrt());
                let scores = match &mask {
                    Some(m) => scores + m.clone(),
                    None => scores,
                };
                softmax(scores, 3).matmul(v).reshape([b, c.heads, t, hd])
            };
            let context = context.swap_dims(1, 2).reshape([b, t, c.hidden]);
            x = x + block.o.forward(context);
            let h = block.mlp_norm.forward(x.clone());
            let inner = match &block.gate {
                Some(gate) => {
                    let mut gu = Linear::forward_group(&[gate, &block.up], h).into_iter();
                    match (gu.next(), gu.next()) {
                        (Some(g), Some(u)) => crate::fused::swiglu(g, u),
                        _ => unreachable!("two projections"),
                    }
                }
                None => crate::fused::gelu_tanh(block.up.forward(h)),
            };
            x = x + block.down.forward(inner);
        }
        debug_assert_eq!(cache.layers.len(), c.layers);
        cache.len = total;
        Ok(self.final_norm.forward(x))
    }

    /// Logits `[n, vocab]` of hidden states `[n, hidden]`.
    pub fn logits(&self, hidden: Tensor<2>) -> Tensor<2> {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => match &self.embed.weight {
                // The embedding table is `[vocab, hidden]` stored as a `[d_in=vocab, d_out=hidden]`
                // matrix, so the tied projection multiplies by its transpose.
                Some(w) => crate::fused_linear::linear_out_in(hidden, w.val()),
                None if hidden.is_tracked() => crate::qop::quant_linear(
                    hidden,
                    self.embed.quant.as_ref().expect("embedding matrix"),
                ),
                None => {
                    let q = self.embed.quant.as_ref().expect("embedding matrix");
                    let [n, _] = hidden.dims();
                    let device = hidden.device();
                    let host = hidden
                        .into_data()
                        .convert::<f32>()
                        .try_into_vec::<f32>()
                        .expect("f32");
                    Tensor::from_data(TensorData::new(q.matmul(&host, n), [n, q.rows]), &device)
                }
            },
        }
    }

    /// Logits of the last new token of every row: `[batch, vocab]`.
    pub fn last_logits(&self, step: &Step, cache: &mut KvCache) -> Result<Tensor<2>> {
        let h = self.forward_hidden(step, cache)?;
        let [b, t, d] = h.dims();
        Ok(self.logits(h.slice([0..b, t - 1..t, 0..d]).reshape([b, d])))
    }

    pub fn device(&self) -> Device {
        self.final_norm.weight.val().device()
    }

    fn embed_tokens(
        &self,
        tokens: &[u32],
        [b, t]: [usize; 2],
        device: &Device,
    ) -> Result<Tensor<3>> {
        let d = self.config.hidden;
        match (&self.embed.weight, &self.embed.quant) {
            (Some(w), _) => {
                let ids = Tensor::<1, burn::tensor::Int>::from_data(
                    TensorData::new(
                        tokens.iter().map(|&i| i as i64).collect::<Vec<_>>(),
                        [b * t],
                    ),
                    device,
                );
                Ok(w.val().select(0, ids).reshape([b, t, d]))
            }
            (None, Some(q)) => {
                let mut out = vec![0f32; tokens.len() * d];
                for (row, &id) in out.chunks_exact_mut(d).zip(tokens) {
                    q.dequantize_row(id as usize, row);
                }
                Ok(Tensor::from_data(TensorData::new(out, [b, t, d]), device))
            }
            (None, None) => unreachable!("an embedding holds a matrix"),
        }
    }

    /// The same model with every quantized matrix decoded to trainable f32 weights.
    pub fn to_dense(mut self) -> Result<Self> {
        let device = self.device();
        let dense = |l: &mut Linear| -> Result<()> {
            if l.weight.is_none() {
                let w = l.weight_out_in()?;
                let bias = l.bias_values()?;
                *l = Linear::dense(&w, bias, l.d_in, l.d_out, &device);
            }
            Ok(())
        };
        if self.embed.weight.is_none() {
            let table = self.embed.weight_out_in_table()?;
            self.embed = Linear::table(table, self.config.vocab_size, self.config.hidden, &device);
        }
        for b in self.blocks.iter_mut() {
            for l in [
                &mut b.q,
                &mut b.k,
                &mut b.v,
                &mut b.o,
                &mut b.up,
                &mut b.down,
            ] {
                dense(l)?;
            }
            if let Some(g) = b.gate.as_mut() {
                dense(g)?;
            }
        }
        if let Some(h) = self.lm_head.as_mut() {
            dense(h)?;
        }
        Ok(self)
    }

    /// Tensor types and counts, for `smelt inspect`.
    pub fn storage_summary(&self) -> Vec<(String, usize)> {
        let mut counts = std::collections::BTreeMap::new();
        let mut add = |l: &Linear| *counts.entry(l.storage().name().to_string()).or_insert(0) += 1;
        add(&self.embed);
        for b in &self.blocks {
            for l in [&b.q, &b.k, &b.v, &b.o, &b.up, &b.down] {
                add(l);
            }
            if let Some(g) = &b.gate {
                add(g);
            }
        }
        if let Some(h) = &self.lm_head {
            add(h);
        }
        counts.into_iter().collect()
    }

    /// Loads the decoder of a GGUF file.
    pub fn load_gguf(file: &GgufFile, device: &Device) -> Result<Self> {
        let config = gguf_config(file)?;
        let c = &config;
        let hd = c.head_dim();
        let kv = c.kv_heads * hd;
        let matrix = |name: &str, rows: usize, cols: usize| file.matrix(name, rows, cols);
        let vector = |name: &str, n: usize| file.f32(name, n);
        let linear = |name: &str, rows: usize, cols: usize| -> Result<Linear> {
            Ok(Linear::from_quant(
                matrix(&format!("{name}.weight"), rows, cols)?,
                None,
                device,
            ))
        };
        let embed =
            Linear::table_from_quant(matrix("token_embd.weight", c.vocab_size, c.hidden)?, device);
        let mut blocks = Vec::with_capacity(c.layers);
        for i in 0..c.layers {
            let p = format!("blk.{i}");
            // GGUF stores Q and K rows permuted for rotation of adjacent pairs; undo it so the
            // model rotates halves like the Hugging Face layout (and adapters match it).
            let q = matrix(&format!("{p}.attn_q.weight"), c.hidden, c.hidden)?
                .permute_rows(&unpermute_order(c.heads, hd));
            let k = matrix(&format!("{p}.attn_k.weight"), kv, c.hidden)?
                .permute_rows(&unpermute_order(c.kv_heads, hd));
            blocks.push(Block {
                attn_norm: LmNorm::new(
                    vector(&format!("{p}.attn_norm.weight"), c.hidden)?,
                    None,
                    c.norm_eps,
                    device,
                ),
                q: Linear::from_quant(q, None, device),
                k: Linear::from_quant(k, None, device),
                v: linear(&format!("{p}.attn_v"), kv, c.hidden)?,
                o: linear(&format!("{p}.attn_output"), c.hidden, c.hidden)?,
                mlp_norm: LmNorm::new(
                    vector(&format!("{p}.ffn_norm.weight"), c.hidden)?,
                    None,
                    c.norm_eps,
                    device,
                ),
                gate: Some(linear(&format!("{p}.ffn_gate"), c.intermediate, c.hidden)?),
                up: linear(&format!("{p}.ffn_up"), c.intermediate, c.hidden)?,
                down: linear(&format!("{p}.ffn_down"), c.hidden, c.intermediate)?,
            });
        }
        let lm_head = if c.tie_embeddings {
            None
        } else {
            Some(linear("output", c.vocab_size, c.hidden)?)
        };
        Ok(Self {
            embed,
            positions: None,
            blocks,
            final_norm: LmNorm::new(
                vector("output_norm.weight", c.hidden)?,
                None,
                c.norm_eps,
                device,
            ),
            lm_head,
            config,
        })
    }

    /// Loads a Hugging Face `LlamaForCausalLM` or `GPT2LMHeadModel` directory.
    pub fn load_hf(dir: &Path, device: &Device) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config = hf_config(&config_path)?;
        let weights_path = dir.join("model.safetensors");
        if !weights_path.exists() {
            if dir.join("pytorch_model.bin").exists() {
                return Err(ModelError::Pickle {
                    path: dir.join("pytorch_model.bin"),
                });
            }
            return Err(ModelError::NoWeights {
                dir: dir.to_path_buf(),
            });
        }
        let file = WeightFile::open(&weights_path)?;
        match config.arch {
            Arch::Llama => load_hf_llama(&file, config, device),
            Arch::Gpt2 => load_hf_gpt2(&file, config, device),
        }
    }

    /// All tensors under Hugging Face names and layout (quantized weights dequantized).
    pub fn export_hf(&self) -> Result<Vec<NamedTensor>> {
        let c = &self.config;
        let mut out = Vec::new();
        let push_vec =
            |out: &mut Vec<NamedTensor>, name: String, t: &Param<Tensor<1>>| -> Result<()> {
                out.push(NamedTensor::from_tensor(name, t.val())?);
                Ok(())
            };
        match c.arch {
            Arch::Llama => {
                let lin = |out: &mut Vec<NamedTensor>, name: String, l: &Linear| -> Result<()> {
                    out.push(NamedTensor::new(
                        name,
                        vec![l.d_out, l.d_in],
                        l.weight_out_in()?,
                    ));
                    Ok(())
                };
                out.push(NamedTensor::new(
                    "model.embed_tokens.weight",
                    vec![c.vocab_size, c.hidden],
                    self.embed.weight_out_in_table()?,
                ));
                for (i, b) in self.blocks.iter().enumerate() {
                    let p = format!("model.layers.{i}");
                    push_vec(
                        &mut out,
                        format!("{p}.input_layernorm.weight"),
                        &b.attn_norm.weight,
                    )?;
                    lin(&mut out, format!("{p}.self_attn.q_proj.weight"), &b.q)?;
                    lin(&mut out, format!("{p}.self_attn.k_proj.weight"), &b.k)?;
                    lin(&mut out, format!("{p}.self_attn.v_proj.weight"), &b.v)?;
                    lin(&mut out, format!("{p}.self_attn.o_proj.weight"), &b.o)?;
                    push_vec(
                        &mut out,
                        format!("{p}.post_attention_layernorm.weight"),
                        &b.mlp_norm.weight,
                    )?;
                    if let Some(g) = &b.gate {
                        lin(&mut out, format!("{p}.mlp.gate_proj.weight"), g)?;
                    }
                    lin(&mut out, format!("{p}.mlp.up_proj.weight"), &b.up)?;
                    lin(&mut out, format!("{p}.mlp.down_proj.weight"), &b.down)?;
                }
                push_vec(
                    &mut out,
                    "model.norm.weight".into(),
                    &self.final_norm.weight,
                )?;
                if let Some(h) = &self.lm_head {
                    lin(&mut out, "lm_head.weight".into(), h)?;
                }
            }
            Arch::Gpt2 => {
                // Conv1D stores `[d_in, d_out]`.
                let conv = |out: &mut Vec<NamedTensor>, name: &str, ls: &[&Linear]| -> Result<()> {
                    let d_in = ls[0].d_in;
                    let d_out: usize = ls.iter().map(|l| l.d_out).sum();
                    let mut w_out_in = Vec::with_capacity(d_in * d_out);
                    let mut bias = Vec::with_capacity(d_out);
                    for l in ls {
                        w_out_in.extend(l.weight_out_in()?);
                        bias.extend(l.bias_values()?.unwrap_or_else(|| vec![0.0; l.d_out]));
                    }
                    out.push(NamedTensor::new(
                        format!("{name}.weight"),
                        vec![d_in, d_out],
                        transpose(&w_out_in, d_out, d_in),
                    ));
                    out.push(NamedTensor::new(format!("{name}.bias"), vec![d_out], bias));
                    Ok(())
                };
                let norm = |out: &mut Vec<NamedTensor>, name: &str, n: &LmNorm| -> Result<()> {
                    out.push(NamedTensor::from_tensor(
                        format!("{name}.weight"),
                        n.weight.val(),
                    )?);
                    if let Some(b) = &n.bias {
                        out.push(NamedTensor::from_tensor(format!("{name}.bias"), b.val())?);
                    }
                    Ok(())
                };
                out.push(NamedTensor::new(
                    "transformer.wte.weight",
                    vec![c.vocab_size, c.hidden],
                    self.embed.weight_out_in_table()?,
                ));
                if let Some(p) = &self.positions {
                    out.push(NamedTensor::from_tensor("transformer.wpe.weight", p.val())?);
                }
                for (i, b) in self.blocks.iter().enumerate() {
                    let p = format!("transformer.h.{i}");
                    norm(&mut out, &format!("{p}.ln_1"), &b.attn_norm)?;
                    conv(&mut out, &format!("{p}.attn.c_attn"), &[&b.q, &b.k, &b.v])?;
                    conv(&mut out, &format!("{p}.attn.c_proj"), &[&b.o])?;
                    norm(&mut out, &format!("{p}.ln_2"), &b.mlp_norm)?;
                    conv(&mut out, &format!("{p}.mlp.c_fc"), &[&b.up])?;
                    conv(&mut out, &format!("{p}.mlp.c_proj"), &[&b.down])?;
                }
                norm(&mut out, "transformer.ln_f", &self.final_norm)?;
            }
        }
        Ok(out)
    }
}

impl Linear {
    /// An embedding table held as a Linear with `d_in = vocab`, `d_out = hidden` (f32) or as a
    /// `[vocab, hidden]` quantized matrix: returns it as row-major `[vocab, hidden]`.
    fn weight_out_in_table(&self) -> Result<Vec<f32>> {
        match (&self.weight, &self.quant) {
            (Some(w), _) => tensor_to_vec(w.val()),
            (None, Some(q)) => Ok(q.dequantize()),
            (None, None) => unreachable!("an embedding holds a matrix"),
        }
    }

    /// An embedding table from a `[vocab, hidden]` GGUF matrix: kept in its encoding on the
    /// CPU (rows are decoded on lookup), dequantized elsewhere.
    fn table_from_quant(m: QMatrix, device: &Device) -> Self {
        let (vocab, hidden) = (m.rows, m.cols);
        if m.ty == GgmlType::F32 || !is_cpu(device) {
            return Self::table(m.dequantize(), vocab, hidden, device);
        }
        Self {
            weight: None,
            quant: Some(Arc::new(m)),
            bias: None,
            d_in: hidden,
            d_out: vocab,
            lora: None,
        }
    }

    /// An embedding table `[vocab, hidden]` from row-major f32 values.
    fn table(values: Vec<f32>, vocab: usize, hidden: usize, device: &Device) -> Self {
        Self {
            weight: Some(Param::from_tensor(tensor_from_vec(
                values,
                [vocab, hidden],
                device,
            ))),
            quant: None,
            bias: None,
            d_in: vocab,
            d_out: hidden,
            lora: None,
        }
    }
}

/// Row order that turns GGUF's pair-permuted Q/K rows back into the Hugging Face order.
pub fn unpermute_order(heads: usize, head_dim: usize) -> Vec<usize> {
    let half = head_dim / 2;
    let mut order = vec![0; heads * head_dim];
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                order[h * head_dim + j * half + i] = h * head_dim + 2 * i + j;
            }
        }
    }
    order
}

/// The decoder configuration described by a GGUF file's `llama.*` metadata, validated.
pub fn gguf_config(file: &GgufFile) -> Result<LmConfig> {
    let arch = file.require("general.architecture", "a string", |v| {
        v.as_str().map(str::to_string)
    })?;
    if arch != "llama" {
        return Err(ModelError::Unsupported(format!(
            "{}: GGUF architecture `{arch}`; smelt reads `llama` GGUF files (GPT-2 from Hugging \
             Face directories)",
            file.path().display()
        )));
    }
    let size = |key: &str| -> Result<usize> {
        file.require(&format!("llama.{key}"), "a positive integer", |v| {
            v.as_u64()
                .filter(|&n| n > 0 && n < 1 << 24)
                .map(|n| n as usize)
        })
    };
    let hidden = size("embedding_length")?;
    let heads = size("attention.head_count")?;
    let kv_heads = match file.get("llama.attention.head_count_kv") {
        Some(_) => size("attention.head_count_kv")?,
        None => heads,
    };
    let embed = file
        .tensor_info("token_embd.weight")
        .ok_or_else(|| ModelError::MissingTensor {
            path: file.path().to_path_buf(),
            name: "token_embd.weight".into(),
        })?;
    let vocab_size = match file.get("llama.vocab_size") {
        Some(_) => size("vocab_size")?,
        None => embed.matrix_shape().0,
    };
    let float = |key: &str, default: f64| -> Result<f64> {
        match file.get(&format!("llama.{key}")) {
            None => Ok(default),
            Some(_) => file.require(&format!("llama.{key}"), "a number", GgufValue::as_f64),
        }
    };
    // Llama 3.1-style frequency scaling (a `rope_freqs` tensor) or other rotary scaling
    // would load and then give wrong logits; refuse it instead.
    let scaling = file
        .get("llama.rope.scaling.type")
        .and_then(GgufValue::as_str);
    if file.tensor_info("rope_freqs.weight").is_some() || scaling.is_some_and(|s| s != "none") {
        return Err(ModelError::Unsupported(format!(
            "{}: scaled rotary embeddings (rope_freqs.weight or llama.rope.scaling.type = {}) \
             are not supported",
            file.path().display(),
            scaling.unwrap_or("-")
        )));
    }
    if let Some(dims) = file.get("llama.rope.dimension_count") {
        if dims.as_u64() != Some((hidden / heads) as u64) {
            return Err(ModelError::Unsupported(format!(
                "{}: rotary embedding over {} of {} head dimensions (partial rotary) is not \
                 supported",
                file.path().display(),
                dims.summary(),
                hidden / heads
            )));
        }
    }
    let config = LmConfig {
        arch: Arch::Llama,
        vocab_size,
        hidden,
        layers: size("block_count")?,
        heads,
        kv_heads,
        intermediate: size("feed_forward_length")?,
        context: size("context_length")?,
        norm_eps: float("attention.layer_norm_rms_epsilon", 1e-5)?,
        rope_theta: float("rope.freq_base", 10000.0)?,
        tie_embeddings: file.tensor_info("output.weight").is_none(),
    };
    config
        .validate(file.path())
        .map_err(|e| rename_field(e, GGUF_KEYS))?;
    Ok(config)
}

/// Where the fields that `LmConfig::validate` names come from in a GGUF file.
const GGUF_KEYS: &[(&str, &str)] = &[
    ("vocab_size", "llama.vocab_size"),
    ("hidden_size", "llama.embedding_length"),
    ("num_hidden_layers", "llama.block_count"),
    ("num_attention_heads", "llama.attention.head_count"),
    ("num_key_value_heads", "llama.attention.head_count_kv"),
    ("intermediate_size", "llama.feed_forward_length"),
    ("max_position_embeddings", "llama.context_length"),
    ("rms_norm_eps", "llama.attention.layer_norm_rms_epsilon"),
    ("rope_theta", "llama.rope.freq_base"),
];

/// The same for a GPT-2 `config.json`.
const GPT2_KEYS: &[(&str, &str)] = &[
    ("hidden_size", "n_embd"),
    ("num_hidden_layers", "n_layer"),
    ("num_attention_heads", "n_head"),
    ("intermediate_size", "n_inner"),
    ("max_position_embeddings", "n_positions"),
    ("rms_norm_eps", "layer_norm_epsilon"),
];

/// Renames the field of a config error to the key the file really uses.
fn rename_field(e: ModelError, names: &[(&str, &str)]) -> ModelError {
    match e {
        ModelError::Config {
            path,
            field,
            message,
        } => {
            let field = names
                .iter()
                .find(|(from, _)| *from == field)
                .map(|(_, to)| to.to_string())
                .unwrap_or(field);
            ModelError::Config {
                path,
                field,
                message,
            }
        }
        other => other,
    }
}

/// Reads `config.json` of a Llama or GPT-2 checkpoint.
pub fn hf_config(path: &Path) -> Result<LmConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| ModelError::Json {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let bad = |field: &str, message: String| ModelError::Config {
        path: path.to_path_buf(),
        field: field.to_string(),
        message,
    };
    let size = |keys: &[&str], default: Option<usize>| -> Result<usize> {
        for k in keys {
            if let Some(x) = v.get(*k) {
                return x
                    .as_u64()
                    .filter(|&n| n > 0 && n < 1 << 24)
                    .map(|n| n as usize)
                    .ok_or_else(|| bad(k, format!("is {x}, expected a positive integer")));
            }
        }
        default.ok_or_else(|| bad(keys[0], "missing; expected a positive integer".into()))
    };
    let float = |key: &str, default: f64| -> Result<f64> {
        match v.get(key) {
            None => Ok(default),
            Some(x) => x
                .as_f64()
                .ok_or_else(|| bad(key, format!("is {x}, expected a number"))),
        }
    };
    let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
    let config = match model_type {
        "llama" => {
            for key in ["rope_scaling", "rope_parameters"] {
                if let Some(kind) = v
                    .get(key)
                    .and_then(|r| r.get("rope_type").or(r.get("type")))
                {
                    if kind.as_str() != Some("default") {
                        return Err(bad(
                            key,
                            format!(
                                "rope type {kind}; only unscaled rotary embeddings are supported"
                            ),
                        ));
                    }
                }
            }
            for key in ["attention_bias", "mlp_bias"] {
                if v.get(key).and_then(Value::as_bool) == Some(true) {
                    return Err(bad(
                        key,
                        "is true; Llama layers with biases are not supported".into(),
                    ));
                }
            }
            if let Some(act) = v.get("hidden_act").and_then(Value::as_str) {
                if act != "silu" {
                    return Err(bad("hidden_act", format!("is `{act}`, expected `silu`")));
                }
            }
            let hidden = size(&["hidden_size"], None)?;
            let heads = size(&["num_attention_heads"], None)?;
            if let Some(hd) = v.get("head_dim").and_then(Value::as_u64) {
                if (hd as usize).checked_mul(heads) != Some(hidden) {
                    return Err(bad(
                        "head_dim",
                        format!("{hd} × {heads} heads is not hidden_size {hidden}"),
                    ));
                }
            }
            LmConfig {
                arch: Arch::Llama,
                vocab_size: size(&["vocab_size"], None)?,
                hidden,
                layers: size(&["num_hidden_layers"], None)?,
                heads,
                kv_heads: size(&["num_key_value_heads"], Some(heads))?,
                intermediate: size(&["intermediate_size"], None)?,
                context: size(&["max_position_embeddings"], None)?,
                norm_eps: float("rms_norm_eps", 1e-6)?,
                // transformers 5 writes `rope_parameters.rope_theta`; older configs `rope_theta`.
                rope_theta: match v.get("rope_parameters").and_then(|r| r.get("rope_theta")) {
                    Some(t) => t.as_f64().ok_or_else(|| {
                        bad(
                            "rope_parameters.rope_theta",
                            format!("is {t}, expected a number"),
                        )
                    })?,
                    None => float("rope_theta", 10000.0)?,
                },
                tie_embeddings: v
                    .get("tie_word_embeddings")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            }
        }
        "gpt2" => {
            if let Some(act) = v.get("activation_function").and_then(Value::as_str) {
                if act != "gelu_new" && act != "gelu_pytorch_tanh" {
                    return Err(bad(
                        "activation_function",
                        format!("is `{act}`, expected `gelu_new`"),
                    ));
                }
            }
            let hidden = size(&["n_embd", "hidden_size"], None)?;
            let heads = size(&["n_head", "num_attention_heads"], None)?;
            LmConfig {
                arch: Arch::Gpt2,
                vocab_size: size(&["vocab_size"], None)?,
                hidden,
                layers: size(&["n_layer", "num_hidden_layers"], None)?,
                heads,
                kv_heads: heads,
                intermediate: match v.get("n_inner").filter(|x| !x.is_null()) {
                    Some(_) => size(&["n_inner"], None)?,
                    None => 4 * hidden,
                },
                context: size(&["n_positions", "n_ctx"], None)?,
                norm_eps: float("layer_norm_epsilon", 1e-5)?,
                rope_theta: 0.0,
                tie_embeddings: true,
            }
        }
        other => {
            return Err(bad(
                "model_type",
                format!("is `{other}`; smelt's causal models are `llama` and `gpt2`"),
            ))
        }
    };
    let names = if config.arch == Arch::Gpt2 {
        GPT2_KEYS
    } else {
        &[]
    };
    config.validate(path).map_err(|e| rename_field(e, names))?;
    Ok(config)
}

fn load_hf_llama(file: &WeightFile, c: LmConfig, device: &Device) -> Result<CausalLm> {
    let hd = c.head_dim();
    let kv = c.kv_heads * hd;
    let linear = |name: &str, rows: usize, cols: usize| -> Result<Linear> {
        Ok(Linear::dense(
            &file.f32(&format!("{name}.weight"), &[rows, cols])?,
            None,
            cols,
            rows,
            device,
        ))
    };
    let norm = |name: &str| -> Result<LmNorm> {
        Ok(LmNorm::new(
            file.f32(&format!("{name}.weight"), &[c.hidden])?,
            None,
            c.norm_eps,
            device,
        ))
    };
    let embed = Linear::table(
        file.f32("model.embed_tokens.weight", &[c.vocab_size, c.hidden])?,
        c.vocab_size,
        c.hidden,
        device,
    );
    let mut blocks = Vec::with_capacity(c.layers);
    for i in 0..c.layers {
        let p = format!("model.layers.{i}");
        blocks.push(Block {
            attn_norm: norm(&format!("{p}.input_layernorm"))?,
            q: linear(&format!("{p}.self_attn.q_proj"), c.hidden, c.hidden)?,
            k: linear(&format!("{p}.self_attn.k_proj"), kv, c.hidden)?,
            v: linear(&format!("{p}.self_attn.v_proj"), kv, c.hidden)?,
            o: linear(&format!("{p}.self_attn.o_proj"), c.hidden, c.hidden)?,
            mlp_norm: norm(&format!("{p}.post_attention_layernorm"))?,
            gate: Some(linear(
                &format!("{p}.mlp.gate_proj"),
                c.intermediate,
                c.hidden,
            )?),
            up: linear(&format!("{p}.mlp.up_proj"), c.intermediate, c.hidden)?,
            down: linear(&format!("{p}.mlp.down_proj"), c.hidden, c.intermediate)?,
        });
    }
    let lm_head = if c.tie_embeddings || !file.contains("lm_head.weight") {
        None
    } else {
        Some(linear("lm_head", c.vocab_size, c.hidden)?)
    };
    let final_norm = norm("model.norm")?;
    let mut c = c;
    c.tie_embeddings = lm_head.is_none();
    Ok(CausalLm {
        embed,
        positions: None,
        blocks,
        final_norm,
        lm_head,
        config: c,
    })
}

fn load_hf_gpt2(file: &WeightFile, c: LmConfig, device: &Device) -> Result<CausalLm> {
    let prefix = if file.contains("transformer.wte.weight") {
        "transformer."
    } else {
        ""
    };
    let h = c.hidden;
    let get = |name: &str, shape: &[usize]| file.f32(&format!("{prefix}{name}"), shape);
    let norm = |name: &str| -> Result<LmNorm> {
        Ok(LmNorm::new(
            get(&format!("{name}.weight"), &[h])?,
            Some(get(&format!("{name}.bias"), &[h])?),
            c.norm_eps,
            device,
        ))
    };
    // Conv1D weights are `[d_in, d_out]`; c_attn packs Q, K and V along d_out.
    let conv = |name: &str, d_in: usize, d_out: usize| -> Result<(Vec<f32>, Vec<f32>)> {
        Ok((
            get(&format!("{name}.weight"), &[d_in, d_out])?,
            get(&format!("{name}.bias"), &[d_out])?,
        ))
    };
    let embed = Linear::table(
        get("wte.weight", &[c.vocab_size, h])?,
        c.vocab_size,
        h,
        device,
    );
    let positions = Param::from_tensor(tensor_from_vec(
        get("wpe.weight", &[c.context, h])?,
        [c.context, h],
        device,
    ));
    let mut blocks = Vec::with_capacity(c.layers);
    for i in 0..c.layers {
        let p = format!("h.{i}");
        let (qkv_w, qkv_b) = conv(&format!("{p}.attn.c_attn"), h, 3 * h)?;
        let w_out_in = transpose(&qkv_w, h, 3 * h);
        let part = |j: usize| {
            Linear::dense(
                &w_out_in[j * h * h..(j + 1) * h * h],
                Some(qkv_b[j * h..(j + 1) * h].to_vec()),
                h,
                h,
                device,
            )
        };
        let (o_w, o_b) = conv(&format!("{p}.attn.c_proj"), h, h)?;
        let (fc_w, fc_b) = conv(&format!("{p}.mlp.c_fc"), h, c.intermediate)?;
        let (pr_w, pr_b) = conv(&format!("{p}.mlp.c_proj"), c.intermediate, h)?;
        blocks.push(Block {
            attn_norm: norm(&format!("{p}.ln_1"))?,
            q: part(0),
            k: part(1),
            v: part(2),
            o: Linear::dense_in_out(o_w, Some(o_b), h, h, device),
            mlp_norm: norm(&format!("{p}.ln_2"))?,
            gate: None,
            up: Linear::dense_in_out(fc_w, Some(fc_b), h, c.intermediate, device),
            down: Linear::dense_in_out(pr_w, Some(pr_b), c.intermediate, h, device),
        });
    }
    Ok(CausalLm {
        embed,
        positions: Some(positions),
        blocks,
        final_norm: norm("ln_f")?,
        lm_head: None,
        config: c.clone(),
    })
}

/// `[batch, 1, groups × len, cache + len]` additive mask: causal, and padded keys hidden.
/// `None` when a single new token may see everything (plain decoding).
fn attention_mask(step: &Step, past: usize, groups: usize, device: &Device) -> Option<Tensor<4>> {
    let (b, t) = (step.batch, step.len);
    let total = past + t;
    if t == 1 && step.key_valid.is_none() {
        return None;
    }
    const HIDDEN: f32 = -1e9;
    let mut m = vec![0f32; b * groups * t * total];
    for r in 0..b {
        for g in 0..groups {
            for i in 0..t {
                let row = &mut m[((r * groups + g) * t + i) * total..][..total];
                for (j, v) in row.iter_mut().enumerate() {
                    let valid = step
                        .key_valid
                        .as_ref()
                        .map(|kv| kv[r * total + j])
                        .unwrap_or(true);
                    if j > past + i || !valid {
                        *v = HIDDEN;
                    }
                }
            }
        }
    }
    Some(Tensor::from_data(
        TensorData::new(m, [b, 1, groups * t, total]),
        device,
    ))
}

/// Rotary tables `[batch, 1, len, head_dim]` for the positions of `step` (halves convention).
fn rope_tables(step: &Step, c: &LmConfig, device: &Device) -> (Tensor<4>, Tensor<4>) {
    let hd = c.head_dim();
    let half = hd / 2;
    let n = step.batch * step.len;
    let mut cos = vec![0f32; n * hd];
    let mut sin = vec![0f32; n * hd];
    for (k, &p) in step.positions.iter().enumerate() {
        for i in 0..half {
            let inv = 1.0 / c.rope_theta.powf(2.0 * i as f64 / hd as f64);
            let angle = p as f64 * inv;
            let (s, co) = angle.sin_cos();
            for j in [i, i + half] {
                cos[k * hd + j] = co as f32;
                sin[k * hd + j] = s as f32;
            }
        }
    }
    let shape = [step.batch, 1, step.len, hd];
    (
        Tensor::from_data(TensorData::new(cos, shape), device),
        Tensor::from_data(TensorData::new(sin, shape), device),
    )
}

/// `x·cos + rotate_half(x)·sin` on `[batch, heads, len, head_dim]`.
fn apply_rope(x: Tensor<4>, cos: Tensor<4>, sin: Tensor<4>) -> Tensor<4> {
    let [b, h, t, d] = x.dims();
    let half = d / 2;
    let x1 = x.clone().slice([0..b, 0..h, 0..t, 0..half]);
    let x2 = x.clone().slice([0..b, 0..h, 0..t, half..d]);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos + rotated * sin
}

/// A new random GPT-2 style model (for training from scratch and tests).
pub fn random_gpt2(config: LmConfig, seed: u64, device: &Device) -> CausalLm {
    let mut init = crate::init::HostInit::new(seed);
    let (h, f, v) = (config.hidden, config.intermediate, config.vocab_size);
    let std = 0.02;
    let proj_std = 0.02 / (2.0 * config.layers as f32).sqrt();
    let norm =
        |device: &Device| LmNorm::new(vec![1.0; h], Some(vec![0.0; h]), config.norm_eps, device);
    let mut blocks = Vec::with_capacity(config.layers);
    for _ in 0..config.layers {
        let mut lin = |d_in: usize, d_out: usize, s: f32| {
            Linear::dense_in_out(
                init.normal(d_in * d_out, s),
                Some(vec![0.0; d_out]),
                d_in,
                d_out,
                device,
            )
        };
        blocks.push(Block {
            attn_norm: norm(device),
            q: lin(h, h, std),
            k: lin(h, h, std),
            v: lin(h, h, std),
            o: lin(h, h, proj_std),
            mlp_norm: norm(device),
            gate: None,
            up: lin(h, f, std),
            down: lin(f, h, proj_std),
        });
    }
    let embed = Linear::table(init.normal(v * h, std), v, h, device);
    let positions = Param::from_tensor(tensor_from_vec(
        init.normal(config.context * h, std),
        [config.context, h],
        device,
    ));
    CausalLm {
        embed,
        positions: Some(positions),
        blocks,
        final_norm: norm(device),
        lm_head: None,
        config,
    }
}

/// Writes the `config.json` of a Hugging Face checkpoint for `config`.
pub fn hf_config_json(config: &LmConfig) -> Value {
    match config.arch {
        Arch::Gpt2 => serde_json::json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": config.vocab_size,
            "n_embd": config.hidden,
            "n_layer": config.layers,
            "n_head": config.heads,
            "n_inner": config.intermediate,
            "n_positions": config.context,
            "n_ctx": config.context,
            "layer_norm_epsilon": config.norm_eps,
            "activation_function": "gelu_new",
            "tie_word_embeddings": true,
        }),
        Arch::Llama => serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": config.vocab_size,
            "hidden_size": config.hidden,
            "num_hidden_layers": config.layers,
            "num_attention_heads": config.heads,
            "num_key_value_heads": config.kv_heads,
            "intermediate_size": config.intermediate,
            "max_position_embeddings": config.context,
            "rms_norm_eps": config.norm_eps,
            "rope_theta": config.rope_theta,
            "hidden_act": "silu",
            "tie_word_embeddings": config.tie_embeddings,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_the_gguf_pair_permutation() {
        // GGUF row of (head h, pair i, member j) is h*hd + 2i + j; HF row is h*hd + j*half + i.
        let (heads, hd) = (2, 6);
        let order = unpermute_order(heads, hd);
        let mut seen = order.clone();
        seen.sort();
        assert_eq!(seen, (0..heads * hd).collect::<Vec<_>>());
        assert_eq!(&order[..6], &[0, 2, 4, 1, 3, 5]);
    }

    #[test]
    fn cache_gives_the_same_logits_as_a_full_pass() {
        let device = Device::flex();
        let config = LmConfig {
            arch: Arch::Gpt2,
            vocab_size: 50,
            hidden: 16,
            layers: 2,
            heads: 4,
            kv_heads: 4,
            intermediate: 32,
            context: 32,
            norm_eps: 1e-5,
            rope_theta: 0.0,
            tie_embeddings: true,
        };
        let model = random_gpt2(config, 1, &device);
        let tokens = [3u32, 9, 27, 4, 11];
        let mut full_cache = KvCache::new();
        let full = model
            .forward_hidden(&Step::single(&tokens, 0), &mut full_cache)
            .unwrap();
        let full = tensor_to_vec(full).unwrap();
        let mut cache = KvCache::new();
        model
            .forward_hidden(&Step::single(&tokens[..3], 0), &mut cache)
            .unwrap();
        model
            .forward_hidden(&Step::single(&tokens[3..4], 3), &mut cache)
            .unwrap();
        let last = model
            .forward_hidden(&Step::single(&tokens[4..], 4), &mut cache)
            .unwrap();
        let last = tensor_to_vec(last).unwrap();
        for (a, b) in full[4 * 16..].iter().zip(&last) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        assert_eq!(cache.len(), 5);
    }
}
