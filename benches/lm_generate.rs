//! smelt side of the generation benchmark: batch 1, a prompt of exactly P tokens, then G
//! generated tokens (greedy, end-of-sequence ignored), timed separately. Run through
//! `benches/run-lm-bench.sh`, which runs llama.cpp and PyTorch in the same invocation.
//!
//! Environment: `SMELT_BENCH_MODEL` (GGUF file or HF directory, default the SmolLM2 asset),
//! `SMELT_BENCH_TOKENIZER` (optional tokenizer.json), `SMELT_BENCH_PROMPT_TOKENS` (128),
//! `SMELT_BENCH_GEN_TOKENS` (128), `SMELT_BENCH_REPS` (3). Prints one JSON line with the
//! median speeds, the bytes of weights read per generated token, and the measured memory
//! read bandwidth (two threads summing a 512 MB buffer).

use burn::tensor::Device;
use rayon::prelude::*;
use smelt_tasks::lm::{generate, GenerateOptions, LanguageModel, Sampling};
use std::path::PathBuf;
use std::time::Instant;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn bandwidth_gb_s() -> f64 {
    let buf = vec![1.0f32; 128 << 20];
    let mut best = 0f64;
    for _ in 0..5 {
        let t = Instant::now();
        // Sixteen independent partial sums per chunk, so the reduction vectorises and the
        // loop is limited by memory, not by a chain of dependent additions.
        let s: f32 = buf
            .par_chunks(1 << 16)
            .map(|c| {
                let mut acc = [0f32; 16];
                for v in c.chunks_exact(16) {
                    for j in 0..16 {
                        acc[j] += v[j];
                    }
                }
                acc.iter().sum::<f32>()
            })
            .sum();
        let dt = t.elapsed().as_secs_f64();
        assert!(s > 0.0);
        best = best.max((buf.len() * 4) as f64 / dt / 1e9);
    }
    best
}

fn main() {
    // The allocator settings of the `smelt` binary.
    // SAFETY: first thing in `main`, before any other thread is started.
    unsafe { smelt_tasks::allocator::keep_freed_memory() };
    let model: PathBuf = std::env::var("SMELT_BENCH_MODEL")
        .map(Into::into)
        .unwrap_or_else(|_| {
            smelt_data::assets::locate("models/smollm2-135m-instruct-q4_1")
                .expect("SmolLM2 asset")
                .join("SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    let tokenizer = std::env::var("SMELT_BENCH_TOKENIZER")
        .ok()
        .map(PathBuf::from);
    let p = env_usize("SMELT_BENCH_PROMPT_TOKENS", 128);
    let g = env_usize("SMELT_BENCH_GEN_TOKENS", 128);
    let reps = env_usize("SMELT_BENCH_REPS", 3);
    let lm =
        LanguageModel::load(&model, tokenizer.as_deref(), &Device::flex()).expect("load model");
    let text = "It is a truth universally acknowledged, that a single man in possession of a good \
                fortune, must be in want of a wife. ";
    let mut ids = Vec::new();
    while ids.len() < p {
        ids.extend(lm.tokenizer.encode(text, false).expect("tokenize"));
    }
    ids.truncate(p);
    let options = GenerateOptions {
        max_new_tokens: g,
        sampling: Sampling::greedy(),
        stop: vec![],
        ignore_eos: true,
    };
    // One warm-up run, then timed ones.
    generate(&lm, &[ids.clone()], &options, |_, _| {}).expect("generate");
    let mut pp = Vec::new();
    let mut tg = Vec::new();
    for _ in 0..reps {
        let (gens, stats) = generate(&lm, &[ids.clone()], &options, |_, _| {}).expect("generate");
        assert_eq!(gens[0].tokens.len(), g);
        pp.push(stats.prompt_tokens as f64 / stats.prompt_seconds);
        // The first generated token comes from the prompt pass; the rest are decode steps.
        tg.push((stats.generated_tokens - 1) as f64 / stats.generate_seconds);
    }
    let weight_bytes = weight_bytes(&model);
    let bw = bandwidth_gb_s();
    println!(
        "{}",
        serde_json::json!({
            "model": model.display().to_string(),
            "prompt_tokens": p,
            "gen_tokens": g,
            "pp_tokens_per_sec": median(pp),
            "tg_tokens_per_sec": median(tg),
            "weight_bytes_per_token": weight_bytes,
            "read_bandwidth_gb_s": bw,
            "bandwidth_bound_tokens_per_sec": bw * 1e9 / weight_bytes as f64,
            "threads": rayon::current_num_threads(),
        })
    );
}

/// Bytes of weights a decode step reads: the whole checkpoint minus the embedding rows that
/// are only looked up (they are read in full only when tied to the output projection).
fn weight_bytes(model: &std::path::Path) -> u64 {
    if model.is_dir() {
        std::fs::metadata(model.join("model.safetensors"))
            .map(|m| m.len())
            .unwrap_or(0)
    } else {
        std::fs::metadata(model).map(|m| m.len()).unwrap_or(0)
    }
}
