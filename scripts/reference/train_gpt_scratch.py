"""Reference for `smelt lm train --from-scratch`: the same GPT-2 configuration, tokenizer,
data blocks, optimizer and schedule, trained with PyTorch `transformers`.

Usage:
    python scripts/reference/train_gpt_scratch.py --config small.toml --tokenizer tokenizer.json \
        --train A.txt B.txt ... --valid F.txt [--epochs 1] [--batch-size 16] [--lr 1e-3] \
        [--seed 42] [--max-steps N]

What matches smelt's defaults: the texts are tokenized whole and concatenated with
<|endoftext|> after each file, cut into consecutive blocks of `context + 1` tokens that
overlap by one (the tail is dropped); a GPT-2 with no dropout, LayerNorm eps 1e-5, tied
embeddings, weights drawn N(0, 0.02) (output projections N(0, 0.02/sqrt(2 layers))); AdamW
(betas 0.9/0.999, eps 1e-8, no weight decay), linear warm-up over 5 % of the updates then
cosine decay to 0, gradients clipped to norm 1, seeded shuffled batches. Weights are drawn by
PyTorch's generator, not smelt's, so the runs agree in distribution, not bit for bit.

Prints one JSON object: validation loss and perplexity before and after training, training
tokens, tokens per second (training steps only) and peak resident memory.
"""

import argparse
import json
import math
import resource
import time
import tomllib

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast


def blocks(files, tok, block):
    ids = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            ids += tok(f.read(), add_special_tokens=False)["input_ids"]
        ids.append(tok.convert_tokens_to_ids("<|endoftext|>"))
    out = []
    start = 0
    while start + block < len(ids):
        out.append(ids[start : start + block + 1])
        start += block
    return torch.tensor(out), len(ids)


@torch.no_grad()
def evaluate(model, data, batch):
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(data), batch):
        x = data[i : i + batch]
        logits = model(x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += x[:, 1:].numel()
    model.train()
    return total / count


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--train", nargs="+", required=True)
    ap.add_argument("--valid", required=True)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup-ratio", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--max-steps", type=int)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    with open(a.config, "rb") as f:
        c = tomllib.load(f)
    tok = PreTrainedTokenizerFast(tokenizer_file=a.tokenizer)
    context = c["context"]
    train, train_tokens = blocks(a.train, tok, context)
    valid, _ = blocks([a.valid], tok, context)
    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=context,
        n_embd=c["hidden"],
        n_layer=c["layers"],
        n_head=c["heads"],
        n_inner=c.get("intermediate"),
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(config)
    model.train()
    steps_per_epoch = math.ceil(len(train) / a.batch_size)
    total = steps_per_epoch * a.epochs
    if a.max_steps:
        total = min(total, a.max_steps)
    warmup = math.ceil(a.warmup_ratio * total)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.0)

    def factor(step):
        if step < warmup:
            return step / max(warmup, 1)
        progress = (step - warmup) / max(total - warmup, 1)
        return max(0.0, 0.5 * (1 + math.cos(math.pi * progress)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    before = evaluate(model, valid, a.batch_size)
    gen = torch.Generator().manual_seed(a.seed)
    step, seen, train_seconds = 0, 0, 0.0
    for _ in range(a.epochs):
        order = torch.randperm(len(train), generator=gen)
        for i in range(0, len(train), a.batch_size):
            if step == total:
                break
            t0 = time.perf_counter()
            x = train[order[i : i + a.batch_size]]
            out = model(x[:, :-1], labels=None).logits
            loss = torch.nn.functional.cross_entropy(
                out.reshape(-1, out.shape[-1]), x[:, 1:].reshape(-1)
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            train_seconds += time.perf_counter() - t0
            seen += x[:, 1:].numel()
            step += 1
    after = evaluate(model, valid, a.batch_size)
    print(json.dumps({
        "valid_loss_before": before,
        "valid_loss": after,
        "valid_perplexity": math.exp(after),
        "steps": step,
        "train_tokens": seen,
        "corpus_tokens": train_tokens,
        "tokens_per_second": seen / train_seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "parameters": sum(p.numel() for p in model.parameters()),
    }))


if __name__ == "__main__":
    main()
