//! smelt side of the ViT training benchmark. Run through `benches/run-vision-bench.sh`,
//! which runs the PyTorch reference (`benches/vision_train_torch.py`) in the same invocation.
//!
//! The Fashion-MNIST configuration of `configs/fashion-vit.toml` (28x28 gray, patch 4, width
//! 64, 6 layers, 4 heads, MLP 128, 10 classes, no dropout), batch 128 of real training
//! images, normalised as by `smelt vision train` and made before timing. Each step is forward,
//! cross-entropy, backward, clipping to norm 1 and an AdamW update, as in `smelt vision
//! train`. `SMELT_BENCH_STEPS` (default 6; one more warm-up step is not timed). Prints one
//! JSON line: images per second (median step), peak resident memory, model FLOPs per step.

use burn::module::Module;
use burn::tensor::Device;
use smelt_data::augment::{image_rng, prepare, Preprocess};
use smelt_data::images::{ImageSet, ReadImages};
use smelt_models::vit::{VitClassifier, VitConfig};
use smelt_models::weights::tensor_from_vec;
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
    let steps: usize = std::env::var("SMELT_BENCH_STEPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let batch: usize = std::env::var("SMELT_BENCH_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(128);
    let device = Device::flex().autodiff();
    let dir = smelt_data::assets::locate("data/fashion-mnist").expect("fashion-mnist asset");
    let set = ImageSet::read(&dir, &ReadImages::default()).expect("images read");
    let labels: Vec<u32> = set
        .labels
        .iter()
        .map(|l| l.parse().expect("digit"))
        .collect();
    // `SMELT_BENCH_VIT=hidden,layers,heads,mlp,patch` tries other shapes.
    let shape: Vec<usize> = std::env::var("SMELT_BENCH_VIT")
        .unwrap_or_else(|_| "64,6,4,128,4".into())
        .split(',')
        .map(|v| v.parse().expect("SMELT_BENCH_VIT: five integers"))
        .collect();
    let config =
        VitConfig::new(28, shape[4], 1, [shape[0], shape[1], shape[2], shape[3]]).expect("config");
    let pre = Preprocess {
        size: 28,
        channels: 1,
        mean: vec![0.2860],
        std: vec![0.3530],
    };
    let batches: Vec<(Vec<f32>, Vec<u32>)> = (0..=steps)
        .map(|s| {
            let idx: Vec<usize> = (0..batch).map(|i| (s * batch + i) % set.len()).collect();
            let pixels = idx
                .iter()
                .flat_map(|&i| prepare(&set.images[i], &pre, None, &mut image_rng(0, 0, i)))
                .collect();
            (pixels, idx.iter().map(|&i| labels[i]).collect())
        })
        .collect();
    let mut model = VitClassifier::init(&config, 10, 0, &device).expect("model");
    let mut optim = AdamW::new(AdamWConfig {
        weight_decay: 0.05,
        ..AdamWConfig::default()
    });
    let mut times = Vec::new();
    for (step, (pixels, targets)) in batches.into_iter().enumerate() {
        let t = Instant::now();
        let images = tensor_from_vec(pixels, [batch, 1, 28, 28], &device);
        let loss = smelt_models::fused::cross_entropy(model.forward(images), &targets);
        let value = loss.clone().into_scalar::<f32>();
        let forward = t.elapsed().as_secs_f64();
        let mut grads = GradStore::collect(&model, &loss.backward());
        let backward = t.elapsed().as_secs_f64() - forward;
        grads.clip_global_norm(1.0);
        model = optim.step(model, &grads, 1e-3);
        let secs = t.elapsed().as_secs_f64();
        eprintln!(
            "step {step}: loss {value:.4}, {secs:.3} s (forward {forward:.3}, backward \
             {backward:.3})"
        );
        if step > 0 {
            times.push(secs);
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "{}",
        serde_json::json!({
            "batch": batch,
            "step_seconds_median": median,
            "images_per_second": batch as f64 / median,
            "peak_rss_mb": peak_rss_mb(),
            // Forward, and twice that for the backward pass.
            "model_gflop_per_step": 3.0 * config.forward_flops() * batch as f64 / 1e9,
            "params": model.num_params(),
        })
    );
}
