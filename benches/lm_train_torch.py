"""PyTorch side of the LM training benchmark (see benches/run-lm-train-bench.sh).

`--mode lora`: SmolLM2-135M-Instruct loaded by `transformers` from the Q4_1 GGUF (fp32), a
`peft` LoRA of rank 8, alpha 16 on q_proj and v_proj without dropout, batch 4 x 256 tokens.
`--mode scratch`: a new GPT-2 (4 layers, 4 heads, width 256, context 256, the vocabulary of
--tokenizer, GPT-2's by default), batch 16 x 256. Both on text of Persuasion, every token a target; each step is
forward, loss, backward, clipping to norm 1 and an AdamW update. Prints one JSON line.
"""

import argparse
import json
import os
import resource
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers import PreTrainedTokenizerFast, AutoTokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="lora", choices=["lora", "scratch"])
    ap.add_argument("--assets", required=True)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--tokenizer", help="tokenizer.json for --mode scratch (GPT-2's by default)")
    a = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    text = open(os.path.join(a.assets, "data", "jane-austen", "persuasion.txt"), encoding="utf-8").read()
    if a.mode == "lora":
        from peft import LoraConfig, get_peft_model

        folder = os.path.join(a.assets, "models", "smollm2-135m-instruct-q4_1")
        gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=["q_proj", "v_proj"],
                                                 task_type="CAUSAL_LM"))
        batch, seq = 4, 256
    else:
        tok = PreTrainedTokenizerFast(tokenizer_file=a.tokenizer or os.path.join(
            a.assets, "models", "gpt2-tokenizer", "tokenizer.json"))
        vocab = 50257 if a.tokenizer is None else len(tok)
        config = GPT2Config(vocab_size=vocab, n_positions=256, n_embd=256, n_layer=4, n_head=4,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            layer_norm_epsilon=1e-5)
        model = GPT2LMHeadModel(config)
        batch, seq = 16, 256
    ids = tok(text, add_special_tokens=False)["input_ids"]
    blocks = [ids[i : i + seq + 1] for i in range(0, len(ids) - seq - 1, seq)]
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    times = []
    for step in range(a.steps):
        x = torch.tensor([blocks[(step * batch + i) % len(blocks)] for i in range(batch)])
        t0 = time.perf_counter()
        logits = model(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        dt = time.perf_counter() - t0
        print(f"step {step}: loss {loss.item():.4f}, {dt:.3f} s", flush=True, file=__import__("sys").stderr)
        if step > 0:
            times.append(dt)
    med = statistics.median(times)
    print(json.dumps({
        "mode": a.mode, "batch": batch, "seq": seq, "step_seconds_median": med,
        "tokens_per_second": batch * seq / med,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trainable_parameters": sum(p.numel() for p in params),
    }))


if __name__ == "__main__":
    main()
