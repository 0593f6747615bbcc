#!/usr/bin/env bash
# Fine-tuning step benchmark, smelt and PyTorch side by side on this machine in one run:
# MiniLM-L6 classifier, batch 16, sequence 128, fp32, 2 threads. Prints both results, the
# speed and memory ratios, and smelt's model FLOP utilisation against a measured SGEMM peak.
#
# The PyTorch reference lives in a throw-away venv outside the repo (created on first use by
# scripts/reference/setup-venv.sh; REFERENCE_VENV overrides its location).
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-5}
VENV=${REFERENCE_VENV:-$HOME/.cache/smelt/reference-venv}
bash scripts/reference/setup-venv.sh "$VENV" >/dev/null
py="$VENV/bin/python"
model=$(cargo run --release -q -p smelt-cli -- assets path models/all-minilm-l6-v2)

export RAYON_NUM_THREADS=2 OMP_NUM_THREADS=2
smelt_json=$(SMELT_BENCH_MODEL="$model" SMELT_BENCH_STEPS=$STEPS \
  cargo bench -q -p smelt-tasks --bench classify_step 2>/dev/null | tail -n 1)
torch_json=$("$py" benches/classify_step_torch.py --model "$model" --steps "$STEPS" | tail -n 1)
sgemm_json=$(env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE "$py" benches/sgemm_peak.py | tail -n 1)

echo "smelt:   $smelt_json"
echo "pytorch: $torch_json"
echo "sgemm:   $sgemm_json"
"$py" - "$smelt_json" "$torch_json" "$sgemm_json" <<'PY'
import json, sys
s, t, g = (json.loads(a) for a in sys.argv[1:4])
flops = s["model_gflop_per_step"]
print(f"samples/s  smelt {s['samples_per_sec']:.2f}  pytorch {t['samples_per_sec']:.2f}  "
      f"ratio {s['samples_per_sec'] / t['samples_per_sec']:.2f}x")
print(f"peak RSS   smelt {s['peak_rss_mb']:.0f} MB  pytorch {t['peak_rss_mb']:.0f} MB")
print(f"MFU        smelt {flops / s['step_seconds_median'] / g['sgemm_gflops']:.1%}  "
      f"pytorch {flops / t['step_seconds_median'] / g['sgemm_gflops']:.1%}  "
      f"(model {flops:.1f} GFLOP/step, SGEMM peak {g['sgemm_gflops']:.1f} GFLOP/s)")
PY
