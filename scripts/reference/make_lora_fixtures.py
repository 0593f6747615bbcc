"""Reference values for smelt's LoRA training, computed with PyTorch `transformers` + `peft`.

Usage:
    python scripts/reference/make_lora_fixtures.py --assets DIR --out crates/smelt-tasks/tests/fixtures

DIR is the asset folder (`smelt assets path` prints it). Run it with the environment of
scripts/reference/setup-venv.sh (torch, transformers, gguf, accelerate, peft). CPU, two
threads, under a minute.

SmolLM2-135M-Instruct is loaded by transformers from the Q4_1 GGUF (dequantized to fp32) and
wrapped by peft with a rank-2 LoRA on q_proj and v_proj (alpha 4, no dropout). Both adapter
matrices are then set to seeded random values (B is zero after PEFT's own initialisation,
which would make every gradient of A zero), and the adapter is saved with
`save_pretrained`. Writes:

  smollm2-lora/             the adapter (adapter_config.json, adapter_model.safetensors)
  smollm2_lora_reference.json
      rows        two prompt/completion sequences as token ids, with the index of the first
                  completion token (the loss counts completion tokens only)
      loss        the mean next-token cross-entropy over those completion tokens
      grads       gradients of that loss for the adapter matrices of layers 0, 14 and 29,
                  flattened in PEFT's layout ([r, d_in] for A, [d_out, r] for B)
      grad_norm   the global L2 norm of all adapter gradients
      top_logits  the 10 largest logits at the last position of a fixed prompt, with the
                  adapter applied, as [id, value] pairs
"""

import argparse
import json
import os

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

PAIRS = [
    ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
     "Paris is the capital of France.<|im_end|>"),
    ("Q: Name a colour of the sky.\nA:", " Blue, on a clear day; grey when it rains."),
]
PROMPT = "<|im_start|>user\nTell me a joke.<|im_end|>\n<|im_start|>assistant\n"
LAYERS = [0, 14, 29]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--assets", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)

    folder = os.path.join(args.assets, "models", "smollm2-135m-instruct-q4_1")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, torch_dtype=torch.float32)
    config = LoraConfig(
        r=2,
        lora_alpha=4,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj"],
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            elif "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    adapter_dir = os.path.join(args.out, "smollm2-lora")
    peft_model.save_pretrained(adapter_dir)
    card = os.path.join(adapter_dir, "README.md")  # peft's generated model card
    if os.path.exists(card):
        os.remove(card)

    rows = []
    for prompt, completion in PAIRS:
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        c = tok(completion, add_special_tokens=False)["input_ids"]
        rows.append({"ids": p + c, "target_from": len(p)})
    width = max(len(r["ids"]) for r in rows)
    pad = tok.eos_token_id
    ids = torch.tensor([r["ids"] + [pad] * (width - len(r["ids"])) for r in rows])
    mask = torch.tensor([[1] * len(r["ids"]) + [0] * (width - len(r["ids"])) for r in rows])
    labels = ids.clone()
    for i, r in enumerate(rows):
        labels[i, : r["target_from"]] = -100
        labels[i, len(r["ids"]):] = -100

    peft_model.train()
    out = peft_model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    grads = {}
    total = 0.0
    for name, p in peft_model.named_parameters():
        if p.grad is None:
            continue
        total += float(p.grad.double().pow(2).sum())
        key = name.replace(".default", "")
        layer = int(key.split(".layers.")[1].split(".")[0])
        if layer in LAYERS:
            grads[key] = [float(v) for v in p.grad.flatten()]

    peft_model.eval()
    with torch.no_grad():
        prompt_ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
        logits = peft_model(input_ids=torch.tensor([prompt_ids])).logits[0, -1]
        top = torch.topk(logits, 10)
    reference = {
        "rows": rows,
        "loss": float(out.loss),
        "grads": grads,
        "grad_norm": total ** 0.5,
        "prompt_ids": prompt_ids,
        "top_logits": [[int(i), float(v)] for v, i in zip(top.values, top.indices)],
    }
    with open(os.path.join(args.out, "smollm2_lora_reference.json"), "w") as f:
        json.dump(reference, f)
    print(f"loss {reference['loss']:.6f}, grad norm {reference['grad_norm']:.6f}")


if __name__ == "__main__":
    main()
