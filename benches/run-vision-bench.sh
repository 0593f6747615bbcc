#!/usr/bin/env bash
# ViT training benchmark, in one run on this machine, 2 threads, fp32: training steps of the
# Fashion-MNIST configuration of configs/fashion-vit.toml (28x28 gray, patch 4, width 64,
# 6 layers, 4 heads, MLP 128, 10 classes), batch 128 of real Fashion-MNIST images, in smelt
# and in PyTorch `transformers` (ViTForImageClassification of the same configuration). Each
# step is forward, cross-entropy, backward, clipping to norm 1 and an AdamW update; the
# images are prepared before timing on both sides. Prints images per second and peak memory
# of both, the ratios, and smelt's model FLOP utilisation against the measured SGEMM peak.
#
# The reference venv lives under $HOME/.cache/smelt (REFERENCE_VENV overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${SMELT_BENCH_CACHE:-$HOME/.cache/smelt}
VENV=${REFERENCE_VENV:-$CACHE/reference-venv}
bash scripts/reference/setup-venv.sh "$VENV" >/dev/null
py="$VENV/bin/python"
export RAYON_NUM_THREADS=2 OMP_NUM_THREADS=2
data="$(cargo run --release -q -p smelt-cli -- assets path data/fashion-mnist)"
cargo bench -q -p smelt-tasks --bench vision_train --no-run >&2
sgemm=$(env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE "$py" benches/sgemm_peak.py | tail -n 1)
s=$(cargo bench -q -p smelt-tasks --bench vision_train 2>/dev/null | tail -n 1)
t=$("$py" benches/vision_train_torch.py --data "$data" --hidden 64 --layers 6 --mlp 128 2>/dev/null | tail -n 1)
echo "smelt   $s"
echo "pytorch $t"
"$py" - "$s" "$t" "$sgemm" <<'PY'
import json, sys
s, t, g = (json.loads(x) for x in sys.argv[1:4])
print(f"ViT batch {s['batch']}: images/s smelt {s['images_per_second']:.0f}"
      f"  pytorch {t['images_per_second']:.0f}"
      f"  ratio {s['images_per_second'] / t['images_per_second']:.2f}x;"
      f"  peak MB smelt {s['peak_rss_mb']:.0f}  pytorch {t['peak_rss_mb']:.0f}"
      f"  ratio {s['peak_rss_mb'] / t['peak_rss_mb']:.2f};"
      f"  smelt MFU {s['model_gflop_per_step'] / s['step_seconds_median'] / g['sgemm_gflops']:.1%}"
      f" (SGEMM peak {g['sgemm_gflops']:.0f} GFLOP/s)")
PY
