"""PyTorch side of the classifier training-step benchmark.

Usage:
    python benches/classify_step_torch.py --model /path/to/all-minilm-l6-v2 [--steps 5]

One step is what smelt's trainer does per batch: forward pass of BertForSequenceClassification
(MiniLM-L6, 2 labels) in train mode with the config's dropout, mean cross-entropy, backward,
one AdamW step. Inputs are fixed: batch 16, sequence 128, token ids drawn from a seeded
generator, every position attended. fp32 on the CPU with 2 threads. Two warm-up steps, then
--steps timed steps; the median is reported as one JSON object:
    {"impl": "pytorch", "samples_per_sec", "step_seconds_median", "peak_rss_mb",
     "torch_version", ...}
peak_rss_mb is the process's maximum resident set size (getrusage), imports and model load
included; rss_after_load_mb is the same figure taken before the first step.

Run it with the environment made by scripts/reference/setup-venv.sh.
"""

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import BertForSequenceClassification

WARMUP_STEPS = 2
SEED = 0
# Ids below this are [PAD], [unusedN], [UNK], [CLS], [SEP], [MASK] in BERT's uncased vocab.
FIRST_ORDINARY_ID = 1000


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="model folder (HF layout)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--attn", choices=("sdpa", "eager"), default="sdpa", help="attention implementation"
    )
    args = parser.parse_args()
    for name in ("steps", "batch_size", "seq_len", "threads"):
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, found {getattr(args, name)}")
    if not (args.model / "model.safetensors").is_file():
        fail(f"{args.model / 'model.safetensors'} does not exist")
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)

    model = BertForSequenceClassification.from_pretrained(
        args.model, num_labels=2, attn_implementation=args.attn
    )
    if args.seq_len > model.config.max_position_embeddings:
        fail(
            f"--seq-len {args.seq_len} exceeds max_position_embeddings "
            f"{model.config.max_position_embeddings}"
        )
    model.train()
    # ru_maxrss is in KiB on Linux. The imports alone account for much of it.
    rss_after_load_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    # Fixed inputs: [batch, seq] ids, all positions attended, random labels.
    generator = torch.Generator().manual_seed(SEED)
    shape = (args.batch_size, args.seq_len)
    input_ids = torch.randint(
        FIRST_ORDINARY_ID, model.config.vocab_size, shape, generator=generator
    )
    token_type_ids = torch.zeros(shape, dtype=torch.int64)
    attention_mask = torch.ones(shape, dtype=torch.int64)
    labels = torch.randint(0, 2, (args.batch_size,), generator=generator)

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=5e-5,
        betas=(0.9, 0.999),
        eps=1e-8,
    )

    def train_step():
        logits = model(
            input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask
        ).logits  # [batch, 2]
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    for _ in range(WARMUP_STEPS):
        train_step()
    seconds = []
    for step in range(args.steps):
        started = time.perf_counter()
        loss = train_step()
        seconds.append(time.perf_counter() - started)
        print(
            f"step {step + 1}/{args.steps}: {seconds[-1]:.3f} s, loss {loss:.4f}", file=sys.stderr
        )

    median = statistics.median(seconds)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "impl": "pytorch",
                "samples_per_sec": args.batch_size / median,
                "step_seconds_median": median,
                "peak_rss_mb": peak_rss_mb,
                "rss_after_load_mb": rss_after_load_mb,
                "torch_version": torch.__version__,
                "transformers_version": transformers.__version__,
                "batch_size": args.batch_size,
                "seq_len": args.seq_len,
                "threads": args.threads,
                "attn_implementation": args.attn,
                "warmup_steps": WARMUP_STEPS,
                "step_seconds": seconds,
            }
        )
    )


if __name__ == "__main__":
    main()
