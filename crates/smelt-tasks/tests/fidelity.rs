//! Numerical fidelity against PyTorch `transformers`: tokenization, forward pass, gradients
//! of one training step and one AdamW update of all-MiniLM-L6-v2 with a seeded head.
//! The reference values come from `scripts/reference/make_bert_fixtures.py`.

use burn::tensor::Device;
use smelt_data::tokenize::TextTokenizer;
use smelt_models::bert::{cross_entropy, labels_tensor, BertClassifier, BertConfig, EncoderInput};
use smelt_models::layers::Dense;
use smelt_models::weights::{tensor_to_vec, transpose, WeightFile};
use smelt_train::grads::GradStore;
use smelt_train::optim::{AdamW, AdamWConfig};
use std::path::PathBuf;

fn fixture() -> (WeightFile, serde_json::Value) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../smelt-models/tests/fixtures");
    let file = WeightFile::open(&dir.join("minilm_reference.safetensors")).unwrap();
    let json = std::fs::read_to_string(dir.join("minilm_reference.json")).unwrap();
    (file, serde_json::from_str(&json).unwrap())
}

fn model_dir() -> PathBuf {
    smelt_data::assets::locate("models/all-minilm-l6-v2").expect("MiniLM asset")
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn relative_error(a: &[f32], reference: &[f32]) -> f32 {
    assert_eq!(a.len(), reference.len());
    let diff: f32 = a
        .iter()
        .zip(reference)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f32>()
        .sqrt();
    let norm: f32 = reference.iter().map(|y| y * y).sum::<f32>().sqrt();
    diff / norm.max(1e-12)
}

struct Loaded {
    model: BertClassifier,
    input: EncoderInput,
    batch: usize,
    seq: usize,
}

fn load(fx: &WeightFile, no_dropout: bool, device: &Device) -> Loaded {
    let dir = model_dir();
    let mut config = BertConfig::from_file(&dir.join("config.json")).unwrap();
    if no_dropout {
        config = config.without_dropout();
    }
    let weights = WeightFile::open(&dir.join("model.safetensors")).unwrap();
    let (mut model, _) = BertClassifier::load(&config, &weights, 2, false, 0, device).unwrap();
    let h = config.hidden_size;
    model.bert.pooler = Dense::load(fx, "head.bert.pooler.dense", h, h, device).unwrap();
    model.classifier = Dense::load(fx, "head.classifier", h, 2, device).unwrap();
    let [batch, seq] = fx.shape("input_ids").unwrap()[..] else {
        panic!("input_ids rank")
    };
    let ids = |n: &str| fx.i64(n, &[batch, seq]).unwrap();
    let input = EncoderInput::from_host(
        ids("input_ids"),
        ids("token_type_ids"),
        ids("attention_mask"),
        batch,
        seq,
        device,
    );
    Loaded {
        model,
        input,
        batch,
        seq,
    }
}

#[test]
fn tokenizer_matches_reference_ids() {
    let (fx, meta) = fixture();
    let tokenizer = TextTokenizer::from_model_dir(&model_dir()).unwrap();
    let [batch, seq] = fx.shape("input_ids").unwrap()[..] else {
        panic!()
    };
    let ids = fx.i64("input_ids", &[batch, seq]).unwrap();
    let types = fx.i64("token_type_ids", &[batch, seq]).unwrap();
    let mask = fx.i64("attention_mask", &[batch, seq]).unwrap();
    for (row, pair) in meta["texts"].as_array().unwrap().iter().enumerate() {
        let text = pair[0].as_str().unwrap();
        let text_pair = pair[1].as_str();
        let encoded = tokenizer.encode(text, text_pair, 128).unwrap();
        let len = mask[row * seq..(row + 1) * seq]
            .iter()
            .filter(|m| **m == 1)
            .count();
        let expected: Vec<u32> = ids[row * seq..row * seq + len]
            .iter()
            .map(|&i| i as u32)
            .collect();
        let expected_types: Vec<u32> = types[row * seq..row * seq + len]
            .iter()
            .map(|&i| i as u32)
            .collect();
        assert_eq!(encoded.ids, expected, "ids of row {row}: {text}");
        assert_eq!(encoded.type_ids, expected_types, "token types of row {row}");
    }
}

#[test]
fn vocab_txt_tokenizer_matches_tokenizer_json() {
    let dir = model_dir();
    let from_json = TextTokenizer::from_json(&dir.join("tokenizer.json")).unwrap();
    let from_vocab = TextTokenizer::from_vocab(&dir.join("vocab.txt"), true).unwrap();
    for (a, b) in [
        ("Café prices in Zürich are absurd!!", None),
        ("Hello, world", Some("second sentence here")),
        ("unbelievably overlong tokenization example", None),
    ] {
        assert_eq!(
            from_json.encode(a, b, 16).unwrap(),
            from_vocab.encode(a, b, 16).unwrap()
        );
    }
}

#[test]
fn forward_matches_reference_within_1e_4() {
    let (fx, _) = fixture();
    let device = Device::flex();
    let l = load(&fx, false, &device);
    let (hidden, pooled) = l.model.bert.forward(l.input.clone());
    let logits = l.model.forward(l.input);

    let expected = fx
        .f32("out.last_hidden_state", &[l.batch, l.seq, 384])
        .unwrap();
    let diff = max_abs_diff(&tensor_to_vec(hidden).unwrap(), &expected);
    assert!(diff < 1e-4, "last_hidden_state max abs diff {diff}");
    let expected = fx.f32("out.pooled", &[l.batch, 384]).unwrap();
    let diff = max_abs_diff(&tensor_to_vec(pooled).unwrap(), &expected);
    assert!(diff < 1e-4, "pooled max abs diff {diff}");
    let expected = fx.f32("out.logits", &[l.batch, 2]).unwrap();
    let diff = max_abs_diff(&tensor_to_vec(logits).unwrap(), &expected);
    assert!(diff < 1e-4, "logits max abs diff {diff}");
}

/// Module path in smelt and whether the tensor is a transposed dense weight, for a
/// Hugging Face parameter name.
fn smelt_path(hf: &str) -> (String, bool) {
    let name = hf
        .strip_prefix("bert.")
        .map_or(hf.to_string(), |n| format!("bert.{n}"));
    let replacements = [
        ("bert.encoder.layer.", "bert.layers."),
        (".attention.self.query", ".query"),
        (".attention.self.key", ".key"),
        (".attention.self.value", ".value"),
        (".attention.output.dense", ".attention_output"),
        (".attention.output.LayerNorm", ".attention_norm"),
        (".intermediate.dense", ".intermediate"),
        (".output.dense", ".output"),
        (".output.LayerNorm", ".output_norm"),
        ("embeddings.LayerNorm", "embeddings.layer_norm"),
        ("bert.pooler.dense", "bert.pooler"),
        ("_embeddings.weight", "_embeddings"),
    ];
    let mut path = name;
    for (from, to) in replacements {
        path = path.replace(from, to);
    }
    let is_norm = path.contains("norm");
    if is_norm {
        path = path.replace(".weight", ".gamma").replace(".bias", ".beta");
    }
    let dense_weight = path.ends_with(".weight");
    (path, dense_weight)
}

#[test]
fn gradients_and_adamw_step_match_reference() {
    let (fx, meta) = fixture();
    let device = Device::flex().autodiff();
    let l = load(&fx, true, &device);
    let labels: Vec<i64> = meta["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();

    let loss = cross_entropy(
        l.model.forward(l.input.clone()),
        labels_tensor(&labels, &device),
    );
    let value = loss.clone().into_scalar::<f32>();
    let expected_loss = fx.f32("loss", &[1]).unwrap()[0];
    assert!(
        (value - expected_loss).abs() < 1e-5,
        "loss {value} vs {expected_loss}"
    );

    let grads = GradStore::collect(&l.model, &loss.backward());
    for hf in meta["selected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
    {
        let (path, dense_weight) = smelt_path(hf);
        let shape = fx.shape(&format!("grad.{hf}")).unwrap();
        let reference = fx.f32(&format!("grad.{hf}"), &shape).unwrap();
        let grad = grads
            .grads
            .get(&path)
            .unwrap_or_else(|| panic!("no gradient at {path}"));
        let mut ours = tensor_to_vec(grad.clone()).unwrap();
        if dense_weight {
            ours = transpose(&ours, shape[1], shape[0]);
        }
        let err = relative_error(&ours, &reference);
        assert!(
            err < 1e-4,
            "gradient of {hf} ({path}): relative error {err}"
        );
    }

    let mut optim = AdamW::new(AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        epsilon: 1e-8,
        weight_decay: meta["weight_decay"].as_f64().unwrap(),
    });
    let lr = meta["learning_rate"].as_f64().unwrap();
    let stepped = optim.step(l.model, &grads, lr);
    let exported = stepped.export().unwrap();
    for hf in meta["selected_step"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
    {
        let ours = exported
            .iter()
            .find(|t| t.name == hf)
            .unwrap_or_else(|| panic!("{hf}"));
        let reference = fx.f32(&format!("step.{hf}"), &ours.shape).unwrap();
        let diff = max_abs_diff(&ours.values, &reference);
        assert!(diff < 1e-6, "after one AdamW step, {hf} differs by {diff}");
    }
}
