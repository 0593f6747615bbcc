"""Reference values for smelt's BERT sequence classifier, computed with PyTorch.

Usage:
    python scripts/reference/make_bert_fixtures.py \
        --model /path/to/all-minilm-l6-v2 \
        --out crates/smelt-models/tests/fixtures/minilm_reference.safetensors

Run it with the environment made by scripts/reference/setup-venv.sh (torch 2.15.0,
transformers 5.23.0, safetensors, numpy). The script refuses other torch or transformers
versions unless --any-version is given, because the fixture records what those versions
compute. It runs on the CPU with two threads and takes a few seconds.

It writes two files: FILE.safetensors with the tensors below, and FILE.json (same stem)
with the input texts, labels and optimiser settings.

Inputs (4 rows: three single sentences of different lengths, one sentence pair), tokenised
by the Hugging Face fast tokenizer of the model folder, padded to the longest row and
truncated to 128 tokens:
    input_ids, token_type_ids, attention_mask   [batch, seq] I64
    labels                                      [batch] I64

Classification head (pooler and classifier), initialised with torch.manual_seed(0) as
Hugging Face initialises new BERT weights (normal with std = initializer_range, zero bias).
The checkpoint may carry a pooler of its own; it is replaced, so the head is the same
whether or not the checkpoint has one. Layout is Hugging Face's [out, in]:
    head.bert.pooler.dense.weight   [hidden, hidden]
    head.bert.pooler.dense.bias     [hidden]
    head.classifier.weight          [num_labels, hidden]
    head.classifier.bias            [num_labels]

Forward pass in eval mode (no dropout), eager attention:
    out.last_hidden_state   [batch, seq, hidden]
    out.pooled              [batch, hidden]      tanh(dense(last_hidden_state[:, 0]))
    out.logits              [batch, num_labels]

One training step from the same forward pass (eval mode, so dropout is off), loss = mean
cross-entropy of the logits against the labels:
    loss                    [1]
    grad.<name>             gradient of the loss for each name in GRAD_NAMES

Then one torch.optim.AdamW step (lr 1e-3, betas (0.9, 0.999), eps 1e-8; weight decay 0.01
except on biases and LayerNorm weights, which get 0.0):
    step.<name>             updated parameter for each name in STEP_NAMES

Parameter names are those of BertForSequenceClassification ("bert." prefix). STEP_NAMES is
the part of GRAD_NAMES small enough to keep the fixture near 4 MB; it holds parameters of
both weight-decay groups, so every branch of the update is covered.
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from transformers import AutoTokenizer, BertForSequenceClassification

TORCH_VERSION = "2.15.0"
TRANSFORMERS_VERSION = "5.23.0"

# (text_a, text_b); text_b is None for a single sentence.
TEXTS = [
    ("Café prices in Zürich are absurd!!", None),
    ("Loved it.", None),
    (
        "The plot wanders for an hour, but the final act (tense, funny and strangely "
        "moving) makes up for nearly all of it.",
        None,
    ),
    ("A man is playing a guitar on stage.", "Someone performs music for a crowd."),
]
LABELS = [1, 0, 1, 0]
NUM_LABELS = 2
MAX_LENGTH = 128
SEED = 0

LEARNING_RATE = 1e-3
BETAS = (0.9, 0.999)
EPS = 1e-8
WEIGHT_DECAY = 0.01

GRAD_NAMES = [
    "bert.embeddings.LayerNorm.weight",
    "bert.embeddings.LayerNorm.bias",
    "bert.embeddings.position_embeddings.weight",
    "bert.embeddings.token_type_embeddings.weight",
    "bert.encoder.layer.0.attention.self.query.weight",
    "bert.encoder.layer.0.attention.self.query.bias",
    "bert.encoder.layer.2.attention.output.dense.weight",
    "bert.encoder.layer.3.intermediate.dense.bias",
    "bert.encoder.layer.5.output.LayerNorm.weight",
    "bert.encoder.layer.5.attention.self.value.weight",
    "bert.pooler.dense.weight",
    "bert.pooler.dense.bias",
    "classifier.weight",
    "classifier.bias",
]
# Without the [hidden, hidden] matrices and the position table, which would add 3 MB.
STEP_NAMES = [
    "bert.embeddings.LayerNorm.weight",
    "bert.embeddings.LayerNorm.bias",
    "bert.embeddings.token_type_embeddings.weight",
    "bert.encoder.layer.0.attention.self.query.bias",
    "bert.encoder.layer.3.intermediate.dense.bias",
    "bert.encoder.layer.5.output.LayerNorm.weight",
    "bert.pooler.dense.bias",
    "classifier.weight",
    "classifier.bias",
]


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="model folder (HF layout)")
    parser.add_argument("--out", required=True, type=Path, help="output .safetensors file")
    parser.add_argument(
        "--any-version", action="store_true", help="run with other torch/transformers versions"
    )
    args = parser.parse_args()

    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (args.model / name).is_file():
            fail(f"{args.model / name} does not exist (expected a Hugging Face model folder)")
    if args.out.suffix != ".safetensors":
        fail(f"--out must end in .safetensors, found {args.out}")
    if not args.out.parent.is_dir():
        fail(f"output folder {args.out.parent} does not exist")

    found = (torch.__version__.split("+")[0], transformers.__version__)
    if found != (TORCH_VERSION, TRANSFORMERS_VERSION) and not args.any_version:
        fail(
            f"expected torch {TORCH_VERSION} and transformers {TRANSFORMERS_VERSION}, "
            f"found torch {found[0]} and transformers {found[1]} (--any-version to go on)"
        )
    return args


def is_decayed(name):
    return not (name.endswith("bias") or "LayerNorm" in name)


def write_atomic(path, write):
    """Call write(tmp_path) on a temporary file beside path, then rename it onto path."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def tensor_out(t):
    return t.detach().clone().contiguous()


def main():
    args = parse_args()
    torch.set_num_threads(2)

    # Tokenise: padding="longest" overrides the fixed 128 padding in tokenizer.json.
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    batch_text = [a if b is None else (a, b) for a, b in TEXTS]
    enc = tokenizer(
        batch_text,
        padding="longest",
        truncation=True,
        max_length=MAX_LENGTH,
        return_tensors="pt",
    )
    input_ids = enc["input_ids"].to(torch.int64)  # [B, S]
    token_type_ids = enc["token_type_ids"].to(torch.int64)  # [B, S]
    attention_mask = enc["attention_mask"].to(torch.int64)  # [B, S]
    labels = torch.tensor(LABELS, dtype=torch.int64)  # [B]
    lengths = attention_mask.sum(dim=1).tolist()
    if len(set(lengths[:3])) != 3:
        fail(f"the three single sentences should differ in length, found {lengths[:3]}")

    # Model with a fresh, seeded head (pooler + classifier).
    model = BertForSequenceClassification.from_pretrained(
        args.model, num_labels=NUM_LABELS, attn_implementation="eager"
    )
    std = model.config.initializer_range
    torch.manual_seed(SEED)
    with torch.no_grad():
        for layer in (model.bert.pooler.dense, model.classifier):
            layer.weight.normal_(mean=0.0, std=std)
            layer.bias.zero_()
    params = dict(model.named_parameters())
    missing = [n for n in GRAD_NAMES if n not in params]
    if missing:
        fail(f"parameters not found in the model: {missing}")
    head = {
        "head.bert.pooler.dense.weight": model.bert.pooler.dense.weight,
        "head.bert.pooler.dense.bias": model.bert.pooler.dense.bias,
        "head.classifier.weight": model.classifier.weight,
        "head.classifier.bias": model.classifier.bias,
    }
    tensors = {name: tensor_out(t) for name, t in head.items()}

    # Forward in eval mode with autograd on: dropout is off, and the same graph gives the
    # gradients below.
    model.eval()
    bert_out = model.bert(
        input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
    )
    last_hidden = bert_out.last_hidden_state  # [B, S, H]
    pooled = bert_out.pooler_output  # [B, H]
    logits = model.classifier(model.dropout(pooled))  # [B, num_labels]
    loss = F.cross_entropy(logits, labels)

    # The split forward above must agree with the model's own classification forward.
    with torch.no_grad():
        whole = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            labels=labels,
        )
    if not torch.allclose(whole.logits, logits, atol=1e-6, rtol=0):
        fail("split forward disagrees with BertForSequenceClassification.forward (logits)")
    if not torch.allclose(whole.loss, loss, atol=1e-6, rtol=0):
        fail("split forward disagrees with BertForSequenceClassification.forward (loss)")

    tensors.update(
        {
            "input_ids": input_ids,
            "token_type_ids": token_type_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "out.last_hidden_state": tensor_out(last_hidden),
            "out.pooled": tensor_out(pooled),
            "out.logits": tensor_out(logits),
            "loss": tensor_out(loss).reshape(1),
        }
    )

    # Backward.
    model.zero_grad(set_to_none=True)
    loss.backward()
    for name in GRAD_NAMES:
        grad = params[name].grad
        if grad is None:
            fail(f"no gradient reached {name}")
        tensors[f"grad.{name}"] = tensor_out(grad)

    # One AdamW step, with no weight decay on biases and LayerNorm weights.
    decay = [p for n, p in model.named_parameters() if is_decayed(n)]
    no_decay = [p for n, p in model.named_parameters() if not is_decayed(n)]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": WEIGHT_DECAY},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=LEARNING_RATE,
        betas=BETAS,
        eps=EPS,
    )
    optimizer.step()
    for name in STEP_NAMES:
        tensors[f"step.{name}"] = tensor_out(params[name])

    for name, t in tensors.items():
        if t.is_floating_point() and t.dtype != torch.float32:
            fail(f"{name} is {t.dtype}, expected float32")
        if t.is_floating_point() and not torch.isfinite(t).all():
            fail(f"{name} holds non-finite values")

    # One metadata key: safetensors writes several keys in a random order, and the file
    # should come out byte for byte the same on every run.
    metadata = {
        "reference": json.dumps(
            {
                "generator": "scripts/reference/make_bert_fixtures.py",
                "model": args.model.name,
                "torch_version": torch.__version__,
                "transformers_version": transformers.__version__,
            }
        )
    }
    write_atomic(args.out, lambda tmp: save_file(tensors, tmp, metadata=metadata))

    description = {
        "texts": [[a, b] for a, b in TEXTS],
        "labels": LABELS,
        "num_labels": NUM_LABELS,
        "max_length": MAX_LENGTH,
        "seed": SEED,
        "learning_rate": LEARNING_RATE,
        "betas": list(BETAS),
        "eps": EPS,
        "weight_decay": WEIGHT_DECAY,
        "no_weight_decay": "parameters whose name ends in 'bias' or contains 'LayerNorm'",
        "selected": GRAD_NAMES,
        "selected_step": STEP_NAMES,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
    json_path = args.out.with_suffix(".json")

    def write_json(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(description, f, ensure_ascii=False, indent=2)
            f.write("\n")

    write_atomic(json_path, write_json)

    size = args.out.stat().st_size
    print(
        f"wrote {args.out} ({size / 1e6:.2f} MB, {len(tensors)} tensors) and {json_path}; "
        f"seq lengths {lengths}, loss {loss.item():.6f}"
    )


if __name__ == "__main__":
    main()
