#!/usr/bin/env bash
# LM training benchmark, in one run on this machine, 2 threads, fp32:
#   1. LoRA fine-tuning steps of SmolLM2-135M (rank 8 on q_proj/v_proj, batch 4 x 256):
#      smelt on the Q4_1 GGUF (base kept quantized) against PyTorch `transformers` + `peft`
#      (the same GGUF loaded in fp32).
#   2. Training steps of a GPT-2 from scratch (4 layers, width 256, an 8,192-token vocabulary
#      trained on five Austen novels, batch 16 x 256): smelt against PyTorch `transformers`.
# Prints tokens/s and peak memory of both, the ratios, and smelt's model FLOP utilisation
# against the measured SGEMM peak.
#
# The reference venv lives under $HOME/.cache/smelt (REFERENCE_VENV overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${SMELT_BENCH_CACHE:-$HOME/.cache/smelt}
VENV=${REFERENCE_VENV:-$CACHE/reference-venv}
bash scripts/reference/setup-venv.sh "$VENV" >/dev/null
py="$VENV/bin/python"
export RAYON_NUM_THREADS=2 OMP_NUM_THREADS=2
assets="$(dirname "$(cargo run --release -q -p smelt-cli -- assets path data/jane-austen)")"
assets="$(dirname "$assets")"
cargo bench -q -p smelt-tasks --bench lm_train --no-run >&2
# The from-scratch configuration of the README: an 8,192-token BPE vocabulary trained on the
# five novels other than Persuasion (whose text the steps train on).
tok="$CACHE/bench-austen-tokenizer.json"
a="$assets/data/jane-austen"
cargo run --release -q -p smelt-cli -- tokenizer train --vocab-size 8192 --out "$tok" \
  "$a/emma.txt" "$a/mansfieldpark.txt" "$a/northangerabbey.txt" "$a/prideprejudice.txt" \
  "$a/sensesensibility.txt" 2>/dev/null
sgemm=$(env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE "$py" benches/sgemm_peak.py | tail -n 1)
for mode in lora scratch; do
  s=$(SMELT_BENCH_MODE=$mode SMELT_BENCH_TOKENIZER="$tok" \
    cargo bench -q -p smelt-tasks --bench lm_train 2>/dev/null | tail -n 1)
  t=$("$py" benches/lm_train_torch.py --mode "$mode" --assets "$assets" --tokenizer "$tok" \
    2>/dev/null | tail -n 1)
  echo "smelt   $s"
  echo "pytorch $t"
  "$py" - "$s" "$t" "$sgemm" <<'PY'
import json, sys
s, t, g = (json.loads(x) for x in sys.argv[1:4])
print(f"{s['mode']}: tokens/s smelt {s['tokens_per_second']:.0f}  pytorch {t['tokens_per_second']:.0f}"
      f"  ratio {s['tokens_per_second'] / t['tokens_per_second']:.2f}x;"
      f"  peak MB smelt {s['peak_rss_mb']:.0f}  pytorch {t['peak_rss_mb']:.0f}"
      f"  ratio {s['peak_rss_mb'] / t['peak_rss_mb']:.2f};"
      f"  smelt MFU {s['model_gflop_per_step'] / s['step_seconds_median'] / g['sgemm_gflops']:.1%}"
      f" (SGEMM peak {g['sgemm_gflops']:.0f} GFLOP/s)")
PY
done
