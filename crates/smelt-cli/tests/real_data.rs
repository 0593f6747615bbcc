//! Fine-tuning the real all-MiniLM-L6-v2 on a slice of the real movie-review sentiment data,
//! then evaluating and predicting through the command line.

mod common;

use common::*;
use smelt_data::table::{ReadOptions, Table};
use std::io::Write;
use std::process::Stdio;

/// Writes `text<TAB>label` files from the raw rating file (rating > 0 positive, < 0
/// negative, 0 dropped), as `scripts/prepare-sentiment.sh` does.
fn sentiment_slices(dir: &std::path::Path, train_rows: usize, test_rows: usize) {
    let raw = asset("data/sentiment-snippets").join("movieReviewSnippets_GroundTruth.txt");
    let options = ReadOptions {
        format: Some(smelt_data::table::Format::Tsv),
        no_header: true,
        ..Default::default()
    };
    let table = Table::read(&raw, &options).unwrap();
    let rows: Vec<(String, &str)> = table
        .rows
        .iter()
        .filter_map(|r| {
            let rating: f64 = r.values[1].as_deref()?.trim().parse().ok()?;
            let text = r.values[2].clone()?;
            (rating != 0.0).then_some((text, if rating > 0.0 { "positive" } else { "negative" }))
        })
        .collect();
    // Every 5th row tests, the rest train: the split of prepare-sentiment.sh.
    let (mut train, mut test) = (String::from("text\tlabel\n"), String::from("text\tlabel\n"));
    let (mut n_train, mut n_test) = (0, 0);
    for (i, (text, label)) in rows.iter().enumerate() {
        if i % 5 == 4 && n_test < test_rows {
            test.push_str(&format!("{text}\t{label}\n"));
            n_test += 1;
        } else if i % 5 != 4 && n_train < train_rows {
            train.push_str(&format!("{text}\t{label}\n"));
            n_train += 1;
        }
    }
    std::fs::write(dir.join("train.tsv"), train).unwrap();
    std::fs::write(dir.join("test.tsv"), test).unwrap();
}

#[test]
fn minilm_learns_movie_review_sentiment() {
    let root = tempfile::tempdir().unwrap();
    sentiment_slices(root.path(), 512, 256);
    let model = asset("models/all-minilm-l6-v2");
    let out_dir = root.path().join("run");
    let train = root.path().join("train.tsv");
    let test = root.path().join("test.tsv");

    let out = run(&[
        "classify",
        "train",
        "--model",
        model.to_str().unwrap(),
        "--train",
        train.to_str().unwrap(),
        "--valid-fraction",
        "0",
        "--text-column",
        "text",
        "--label-column",
        "label",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--lr",
        "1e-4",
        "--max-length",
        "64",
        "--seed",
        "42",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "vocab.txt",
        "metrics.jsonl",
        "run_config.json",
    ] {
        assert!(out_dir.join(file).is_file(), "missing {file}");
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["id2label"]["0"], "negative");
    assert_eq!(config["label2id"]["positive"], 1);
    assert_eq!(config["architectures"][0], "BertForSequenceClassification");

    let out = run(&[
        "classify",
        "eval",
        "--model",
        out_dir.to_str().unwrap(),
        "--data",
        test.to_str().unwrap(),
        "--text-column",
        "text",
        "--label-column",
        "label",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    let accuracy = report["accuracy"].as_f64().unwrap();
    // Untrained, the head is at chance (about 0.5) on this balanced slice.
    assert!(
        accuracy > 0.70,
        "accuracy after one short epoch: {accuracy}"
    );

    // Predicting the test texts from a file agrees with eval's accuracy.
    let test_text = std::fs::read_to_string(&test).unwrap();
    let rows: Vec<(&str, &str)> = test_text
        .lines()
        .skip(1)
        .map(|l| l.split_once('\t').unwrap())
        .collect();
    let texts = root.path().join("texts.txt");
    let joined: Vec<&str> = rows.iter().map(|r| r.0).collect();
    std::fs::write(&texts, joined.join("\n")).unwrap();
    let out = run(&[
        "classify",
        "predict",
        "--model",
        out_dir.to_str().unwrap(),
        "--file",
        texts.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let predicted: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(predicted.len(), rows.len());
    let correct = predicted
        .iter()
        .zip(&rows)
        .filter(|(p, r)| p["label"] == r.1)
        .count();
    let predict_accuracy = correct as f64 / rows.len() as f64;
    assert!(
        (predict_accuracy - accuracy).abs() < 1e-9,
        "{predict_accuracy} vs {accuracy}"
    );

    // Predict from stdin: one JSON line per text, a probability for every class.
    let mut child = smelt()
        .args(["classify", "predict", "--model", out_dir.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"A wonderful, moving film with superb acting.\nA dull, tedious mess.\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for line in &lines {
        let label = line["label"].as_str().unwrap();
        assert!(label == "positive" || label == "negative", "{label}");
        let probs = line["probabilities"].as_object().unwrap();
        assert_eq!(probs.len(), 2);
        let total: f64 = probs.values().map(|p| p.as_f64().unwrap()).sum();
        assert!((total - 1.0).abs() < 1e-5);
        assert!(probs[label].as_f64().unwrap() >= 0.5);
    }
    eprintln!("accuracy after one epoch on 512 rows: {accuracy:.4}");
}
