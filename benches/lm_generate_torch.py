"""PyTorch side of the generation benchmark: batch 1, a prompt of exactly P tokens, then G
greedy tokens with the KV cache (end-of-sequence ignored), fp32, two threads. Prints one
JSON line with the median prompt and generation speeds.

Usage: python benches/lm_generate_torch.py --model DIR [--gguf FILE] [--tokenizer FILE]
       [--prompt-tokens 128] [--gen-tokens 128] [--reps 3]
"""

import argparse
import json
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good "
        "fortune, must be in want of a wife. ")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--gguf")
    ap.add_argument("--tokenizer")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(2)
    kw = {"gguf_file": a.gguf} if a.gguf else {}
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, **kw).eval()
    if a.tokenizer:
        tok = PreTrainedTokenizerFast(tokenizer_file=a.tokenizer)
    else:
        tok = AutoTokenizer.from_pretrained(a.model, **kw)
    ids = []
    while len(ids) < a.prompt_tokens:
        ids += tok(TEXT, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ids[: a.prompt_tokens]])
    pp, tg = [], []
    with torch.inference_mode():
        for rep in range(a.reps + 1):
            t0 = time.perf_counter()
            out = model(ids, use_cache=True)
            t1 = time.perf_counter()
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            for _ in range(a.gen_tokens - 1):
                out = model(nxt, past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            t2 = time.perf_counter()
            if rep > 0:  # the first run warms up
                pp.append(a.prompt_tokens / (t1 - t0))
                tg.append((a.gen_tokens - 1) / (t2 - t1))
    print(json.dumps({"pp_tokens_per_sec": statistics.median(pp),
                      "tg_tokens_per_sec": statistics.median(tg),
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
