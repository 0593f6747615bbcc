//! ViT against PyTorch `transformers` (fixtures written by
//! `scripts/reference/make_vit_fixtures.py`): a random-weight `ViTForImageClassification`
//! loaded from its Hugging Face directory gives the reference's logits and features, its
//! image preprocessing matches the reference processor's on a PNG, and the directory smelt
//! writes back has the same tensors and logits.

use burn::tensor::Device;
use serde_json::Value;
use smelt_data::augment::{image_rng, prepare};
use smelt_data::images::{ImageSet, ReadImages};
use smelt_models::weights::{tensor_from_vec, tensor_to_vec, WeightFile};
use smelt_tasks::vision::{save_classifier, VisionModel};
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn reference() -> Value {
    let text = std::fs::read_to_string(fixtures().join("vit_tiny_reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn flat(v: &Value) -> Vec<f32> {
    match v {
        Value::Array(items) => items.iter().flat_map(flat).collect(),
        other => vec![other.as_f64().unwrap() as f32],
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn vit_logits_and_features_match_transformers() {
    let device = Device::default();
    let r = reference();
    let m = VisionModel::load(&fixtures().join("vit-tiny"), None, 0, &device).unwrap();
    assert_eq!(m.labels, vec!["ankle", "bag", "coat", "dress", "shirt"]);
    let pixels = flat(&r["pixel_values"]);
    let images = || tensor_from_vec(pixels.clone(), [2, 3, 32, 32], &device);
    let logits = tensor_to_vec(m.model.forward(images())).unwrap();
    let d = max_diff(&logits, &flat(&r["logits"]));
    assert!(d < 1e-4, "logits differ by {d}");
    let features = tensor_to_vec(m.model.vit.features(images())).unwrap();
    let d = max_diff(&features, &flat(&r["cls_features"]));
    assert!(d < 1e-4, "class-token features differ by {d}");
}

#[test]
fn vit_preprocessing_of_a_png_matches_the_image_processor() {
    let device = Device::default();
    let r = reference();
    let m = VisionModel::load(&fixtures().join("vit-tiny"), None, 0, &device).unwrap();
    assert_eq!((m.pre.size, m.pre.mean.clone()), (32, vec![0.5; 3]));
    let set = ImageSet::read_files(
        &[fixtures().join("vit-tiny-input.png")],
        &ReadImages::default(),
    )
    .unwrap();
    let pixels = prepare(&set.images[0], &m.pre, None, &mut image_rng(0, 0, 0));
    let expected = flat(&r["image_pixel_values"]);
    // The reference resizes with PIL's fixed-point bilinear filter, smelt with `image`'s
    // floating-point triangle filter: outputs may differ by one of 255 levels (2/255 after
    // normalising to [-1, 1]).
    let d = max_diff(&pixels, &expected);
    assert!(d <= 2.0 / 255.0 + 1e-6, "pixels differ by {d}");
    let mean_diff: f32 = pixels
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .sum::<f32>()
        / pixels.len() as f32;
    assert!(mean_diff < 4e-3, "mean pixel difference {mean_diff}");
    let logits = tensor_to_vec(
        m.model
            .forward(tensor_from_vec(pixels, [1, 3, 32, 32], &device)),
    )
    .unwrap();
    let d = max_diff(&logits, &flat(&r["image_logits"]));
    assert!(d < 5e-3, "logits of the PNG differ by {d}");
}

#[test]
fn saved_vit_directory_has_the_reference_layout_and_logits() {
    let device = Device::default();
    let source = fixtures().join("vit-tiny");
    let m = VisionModel::load(&source, None, 0, &device).unwrap();
    let out = tempfile::tempdir().unwrap();
    save_classifier(&m.model, &m.config, &m.pre, &m.labels, out.path()).unwrap();
    let theirs = WeightFile::open(&source.join("model.safetensors")).unwrap();
    let ours = WeightFile::open(&out.path().join("model.safetensors")).unwrap();
    let mut a = theirs.names();
    let mut b = ours.names();
    a.sort();
    b.sort();
    assert_eq!(a, b);
    for name in &a {
        assert_eq!(theirs.shape(name), ours.shape(name), "{name}");
        let shape = theirs.shape(name).unwrap();
        assert_eq!(
            theirs.f32(name, &shape).unwrap(),
            ours.f32(name, &shape).unwrap(),
            "{name}"
        );
    }
    let again = VisionModel::load(out.path(), None, 0, &device).unwrap();
    assert_eq!(again.labels, m.labels);
    assert_eq!(again.pre, m.pre);
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["architectures"][0], "ViTForImageClassification");
    assert_eq!(config["label2id"]["coat"], 2);
}
