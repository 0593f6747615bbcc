//! smelt side of the fine-tuning step benchmark: MiniLM-L6 classifier, batch 16, sequence
//! 128, fp32, forward + cross-entropy + backward + clipping + AdamW. Run through
//! `benches/run-classify-bench.sh`, which runs the PyTorch side in the same invocation.
//!
//! Environment: `SMELT_BENCH_MODEL` (model directory, default the MiniLM asset),
//! `SMELT_BENCH_STEPS` (timed steps, default 5), `SMELT_BENCH_BATCH`, `SMELT_BENCH_SEQ`.

use burn::tensor::Device;
use smelt_models::bert::{cross_entropy, labels_tensor, BertClassifier, BertConfig, EncoderInput};
use smelt_models::weights::WeightFile;
use smelt_train::grads::GradStore;
use smelt_train::optim::{AdamW, AdamWConfig};
use std::time::Instant;

// The same allocator as the `smelt` binary.
#[path = "common.rs"]
mod common;
use common::{keep_freed_memory, peak_rss_mb};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // SAFETY: first thing in `main`, before any other thread is started.
    unsafe { keep_freed_memory() };
    let dir = std::env::var("SMELT_BENCH_MODEL")
        .map(Into::into)
        .unwrap_or_else(|_| {
            smelt_data::assets::locate("models/all-minilm-l6-v2").expect("MiniLM asset")
        });
    let steps = env_usize("SMELT_BENCH_STEPS", 5);
    let batch = env_usize("SMELT_BENCH_BATCH", 16);
    let seq = env_usize("SMELT_BENCH_SEQ", 128);

    let device = Device::flex().autodiff();
    let config = BertConfig::from_file(&dir.join("config.json")).expect("config");
    let weights = WeightFile::open(&dir.join("model.safetensors")).expect("weights");
    let (mut model, _) =
        BertClassifier::load(&config, &weights, 2, false, 0, &device).expect("model");
    drop(weights);
    if std::env::var("SMELT_BENCH_FREEZE_EMBEDDINGS").is_ok() {
        let e = &mut model.bert.embeddings;
        e.word_embeddings = e.word_embeddings.clone().set_require_grad(false);
    }

    // Fixed pseudo-random tokens (not special ids), full attention mask.
    let mut state = 12345u64;
    let ids: Vec<i64> = (0..batch * seq)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            1000 + ((state >> 33) % (config.vocab_size as u64 - 1000)) as i64
        })
        .collect();
    let labels: Vec<i64> = (0..batch).map(|i| (i % 2) as i64).collect();
    let input = EncoderInput::from_host(
        ids,
        vec![0; batch * seq],
        vec![1; batch * seq],
        batch,
        seq,
        &device,
    );
    let mut optim = AdamW::new(AdamWConfig::default());

    // (total, forward, backward, optimizer) seconds of each timed step.
    let mut times: Vec<[f64; 4]> = Vec::new();
    for step in 0..steps + 2 {
        smelt_models::dropout::reseed(step as u64);
        let start = Instant::now();
        let logits = model.forward(input.clone());
        let loss = cross_entropy(logits, labels_tensor(&labels, &device));
        let _ = loss.clone().into_scalar::<f32>();
        let forward = start.elapsed().as_secs_f64();
        let mut grads = GradStore::collect(&model, &loss.backward());
        let backward = start.elapsed().as_secs_f64() - forward;
        grads.clip_global_norm(1.0);
        model = optim.step(model, &grads, 1e-5);
        // Force the update to finish before stopping the clock.
        let _ = model.classifier.bias.val().into_data();
        let total = start.elapsed().as_secs_f64();
        if step >= 2 {
            times.push([total, forward, backward, total - forward - backward]);
        }
    }
    times.sort_by(|a, b| a[0].total_cmp(&b[0]));
    let [median, forward, backward, optimizer] = times[times.len() / 2];
    let h = config.hidden_size as f64;
    let i = config.intermediate_size as f64;
    let l = config.num_hidden_layers as f64;
    let tokens = (batch * seq) as f64;
    // Matmul FLOPs of forward + backward (3x forward): dense layers and attention.
    let dense = 2.0 * tokens * l * (4.0 * h * h + 2.0 * h * i);
    let attention = 2.0 * 2.0 * l * batch as f64 * (seq * seq) as f64 * h;
    let flops = 3.0 * (dense + attention);
    println!(
        "{}",
        serde_json::json!({
            "impl": "smelt",
            "batch": batch,
            "seq": seq,
            "steps": steps,
            "step_seconds_median": median,
            "forward_seconds": forward,
            "backward_seconds": backward,
            "clip_and_optimizer_seconds": optimizer,
            "samples_per_sec": batch as f64 / median,
            "model_gflop_per_step": flops / 1e9,
            "achieved_gflops": flops / median / 1e9,
            "peak_rss_mb": peak_rss_mb(),
        })
    );
}
