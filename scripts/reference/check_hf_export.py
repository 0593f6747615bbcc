"""Checks that a directory written by `smelt classify train` loads in PyTorch `transformers`
and gives the same logits as smelt.

Usage (inside the reference venv of setup-venv.sh):
    python scripts/reference/check_hf_export.py --model OUT_DIR --smelt target/release/smelt

It loads OUT_DIR with AutoModelForSequenceClassification, computes logits for fixed texts,
runs `smelt classify predict --model OUT_DIR --logits` on the same texts, and prints the
largest absolute difference. Exits 1 if it exceeds --tolerance (default 1e-4).
"""

import argparse
import json
import subprocess
import sys

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

TEXTS = [
    "A gorgeous, witty, seductive movie.",
    "The plot is nothing but boilerplate clichés from start to finish.",
    "It's not a bad film, just a forgettable one.",
    "Café prices in Zürich are absurd!!",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--smelt", default="target/release/smelt")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args()

    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model).eval()
    with torch.no_grad():
        reference = []
        for text in TEXTS:
            enc = tokenizer(text, return_tensors="pt", truncation=True, max_length=128)
            reference.append(model(**enc).logits[0].tolist())

    out = subprocess.run(
        [args.smelt, "classify", "predict", "--model", args.model, "--logits", *TEXTS],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    ours = [json.loads(line)["logits"] for line in out.splitlines() if line.strip()]
    worst = max(abs(a - b) for r, o in zip(reference, ours) for a, b in zip(r, o))
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    print(json.dumps({"labels": labels, "max_abs_diff": worst, "texts": len(TEXTS)}))
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
