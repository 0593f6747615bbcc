"""Reference perplexity of a text file under a causal LM, with the same sliding window as
`smelt lm eval`: windows of W tokens advancing by S; each token is scored once, predicted
from up to W - S tokens of context before the new ones. The text is tokenized whole, without
special tokens (SmolLM2 adds no BOS).

Usage: python scripts/reference/lm_perplexity.py --model DIR [--gguf FILE] [--adapter DIR]
       --data FILE [--window 1024] [--stride 512]

With --adapter, the model is wrapped by `peft` with that LoRA adapter (for example one
written by `smelt lm train --lora-rank N`), so the result checks that peft reads smelt's
adapter files and computes what `smelt lm eval --adapter DIR` computes.
"""

import argparse
import json
import math
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--gguf")
    ap.add_argument("--adapter")
    ap.add_argument("--data", required=True)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    a = ap.parse_args()
    torch.set_num_threads(2)
    kw = {"gguf_file": a.gguf} if a.gguf else {}
    tok = AutoTokenizer.from_pretrained(a.model, **kw)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, **kw).eval()
    if a.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, a.adapter).eval()
    with open(a.data, encoding="utf-8") as f:
        ids = tok(f.read(), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    n = ids.shape[0]
    nll, scored, prev_end, begin = 0.0, 0, 0, 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        while True:
            end = min(begin + a.window, n)
            first = max(prev_end, begin + 1)
            logits = model(ids[begin:end][None]).logits[0].float()
            lp = torch.log_softmax(logits[first - 1 - begin : end - 1 - begin], -1)
            tgt = ids[first:end]
            nll -= lp.gather(1, tgt[:, None]).sum().item()
            scored += end - first
            prev_end = end
            if end == n:
                break
            begin += a.stride
    mean = nll / scored
    print(json.dumps({"perplexity": math.exp(mean), "mean_nll": mean, "tokens": n,
                      "scored_tokens": scored, "window": a.window, "stride": a.stride,
                      "seconds": time.perf_counter() - t0}))


if __name__ == "__main__":
    main()
