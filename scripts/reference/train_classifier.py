"""PyTorch reference for smelt's text-classifier fine-tuning recipe.

Usage:
    python scripts/reference/train_classifier.py \
        --model /path/to/all-minilm-l6-v2 --train train.tsv --test test.tsv \
        --epochs 3 --batch-size 32 --lr 5e-5 --max-length 128 --seed 42 \
        --warmup-ratio 0.1 --weight-decay 0.01 --json

Run it with the environment made by scripts/reference/setup-venv.sh (torch 2.15.0,
transformers 5.23.0). scripts/prepare-sentiment.sh makes suitable TSV files.

Data: TSV files with the header "text<TAB>label", no quoting, one example a line. Labels are
strings; class i is the i-th label of the training file in sorted order.

Recipe (a plain loop, the same steps smelt's trainer takes):
  - BertForSequenceClassification from the model folder, keeping the checkpoint's pooler; the
    classifier is newly initialised after torch.manual_seed(seed) (normal, std =
    initializer_range; zero bias).
  - Dropout as in the model config (train mode while training).
  - Each epoch visits the training rows in a new order drawn from a generator seeded with
    the seed; the last batch may be short. Each batch is padded to its longest row.
  - Loss: mean cross-entropy. Gradients are clipped to a global L2 norm of 1.0.
  - AdamW (betas 0.9/0.999, eps 1e-8); weight decay on every parameter except biases and
    LayerNorm weights.
  - Learning rate at optimiser step s (0-based) of T = epochs * ceil(rows / batch):
    lr * s / W while s < W, then lr * max(0, (T - s) / (T - W)), with W = ceil(warmup_ratio * T).
  - After each epoch: accuracy and macro-F1 (unweighted mean over classes of the training
    file) on the test file.

Output: one line per epoch and a final summary; with --json each is one JSON object on
stdout. Progress goes to stderr.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import AutoTokenizer, BertForSequenceClassification

PROGRESS_EVERY = 20


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {text}")
    return value


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="model folder (HF layout)")
    parser.add_argument("--train", required=True, type=Path, help="training TSV")
    parser.add_argument("--test", required=True, type=Path, help="test TSV")
    parser.add_argument("--epochs", type=positive_int, default=3)
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--max-length", type=positive_int, default=128)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument(
        "--limit", type=positive_int, help="use only the first N rows of each file (smoke runs)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON lines")
    args = parser.parse_args()

    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (args.model / name).is_file():
            fail(f"{args.model / name} does not exist (expected a Hugging Face model folder)")
    if not args.lr > 0:
        fail(f"--lr must be positive, found {args.lr}")
    if not 0 <= args.warmup_ratio < 1:
        fail(f"--warmup-ratio must lie in [0, 1), found {args.warmup_ratio}")
    if not args.weight_decay >= 0:
        fail(f"--weight-decay must be at least 0, found {args.weight_decay}")
    if args.max_length < 2:
        fail(f"--max-length must leave room for [CLS] and [SEP], found {args.max_length}")
    return args


def read_tsv(path, limit):
    """Rows of (text, label) from a headed TSV file without quoting."""
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as err:
        fail(f"cannot read {path}: {err}")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines or lines[0].rstrip("\r") != "text\tlabel":
        found = lines[0] if lines else "an empty file"
        fail(f"{path}:1: expected the header 'text<TAB>label', found {found!r}")

    rows = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.rstrip("\r").split("\t")
        if len(fields) != 2:
            fail(f"{path}:{number}: expected 2 tab-separated fields, found {len(fields)}")
        text, label = fields
        if not text.strip() or not label:
            fail(f"{path}:{number}: empty text or label")
        rows.append((text, label))
        if limit is not None and len(rows) == limit:
            break
    if not rows:
        fail(f"{path}: no rows after the header")
    return rows


def pad_batch(encoded, indices, pad_id):
    """Stack the encodings at indices into tensors [batch, longest] padded with pad_id."""
    longest = max(len(encoded[i]["input_ids"]) for i in indices)
    shape = (len(indices), longest)
    input_ids = torch.full(shape, pad_id, dtype=torch.int64)
    token_type_ids = torch.zeros(shape, dtype=torch.int64)
    attention_mask = torch.zeros(shape, dtype=torch.int64)
    for row, i in enumerate(indices):
        n = len(encoded[i]["input_ids"])
        input_ids[row, :n] = torch.tensor(encoded[i]["input_ids"])
        token_type_ids[row, :n] = torch.tensor(encoded[i]["token_type_ids"])
        attention_mask[row, :n] = 1
    return input_ids, token_type_ids, attention_mask


def lr_factor(step, warmup_steps, total_steps):
    if step < warmup_steps:
        return step / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def evaluate(model, encoded, labels, batch_size, pad_id, num_labels):
    """Accuracy, macro-F1 and mean loss over the rows, in file order."""
    model.eval()
    predictions = []
    loss_sum = 0.0
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            indices = list(range(start, min(start + batch_size, len(encoded))))
            input_ids, token_type_ids, attention_mask = pad_batch(encoded, indices, pad_id)
            logits = model(
                input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask
            ).logits  # [batch, num_labels]
            target = labels[start : start + len(indices)]
            loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
            predictions.append(logits.argmax(dim=-1))
    predicted = torch.cat(predictions)

    accuracy = (predicted == labels).float().mean().item()
    f1_scores = []
    for c in range(num_labels):
        true_pos = ((predicted == c) & (labels == c)).sum().item()
        false_pos = ((predicted == c) & (labels != c)).sum().item()
        false_neg = ((predicted != c) & (labels == c)).sum().item()
        denom = 2 * true_pos + false_pos + false_neg
        f1_scores.append(2 * true_pos / denom if denom else 0.0)
    return accuracy, sum(f1_scores) / num_labels, loss_sum / len(encoded)


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)

    # Data.
    train_rows = read_tsv(args.train, args.limit)
    test_rows = read_tsv(args.test, args.limit)
    label_names = sorted({label for _, label in train_rows})
    if len(label_names) < 2:
        fail(f"{args.train}: need at least 2 distinct labels, found {label_names}")
    label_index = {name: i for i, name in enumerate(label_names)}
    unknown = sorted({label for _, label in test_rows} - set(label_names))
    if unknown:
        fail(f"{args.test}: labels not in the training file: {unknown}")
    train_labels = torch.tensor([label_index[lab] for _, lab in train_rows], dtype=torch.int64)
    test_labels = torch.tensor([label_index[lab] for _, lab in test_rows], dtype=torch.int64)

    # Tokenise once without padding; batches are padded to their own longest row.
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    pad_id = tokenizer.pad_token_id

    def encode(rows):
        enc = tokenizer([text for text, _ in rows], truncation=True, max_length=args.max_length)
        return [
            {"input_ids": ids, "token_type_ids": types}
            for ids, types in zip(enc["input_ids"], enc["token_type_ids"], strict=True)
        ]

    train_enc = encode(train_rows)
    test_enc = encode(test_rows)

    # The checkpoint's encoder and pooler, with a fresh, seeded classifier (as smelt does).
    model = BertForSequenceClassification.from_pretrained(args.model, num_labels=len(label_names))
    std = model.config.initializer_range
    torch.manual_seed(args.seed)
    with torch.no_grad():
        model.classifier.weight.normal_(mean=0.0, std=std)
        model.classifier.bias.zero_()

    # Optimiser and schedule.
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(param)
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    steps_per_epoch = math.ceil(len(train_enc) / args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = math.ceil(args.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, total_steps)
    )
    order_rng = torch.Generator().manual_seed(args.seed)

    config = {
        "model": str(args.model),
        "train": str(args.train),
        "test": str(args.test),
        "train_rows": len(train_rows),
        "test_rows": len(test_rows),
        "labels": label_names,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "max_length": args.max_length,
        "seed": args.seed,
        "warmup_ratio": args.warmup_ratio,
        "warmup_steps": warmup_steps,
        "total_steps": total_steps,
        "weight_decay": args.weight_decay,
        "threads": args.threads,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
    print(f"config {json.dumps(config)}", file=sys.stderr)

    train_seconds = 0.0
    step = 0
    accuracy = macro_f1 = None
    for epoch in range(1, args.epochs + 1):
        # Train one epoch.
        model.train()
        order = torch.randperm(len(train_enc), generator=order_rng).tolist()
        loss_sum = 0.0
        started = time.perf_counter()
        for start in range(0, len(order), args.batch_size):
            indices = order[start : start + args.batch_size]
            input_ids, token_type_ids, attention_mask = pad_batch(train_enc, indices, pad_id)
            logits = model(
                input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask
            ).logits  # [batch, num_labels]
            loss = F.cross_entropy(logits, train_labels[indices])

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            loss_sum += loss.item() * len(indices)

            if step % PROGRESS_EVERY == 0 or step == total_steps:
                elapsed = train_seconds + time.perf_counter() - started
                print(
                    f"step {step}/{total_steps} loss {loss.item():.4f} "
                    f"{elapsed / step * 1000:.0f} ms/step",
                    file=sys.stderr,
                )
        epoch_seconds = time.perf_counter() - started
        train_seconds += epoch_seconds

        # Evaluate.
        accuracy, macro_f1, test_loss = evaluate(
            model, test_enc, test_labels, args.batch_size, pad_id, len(label_names)
        )
        record = {
            "epoch": epoch,
            "train_loss": loss_sum / len(order),
            "test_loss": test_loss,
            "accuracy": accuracy,
            "macro_f1": macro_f1,
            "epoch_seconds": epoch_seconds,
            "lr_end": scheduler.get_last_lr()[0],
        }
        if args.json:
            print(json.dumps(record), flush=True)
        else:
            print(
                f"epoch {epoch}: train loss {record['train_loss']:.4f}, test loss "
                f"{test_loss:.4f}, accuracy {accuracy:.4f}, macro-F1 {macro_f1:.4f}, "
                f"{epoch_seconds:.1f} s",
                flush=True,
            )

    summary = {
        "impl": "pytorch",
        "accuracy": accuracy,
        "macro_f1": macro_f1,
        "train_seconds": train_seconds,
        "samples_per_sec": args.epochs * len(train_enc) / train_seconds,
        "config": config,
    }
    if args.json:
        print(json.dumps(summary), flush=True)
    else:
        print(
            f"final: accuracy {accuracy:.4f}, macro-F1 {macro_f1:.4f}, trained in "
            f"{train_seconds:.1f} s ({summary['samples_per_sec']:.1f} samples/s)"
        )


if __name__ == "__main__":
    main()
