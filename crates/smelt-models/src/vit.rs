//! Vision Transformer (ViT) encoders and the image-classification head, in the layout of
//! Hugging Face `ViTModel` / `ViTForImageClassification`.
//!
//! An image `[batch, channels, size, size]` is cut into square patches, each projected to the
//! width (the `Conv2d` of the reference, done here as one matrix product over flattened
//! patches), a learned class token is prepended and learned positions added; pre-norm blocks
//! follow and a final LayerNorm. The classifier reads the class token.

use crate::bert::{id2label_of, label_maps};
use crate::dropout::Dropout;
use crate::error::{ModelError, Result};
use crate::init::HostInit;
use crate::layers::{Dense, Norm};
use crate::weights::{tensor_from_vec, tensor_to_vec, NamedTensor, WeightFile};
use burn::module::{Module, Param};
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor};
use serde_json::{json, Map, Value};
use std::path::Path;

/// Architecture hyper-parameters, read from or written to a Hugging Face `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct VitConfig {
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub layer_norm_eps: f64,
    pub hidden_dropout_prob: f64,
    pub attention_probs_dropout_prob: f64,
    pub initializer_range: f64,
    /// Class names by index, when the checkpoint carries a classifier.
    pub id2label: Option<Vec<String>>,
    /// The whole JSON object, so that saving keeps fields smelt does not interpret.
    pub raw: Map<String, Value>,
}

/// Named sizes `[hidden, layers, heads, intermediate]`: ViT-Tiny, -Small and -Base.
pub const PRESETS: [(&str, [usize; 4]); 3] = [
    ("tiny", [192, 12, 3, 768]),
    ("small", [384, 12, 6, 1536]),
    ("base", [768, 12, 12, 3072]),
];

impl VitConfig {
    /// A configuration from sizes; dropout off, Hugging Face's other defaults.
    pub fn new(
        image_size: usize,
        patch_size: usize,
        num_channels: usize,
        [hidden, layers, heads, intermediate]: [usize; 4],
    ) -> Result<Self> {
        let value = json!({
            "model_type": "vit",
            "image_size": image_size,
            "patch_size": patch_size,
            "num_channels": num_channels,
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "intermediate_size": intermediate,
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-12,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "initializer_range": 0.02,
            "qkv_bias": true,
            "encoder_stride": patch_size,
        });
        Self::from_json(Path::new("<model config>"), value)
    }

    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| ModelError::Json {
            path: path.to_path_buf(),
            message: format!("not valid JSON: {e}"),
        })?;
        Self::from_json(path, value)
    }

    pub fn from_json(path: &Path, value: Value) -> Result<Self> {
        let Value::Object(raw) = value else {
            return Err(ModelError::Json {
                path: path.to_path_buf(),
                message: "expected a JSON object".into(),
            });
        };
        let err = |field: &str, message: String| ModelError::Config {
            path: path.to_path_buf(),
            field: field.to_string(),
            message,
        };
        match raw.get("model_type").and_then(Value::as_str) {
            Some("vit") => {}
            other => {
                return Err(err(
                    "model_type",
                    format!("expected `vit` (a ViT image model), found {other:?}"),
                ))
            }
        }
        let size = |field: &str, default: Option<usize>| -> Result<usize> {
            match raw.get(field) {
                Some(v) => match v.as_u64() {
                    Some(n) if n > 0 && n <= 1 << 20 => Ok(n as usize),
                    _ => Err(err(
                        field,
                        format!("expected a positive integer, found {v}"),
                    )),
                },
                None => default.ok_or_else(|| err(field, "missing".into())),
            }
        };
        let prob = |field: &str| -> Result<f64> {
            match raw.get(field) {
                None | Some(Value::Null) => Ok(0.0),
                Some(v) => match v.as_f64() {
                    Some(p) if (0.0..1.0).contains(&p) => Ok(p),
                    _ => Err(err(
                        field,
                        format!("expected a probability in [0, 1), found {v}"),
                    )),
                },
            }
        };
        let image_size = size("image_size", Some(224))?;
        let patch_size = size("patch_size", Some(16))?;
        if image_size % patch_size != 0 {
            return Err(err(
                "patch_size",
                format!("{patch_size} does not divide image_size {image_size}"),
            ));
        }
        let hidden_size = size("hidden_size", Some(768))?;
        let num_attention_heads = size("num_attention_heads", Some(12))?;
        if hidden_size % num_attention_heads != 0 {
            return Err(err(
                "num_attention_heads",
                format!("{num_attention_heads} heads do not divide hidden_size {hidden_size}"),
            ));
        }
        if let Some(act) = raw.get("hidden_act") {
            if act.as_str() != Some("gelu") {
                return Err(err(
                    "hidden_act",
                    format!("only `gelu` is supported, found {act}"),
                ));
            }
        }
        if raw.get("qkv_bias").and_then(Value::as_bool) == Some(false) {
            return Err(err(
                "qkv_bias",
                "only `true` is supported (query, key and value with biases)".into(),
            ));
        }
        let num_channels = size("num_channels", Some(3))?;
        if num_channels != 1 && num_channels != 3 {
            return Err(err(
                "num_channels",
                format!("expected 1 (gray) or 3 (RGB), found {num_channels}"),
            ));
        }
        Ok(Self {
            image_size,
            patch_size,
            num_channels,
            hidden_size,
            num_hidden_layers: size("num_hidden_layers", Some(12))?,
            num_attention_heads,
            intermediate_size: size("intermediate_size", Some(3072))?,
            layer_norm_eps: raw
                .get("layer_norm_eps")
                .and_then(Value::as_f64)
                .filter(|e| *e > 0.0)
                .unwrap_or(1e-12),
            hidden_dropout_prob: prob("hidden_dropout_prob")?,
            attention_probs_dropout_prob: prob("attention_probs_dropout_prob")?,
            initializer_range: raw
                .get("initializer_range")
                .and_then(Value::as_f64)
                .unwrap_or(0.02),
            id2label: id2label_of(path, &raw)?,
            raw,
        })
    }

    /// Patches per image.
    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }

    /// Values in one flattened patch.
    pub fn patch_dim(&self) -> usize {
        self.num_channels * self.patch_size * self.patch_size
    }

    /// The config as JSON, with `architectures` and the labels (when given) set.
    pub fn to_json(&self, architecture: &str, labels: Option<&[String]>) -> Value {
        let mut raw = self.raw.clone();
        for (k, v) in [
            ("image_size", self.image_size),
            ("patch_size", self.patch_size),
            ("num_channels", self.num_channels),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
        ] {
            raw.insert(k.into(), Value::from(v));
        }
        raw.insert(
            "hidden_dropout_prob".into(),
            json!(self.hidden_dropout_prob),
        );
        raw.insert(
            "attention_probs_dropout_prob".into(),
            json!(self.attention_probs_dropout_prob),
        );
        raw.insert("model_type".into(), Value::from("vit"));
        raw.insert("architectures".into(), Value::from(vec![architecture]));
        raw.remove("id2label");
        raw.remove("label2id");
        raw.remove("num_labels");
        if let Some(labels) = labels {
            let (id2label, label2id) = label_maps(labels);
            raw.insert("id2label".into(), id2label);
            raw.insert("label2id".into(), label2id);
        }
        Value::Object(raw)
    }

    /// Parameters of the encoder (without a classifier).
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let layer = 4 * (h * h + h) + 2 * h * self.intermediate_size + self.intermediate_size + h;
        let norms = (2 * self.num_hidden_layers + 1) * 2 * h;
        (self.patch_dim() + 1) * h
            + h
            + (self.num_patches() + 1) * h
            + self.num_hidden_layers * layer
            + norms
    }

    /// Multiply-adds of one image's forward pass through the encoder, times two (FLOPs).
    pub fn forward_flops(&self) -> f64 {
        let t = (self.num_patches() + 1) as f64;
        let h = self.hidden_size as f64;
        let per_layer =
            t * (4.0 * h * h + 2.0 * h * self.intermediate_size as f64) + 2.0 * t * t * h;
        2.0 * (t * self.patch_dim() as f64 * h + self.num_hidden_layers as f64 * per_layer)
    }
}

/// Patch projection, class token and positions.
#[derive(Module, Debug)]
pub struct VitEmbeddings {
    /// `[channels * patch * patch, hidden]`: the reference's patch convolution.
    pub patch: Dense,
    /// `[hidden]`
    pub cls_token: Param<Tensor<1>>,
    /// `[patches + 1, hidden]`
    pub position_embeddings: Param<Tensor<2>>,
    pub dropout: Dropout,
    pub patch_size: usize,
}

/// `[batch, channels, size, size]` images to `[batch, patches, channels * patch * patch]`,
/// patches in row-major order, each flattened channel first as a convolution kernel is.
pub fn patchify(images: Tensor<4>, patch: usize) -> Tensor<3> {
    let [batch, channels, height, width] = images.dims();
    let (gh, gw) = (height / patch, width / patch);
    images
        .reshape([batch, channels, gh, patch, gw, patch])
        .permute([0, 2, 4, 1, 3, 5])
        .reshape([batch, gh * gw, channels * patch * patch])
}

impl VitEmbeddings {
    /// `[batch, channels, size, size]` to `[batch, patches + 1, hidden]`.
    pub fn forward(&self, images: Tensor<4>) -> Tensor<3> {
        let batch = images.dims()[0];
        let patches = self.patch.forward(patchify(images, self.patch_size));
        let hidden = patches.dims()[2];
        let cls = self
            .cls_token
            .val()
            .reshape([1, 1, hidden])
            .expand([batch, 1, hidden]);
        let x = Tensor::cat(vec![cls, patches], 1) + self.position_embeddings.val().unsqueeze();
        self.dropout.forward(x)
    }
}

/// One pre-norm Transformer block.
#[derive(Module, Debug)]
pub struct VitLayer {
    pub norm_before: Norm,
    pub query: Dense,
    pub key: Dense,
    pub value: Dense,
    pub attention_output: Dense,
    pub norm_after: Norm,
    pub intermediate: Dense,
    pub output: Dense,
    pub attention_dropout: Dropout,
    pub hidden_dropout: Dropout,
    pub num_heads: usize,
}

impl VitLayer {
    /// `[batch, tokens, hidden]` to the same.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [batch, tokens, hidden] = x.dims();
        let head_dim = hidden / self.num_heads;
        let split = |t: Tensor<3>| {
            t.reshape([batch, tokens, self.num_heads, head_dim])
                .swap_dims(1, 2)
        };
        let h = self.norm_before.forward(x.clone());
        let q = split(self.query.forward(h.clone()));
        let k = split(self.key.forward(h.clone()));
        let v = split(self.value.forward(h));
        let scale = 1.0 / (head_dim as f32).sqrt();
        let context = if crate::fused::is_fusable(&q.device()) {
            let n = batch * self.num_heads * tokens * tokens;
            let dropout = self
                .attention_dropout
                .mask(n, q.is_autodiff())
                .map(std::sync::Arc::new);
            let spec = crate::fused::AttentionSpec {
                scale,
                causal_past: None,
                key_valid: None,
                dropout,
            };
            crate::fused::attention(q, k, v, spec)
        } else {
            let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(scale as f64);
            self.attention_dropout.forward(softmax(scores, 3)).matmul(v)
        };
        let context = context.swap_dims(1, 2).reshape([batch, tokens, hidden]);
        let x = x + self
            .hidden_dropout
            .forward(self.attention_output.forward(context));
        let inner = crate::fused::gelu_erf(
            self.intermediate
                .forward(self.norm_after.forward(x.clone())),
        );
        x + self.hidden_dropout.forward(self.output.forward(inner))
    }
}

/// The encoder: embeddings, blocks and the final LayerNorm.
#[derive(Module, Debug)]
pub struct VitModel {
    pub embeddings: VitEmbeddings,
    pub layers: Vec<VitLayer>,
    pub layernorm: Norm,
}

impl VitModel {
    /// The last hidden state `[batch, patches + 1, hidden]` (after the final LayerNorm).
    pub fn forward(&self, images: Tensor<4>) -> Tensor<3> {
        let mut x = self.embeddings.forward(images);
        for layer in &self.layers {
            x = layer.forward(x);
        }
        self.layernorm.forward(x)
    }

    /// The class token's final representation `[batch, hidden]`: the image's features.
    pub fn features(&self, images: Tensor<4>) -> Tensor<2> {
        let x = self.forward(images);
        let [batch, _, hidden] = x.dims();
        x.narrow(1, 0, 1).reshape([batch, hidden])
    }

    pub fn hidden_size(&self) -> usize {
        self.layernorm.gamma.dims()[0]
    }

    /// A new encoder: N(0, initializer_range²) weights (the class token and positions too),
    /// zero biases, unit LayerNorm scales, as Hugging Face initialises ViT.
    pub fn init(config: &VitConfig, init: &mut HostInit, device: &Device) -> Result<Self> {
        let c = config;
        let h = c.hidden_size;
        let std = c.initializer_range as f32;
        let dropout = |p: f64| dropout_of(Path::new("<model config>"), p);
        let norm = || Norm {
            gamma: Param::from_tensor(tensor_from_vec(vec![1.0; h], [h], device)),
            beta: Param::from_tensor(tensor_from_vec(vec![0.0; h], [h], device)),
            epsilon: c.layer_norm_eps,
        };
        let tokens = c.num_patches() + 1;
        let embeddings = VitEmbeddings {
            patch: Dense::init(init, c.patch_dim(), h, std, device),
            cls_token: Param::from_tensor(tensor_from_vec(init.normal(h, std), [h], device)),
            position_embeddings: Param::from_tensor(tensor_from_vec(
                init.normal(tokens * h, std),
                [tokens, h],
                device,
            )),
            dropout: dropout(c.hidden_dropout_prob)?,
            patch_size: c.patch_size,
        };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for _ in 0..c.num_hidden_layers {
            layers.push(VitLayer {
                norm_before: norm(),
                query: Dense::init(init, h, h, std, device),
                key: Dense::init(init, h, h, std, device),
                value: Dense::init(init, h, h, std, device),
                attention_output: Dense::init(init, h, h, std, device),
                norm_after: norm(),
                intermediate: Dense::init(init, h, c.intermediate_size, std, device),
                output: Dense::init(init, c.intermediate_size, h, std, device),
                attention_dropout: dropout(c.attention_probs_dropout_prob)?,
                hidden_dropout: dropout(c.hidden_dropout_prob)?,
                num_heads: c.num_attention_heads,
            });
        }
        Ok(Self {
            embeddings,
            layers,
            layernorm: norm(),
        })
    }

    /// Loads the encoder's tensors under `prefix` (`"vit."` in a classifier checkpoint, `""`
    /// in a `ViTModel` one); returns the model and the tensor names it read.
    pub fn load(
        config: &VitConfig,
        file: &WeightFile,
        prefix: &str,
        device: &Device,
    ) -> Result<(Self, Vec<String>)> {
        let c = config;
        let h = c.hidden_size;
        let name = |n: &str| format!("{prefix}{n}");
        let mut used: Vec<String> = Vec::new();
        let mut take = |n: String| {
            used.push(n.clone());
            n
        };
        let dropout = |p: f64| dropout_of(file.path(), p);
        let (ps, ch) = (c.patch_size, c.num_channels);
        let conv = take(name("embeddings.patch_embeddings.projection.weight"));
        let conv_weight = file.f32(&conv, &[h, ch, ps, ps])?;
        let conv_bias = file.f32(
            &take(name("embeddings.patch_embeddings.projection.bias")),
            &[h],
        )?;
        let tokens = c.num_patches() + 1;
        let embeddings = VitEmbeddings {
            patch: Dense::from_host(
                &crate::weights::transpose(&conv_weight, h, c.patch_dim()),
                conv_bias,
                c.patch_dim(),
                h,
                device,
            ),
            cls_token: Param::from_tensor(tensor_from_vec(
                file.f32(&take(name("embeddings.cls_token")), &[1, 1, h])?,
                [h],
                device,
            )),
            position_embeddings: Param::from_tensor(tensor_from_vec(
                file.f32(
                    &take(name("embeddings.position_embeddings")),
                    &[1, tokens, h],
                )?,
                [tokens, h],
                device,
            )),
            dropout: dropout(c.hidden_dropout_prob)?,
            patch_size: ps,
        };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = |n: &str| name(&format!("encoder.layer.{i}.{n}"));
            let dense = |n: &str, d_in, d_out| Dense::load(file, &p(n), d_in, d_out, device);
            let norm = |n: &str| Norm::load(file, &p(n), h, c.layer_norm_eps, device);
            layers.push(VitLayer {
                norm_before: norm("layernorm_before")?,
                query: dense("attention.attention.query", h, h)?,
                key: dense("attention.attention.key", h, h)?,
                value: dense("attention.attention.value", h, h)?,
                attention_output: dense("attention.output.dense", h, h)?,
                norm_after: norm("layernorm_after")?,
                intermediate: dense("intermediate.dense", h, c.intermediate_size)?,
                output: dense("output.dense", c.intermediate_size, h)?,
                attention_dropout: dropout(c.attention_probs_dropout_prob)?,
                hidden_dropout: dropout(c.hidden_dropout_prob)?,
                num_heads: c.num_attention_heads,
            });
            take(name(&format!("encoder.layer.{i}.")));
        }
        let extra_layer = name(&format!(
            "encoder.layer.{}.attention.attention.query.weight",
            c.num_hidden_layers
        ));
        if file.contains(&extra_layer) {
            return Err(ModelError::Config {
                path: file.path().to_path_buf(),
                field: "num_hidden_layers".into(),
                message: format!(
                    "config says {} layers, but the weights have more",
                    c.num_hidden_layers
                ),
            });
        }
        let layernorm = Norm::load(file, &take(name("layernorm")), h, c.layer_norm_eps, device)?;
        Ok((
            Self {
                embeddings,
                layers,
                layernorm,
            },
            used,
        ))
    }

    /// The encoder's tensors under Hugging Face names, each prefixed with `prefix`.
    pub fn export(&self, prefix: &str, out: &mut Vec<NamedTensor>) -> Result<()> {
        let name = |n: &str| format!("{prefix}{n}");
        let e = &self.embeddings;
        let [patch_dim, h] = e.patch.weight.dims();
        let ps = e.patch_size;
        let channels = patch_dim / (ps * ps);
        let weight = tensor_to_vec(e.patch.weight.val())?;
        out.push(NamedTensor::new(
            name("embeddings.patch_embeddings.projection.weight"),
            vec![h, channels, ps, ps],
            crate::weights::transpose(&weight, patch_dim, h),
        ));
        out.push(NamedTensor::from_tensor(
            name("embeddings.patch_embeddings.projection.bias"),
            e.patch.bias.val(),
        )?);
        out.push(NamedTensor::new(
            name("embeddings.cls_token"),
            vec![1, 1, h],
            tensor_to_vec(e.cls_token.val())?,
        ));
        let tokens = e.position_embeddings.dims()[0];
        out.push(NamedTensor::new(
            name("embeddings.position_embeddings"),
            vec![1, tokens, h],
            tensor_to_vec(e.position_embeddings.val())?,
        ));
        for (i, layer) in self.layers.iter().enumerate() {
            let p = |n: &str| name(&format!("encoder.layer.{i}.{n}"));
            layer.norm_before.export(&p("layernorm_before"), out)?;
            layer.query.export(&p("attention.attention.query"), out)?;
            layer.key.export(&p("attention.attention.key"), out)?;
            layer.value.export(&p("attention.attention.value"), out)?;
            layer
                .attention_output
                .export(&p("attention.output.dense"), out)?;
            layer.norm_after.export(&p("layernorm_after"), out)?;
            layer.intermediate.export(&p("intermediate.dense"), out)?;
            layer.output.export(&p("output.dense"), out)?;
        }
        self.layernorm.export(&name("layernorm"), out)
    }
}

fn dropout_of(path: &Path, p: f64) -> Result<Dropout> {
    Dropout::new(p).map_err(|message| ModelError::Config {
        path: path.to_path_buf(),
        field: "dropout".into(),
        message,
    })
}

/// The tensor-name prefix of the encoder in `file`: `"vit."` for a classifier checkpoint,
/// `""` for a bare `ViTModel`.
pub fn encoder_prefix(file: &WeightFile) -> &'static str {
    if file.contains("vit.embeddings.cls_token") {
        "vit."
    } else {
        ""
    }
}

/// ViT with a linear classifier on the class token.
#[derive(Module, Debug)]
pub struct VitClassifier {
    pub vit: VitModel,
    pub classifier: Dense,
}

/// What [`VitClassifier::load`] found in a checkpoint.
#[derive(Debug, Clone, Default)]
pub struct VitLoadReport {
    pub created_classifier: bool,
    /// Tensors in the file that the model does not use.
    pub unused: Vec<String>,
}

impl VitClassifier {
    /// Logits `[batch, classes]` of `[batch, channels, size, size]` images.
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        self.classifier.forward(self.vit.features(images))
    }

    pub fn num_labels(&self) -> usize {
        self.classifier.bias.dims()[0]
    }

    /// A new model with seeded random weights.
    pub fn init(config: &VitConfig, num_labels: usize, seed: u64, device: &Device) -> Result<Self> {
        let mut init = HostInit::new(seed);
        let vit = VitModel::init(config, &mut init, device)?;
        let std = config.initializer_range as f32;
        let classifier = Dense::init(&mut init, config.hidden_size, num_labels, std, device);
        Ok(Self { vit, classifier })
    }

    /// Loads a `ViTForImageClassification` or a bare `ViTModel` checkpoint. The classifier is
    /// taken from the file when `reuse_classifier` is set and it has `num_labels` outputs, and
    /// created (seeded) otherwise.
    pub fn load(
        config: &VitConfig,
        file: &WeightFile,
        num_labels: usize,
        reuse_classifier: bool,
        seed: u64,
        device: &Device,
    ) -> Result<(Self, VitLoadReport)> {
        let (vit, mut used) = VitModel::load(config, file, encoder_prefix(file), device)?;
        let h = config.hidden_size;
        let mut report = VitLoadReport::default();
        let classifier = match file.shape("classifier.weight") {
            Some(shape) if reuse_classifier && shape == [num_labels, h] => {
                used.push("classifier".into());
                Dense::load(file, "classifier", h, num_labels, device)?
            }
            _ => {
                report.created_classifier = true;
                let mut init = HostInit::new(seed);
                let std = config.initializer_range as f32;
                Dense::init(&mut init, h, num_labels, std, device)
            }
        };
        report.unused = file
            .names()
            .into_iter()
            .filter(|n| !used.iter().any(|u| n.starts_with(u.as_str())))
            .collect();
        Ok((Self { vit, classifier }, report))
    }

    /// All tensors under `ViTForImageClassification` names and layout.
    pub fn export(&self) -> Result<Vec<NamedTensor>> {
        let mut out = Vec::new();
        self.vit.export("vit.", &mut out)?;
        self.classifier.export("classifier", &mut out)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patchify_orders_values_as_the_patch_convolution_reads_them() {
        let device = Device::default();
        // One 2-channel 4x4 image, value = 100 * channel + 10 * row + column.
        let mut values = Vec::new();
        for c in 0..2 {
            for r in 0..4 {
                for col in 0..4 {
                    values.push((100 * c + 10 * r + col) as f32);
                }
            }
        }
        let image = tensor_from_vec(values, [1, 2, 4, 4], &device);
        let patches = tensor_to_vec(patchify(image, 2)).unwrap();
        // Patch 1 is the top-right one: rows 0-1, columns 2-3, channel 0 then channel 1.
        let second = &patches[8..16];
        assert_eq!(second, &[2.0, 3.0, 12.0, 13.0, 102.0, 103.0, 112.0, 113.0]);
    }

    #[test]
    fn bad_configs_are_refused_with_the_field() {
        let cases = [
            (json!({"model_type": "bert"}), "model_type"),
            (
                json!({"model_type": "vit", "image_size": 30, "patch_size": 4}),
                "patch_size",
            ),
            (
                json!({"model_type": "vit", "hidden_size": 100, "num_attention_heads": 3}),
                "num_attention_heads",
            ),
            (
                json!({"model_type": "vit", "hidden_act": "relu"}),
                "hidden_act",
            ),
            (json!({"model_type": "vit", "qkv_bias": false}), "qkv_bias"),
            (
                json!({"model_type": "vit", "num_channels": 2}),
                "num_channels",
            ),
        ];
        for (value, field) in cases {
            let err = VitConfig::from_json(Path::new("c.json"), value).unwrap_err();
            assert!(err.to_string().contains(field), "{err}");
        }
    }

    #[test]
    fn parameter_count_matches_the_built_model() {
        let config = VitConfig::new(28, 4, 1, [32, 2, 4, 64]).unwrap();
        let model = VitModel::init(&config, &mut HostInit::new(1), &Device::default()).unwrap();
        assert_eq!(model.num_params(), config.num_parameters());
    }
}
