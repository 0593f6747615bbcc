"""Reference values for smelt's causal language models, computed with PyTorch `transformers`.

Usage:
    python scripts/reference/make_lm_fixtures.py --assets DIR --out crates/smelt-tasks/tests/fixtures

DIR is the asset folder (`smelt assets path` prints it). Run it with the environment of
scripts/reference/setup-venv.sh (torch, transformers, gguf, accelerate). CPU, two threads,
about a minute.

Writes:
  smollm2_reference.json   SmolLM2-135M-Instruct loaded by transformers from the Q4_1 GGUF
                           (dequantized to fp32): token ids of fixed texts, greedy
                           continuations (40 tokens) of fixed prompts, the top logits of each
                           prompt's last position, the mean negative log-likelihood of a
                           fixed text, and a rendered chat template.
  tiny-gpt2/               a GPT-2 checkpoint with random weights (torch.manual_seed(0)),
                           saved by `save_pretrained` (config.json, model.safetensors)
  tiny_gpt2_reference.json its logits on fixed token ids and a greedy continuation
  gpt2_tokenizer_reference.json  token ids of fixed texts under models/gpt2-tokenizer
  tiny-llama/              a Llama checkpoint with random weights (grouped-query attention,
                           untied output projection), stored in bfloat16
  tiny_llama_reference.json  its logits (computed in fp32 from the bfloat16 weights)

`--only NAME` (smollm, tiny_gpt2, gpt2_tokenizer, tiny_llama) regenerates one part.
"""

import argparse
import json
import os

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel
from transformers import LlamaConfig, LlamaForCausalLM
from transformers import PreTrainedTokenizerFast

TEXTS = [
    "Hello, world!",
    "It is a truth universally acknowledged, that a single man in possession of a good "
    "fortune, must be in want of a wife.",
    "Numbers 12345 and 3.14159, dates 2026-12-03; emoji 🙂 and accents: café, naïve.",
    "<|im_start|>user\nHi there<|im_end|>\n",
    "  leading spaces\tand\ttabs\n\nnew lines",
]

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n",
]

NLL_TEXT = (
    "Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who, for his own "
    "amusement, never took up any book but the Baronetage; there he found occupation for an "
    "idle hour, and consolation in a distressed one."
)

CHAT = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name a primary colour."},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "Another?"},
]


def smollm(assets, out):
    folder = os.path.join(assets, "models", "smollm2-135m-instruct-q4_1")
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    result = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "tokenize": [{"text": t, "ids": tok(t, add_special_tokens=False)["input_ids"]} for t in TEXTS],
        "prompts": [],
    }
    with torch.no_grad():
        for p in PROMPTS:
            ids = tok(p, add_special_tokens=False, return_tensors="pt")["input_ids"]
            logits = model(ids).logits[0, -1]
            top = torch.topk(logits, 20)
            gen = model.generate(ids, max_new_tokens=40, do_sample=False, num_beams=1,
                                 eos_token_id=None, pad_token_id=tok.eos_token_id)
            result["prompts"].append({
                "prompt": p,
                "ids": ids[0].tolist(),
                "greedy": gen[0, ids.shape[1]:].tolist(),
                "top_ids": top.indices.tolist(),
                "top_logits": top.values.tolist(),
            })
        ids = tok(NLL_TEXT, add_special_tokens=False, return_tensors="pt")["input_ids"]
        loss = model(ids, labels=ids).loss
        result["nll"] = {"text": NLL_TEXT, "tokens": ids.shape[1], "mean_nll": loss.item()}
    result["chat"] = {
        "messages": CHAT,
        "rendered": tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True),
    }
    with open(os.path.join(out, "smollm2_reference.json"), "w") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)


def tiny_gpt2(out):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=384, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    # Non-trivial norms and biases, so that the test sees every parameter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    folder = os.path.join(out, "tiny-gpt2")
    model.save_pretrained(folder, safe_serialization=True)
    ids = torch.tensor([[5, 17, 200, 3, 99, 383, 0, 42, 7, 250]])
    with torch.no_grad():
        logits = model(ids).logits[0]
        gen = model.generate(ids, max_new_tokens=20, do_sample=False, num_beams=1,
                             eos_token_id=None, pad_token_id=0)
    with open(os.path.join(out, "tiny_gpt2_reference.json"), "w") as f:
        json.dump({"ids": ids[0].tolist(), "logits": logits.tolist(),
                   "greedy": gen[0, ids.shape[1]:].tolist()}, f)


def tiny_llama(out):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, rope_theta=500.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model = model.to(torch.bfloat16)
    folder = os.path.join(out, "tiny-llama")
    model.save_pretrained(folder, safe_serialization=True)
    model = model.float().eval()
    ids = torch.tensor([[5, 17, 200, 3, 99, 383, 0, 42, 7, 250]])
    with torch.no_grad():
        logits = model(ids).logits[0]
    with open(os.path.join(out, "tiny_llama_reference.json"), "w") as f:
        json.dump({"ids": ids[0].tolist(), "logits": logits.tolist()}, f)


def gpt2_tokenizer(assets, out):
    path = os.path.join(assets, "models", "gpt2-tokenizer", "tokenizer.json")
    tok = PreTrainedTokenizerFast(tokenizer_file=path)
    rows = [{"text": t, "ids": tok(t, add_special_tokens=False)["input_ids"]} for t in TEXTS]
    with open(os.path.join(out, "gpt2_tokenizer_reference.json"), "w") as f:
        json.dump(rows, f, indent=1, ensure_ascii=False)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--assets", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--only")
    args = ap.parse_args()
    torch.set_num_threads(2)
    os.makedirs(args.out, exist_ok=True)
    parts = {
        "tiny_gpt2": lambda: tiny_gpt2(args.out),
        "gpt2_tokenizer": lambda: gpt2_tokenizer(args.assets, args.out),
        "smollm": lambda: smollm(args.assets, args.out),
        "tiny_llama": lambda: tiny_llama(args.out),
    }
    for name, run in parts.items():
        if args.only in (None, name):
            run()


if __name__ == "__main__":
    main()
