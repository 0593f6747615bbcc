//! Shared helpers of the command-line tests: running the binary, tiny random BERT models,
//! small data files.

#![allow(dead_code)]

use smelt_models::init::HostInit;
use smelt_models::weights::{write_safetensors, NamedTensor};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn smelt() -> Command {
    Command::new(env!("CARGO_BIN_EXE_smelt"))
}

pub fn run(args: &[&str]) -> Output {
    smelt().args(args).output().expect("run smelt")
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Starts `smelt args` and kills it (SIGKILL) once `out/checkpoint` records at least
/// `step` updates; returns the trainer state it was killed at.
pub fn kill_after_checkpoint(args: &[String], out: &Path, step: u64) -> serde_json::Value {
    let mut child = smelt()
        .args(args)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let state = out.join("checkpoint").join("trainer_state.json");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let reached = std::fs::read_to_string(&state)
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .and_then(|v| v["global_step"].as_u64());
        if reached.is_some_and(|s| s >= step) || std::time::Instant::now() > deadline {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap()
}

pub fn asset(rel: &str) -> PathBuf {
    smelt_data::assets::locate(rel).expect("asset available (run `smelt assets fetch`)")
}

/// Writes a BERT checkpoint with random weights: `hidden` wide, `layers` deep, using the
/// MiniLM WordPiece vocabulary, as a Hugging Face `BertModel` directory.
pub fn tiny_bert(dir: &Path, hidden: usize, layers: usize, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let vocab_src = asset("models/all-minilm-l6-v2").join("vocab.txt");
    std::fs::copy(&vocab_src, dir.join("vocab.txt")).unwrap();
    let vocab = std::fs::read_to_string(&vocab_src).unwrap().lines().count();
    let intermediate = hidden * 2;
    let config = serde_json::json!({
        "model_type": "bert",
        "architectures": ["BertModel"],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "intermediate_size": intermediate,
        "max_position_embeddings": 64,
        "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "initializer_range": 0.02,
        "pad_token_id": 0
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();

    let mut init = HostInit::new(seed);
    let mut tensors = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, init: &mut HostInit, ones: Option<f32>| {
        let n = shape.iter().product();
        let values = match ones {
            Some(v) => vec![v; n],
            None => init.normal(n, 0.02),
        };
        tensors.push(NamedTensor::new(name, shape, values));
    };
    add(
        "embeddings.word_embeddings.weight".into(),
        vec![vocab, hidden],
        &mut init,
        None,
    );
    add(
        "embeddings.position_embeddings.weight".into(),
        vec![64, hidden],
        &mut init,
        None,
    );
    add(
        "embeddings.token_type_embeddings.weight".into(),
        vec![2, hidden],
        &mut init,
        None,
    );
    add(
        "embeddings.LayerNorm.weight".into(),
        vec![hidden],
        &mut init,
        Some(1.0),
    );
    add(
        "embeddings.LayerNorm.bias".into(),
        vec![hidden],
        &mut init,
        Some(0.0),
    );
    for l in 0..layers {
        let p = |n: &str| format!("encoder.layer.{l}.{n}");
        for name in [
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
        ] {
            add(
                p(&format!("{name}.weight")),
                vec![hidden, hidden],
                &mut init,
                None,
            );
            add(
                p(&format!("{name}.bias")),
                vec![hidden],
                &mut init,
                Some(0.0),
            );
        }
        add(
            p("intermediate.dense.weight"),
            vec![intermediate, hidden],
            &mut init,
            None,
        );
        add(
            p("intermediate.dense.bias"),
            vec![intermediate],
            &mut init,
            Some(0.0),
        );
        add(
            p("output.dense.weight"),
            vec![hidden, intermediate],
            &mut init,
            None,
        );
        add(p("output.dense.bias"), vec![hidden], &mut init, Some(0.0));
        for norm in ["attention.output.LayerNorm", "output.LayerNorm"] {
            add(
                p(&format!("{norm}.weight")),
                vec![hidden],
                &mut init,
                Some(1.0),
            );
            add(
                p(&format!("{norm}.bias")),
                vec![hidden],
                &mut init,
                Some(0.0),
            );
        }
    }
    write_safetensors(&dir.join("model.safetensors"), &tensors, None).unwrap();
}

/// A small labelled TSV of sentiment-like sentences whose label is given by one keyword.
pub fn keyword_tsv(path: &Path, rows: usize) {
    let good = ["great", "wonderful", "superb", "lovely"];
    let bad = ["awful", "dreadful", "boring", "terrible"];
    let mut text = String::from("text\tlabel\n");
    for i in 0..rows {
        let (word, label) = if i % 2 == 0 {
            (good[i % 4], "pos")
        } else {
            (bad[i % 4], "neg")
        };
        text.push_str(&format!(
            "the film number {i} was {word} overall\t{label}\n"
        ));
    }
    std::fs::write(path, text).unwrap();
}
