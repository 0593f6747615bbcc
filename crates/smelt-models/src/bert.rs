//! BERT-family encoders (BERT, MiniLM) and the sequence-classification head, in the layout of
//! Hugging Face `BertModel` / `BertForSequenceClassification`.
//!
//! RoBERTa shares this graph (its checkpoints differ in the tensor prefix, the position-id
//! offset and a single token type); [`BertConfig::from_json`] refuses it until those are wired
//! and checked against a reference.

use crate::dropout::Dropout;
use crate::error::{ModelError, Result};
use crate::init::HostInit;
use crate::layers::{Dense, Norm};
use crate::weights::{NamedTensor, WeightFile};
use burn::module::{Module, Param};
use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde_json::{Map, Value};
use std::path::Path;

/// Architecture hyper-parameters read from a Hugging Face `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct BertConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    pub hidden_dropout_prob: f64,
    pub attention_probs_dropout_prob: f64,
    /// Dropout before the classifier; Hugging Face falls back to `hidden_dropout_prob`.
    pub classifier_dropout: Option<f64>,
    pub initializer_range: f64,
    /// Class names by index, when the checkpoint carries a classifier.
    pub id2label: Option<Vec<String>>,
    /// The whole JSON object, so that saving keeps fields smelt does not interpret.
    pub raw: Map<String, Value>,
}

impl BertConfig {
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
        let model_type = raw
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("bert")
            .to_string();
        if model_type != "bert" {
            return Err(err(
                "model_type",
                format!("`{model_type}` is not supported yet; supported: `bert` (BERT, MiniLM)"),
            ));
        }
        let size = |field: &str, default: Option<usize>| -> Result<usize> {
            match raw.get(field) {
                Some(v) => match v.as_u64() {
                    Some(n) if n > 0 => Ok(n as usize),
                    _ => Err(err(
                        field,
                        format!("expected a positive integer, found {v}"),
                    )),
                },
                None => default.ok_or_else(|| err(field, "missing".into())),
            }
        };
        let prob = |field: &str, default: f64| -> Result<f64> {
            match raw.get(field) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => match v.as_f64() {
                    Some(p) if (0.0..1.0).contains(&p) => Ok(p),
                    _ => Err(err(
                        field,
                        format!("expected a probability in [0, 1), found {v}"),
                    )),
                },
            }
        };
        let hidden_size = size("hidden_size", None)?;
        let num_attention_heads = size("num_attention_heads", None)?;
        if hidden_size % num_attention_heads != 0 {
            return Err(err(
                "num_attention_heads",
                format!("{num_attention_heads} heads do not divide hidden_size {hidden_size}"),
            ));
        }
        if let Some(kind) = raw.get("position_embedding_type") {
            if kind.as_str() != Some("absolute") {
                return Err(err(
                    "position_embedding_type",
                    format!("only `absolute` is supported, found {kind}"),
                ));
            }
        }
        if let Some(act) = raw.get("hidden_act") {
            if act.as_str() != Some("gelu") {
                return Err(err(
                    "hidden_act",
                    format!("only `gelu` is supported, found {act}"),
                ));
            }
        }
        let id2label = id2label_of(path, &raw)?;
        let classifier_dropout = match raw.get("classifier_dropout") {
            None | Some(Value::Null) => None,
            Some(_) => Some(prob("classifier_dropout", 0.0)?),
        };
        Ok(Self {
            model_type,
            vocab_size: size("vocab_size", None)?,
            hidden_size,
            num_hidden_layers: size("num_hidden_layers", None)?,
            num_attention_heads,
            intermediate_size: size("intermediate_size", None)?,
            max_position_embeddings: size("max_position_embeddings", Some(512))?,
            type_vocab_size: size("type_vocab_size", Some(2))?,
            layer_norm_eps: raw
                .get("layer_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-12),
            hidden_dropout_prob: prob("hidden_dropout_prob", 0.1)?,
            attention_probs_dropout_prob: prob("attention_probs_dropout_prob", 0.1)?,
            classifier_dropout,
            initializer_range: raw
                .get("initializer_range")
                .and_then(Value::as_f64)
                .unwrap_or(0.02),
            id2label,
            raw,
        })
    }

    /// Sets every dropout probability to zero (used for deterministic gradient checks).
    pub fn without_dropout(mut self) -> Self {
        self.hidden_dropout_prob = 0.0;
        self.attention_probs_dropout_prob = 0.0;
        self.classifier_dropout = Some(0.0);
        self
    }
}

/// Class names by index from a config's `id2label` object (`None` when absent); the keys must
/// be exactly `0..n`, the names distinct, and there must be at least two.
pub fn id2label_of(path: &Path, raw: &Map<String, Value>) -> Result<Option<Vec<String>>> {
    let err = |field: &str, message: String| ModelError::Config {
        path: path.to_path_buf(),
        field: field.to_string(),
        message,
    };
    Ok(match raw.get("id2label") {
        None | Some(Value::Null) => None,
        Some(Value::Object(map)) => {
            if map.len() < 2 {
                return Err(err("id2label", "needs at least 2 classes".into()));
            }
            let mut labels: Vec<Option<String>> = vec![None; map.len()];
            for (k, v) in map {
                let index: usize = k
                    .parse()
                    .ok()
                    .filter(|i: &usize| *i < map.len() && i.to_string() == *k)
                    .ok_or_else(|| {
                        err(
                            "id2label",
                            format!("bad class index `{k}`: expected 0..{}", map.len()),
                        )
                    })?;
                let name = v
                    .as_str()
                    .ok_or_else(|| err("id2label", format!("label {k} is not a string")))?;
                if labels.iter().flatten().any(|l| l == name) {
                    return Err(err("id2label", format!("label `{name}` appears twice")));
                }
                labels[index] = Some(name.to_string());
            }
            Some(labels.into_iter().map(|l| l.unwrap_or_default()).collect())
        }
        Some(other) => {
            return Err(err(
                "id2label",
                format!("expected an object, found {other}"),
            ))
        }
    })
}

/// `id2label` and `label2id` objects for `labels`, as Hugging Face configs hold them.
pub fn label_maps(labels: &[String]) -> (Value, Value) {
    let id2label: Map<String, Value> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (i.to_string(), Value::String(l.clone())))
        .collect();
    let label2id: Map<String, Value> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.clone(), Value::from(i)))
        .collect();
    (Value::Object(id2label), Value::Object(label2id))
}

/// Token, position and token-type embeddings followed by LayerNorm and dropout.
#[derive(Module, Debug)]
pub struct BertEmbeddings {
    pub word_embeddings: Param<Tensor<2>>,
    pub position_embeddings: Param<Tensor<2>>,
    pub token_type_embeddings: Param<Tensor<2>>,
    pub layer_norm: Norm,
    pub dropout: Dropout,
}

impl BertEmbeddings {
    /// `input_ids`, `token_type_ids`: `[batch, seq]`; returns `[batch, seq, hidden]`.
    pub fn forward(&self, input_ids: Tensor<2, Int>, token_type_ids: Tensor<2, Int>) -> Tensor<3> {
        let [_, seq] = input_ids.dims();
        let words = burn::tensor::module::embedding(self.word_embeddings.val(), input_ids);
        let types =
            burn::tensor::module::embedding(self.token_type_embeddings.val(), token_type_ids);
        // [max_pos, hidden] -> [1, seq, hidden], broadcast over the batch.
        let positions = self
            .position_embeddings
            .val()
            .narrow(0, 0, seq)
            .unsqueeze::<3>();
        let x = words + types + positions;
        self.dropout.forward(self.layer_norm.forward(x))
    }
}

/// One post-norm Transformer encoder block.
#[derive(Module, Debug)]
pub struct BertLayer {
    pub query: Dense,
    pub key: Dense,
    pub value: Dense,
    pub attention_output: Dense,
    pub attention_norm: Norm,
    pub intermediate: Dense,
    pub output: Dense,
    pub output_norm: Norm,
    pub attention_dropout: Dropout,
    pub hidden_dropout: Dropout,
    pub num_heads: usize,
}

impl BertLayer {
    /// `x`: `[batch, seq, hidden]`; `mask`: the padding mask. Returns `[batch, seq, hidden]`.
    pub fn forward(&self, x: Tensor<3>, mask: &AttentionMask) -> Tensor<3> {
        let [batch, seq, hidden] = x.dims();
        let head_dim = hidden / self.num_heads;
        let split = |t: Tensor<3>| {
            // [batch, seq, hidden] -> [batch, heads, seq, head_dim]
            t.reshape([batch, seq, self.num_heads, head_dim])
                .swap_dims(1, 2)
        };
        let q = split(self.query.forward(x.clone()));
        let k = split(self.key.forward(x.clone()));
        let v = split(self.value.forward(x.clone()));

        let context = match &mask.key_valid {
            // The fused CPU kernel, with the dropout mask drawn as the composed path would.
            Some(key_valid) => {
                let n = batch * self.num_heads * seq * seq;
                let dropout = self
                    .attention_dropout
                    .mask(n, q.is_autodiff())
                    .map(std::sync::Arc::new);
                let spec = crate::fused::AttentionSpec {
                    scale: 1.0 / (head_dim as f32).sqrt(),
                    causal_past: None,
                    key_valid: Some(key_valid.clone()),
                    dropout,
                };
                crate::fused::attention(q, k, v, spec)
            }
            None => {
                // [batch, heads, seq, seq]
                let scores = q
                    .matmul(k.swap_dims(2, 3))
                    .mul_scalar(1.0 / (head_dim as f64).sqrt());
                let probs = self
                    .attention_dropout
                    .forward(softmax(scores + mask.bias.clone(), 3));
                probs.matmul(v)
            }
        };
        // [batch, heads, seq, head_dim] -> [batch, seq, hidden]
        let context = context.swap_dims(1, 2).reshape([batch, seq, hidden]);

        let attended = self
            .hidden_dropout
            .forward(self.attention_output.forward(context));
        let h = self.attention_norm.forward(attended + x);

        let inner = crate::fused::gelu_erf(self.intermediate.forward(h.clone()));
        let out = self.hidden_dropout.forward(self.output.forward(inner));
        self.output_norm.forward(out + h)
    }
}

/// Which keys a layer may attend to: an additive bias `[batch, 1, 1, seq]` (0, or the lowest
/// f32 for padding) for composed attention, and on the CPU the same as host flags `[batch,
/// seq]` for the fused kernel.
pub struct AttentionMask {
    pub bias: Tensor<4>,
    pub key_valid: Option<std::sync::Arc<Vec<bool>>>,
}

/// The encoder: embeddings, `num_hidden_layers` blocks and the [CLS] pooler.
#[derive(Module, Debug)]
pub struct BertModel {
    pub embeddings: BertEmbeddings,
    pub layers: Vec<BertLayer>,
    pub pooler: Dense,
}

/// A batch of token ids on the device.
#[derive(Debug, Clone)]
pub struct EncoderInput {
    /// `[batch, seq]`
    pub input_ids: Tensor<2, Int>,
    /// `[batch, seq]`
    pub token_type_ids: Tensor<2, Int>,
    /// `[batch, seq]`, 1 for real tokens and 0 for padding.
    pub attention_mask: Tensor<2, Int>,
}

impl EncoderInput {
    /// Builds the tensors from row-major host ids of shape `[batch, seq]`.
    pub fn from_host(
        input_ids: Vec<i64>,
        token_type_ids: Vec<i64>,
        attention_mask: Vec<i64>,
        batch: usize,
        seq: usize,
        device: &Device,
    ) -> Self {
        let make =
            |v: Vec<i64>| Tensor::<2, Int>::from_data(TensorData::new(v, [batch, seq]), device);
        Self {
            input_ids: make(input_ids),
            token_type_ids: make(token_type_ids),
            attention_mask: make(attention_mask),
        }
    }
}

impl BertModel {
    /// Returns the last hidden state `[batch, seq, hidden]` and the pooled [CLS]
    /// representation `[batch, hidden]`.
    pub fn forward(&self, input: EncoderInput) -> (Tensor<3>, Tensor<2>) {
        let [batch, seq] = input.input_ids.dims();
        let device = input.input_ids.device();
        let key_valid = crate::fused::is_fusable(&device).then(|| {
            let m = input
                .attention_mask
                .clone()
                .into_data()
                .convert::<i64>()
                .try_into_vec::<i64>()
                .expect("integer mask");
            std::sync::Arc::new(m.iter().map(|&v| v != 0).collect::<Vec<_>>())
        });
        // 0 where attended, the lowest f32 where padded: [batch, 1, 1, seq].
        let mask = AttentionMask {
            bias: (input.attention_mask.float().neg() + 1.0)
                .mul_scalar(f32::MIN)
                .reshape([batch, 1, 1, seq]),
            key_valid,
        };
        let mut x = self
            .embeddings
            .forward(input.input_ids, input.token_type_ids);
        for layer in &self.layers {
            x = layer.forward(x, &mask);
        }
        let hidden = x.dims()[2];
        let cls = x.clone().narrow(1, 0, 1).reshape([batch, hidden]);
        let pooled = self.pooler.forward(cls).tanh();
        (x, pooled)
    }
}

/// BERT with a linear classifier on the pooled [CLS] representation.
#[derive(Module, Debug)]
pub struct BertClassifier {
    pub bert: BertModel,
    pub dropout: Dropout,
    pub classifier: Dense,
}

/// What [`BertClassifier::load`] found in the checkpoint and what it had to create.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    pub created_pooler: bool,
    pub created_classifier: bool,
    /// Tensors in the file that the model does not use.
    pub unused: Vec<String>,
}

impl BertClassifier {
    /// Logits `[batch, num_labels]`.
    pub fn forward(&self, input: EncoderInput) -> Tensor<2> {
        let (_, pooled) = self.bert.forward(input);
        self.classifier.forward(self.dropout.forward(pooled))
    }

    pub fn num_labels(&self) -> usize {
        self.classifier.bias.dims()[0]
    }

    /// Loads encoder weights from a safetensors file in either `BertModel` (no prefix) or
    /// `BertForSequenceClassification` (`bert.` prefix) layout. A missing pooler is created;
    /// the classifier is taken from the file when `reuse_classifier` is set and it has
    /// `num_labels` outputs, and created otherwise. New weights are N(0, initializer_range²) from `seed`, biases zero.
    pub fn load(
        config: &BertConfig,
        file: &WeightFile,
        num_labels: usize,
        reuse_classifier: bool,
        seed: u64,
        device: &Device,
    ) -> Result<(Self, LoadReport)> {
        let c = config;
        let h = c.hidden_size;
        let prefix = if file.contains("bert.embeddings.word_embeddings.weight") {
            "bert."
        } else {
            ""
        };
        let name = |n: &str| format!("{prefix}{n}");
        let mut used: Vec<String> = Vec::new();
        let mut take = |n: String| {
            used.push(n.clone());
            n
        };
        let dropout = |p: f64| {
            Dropout::new(p).map_err(|message| ModelError::Config {
                path: file.path().to_path_buf(),
                field: "dropout".into(),
                message,
            })
        };

        let embeddings = BertEmbeddings {
            word_embeddings: Param::from_tensor(file.tensor(
                &take(name("embeddings.word_embeddings.weight")),
                [c.vocab_size, h],
                device,
            )?),
            position_embeddings: Param::from_tensor(file.tensor(
                &take(name("embeddings.position_embeddings.weight")),
                [c.max_position_embeddings, h],
                device,
            )?),
            token_type_embeddings: Param::from_tensor(file.tensor(
                &take(name("embeddings.token_type_embeddings.weight")),
                [c.type_vocab_size, h],
                device,
            )?),
            layer_norm: Norm::load(
                file,
                &take(name("embeddings.LayerNorm")),
                h,
                c.layer_norm_eps,
                device,
            )?,
            dropout: dropout(c.hidden_dropout_prob)?,
        };

        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = |n: &str| name(&format!("encoder.layer.{i}.{n}"));
            let dense = |n: &str, d_in, d_out| Dense::load(file, &p(n), d_in, d_out, device);
            let norm = |n: &str| Norm::load(file, &p(n), h, c.layer_norm_eps, device);
            layers.push(BertLayer {
                query: dense("attention.self.query", h, h)?,
                key: dense("attention.self.key", h, h)?,
                value: dense("attention.self.value", h, h)?,
                attention_output: dense("attention.output.dense", h, h)?,
                attention_norm: norm("attention.output.LayerNorm")?,
                intermediate: dense("intermediate.dense", h, c.intermediate_size)?,
                output: dense("output.dense", c.intermediate_size, h)?,
                output_norm: norm("output.LayerNorm")?,
                attention_dropout: dropout(c.attention_probs_dropout_prob)?,
                hidden_dropout: dropout(c.hidden_dropout_prob)?,
                num_heads: c.num_attention_heads,
            });
            take(format!("{prefix}encoder.layer.{i}."));
        }
        if file.contains(&format!(
            "{prefix}encoder.layer.{}.attention.self.query.weight",
            c.num_hidden_layers
        )) {
            return Err(ModelError::Config {
                path: file.path().to_path_buf(),
                field: "num_hidden_layers".into(),
                message: format!(
                    "config says {} layers, but the weights have more",
                    c.num_hidden_layers
                ),
            });
        }

        let mut init = HostInit::new(seed);
        let std = c.initializer_range as f32;
        let mut report = LoadReport::default();
        let pooler_name = name("pooler.dense");
        let pooler = if file.contains(&format!("{pooler_name}.weight")) {
            Dense::load(file, &take(pooler_name), h, h, device)?
        } else {
            report.created_pooler = true;
            Dense::init(&mut init, h, h, std, device)
        };
        let classifier = match file.shape("classifier.weight") {
            Some(shape) if reuse_classifier && shape == [num_labels, h] => {
                Dense::load(file, &take("classifier".into()), h, num_labels, device)?
            }
            _ => {
                report.created_classifier = true;
                Dense::init(&mut init, h, num_labels, std, device)
            }
        };
        report.unused = file
            .names()
            .into_iter()
            .filter(|n| !used.iter().any(|u| n.starts_with(u.as_str())))
            .filter(|n| !n.ends_with("position_ids"))
            .collect();

        let model = Self {
            bert: BertModel {
                embeddings,
                layers,
                pooler,
            },
            dropout: dropout(c.classifier_dropout.unwrap_or(c.hidden_dropout_prob))?,
            classifier,
        };
        Ok((model, report))
    }

    /// All tensors under `BertForSequenceClassification` names and layout.
    pub fn export(&self) -> Result<Vec<NamedTensor>> {
        let mut out = Vec::new();
        let e = &self.bert.embeddings;
        out.push(NamedTensor::from_tensor(
            "bert.embeddings.word_embeddings.weight",
            e.word_embeddings.val(),
        )?);
        out.push(NamedTensor::from_tensor(
            "bert.embeddings.position_embeddings.weight",
            e.position_embeddings.val(),
        )?);
        out.push(NamedTensor::from_tensor(
            "bert.embeddings.token_type_embeddings.weight",
            e.token_type_embeddings.val(),
        )?);
        e.layer_norm.export("bert.embeddings.LayerNorm", &mut out)?;
        for (i, layer) in self.bert.layers.iter().enumerate() {
            let p = |n: &str| format!("bert.encoder.layer.{i}.{n}");
            layer.query.export(&p("attention.self.query"), &mut out)?;
            layer.key.export(&p("attention.self.key"), &mut out)?;
            layer.value.export(&p("attention.self.value"), &mut out)?;
            layer
                .attention_output
                .export(&p("attention.output.dense"), &mut out)?;
            layer
                .attention_norm
                .export(&p("attention.output.LayerNorm"), &mut out)?;
            layer
                .intermediate
                .export(&p("intermediate.dense"), &mut out)?;
            layer.output.export(&p("output.dense"), &mut out)?;
            layer.output_norm.export(&p("output.LayerNorm"), &mut out)?;
        }
        self.bert.pooler.export("bert.pooler.dense", &mut out)?;
        self.classifier.export("classifier", &mut out)?;
        Ok(out)
    }
}

/// Writes a `BertForSequenceClassification` `config.json` for `labels`.
pub fn classifier_config_json(config: &BertConfig, labels: &[String]) -> Value {
    let mut raw = config.raw.clone();
    let (id2label, label2id) = label_maps(labels);
    raw.insert(
        "architectures".into(),
        Value::from(vec!["BertForSequenceClassification"]),
    );
    raw.insert("model_type".into(), Value::from("bert"));
    raw.insert("id2label".into(), id2label);
    raw.insert("label2id".into(), label2id);
    raw.insert("num_labels".into(), Value::from(labels.len()));
    raw.insert(
        "problem_type".into(),
        Value::from("single_label_classification"),
    );
    Value::Object(raw)
}

/// Mean cross-entropy of `logits` `[batch, classes]` against class indices `[batch]`;
/// returns a `[1]` tensor.
pub fn cross_entropy(logits: Tensor<2>, labels: Tensor<1, Int>) -> Tensor<1> {
    let [batch, _] = logits.dims();
    let picked = log_softmax(logits, 1).gather(1, labels.reshape([batch, 1]));
    picked.mean().neg()
}

/// Host `[batch]` labels on the device.
pub fn labels_tensor(labels: &[i64], device: &Device) -> Tensor<1, Int> {
    Tensor::<1, Int>::from_data(TensorData::new(labels.to_vec(), [labels.len()]), device)
}
