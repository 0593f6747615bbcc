//! Command-line behaviour: help, bad input, determinism and exact resume.

mod common;

use common::*;
use std::path::Path;

fn train_args<'a>(model: &'a str, train: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "classify",
        "train",
        "--model",
        model,
        "--train",
        train,
        "--text-column",
        "text",
        "--label-column",
        "label",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--lr",
        "1e-3",
        "--max-length",
        "32",
        "--seed",
        "7",
        "--out",
        out,
    ]
}

/// Sets `flag` to `value`, replacing an earlier value or appending the pair.
fn set<'a>(args: &mut Vec<&'a str>, flag: &'a str, value: &'a str) {
    match args.iter().position(|a| *a == flag) {
        Some(i) => args[i + 1] = value,
        None => args.extend([flag, value]),
    }
}

fn assert_fails_with(out: &std::process::Output, needles: &[&str]) {
    assert!(
        !out.status.success(),
        "expected failure, got success: {}",
        stderr(out)
    );
    let err = stderr(out);
    for needle in needles {
        assert!(err.contains(needle), "stderr lacks `{needle}`:\n{err}");
    }
    assert!(!err.contains("panicked"), "panicked:\n{err}");
}

#[test]
fn help_works_for_every_subcommand() {
    for args in [
        vec!["--help"],
        vec!["classify", "--help"],
        vec!["classify", "train", "--help"],
        vec!["classify", "eval", "--help"],
        vec!["classify", "predict", "--help"],
        vec!["assets", "--help"],
        vec!["assets", "fetch", "--help"],
    ] {
        let out = run(&args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        assert!(stdout(&out).contains("Usage"), "{args:?}");
    }
}

struct Fixture {
    _root: tempfile::TempDir,
    root: std::path::PathBuf,
    model: String,
    train: String,
}

fn fixture() -> Fixture {
    let root = tempfile::tempdir().unwrap();
    let model = root.path().join("tiny");
    tiny_bert(&model, 32, 2, 1);
    let train = root.path().join("train.tsv");
    keyword_tsv(&train, 48);
    Fixture {
        root: root.path().to_path_buf(),
        model: model.display().to_string(),
        train: train.display().to_string(),
        _root: root,
    }
}

fn write(root: &Path, name: &str, text: &[u8]) -> String {
    let path = root.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn missing_column_names_the_file_and_the_columns() {
    let f = fixture();
    let out_dir = f.root.join("out");
    let mut args = train_args(&f.model, &f.train, out_dir.to_str().unwrap());
    args[7] = "review";
    assert_fails_with(
        &run(&args),
        &["train.tsv", "no column `review`", "`text`, `label`"],
    );
    assert!(!out_dir.exists(), "no output may be left behind");
}

#[test]
fn invalid_json_line_is_reported_with_its_line() {
    let f = fixture();
    let data = write(
        &f.root,
        "bad.jsonl",
        b"{\"text\": \"fine\", \"label\": \"a\"}\n{\"text\": oops}\n",
    );
    let out_dir = f.root.join("out");
    let out = run(&train_args(&f.model, &data, out_dir.to_str().unwrap()));
    assert_fails_with(&out, &["bad.jsonl", "line 2", "not valid JSON"]);
    assert!(!out_dir.exists());
}

#[test]
fn empty_file_and_invalid_encoding_are_clear_errors() {
    let f = fixture();
    let out_dir = f.root.join("out");
    let empty = write(&f.root, "empty.tsv", b"text\tlabel\n");
    assert_fails_with(
        &run(&train_args(&f.model, &empty, out_dir.to_str().unwrap())),
        &["empty.tsv", "no data rows"],
    );
    let latin = write(
        &f.root,
        "latin.tsv",
        b"text\tlabel\nok\ta\ncaf\xe9 cr\xe8me\tb\n",
    );
    assert_fails_with(
        &run(&train_args(&f.model, &latin, out_dir.to_str().unwrap())),
        &["latin.tsv", "line 3", "not valid UTF-8", "--encoding"],
    );
    assert!(!out_dir.exists());
}

#[test]
fn real_non_utf8_tweets_fail_clearly_and_read_with_encoding() {
    let path = asset("data/tweets-3class").join("");
    let file = std::fs::read_dir(&path)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "csv"))
        .expect("tweets csv");
    let options = smelt_data::table::ReadOptions::default();
    let err = smelt_data::table::Table::read(&file, &options)
        .unwrap_err()
        .to_string();
    assert!(err.contains("line ") && err.contains("--encoding"), "{err}");
    let options = smelt_data::table::ReadOptions {
        encoding: Some("windows-1252".into()),
        ..Default::default()
    };
    let table = smelt_data::table::Table::read(&file, &options).unwrap();
    assert_eq!(table.columns, vec!["sentiment", "confidence", "text"]);
    assert!(table.rows.len() > 38_000, "{} rows", table.rows.len());
    // Windows-1252 bytes decode to real characters, never to U+FFFD.
    assert!(table
        .rows
        .iter()
        .all(|r| r.values.iter().flatten().all(|v| !v.contains('\u{fffd}'))));
}

#[test]
fn broken_model_directories_are_refused() {
    let f = fixture();
    let out_dir = f.root.join("out");
    let out_s = out_dir.to_str().unwrap();

    // Truncated weights.
    let trunc = f.root.join("trunc");
    tiny_bert(&trunc, 32, 2, 1);
    let weights = std::fs::read(trunc.join("model.safetensors")).unwrap();
    std::fs::write(
        trunc.join("model.safetensors"),
        &weights[..weights.len() / 2],
    )
    .unwrap();
    assert_fails_with(
        &run(&train_args(trunc.to_str().unwrap(), &f.train, out_s)),
        &["model.safetensors", "truncated"],
    );

    // Missing weights, and a pickle checkpoint in their place.
    std::fs::remove_file(trunc.join("model.safetensors")).unwrap();
    assert_fails_with(
        &run(&train_args(trunc.to_str().unwrap(), &f.train, out_s)),
        &["no model.safetensors"],
    );
    std::fs::write(trunc.join("pytorch_model.bin"), b"PK\x03\x04").unwrap();
    assert_fails_with(
        &run(&train_args(trunc.to_str().unwrap(), &f.train, out_s)),
        &["pickle", "never executes pickle"],
    );

    // Config sizes that do not match the weights.
    let mismatch = f.root.join("mismatch");
    tiny_bert(&mismatch, 32, 2, 1);
    let config = std::fs::read_to_string(mismatch.join("config.json")).unwrap();
    std::fs::write(
        mismatch.join("config.json"),
        config.replace("\"intermediate_size\": 64", "\"intermediate_size\": 80"),
    )
    .unwrap();
    assert_fails_with(
        &run(&train_args(mismatch.to_str().unwrap(), &f.train, out_s)),
        &["intermediate.dense.weight", "[80, 32]", "[64, 32]"],
    );
    assert!(!out_dir.exists());
}

#[test]
fn empty_texts_are_skipped_and_counted_or_fatal_under_strict() {
    let f = fixture();
    let out_dir = f.root.join("out");
    let mut text = std::fs::read_to_string(&f.train).unwrap();
    text.push_str("\tpos\n   \tneg\n");
    let data = write(&f.root, "with-empty.tsv", text.as_bytes());

    let mut strict = train_args(&f.model, &data, out_dir.to_str().unwrap());
    strict.push("--strict");
    assert_fails_with(&run(&strict), &["with-empty.tsv", "line 50", "empty text"]);
    assert!(!out_dir.exists());

    let out = run(&train_args(&f.model, &data, out_dir.to_str().unwrap()));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("skipped 2 rows with empty text"),
        "{}",
        stderr(&out)
    );

    // Eval: an unknown label is an error naming its line.
    let unknown = write(
        &f.root,
        "unknown.tsv",
        b"text\tlabel\ngreat film\tpos\nodd film\tmeh\n",
    );
    let out = run(&[
        "classify",
        "eval",
        "--model",
        out_dir.to_str().unwrap(),
        "--data",
        &unknown,
        "--max-length",
        "32",
        "--json",
    ]);
    assert_fails_with(
        &out,
        &[
            "unknown.tsv",
            "line 3",
            "unknown label `meh`",
            "`neg`, `pos`",
        ],
    );
}

#[test]
fn non_finite_loss_stops_with_the_step() {
    let f = fixture();
    let out_dir = f.root.join("out");
    let mut args = train_args(&f.model, &f.train, out_dir.to_str().unwrap());
    set(&mut args, "--lr", "1e30");
    set(&mut args, "--warmup-ratio", "0");
    set(&mut args, "--max-grad-norm", "0");
    assert_fails_with(&run(&args), &["the loss became", "at step"]);
}

fn losses(metrics: &Path) -> Vec<f64> {
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["split"] == "train")
        .map(|v| v["loss"].as_f64().unwrap())
        .collect()
}

#[test]
fn same_seed_gives_same_losses_and_an_eval_report() {
    let f = fixture();
    let runs: Vec<_> = ["a", "b"]
        .iter()
        .map(|name| {
            let out_dir = f.root.join(name);
            let mut args = train_args(&f.model, &f.train, out_dir.to_str().unwrap());
            set(&mut args, "--epochs", "2");
            set(&mut args, "--log-every", "1");
            let out = run(&args);
            assert!(out.status.success(), "{}", stderr(&out));
            out_dir
        })
        .collect();
    let (a, b) = (
        losses(&runs[0].join("metrics.jsonl")),
        losses(&runs[1].join("metrics.jsonl")),
    );
    assert_eq!(
        a.len(),
        12,
        "2 epochs of 6 updates (43 rows after the 10% validation split)"
    );
    assert_eq!(a, b);

    let out = run(&[
        "classify",
        "eval",
        "--model",
        runs[0].to_str().unwrap(),
        "--data",
        &f.train,
        "--max-length",
        "32",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    for key in ["accuracy", "macro_f1", "loss", "confusion_matrix", "labels"] {
        assert!(
            report.get(key).is_some(),
            "eval --json lacks {key}: {report}"
        );
    }
    let matrix = report["confusion_matrix"].as_array().unwrap();
    let total: u64 = matrix
        .iter()
        .flat_map(|r| r.as_array().unwrap())
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(total, 48);

    // Each metrics line has the required fields.
    for line in std::fs::read_to_string(runs[0].join("metrics.jsonl"))
        .unwrap()
        .lines()
    {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        for key in ["step", "epoch", "split", "loss"] {
            assert!(v.get(key).is_some(), "metrics line lacks {key}: {line}");
        }
    }
    assert!(runs[0].join("run_config.json").is_file());
}

#[test]
fn sigkill_then_resume_ends_with_the_same_weights() {
    let f = fixture();
    let data = f.root.join("big.tsv");
    keyword_tsv(&data, 400);
    let data = data.display().to_string();
    let full = f.root.join("full");
    let cut = f.root.join("cut");
    let args = |out: &Path| {
        let mut a = train_args(&f.model, &data, out.to_str().unwrap());
        set(&mut a, "--epochs", "2");
        set(&mut a, "--batch-size", "4");
        set(&mut a, "--checkpoint-every", "5");
        set(&mut a, "--grad-accum", "2");
        a.into_iter().map(String::from).collect::<Vec<String>>()
    };

    let out = smelt().args(args(&full)).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));

    // Kill the second run once a mid-epoch checkpoint exists.
    let killed_at = kill_after_checkpoint(&args(&cut), &cut, 10);
    assert_eq!(
        killed_at["finished"], false,
        "the run must be cut before it ends"
    );

    let mut resume = args(&cut);
    resume.push("--resume".into());
    let out = smelt().args(&resume).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));

    let a = std::fs::read(full.join("model.safetensors")).unwrap();
    let b = std::fs::read(cut.join("model.safetensors")).unwrap();
    assert!(a == b, "resumed weights differ from the uninterrupted run");
    assert_eq!(
        losses(&full.join("metrics.jsonl")),
        losses(&cut.join("metrics.jsonl"))
    );

    // Without --resume, an existing run is not overwritten.
    let out = smelt().args(args(&cut)).output().unwrap();
    assert_fails_with(&out, &["already holds a training run", "--resume"]);
}

#[test]
fn impossible_options_are_refused_before_any_output() {
    let f = fixture();
    let out_dir = f.root.join("out");
    let out_s = out_dir.to_str().unwrap();
    let mut args = train_args(&f.model, &f.train, out_s);
    set(&mut args, "--max-length", "100");
    assert_fails_with(
        &run(&args),
        &["--max-length 100", "max_position_embeddings (64)"],
    );
    let mut args = train_args(&f.model, &f.train, out_s);
    set(&mut args, "--max-length", "2");
    assert_fails_with(&run(&args), &["--max-length 2 leaves no room"]);
    let mut args = train_args(&f.model, &f.train, out_s);
    set(&mut args, "--checkpoint-every", "0");
    assert_fails_with(&run(&args), &["checkpoint_every", "at least 1"]);
    let mut args = train_args(&f.model, &f.train, out_s);
    set(&mut args, "--valid-fraction", "0");
    set(&mut args, "--patience", "2");
    assert_fails_with(&run(&args), &["--patience needs validation data"]);
    assert!(!out_dir.exists());

    // A bare encoder is not a classifier: eval refuses it instead of using a random head.
    let out = run(&[
        "classify", "eval", "--model", &f.model, "--data", &f.train, "--json",
    ]);
    assert_fails_with(&out, &["config.json has no id2label"]);
}
