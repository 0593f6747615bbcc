#!/usr/bin/env bash
# Generation benchmark, in one run on this machine, batch 1, prompt 128 tokens, 128 generated,
# 2 threads:
#   1. SmolLM2-135M-Instruct Q4_1 (GGUF): smelt against llama.cpp, built here from the
#      llama-cpp-python sdist on PyPI (pinned version and sha256), with `llama-bench`.
#   2. GPT-2 small fp32 (random weights, standard 124M configuration): smelt against PyTorch
#      `transformers`.
# Prints prompt-processing and generation tokens/s of each, the ratios, and the
# memory-bandwidth bound (bytes of weights per token over measured read bandwidth).
#
# Caches under $HOME/.cache/smelt: the reference venv (REFERENCE_VENV overrides), the
# llama.cpp build, and the GPT-2 small checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
LLAMA_VERSION=0.3.36
LLAMA_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
CACHE=${SMELT_BENCH_CACHE:-$HOME/.cache/smelt}
VENV=${REFERENCE_VENV:-$CACHE/reference-venv}
bash scripts/reference/setup-venv.sh "$VENV" >/dev/null
py="$VENV/bin/python"
"$py" -m pip install -q cmake ninja >&2

# llama.cpp from the registry, built locally.
src="$CACHE/llama-cpp-python-$LLAMA_VERSION"
bench_bin="$src/vendor/llama.cpp/build/bin/llama-bench"
if [ ! -x "$bench_bin" ]; then
  mkdir -p "$CACHE"
  sdist="$CACHE/llama_cpp_python-$LLAMA_VERSION.tar.gz"
  if [ ! -f "$sdist" ]; then
    url=$("$py" - "$LLAMA_VERSION" <<'PY'
import json, sys, urllib.request
v = sys.argv[1]
d = json.load(urllib.request.urlopen(f"https://pypi.org/pypi/llama-cpp-python/{v}/json"))
u = [u for u in d["urls"] if u["packagetype"] == "sdist"][0]["url"]
print(urllib.request.urljoin(f"https://pypi.org/pypi/llama-cpp-python/{v}/json", u))
PY
)
    curl -fsSL -o "$sdist.part" "$url"
    mv "$sdist.part" "$sdist"
  fi
  echo "$LLAMA_SHA256  $sdist" | sha256sum -c - >&2
  tar xzf "$sdist" -C "$CACHE"
  mv "$CACHE/llama_cpp_python-$LLAMA_VERSION" "$src" 2>/dev/null || true
  (cd "$src/vendor/llama.cpp" && PATH="$VENV/bin:$PATH" cmake -B build -G Ninja \
      -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
      -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF >&2 &&
    PATH="$VENV/bin:$PATH" cmake --build build -j2 --target llama-bench >&2)
fi

export RAYON_NUM_THREADS=2 OMP_NUM_THREADS=2
gguf="$(cargo run --release -q -p smelt-cli -- assets path models/smollm2-135m-instruct-q4_1)/SmolLM2-135M-Instruct.Q4_1.gguf"
gpt2_tok="$(cargo run --release -q -p smelt-cli -- assets path models/gpt2-tokenizer)/tokenizer.json"
gpt2_dir="$CACHE/gpt2-small-random"
[ -f "$gpt2_dir/model.safetensors" ] || "$py" scripts/reference/make_gpt2_small.py "$gpt2_dir" >&2

cargo bench -q -p smelt-tasks --bench lm_generate --no-run >&2
smelt_q=$(SMELT_BENCH_MODEL="$gguf" cargo bench -q -p smelt-tasks --bench lm_generate 2>/dev/null | tail -n 1)
llama_q=$("$bench_bin" -m "$gguf" -p 128 -n 128 -t 2 -r 3 -o json 2>/dev/null)
smelt_g=$(SMELT_BENCH_MODEL="$gpt2_dir" SMELT_BENCH_TOKENIZER="$gpt2_tok" \
  cargo bench -q -p smelt-tasks --bench lm_generate 2>/dev/null | tail -n 1)
torch_g=$("$py" benches/lm_generate_torch.py --model "$gpt2_dir" --tokenizer "$gpt2_tok" 2>/dev/null | tail -n 1)

"$py" - "$smelt_q" "$llama_q" "$smelt_g" "$torch_g" <<'PY'
import json, sys
sq, lq, sg, tg = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
sq = json.loads(sq)
lpp = [r["avg_ts"] for r in lq if r["n_prompt"] > 0][0]
ltg = [r["avg_ts"] for r in lq if r["n_gen"] > 0][0]
print("SmolLM2-135M Q4_1, batch 1, 2 threads")
print(f"  prompt 128:    smelt {sq['pp_tokens_per_sec']:7.1f} tok/s   llama.cpp {lpp:7.1f} tok/s   ratio {sq['pp_tokens_per_sec'] / lpp:.2f}x")
print(f"  generate 128:  smelt {sq['tg_tokens_per_sec']:7.1f} tok/s   llama.cpp {ltg:7.1f} tok/s   ratio {sq['tg_tokens_per_sec'] / ltg:.2f}x")
print(f"  bandwidth bound: {sq['weight_bytes_per_token'] / 1e6:.1f} MB of weights per token at "
      f"{sq['read_bandwidth_gb_s']:.1f} GB/s = {sq['bandwidth_bound_tokens_per_sec']:.1f} tok/s")
print("GPT-2 small fp32 (random weights), batch 1, 2 threads")
print(f"  prompt 128:    smelt {sg['pp_tokens_per_sec']:7.1f} tok/s   PyTorch {tg['pp_tokens_per_sec']:7.1f} tok/s   ratio {sg['pp_tokens_per_sec'] / tg['pp_tokens_per_sec']:.2f}x")
print(f"  generate 128:  smelt {sg['tg_tokens_per_sec']:7.1f} tok/s   PyTorch {tg['tg_tokens_per_sec']:7.1f} tok/s   ratio {sg['tg_tokens_per_sec'] / tg['tg_tokens_per_sec']:.2f}x")
print(f"  bandwidth bound: {sg['weight_bytes_per_token'] / 1e6:.1f} MB of weights per token at "
      f"{sg['read_bandwidth_gb_s']:.1f} GB/s = {sg['bandwidth_bound_tokens_per_sec']:.1f} tok/s")
print(json.dumps({"smelt_q4_1": sq, "llama_cpp": {"pp": lpp, "tg": ltg}, "smelt_gpt2": sg, "torch_gpt2": tg}))
PY
