//! `smelt vision` on the real Fashion-MNIST asset (IDX) and on image folders and CSVs made
//! from it: training, evaluation, prediction, exact resume, contrastive pretraining with a
//! linear probe, and the bad-input paths.

mod common;

use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(out.status.success(), "{args:?}:\n{}", stderr(&out));
    stdout(&out)
}

fn fails_with(args: &[&str], needles: &[&str]) {
    let out = run(args);
    let err = stderr(&out);
    assert!(!out.status.success(), "{args:?} should fail");
    for needle in needles {
        assert!(
            err.contains(needle),
            "{args:?}: expected {needle:?} in:\n{err}"
        );
    }
    assert!(!err.contains("panicked"), "{args:?} panicked:\n{err}");
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn fashion() -> PathBuf {
    asset("data/fashion-mnist")
}

fn records(metrics: &Path) -> Vec<Value> {
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A small ViT for tests: 28x28 gray, patch 7, width 32, 2 layers.
fn micro_config(dir: &Path) -> PathBuf {
    let path = dir.join("micro.toml");
    std::fs::write(
        &path,
        "[model]\nimage_size = 28\npatch_size = 7\nnum_channels = 1\nhidden_size = 32\n\
         num_hidden_layers = 2\nnum_attention_heads = 4\nintermediate_size = 64\n\n\
         [data]\nimage_mean = [0.286]\nimage_std = [0.353]\n\n[augment]\nhflip = 0.5\n",
    )
    .unwrap();
    path
}

/// The first `n` test images of Fashion-MNIST as PNG files, with their labels.
fn export_pngs(dir: &Path, n: usize) -> Vec<(PathBuf, String)> {
    let set = smelt_data::images::ImageSet::read(
        &fashion(),
        &smelt_data::images::ReadImages {
            split: smelt_data::images::Split::Test,
            ..Default::default()
        },
    )
    .unwrap();
    std::fs::create_dir_all(dir).unwrap();
    (0..n)
        .map(|i| {
            let img = &set.images[i];
            let path = dir.join(format!("test-{i}.png"));
            image::GrayImage::from_raw(img.width as u32, img.height as u32, img.pixels.clone())
                .unwrap()
                .save(&path)
                .unwrap();
            (path, set.labels[i].clone())
        })
        .collect()
}

fn train_args<'a>(data: &'a str, config: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "vision",
        "train",
        "--data",
        data,
        "--config",
        config,
        "--label-fraction",
        "0.1",
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--lr",
        "2e-3",
        "--seed",
        "7",
        "--out",
        out,
    ]
}

#[test]
fn vit_trains_evaluates_and_predicts_on_fashion_mnist() {
    let tmp = tempfile::tempdir().unwrap();
    let config = micro_config(tmp.path());
    let out = tmp.path().join("vit");
    let data = fashion();
    let mut args = train_args(s(&data), s(&config), s(&out));
    args.extend(["--valid", s(&data)]);
    ok(&args);

    // The validation split is the test set: baseline before the first step, then one record
    // per epoch, accuracy far above chance.
    let valid: Vec<Value> = records(&out.join("metrics.jsonl"))
        .into_iter()
        .filter(|r| r["split"] == "valid")
        .collect();
    assert_eq!(valid.len(), 3);
    let accuracy: Vec<f64> = valid
        .iter()
        .map(|r| r["accuracy"].as_f64().unwrap())
        .collect();
    assert!(accuracy[0] < 0.3, "{accuracy:?}");
    assert!(
        accuracy[2] > 0.6 && accuracy[2] > accuracy[1],
        "{accuracy:?}"
    );
    assert_eq!(valid[2]["confusion_matrix"].as_array().unwrap().len(), 10);

    // A Hugging Face ViTForImageClassification directory.
    let hf: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(hf["architectures"][0], "ViTForImageClassification");
    assert_eq!(hf["num_channels"], 1);
    assert_eq!(hf["id2label"]["9"], "9");
    assert!(out.join("preprocessor_config.json").is_file());

    // eval on the IDX folder reads its test split and agrees with the last validation.
    let report: Value = serde_json::from_str(&ok(&[
        "vision",
        "eval",
        "--model",
        s(&out),
        "--data",
        s(&data),
        "--json",
    ]))
    .unwrap();
    let best = accuracy[1..].iter().cloned().fold(0.0, f64::max);
    assert!((report["accuracy"].as_f64().unwrap() - best).abs() < 1e-9);
    assert_eq!(report["images"], 10_000);

    // predict: PNG files of test images, top-3 classes with decreasing probabilities.
    let pngs = export_pngs(&tmp.path().join("png"), 20);
    let mut args = vec!["vision", "predict", "--model", s(&out), "--json"];
    args.extend(pngs.iter().map(|(p, _)| s(p)));
    let lines: Vec<Value> = ok(&args)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 20);
    let mut top3 = 0;
    for (line, (path, label)) in lines.iter().zip(&pngs) {
        assert_eq!(line["image"], path.display().to_string());
        let top = line["top"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        let probs: Vec<f64> = top.iter().map(|t| t[1].as_f64().unwrap()).collect();
        assert!(probs[0] >= probs[1] && probs[1] >= probs[2] && probs[0] <= 1.0);
        if top.iter().any(|t| t[0] == label.as_str()) {
            top3 += 1;
        }
    }
    assert!(top3 >= 15, "truth in the top 3 for {top3} of 20 images");

    // A non-image file among the inputs is named; skipped on request.
    let junk = tmp.path().join("junk.png");
    std::fs::write(&junk, b"not a png").unwrap();
    fails_with(
        &["vision", "predict", "--model", s(&out), s(&junk)],
        &["junk.png", "not a readable image"],
    );
    let out_skip = ok(&[
        "vision",
        "predict",
        "--model",
        s(&out),
        "--on-bad-image",
        "skip",
        s(&junk),
        s(&pngs[0].0),
    ]);
    assert_eq!(out_skip.lines().count(), 1);
}

#[test]
fn image_folders_and_csv_lists_train_and_bad_images_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let config = micro_config(tmp.path());
    // A class-folder tree of two classes (labels 1 "trouser" and 7 "sneaker").
    let pngs = export_pngs(&tmp.path().join("all"), 300);
    let folder = tmp.path().join("folder");
    let mut csv = String::from("path,label\n");
    for (path, label) in &pngs {
        if label == "1" || label == "7" {
            let name = if label == "1" { "trouser" } else { "sneaker" };
            let class = folder.join(name);
            std::fs::create_dir_all(&class).unwrap();
            std::fs::copy(path, class.join(path.file_name().unwrap())).unwrap();
            csv.push_str(&format!(
                "all/{},{name}\n",
                path.file_name().unwrap().to_str().unwrap()
            ));
        }
    }
    let list = tmp.path().join("list.csv");
    std::fs::write(&list, &csv).unwrap();
    for data in [&folder, &list] {
        let out = tmp.path().join(format!(
            "out-{}",
            data.file_name().unwrap().to_str().unwrap()
        ));
        let mut args = vec![
            "vision",
            "train",
            "--data",
            s(data),
            "--valid",
            s(data),
            "--config",
            s(&config),
            "--epochs",
            "3",
            "--batch-size",
            "16",
            "--lr",
            "2e-3",
            "--out",
            s(&out),
        ];
        args.extend(["--seed", "1"]);
        // The CSV run also trains with soft targets: mixup and label smoothing.
        if data == &list {
            args.extend(["--mixup", "0.2", "--label-smoothing", "0.1"]);
        }
        ok(&args);
        let last = records(&out.join("metrics.jsonl"))
            .into_iter()
            .rfind(|r| r["split"] == "valid")
            .unwrap();
        // Trousers and sneakers are easy to tell apart.
        assert!(last["accuracy"].as_f64().unwrap() > 0.9, "{last}");
        assert_eq!(last["labels"], serde_json::json!(["sneaker", "trouser"]));
    }

    // A truncated image: fatal by default, naming it; skipped with --on-bad-image skip.
    let broken = folder.join("trouser").join("broken.png");
    let bytes = std::fs::read(&pngs[0].0).unwrap();
    std::fs::write(&broken, &bytes[..bytes.len() / 2]).unwrap();
    let out = tmp.path().join("out-broken");
    let args = [
        "vision",
        "train",
        "--data",
        s(&folder),
        "--config",
        s(&config),
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--out",
        s(&out),
    ];
    fails_with(&args, &["broken.png", "--on-bad-image skip"]);
    assert!(!out.exists());
    let mut skip = args.to_vec();
    skip.extend(["--on-bad-image", "skip"]);
    let result = run(&skip);
    assert!(result.status.success(), "{}", stderr(&result));
    assert!(
        stderr(&result).contains("broken.png"),
        "{}",
        stderr(&result)
    );

    // A CSV without the path column, and one naming a missing file.
    let bad = tmp.path().join("bad.csv");
    std::fs::write(&bad, "file,label\na.png,x\n").unwrap();
    let out = tmp.path().join("out-bad");
    fails_with(
        &["vision", "train", "--data", s(&bad), "--out", s(&out)],
        &["bad.csv", "no column `path`"],
    );
    std::fs::write(&bad, "path,label\nnope.png,x\n").unwrap();
    fails_with(
        &["vision", "train", "--data", s(&bad), "--out", s(&out)],
        &["nope.png", "cannot open"],
    );
}

#[test]
fn bad_configs_and_options_are_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fashion();
    let out = tmp.path().join("out");
    let write = |name: &str, text: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let cases = [
        (
            "unknown.toml",
            "[model]\nhidden_sise = 32\n",
            "unknown field `hidden_sise`",
        ),
        (
            "heads.toml",
            "[model]\nhidden_size = 30\nnum_attention_heads = 4\n",
            "do not divide",
        ),
        (
            "patch.toml",
            "[model]\nimage_size = 28\npatch_size = 5\n",
            "does not divide",
        ),
        (
            "flip.toml",
            "[augment]\nhflip = 1.5\n",
            "hflip must be a probability",
        ),
        (
            "mean.toml",
            "[data]\nimage_mean = [0.5, 0.5]\n",
            "image_mean and image_std",
        ),
        (
            "preset.toml",
            "[model]\npreset = \"huge\"\n",
            "preset `huge` is unknown",
        ),
        (
            "channels.toml",
            "[model]\nnum_channels = 2\n",
            "num_channels",
        ),
        (
            "pad.toml",
            "[augment]\npad_crop = 100000\n",
            "pad_crop must be at most",
        ),
    ];
    for (name, text, needle) in cases {
        let config = write(name, text);
        fails_with(
            &[
                "vision",
                "train",
                "--data",
                s(&data),
                "--config",
                s(&config),
                "--out",
                s(&out),
            ],
            &[needle],
        );
    }
    fails_with(
        &[
            "vision",
            "train",
            "--data",
            s(&data),
            "--label-fraction",
            "0",
            "--out",
            s(&out),
        ],
        &["--label-fraction"],
    );
    fails_with(
        &[
            "vision",
            "train",
            "--data",
            s(&tmp.path().join("none")),
            "--out",
            s(&out),
        ],
        &["none", "no such file or folder"],
    );
    assert!(!out.exists());
}

#[test]
fn killed_training_resumes_to_the_same_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let config = micro_config(tmp.path());
    let data = fashion();
    let args = |out: &Path| -> Vec<String> {
        let mut a: Vec<String> = train_args(s(&data), s(&config), s(out))
            .into_iter()
            .map(String::from)
            .collect();
        a.extend(["--checkpoint-every".into(), "10".into()]);
        a
    };
    let full = tmp.path().join("full");
    let out = smelt().args(args(&full)).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));

    let cut = tmp.path().join("cut");
    let killed = kill_after_checkpoint(&args(&cut), &cut, 10);
    assert_eq!(
        killed["finished"], false,
        "the run must be cut before it ends"
    );
    let mut resume = args(&cut);
    resume.push("--resume".into());
    let out = smelt().args(&resume).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let a = std::fs::read(full.join("model.safetensors")).unwrap();
    let b = std::fs::read(cut.join("model.safetensors")).unwrap();
    assert!(a == b, "resumed weights differ from the uninterrupted run");
}

#[test]
fn contrastive_pretraining_gives_features_a_probe_separates_better_than_random() {
    let tmp = tempfile::tempdir().unwrap();
    let config = micro_config(tmp.path());
    let data = fashion();
    let enc = tmp.path().join("enc");
    // A shortened SimCLR augmentation for 28x28 gray images.
    let toml = std::fs::read_to_string(&config).unwrap().replace(
        "[augment]\nhflip = 0.5\n",
        "[augment]\ncrop_scale = [0.3, 1.0]\nhflip = 0.5\n[augment.jitter]\nprob = 0.8\n\
         brightness = 0.4\ncontrast = 0.4\nsaturation = 0.0\nhue = 0.0\n",
    );
    let pre_config = tmp.path().join("pretrain.toml");
    std::fs::write(&pre_config, toml).unwrap();
    let out = ok(&[
        "vision",
        "pretrain",
        "--data",
        s(&data),
        "--config",
        s(&pre_config),
        "--epochs",
        "1",
        "--batch-size",
        "128",
        "--lr",
        "2e-3",
        "--queue",
        "256",
        "--out",
        s(&enc),
    ]);
    let _ = out;
    let hf: Value =
        serde_json::from_str(&std::fs::read_to_string(enc.join("config.json")).unwrap()).unwrap();
    assert_eq!(hf["architectures"][0], "ViTModel");
    let losses: Vec<f64> = records(&enc.join("metrics.jsonl"))
        .iter()
        .map(|r| r["loss"].as_f64().unwrap())
        .collect();
    assert!(losses.last().unwrap() < &(losses[0] - 0.5), "{losses:?}");

    let probe = |random: bool| -> f64 {
        let mut args = vec![
            "vision",
            "probe",
            "--encoder",
            s(&enc),
            "--data",
            s(&data),
            "--valid",
            s(&data),
            "--label-fraction",
            "0.05",
            "--json",
        ];
        if random {
            args.push("--random-init");
        }
        let v: Value = serde_json::from_str(&ok(&args)).unwrap();
        assert_eq!(v["train_images"], 3000);
        v["accuracy"].as_f64().unwrap()
    };
    let pretrained = probe(false);
    let random = probe(true);
    assert!(
        pretrained > random + 0.03,
        "pretrained {pretrained} vs random {random}"
    );

    // An encoder has no classifier: eval says so.
    fails_with(
        &["vision", "eval", "--model", s(&enc), "--data", s(&data)],
        &["no id2label", "smelt vision train"],
    );
}
