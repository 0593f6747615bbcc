//! `smelt lm train`, `lm merge`, `--adapter`, `tokenizer train` and `data chatterbot` on real
//! assets (SmolLM2 Q4_1, the chatterbot corpus, the Jane Austen novels), and their bad-input
//! paths.

mod common;

use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn gguf() -> PathBuf {
    asset("models/smollm2-135m-instruct-q4_1").join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(out.status.success(), "{args:?}:\n{}", stderr(&out));
    stdout(&out)
}

fn fails_with(args: &[&str], needle: &str) {
    let out = run(args);
    let err = stderr(&out);
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(
        err.contains(needle),
        "{args:?}: expected {needle:?} in:\n{err}"
    );
    assert!(!err.contains("panicked"), "{args:?} panicked:\n{err}");
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn records(metrics: &Path) -> Vec<Value> {
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn valid_losses(metrics: &Path) -> Vec<f64> {
    records(metrics)
        .iter()
        .filter(|r| r["split"] == "valid")
        .map(|r| r["loss"].as_f64().unwrap())
        .collect()
}

#[test]
fn lora_on_the_quantized_model_lowers_validation_loss_and_merges() {
    let tmp = tempfile::tempdir().unwrap();
    let chat = tmp.path().join("chat");
    let corpus = asset("data/chatterbot-english");
    ok(&["data", "chatterbot", s(&corpus), "--out", s(&chat)]);
    let train: Vec<String> = std::fs::read_to_string(chat.join("train.jsonl"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert!(train.len() > 2000, "{} exchanges", train.len());
    // A small slice keeps the test short: 24 greetings-style exchanges, 8 held out.
    let small_train = tmp.path().join("train.jsonl");
    let small_valid = tmp.path().join("valid.jsonl");
    std::fs::write(&small_train, train[..24].join("\n")).unwrap();
    let valid = std::fs::read_to_string(chat.join("valid.jsonl")).unwrap();
    std::fs::write(
        &small_valid,
        valid.lines().take(8).collect::<Vec<_>>().join("\n"),
    )
    .unwrap();

    let out = tmp.path().join("adapter");
    let m = gguf();
    ok(&[
        "lm",
        "train",
        "--model",
        s(&m),
        "--train",
        s(&small_train),
        "--valid",
        s(&small_valid),
        "--lora-rank",
        "8",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
        "--seed",
        "3",
        "--lora-dropout",
        "0",
        "--out",
        s(&out),
    ]);
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "metrics.jsonl",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let losses = valid_losses(&out.join("metrics.jsonl"));
    assert_eq!(losses.len(), 3, "baseline and one per epoch: {losses:?}");
    assert!(
        losses[2] < losses[0] - 0.05,
        "validation loss did not fall: {losses:?}"
    );
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["r"], 8);
    assert_eq!(
        config["target_modules"],
        serde_json::json!(["q_proj", "v_proj"])
    );

    // The adapter, the merged GGUF and the merged HF directory give the same perplexity.
    let text = tmp.path().join("text.txt");
    std::fs::write(
        &text,
        "Hello! How are you today? I am fine, thank you for asking.",
    )
    .unwrap();
    let ppl = |args: &[&str]| -> f64 {
        let mut all = vec!["lm", "eval", "--data", s(&text), "--json"];
        all.extend_from_slice(args);
        let v: Value = serde_json::from_str(&ok(&all)).unwrap();
        v["perplexity"].as_f64().unwrap()
    };
    let base = ppl(&["--model", s(&m)]);
    let adapted = ppl(&["--model", s(&m), "--adapter", s(&out)]);
    assert!((adapted - base).abs() > 1e-3, "the adapter changes nothing");
    let merged_gguf = tmp.path().join("merged.gguf");
    let merged_hf = tmp.path().join("merged-hf");
    ok(&[
        "lm",
        "merge",
        "--model",
        s(&m),
        "--adapter",
        s(&out),
        "--out",
        s(&merged_gguf),
    ]);
    ok(&[
        "lm",
        "merge",
        "--model",
        s(&m),
        "--adapter",
        s(&out),
        "--out",
        s(&merged_hf),
    ]);
    for merged in [&merged_gguf, &merged_hf] {
        let p = ppl(&["--model", s(merged)]);
        assert!(
            (p - adapted).abs() < 1e-3 * adapted,
            "{}: {p} vs {adapted}",
            merged.display()
        );
    }
    let g = ok(&[
        "lm",
        "generate",
        "--model",
        s(&m),
        "--adapter",
        s(&out),
        "--prompt",
        "Hi",
        "--max-new-tokens",
        "4",
        "--temperature",
        "0",
    ]);
    assert!(!g.is_empty());
}

#[test]
fn bad_training_input_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let m = gguf();
    let write = |name: &str, text: &str| -> PathBuf {
        let p = tmp.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let out = tmp.path().join("out");
    let train = |file: &Path, extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "lm",
            "train",
            "--model",
            s(&m),
            "--train",
            s(file),
            "--lora-rank",
            "4",
            "--out",
            s(&out),
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    let check = |args: Vec<String>, needle: &str| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        fails_with(&refs, needle);
    };
    let empty = write(
        "empty.jsonl",
        "{\"prompt\": \"Hi\", \"completion\": \"\"}\n",
    );
    check(
        train(&empty, &[]),
        "empty.jsonl: line 1: the completion is empty",
    );
    let long = write(
        "long.jsonl",
        &format!(
            "{{\"prompt\": \"{}\", \"completion\": \"yes\"}}\n",
            "word ".repeat(200)
        ),
    );
    check(
        train(&long, &["--max-length", "64"]),
        "long.jsonl: line 1: the prompt is",
    );
    let role = write(
        "role.jsonl",
        "{\"messages\": [{\"role\": \"wizard\", \"content\": \"x\"}, {\"role\": \"assistant\", \"content\": \"y\"}]}\n",
    );
    check(train(&role, &[]), "role `wizard`");
    let bad_json = write(
        "bad.jsonl",
        "{\"prompt\": \"a\", \"completion\": \"b\"}\n{oops\n",
    );
    check(train(&bad_json, &[]), "bad.jsonl: line 2: not valid JSON");
    let fine = write("fine.jsonl", "{\"prompt\": \"a\", \"completion\": \"b\"}\n");
    check(
        train(&fine, &["--lora-targets", "c_attn"]),
        "names no layer",
    );
    assert!(
        !out.join("adapter_config.json").exists(),
        "no partial output"
    );

    // An adapter made for another base model.
    let tiny = tmp.path().join("tiny");
    let config = tmp.path().join("tiny.toml");
    std::fs::write(
        &config,
        "layers = 1\nheads = 2\nhidden = 16\ncontext = 32\n",
    )
    .unwrap();
    let tok = asset("models/gpt2-tokenizer").join("tokenizer.json");
    let text = write(
        "t.txt",
        &"It is a truth universally acknowledged. ".repeat(30),
    );
    ok(&[
        "lm",
        "train",
        "--from-scratch",
        "--config",
        s(&config),
        "--tokenizer",
        s(&tok),
        "--train",
        s(&text),
        "--out",
        s(&tiny),
        "--sample-tokens",
        "0",
    ]);
    fails_with(
        &[
            "lm",
            "train",
            "--model",
            s(&tiny),
            "--train",
            s(&fine),
            "--lora-targets",
            "c_fc",
            "--out",
            s(&tmp.path().join("norank")),
        ],
        "add --lora-rank N",
    );
    let foreign = tmp.path().join("foreign");
    ok(&[
        "lm",
        "train",
        "--model",
        s(&tiny),
        "--train",
        s(&fine),
        "--lora-rank",
        "2",
        "--lora-targets",
        "c_fc",
        "--out",
        s(&foreign),
    ]);
    fails_with(
        &[
            "lm",
            "generate",
            "--model",
            s(&m),
            "--adapter",
            s(&foreign),
            "--prompt",
            "hi",
        ],
        "trained for a different base model",
    );
    fails_with(
        &[
            "lm",
            "merge",
            "--model",
            s(&m),
            "--adapter",
            s(&foreign),
            "--out",
            s(&tmp.path().join("m.gguf")),
        ],
        "different base model",
    );

    // Heads that do not divide the width.
    std::fs::write(
        &config,
        "layers = 1\nheads = 3\nhidden = 16\ncontext = 32\n",
    )
    .unwrap();
    fails_with(
        &[
            "lm",
            "train",
            "--from-scratch",
            "--config",
            s(&config),
            "--tokenizer",
            s(&tok),
            "--train",
            s(&text),
            "--out",
            s(&tmp.path().join("x")),
        ],
        "field `heads`: 3 heads do not divide the width of 16",
    );
    std::fs::write(
        &config,
        "layers = 1\nheads = 2\nhidden = 16\ncontext = 32\nwidth = 3\n",
    )
    .unwrap();
    fails_with(
        &[
            "lm",
            "train",
            "--from-scratch",
            "--config",
            s(&config),
            "--tokenizer",
            s(&tok),
            "--train",
            s(&text),
            "--out",
            s(&tmp.path().join("x")),
        ],
        "unknown field `width`",
    );
}

#[test]
fn a_tokenizer_and_a_gpt_trained_from_scratch_on_austen() {
    let tmp = tempfile::tempdir().unwrap();
    let austen = asset("data/jane-austen");
    let tok = tmp.path().join("tokenizer.json");
    ok(&[
        "tokenizer",
        "train",
        "--vocab-size",
        "2000",
        "--out",
        s(&tok),
        s(&austen.join("persuasion.txt")),
        s(&austen.join("northangerabbey.txt")),
    ]);
    let vocab: Value = serde_json::from_str(&std::fs::read_to_string(&tok).unwrap()).unwrap();
    assert_eq!(vocab["model"]["type"], "BPE");
    assert!(vocab["model"]["vocab"].as_object().unwrap().len() <= 2000);

    // 30 KB of one novel for training, 8 KB of another to validate.
    let train = tmp.path().join("train.txt");
    let valid = tmp.path().join("valid.txt");
    let p = std::fs::read_to_string(austen.join("persuasion.txt")).unwrap();
    let n = std::fs::read_to_string(austen.join("northangerabbey.txt")).unwrap();
    std::fs::write(&train, &p[..30_000]).unwrap();
    std::fs::write(&valid, &n[..8_000]).unwrap();
    let config = tmp.path().join("small.toml");
    std::fs::write(
        &config,
        "layers = 2\nheads = 2\nhidden = 64\ncontext = 64\n",
    )
    .unwrap();
    let out = tmp.path().join("gpt");
    ok(&[
        "lm",
        "train",
        "--from-scratch",
        "--config",
        s(&config),
        "--tokenizer",
        s(&tok),
        "--train",
        s(&train),
        "--valid",
        s(&valid),
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--lr",
        "3e-3",
        "--out",
        s(&out),
        "--sample-tokens",
        "8",
    ]);
    let metrics = out.join("metrics.jsonl");
    let losses = valid_losses(&metrics);
    assert_eq!(losses.len(), 3);
    // 30 KB overfit quickly: the best epoch (the one kept) must beat the untrained model.
    let best = losses[1].min(losses[2]);
    assert!(best < losses[0] - 0.5, "{losses:?}");
    let last = records(&metrics)
        .into_iter()
        .rev()
        .find(|r| r["split"] == "valid")
        .unwrap();
    assert!(last["perplexity"].as_f64().unwrap() > 1.0);
    assert_eq!(last["samples"][0]["prompt"], "It is a truth");
    // A Hugging Face GPT-2 directory that smelt reads back with the same perplexity.
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "GPT2LMHeadModel");
    let v: Value = serde_json::from_str(&ok(&[
        "lm",
        "eval",
        "--model",
        s(&out),
        "--data",
        s(&valid),
        "--json",
    ]))
    .unwrap();
    assert!(v["perplexity"].as_f64().unwrap().is_finite());

    // Resuming a finished run does not train again; a second run into the same --out is refused.
    ok(&[
        "lm",
        "train",
        "--from-scratch",
        "--config",
        s(&config),
        "--tokenizer",
        s(&tok),
        "--train",
        s(&train),
        "--valid",
        s(&valid),
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--lr",
        "3e-3",
        "--out",
        s(&out),
        "--sample-tokens",
        "8",
        "--resume",
    ]);
    assert_eq!(valid_losses(&metrics).len(), 3);
    fails_with(
        &[
            "lm",
            "train",
            "--from-scratch",
            "--config",
            s(&config),
            "--tokenizer",
            s(&tok),
            "--train",
            s(&train),
            "--out",
            s(&out),
        ],
        "already holds a training run",
    );
}
