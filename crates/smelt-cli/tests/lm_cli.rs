//! `smelt lm ...` and `smelt inspect` on the real SmolLM2 GGUF, and their bad-input paths.

mod common;

use common::*;
use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;

fn gguf() -> PathBuf {
    asset("models/smollm2-135m-instruct-q4_1").join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn run_with_stdin(args: &[&str], input: &[u8]) -> std::process::Output {
    let mut child = smelt()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
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

#[test]
fn inspect_describes_the_gguf() {
    let m = gguf();
    let out = run(&["inspect", m.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = stdout(&out);
    assert!(
        s.contains("architecture: llama (30 layers, hidden 576, 9 heads / 3 key-value heads"),
        "{s}"
    );
    assert!(s.contains("Q4_1: 210 tensors"), "{s}");
    assert!(s.contains("Q8_0: 1 tensors"), "{s}");
    assert!(s.contains("tokenizer.ggml.model = \"gpt2\""), "{s}");
}

#[test]
fn damaged_checkpoints_are_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(gguf()).unwrap();
    let cut = tmp.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let cut = cut.to_str().unwrap();
    fails_with(&["inspect", cut], "outside the file");
    fails_with(
        &["lm", "generate", "--model", cut, "--prompt", "hi"],
        "cut.gguf",
    );
    let header_only = tmp.path().join("head.gguf");
    std::fs::write(&header_only, &bytes[..100]).unwrap();
    fails_with(&["inspect", header_only.to_str().unwrap()], "truncated");
    let not_gguf = tmp.path().join("x.gguf");
    std::fs::write(&not_gguf, b"PK\x03\x04 a zip file").unwrap();
    fails_with(&["inspect", not_gguf.to_str().unwrap()], "magic");
    // A Hugging Face directory holding only a pickle checkpoint.
    let pickle = tmp.path().join("pickle");
    std::fs::create_dir(&pickle).unwrap();
    std::fs::write(pickle.join("config.json"), r#"{"model_type":"gpt2","n_embd":8,"n_layer":1,"n_head":2,"n_positions":8,"vocab_size":10}"#).unwrap();
    std::fs::write(pickle.join("pytorch_model.bin"), b"\x80\x02").unwrap();
    fails_with(
        &[
            "lm",
            "generate",
            "--model",
            pickle.to_str().unwrap(),
            "--prompt",
            "hi",
        ],
        "never executes pickle",
    );
    // Heads that do not divide the width.
    std::fs::write(pickle.join("config.json"), r#"{"model_type":"gpt2","n_embd":10,"n_layer":1,"n_head":3,"n_positions":8,"vocab_size":10}"#).unwrap();
    fails_with(
        &["inspect", pickle.to_str().unwrap()],
        "field `n_head`: 3 heads do not divide",
    );
}

#[test]
fn tokenizer_larger_than_the_model_is_refused() {
    let tiny =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../smelt-tasks/tests/fixtures/tiny-gpt2");
    let tok = asset("models/gpt2-tokenizer");
    fails_with(
        &[
            "lm",
            "generate",
            "--model",
            tiny.to_str().unwrap(),
            "--tokenizer",
            tok.to_str().unwrap(),
            "--prompt",
            "hi",
        ],
        "the model's vocabulary is 384",
    );
}

#[test]
fn generate_greedy_streams_and_prints_json() {
    let m = gguf();
    let m = m.to_str().unwrap();
    let out = run(&[
        "lm",
        "generate",
        "--model",
        m,
        "--prompt",
        "The capital of France is",
        "--max-new-tokens",
        "3",
        "--temperature",
        "0",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), " Paris.\n\n");
    let out = run(&[
        "lm",
        "generate",
        "--model",
        m,
        "--prompt",
        "The capital of France is",
        "--prompt",
        "2 + 2 =",
        "--max-new-tokens",
        "4",
        "--temperature",
        "0.7",
        "--seed",
        "1",
        "--json",
        "--ignore-eos",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for l in &lines {
        assert_eq!(l["tokens"].as_array().unwrap().len(), 4);
        assert_eq!(l["finish"], "length");
    }
    fails_with(
        &["lm", "generate", "--model", m, "--prompt", ""],
        "prompt 1 is empty",
    );
    fails_with(
        &[
            "lm", "generate", "--model", m, "--prompt", "x", "--top-p", "0",
        ],
        "--top-p",
    );
    fails_with(
        &[
            "lm", "generate", "--model", m, "--prompt", "x", "--stop", "",
        ],
        "--stop is empty",
    );
}

#[test]
fn generate_reads_stdin_and_chat_works_without_a_terminal() {
    let m = gguf();
    let m = m.to_str().unwrap();
    let args = [
        "lm",
        "generate",
        "--model",
        m,
        "--max-new-tokens",
        "3",
        "--temperature",
        "0",
    ];
    let out = run_with_stdin(&args, b"The capital of France is");
    assert_eq!(String::from_utf8_lossy(&out.stdout), " Paris.\n\n");

    let system = "You answer in one short sentence.";
    let args = [
        "lm",
        "chat",
        "--model",
        m,
        "--system",
        system,
        "--max-new-tokens",
        "24",
        "--temperature",
        "0",
    ];
    let out = run_with_stdin(&args, b"What is the capital of France?\nAnd of Italy?\n");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let replies: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(replies.len() >= 2, "two turns, two replies:\n{text}");
    assert!(text.contains("Paris"), "{text}");
    assert!(text.contains("Rome"), "{text}");
    assert!(!text.contains("<|im_end|>"), "{text}");
}

#[test]
fn few_shot_and_perplexity_report_json() {
    let tmp = tempfile::tempdir().unwrap();
    let ex = tmp.path().join("examples.tsv");
    std::fs::write(
        &ex,
        "text\tlabel\nI loved every minute of it.\tpositive\nA dull, lifeless film.\tnegative\n\
        A triumph of warmth and wit.\tpositive\nTedious and far too long.\tnegative\n",
    )
    .unwrap();
    let data = tmp.path().join("data.tsv");
    std::fs::write(&data, "text\tlabel\nWonderful acting and a moving story.\tpositive\nBoring, I fell asleep.\tnegative\n").unwrap();
    let m = gguf();
    let m = m.to_str().unwrap();
    let args = [
        "lm",
        "classify",
        "--model",
        m,
        "--examples",
        ex.to_str().unwrap(),
        "--shots",
        "4",
        "--data",
        data.to_str().unwrap(),
        "--text-column",
        "text",
        "--label-column",
        "label",
        "--json",
    ];
    let out = run(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(v["total"], 2);
    assert_eq!(v["labels"], serde_json::json!(["negative", "positive"]));
    let acc = v["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    let mut bad = args.to_vec();
    bad[7] = "9";
    fails_with(&bad, "--shots 9");
    std::fs::write(&data, "text\tlabel\nfine\tneutral\n").unwrap();
    fails_with(&args, "label `neutral` is not among the labels");

    let text = tmp.path().join("text.txt");
    std::fs::write(
        &text,
        "It was the best of times, it was the worst of times, it was the age of wisdom.",
    )
    .unwrap();
    let out = run(&[
        "lm",
        "eval",
        "--model",
        m,
        "--data",
        text.to_str().unwrap(),
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    let ppl = v["perplexity"].as_f64().unwrap();
    assert!(ppl > 1.0 && ppl < 100.0, "perplexity {ppl}");
    std::fs::write(&text, b"caf\xe9\n").unwrap();
    fails_with(
        &["lm", "eval", "--model", m, "--data", text.to_str().unwrap()],
        "line 1 is not valid UTF-8",
    );
}
