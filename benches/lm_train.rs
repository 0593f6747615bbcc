//! smelt side of the LM training benchmark. Run through `benches/run-lm-train-bench.sh`,
//! which runs the PyTorch reference in the same invocation.
//!
//! `SMELT_BENCH_MODE=lora` (default): LoRA steps on SmolLM2-135M from its Q4_1 GGUF (rank 8,
//! alpha 16, q_proj and v_proj, no dropout), batch 4 × 256 tokens of Jane Austen text, every
//! token a target. `SMELT_BENCH_MODE=scratch`: full steps of a new GPT-2 (4 layers, 4 heads,
//! width 256, context 256, the vocabulary of `SMELT_BENCH_TOKENIZER`, GPT-2's by default),
//! batch 16 × 256. Each step is forward,
//! loss, backward, gradient clipping and an AdamW update, as in `smelt lm train`.
//! `SMELT_BENCH_STEPS` (default 6; the first is a warm-up and not timed). Prints one JSON
//! line: tokens per second (median over steps), peak resident memory, model FLOPs per token.

use burn::module::Module;
use burn::tensor::Device;
use smelt_data::lm_data::{text_blocks, LmSequence};
use smelt_models::causal::{random_gpt2, Arch, LmConfig};
use smelt_models::lora::{self, LoraConfig};
use smelt_tasks::lm::LanguageModel;
use smelt_tasks::lm_train::sequence_loss;
use smelt_train::grads::GradStore;
use smelt_train::optim::{AdamW, AdamWConfig};
use std::time::Instant;

#[path = "common.rs"]
mod common;
use common::{keep_freed_memory, peak_rss_mb};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    // SAFETY: first thing in `main`, before any other thread is started.
    unsafe { keep_freed_memory() };
    let mode = std::env::var("SMELT_BENCH_MODE").unwrap_or_else(|_| "lora".into());
    let steps: usize = std::env::var("SMELT_BENCH_STEPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let device = Device::flex().autodiff();
    let austen = smelt_data::assets::locate("data/jane-austen").expect("jane-austen asset");
    let (model, tokenizer, batch, seq) = match mode.as_str() {
        "lora" => {
            let dir = smelt_data::assets::locate("models/smollm2-135m-instruct-q4_1")
                .expect("SmolLM2 asset");
            let lm =
                LanguageModel::load(&dir.join("SmolLM2-135M-Instruct.Q4_1.gguf"), None, &device)
                    .expect("model loads");
            let config = LoraConfig {
                dropout: 0.0,
                ..LoraConfig::defaults(Arch::Llama)
            };
            let model = lora::attach(lm.model, &config, 0).expect("adapters attach");
            (model, lm.tokenizer, 4, 256)
        }
        "scratch" => {
            let tok = match std::env::var_os("SMELT_BENCH_TOKENIZER") {
                Some(t) => std::path::PathBuf::from(t),
                None => smelt_data::assets::locate("models/gpt2-tokenizer")
                    .expect("gpt2 tokenizer")
                    .join("tokenizer.json"),
            };
            let tokenizer =
                smelt_data::lm_tokenizer::LmTokenizer::from_hf(&tok).expect("tokenizer loads");
            let config = LmConfig {
                arch: Arch::Gpt2,
                vocab_size: tokenizer.base_vocab_size(),
                hidden: 256,
                intermediate: 1024,
                layers: 4,
                heads: 4,
                kv_heads: 4,
                context: 256,
                norm_eps: 1e-5,
                rope_theta: 10000.0,
                tie_embeddings: true,
            };
            (random_gpt2(config, 0, &device), tokenizer, 16, 256)
        }
        other => panic!("SMELT_BENCH_MODE={other}: expected lora or scratch"),
    };
    let (blocks, _) = text_blocks(
        &[austen.join("persuasion.txt")],
        &tokenizer,
        seq,
        model.config.vocab_size,
    )
    .expect("text tokenizes");
    let c = model.config.clone();
    // Matrix FLOPs per token: 6 per weight of the projections and the output layer for full
    // training; with a frozen base, 4 (forward and the gradient of the input, no weight
    // gradient) plus the adapters; attention scores and context add 6·2·seq·width per layer.
    let kv = c.kv_heads * c.head_dim();
    let mlp = if c.arch == Arch::Llama { 3 } else { 2 };
    let per_layer =
        (2 * c.hidden * c.hidden + 2 * c.hidden * kv + mlp * c.hidden * c.intermediate) as f64;
    let matrices = c.layers as f64 * per_layer + (c.vocab_size * c.hidden) as f64;
    let attention = 6.0 * 2.0 * seq as f64 * c.hidden as f64 * c.layers as f64 / 2.0;
    let flops_per_token = match mode.as_str() {
        "lora" => 4.0 * matrices + attention,
        _ => 6.0 * matrices + attention,
    };
    let mut optim = AdamW::new(AdamWConfig {
        weight_decay: 0.0,
        ..AdamWConfig::default()
    });
    let mut model = model;
    let eos = tokenizer.eos.unwrap_or(0);
    let mut times = Vec::new();
    for step in 0..steps {
        let rows: Vec<LmSequence> = (0..batch)
            .map(|i| blocks[(step * batch + i) % blocks.len()].clone())
            .collect();
        let t = Instant::now();
        let loss = sequence_loss(&model, &rows, eos).expect("loss");
        let value = loss.clone().into_scalar::<f32>();
        let mut grads = GradStore::collect(&model, &loss.backward());
        grads.clip_global_norm(1.0);
        model = optim.step(model, &grads, 1e-4);
        let secs = t.elapsed().as_secs_f64();
        eprintln!("step {step}: loss {value:.4}, {secs:.3} s");
        if step > 0 {
            times.push(secs);
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let tokens = (batch * seq) as f64;
    println!(
        "{}",
        serde_json::json!({
            "mode": mode,
            "batch": batch,
            "seq": seq,
            "step_seconds_median": median,
            "tokens_per_second": tokens / median,
            "peak_rss_mb": peak_rss_mb(),
            "model_gflop_per_step": flops_per_token * tokens / 1e9,
            "trainable_parameters": match mode.as_str() {
                "lora" => lora::adapter_parameters(&model),
                _ => model.num_params(),
            },
        })
    );
}
