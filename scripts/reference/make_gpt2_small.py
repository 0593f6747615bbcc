"""Writes a GPT-2 small checkpoint (124M parameters, the standard configuration) with random
weights (torch.manual_seed(0)), for the fp32 generation benchmark: no full-precision GPT-2
weights are available from the package registries.

Usage: python scripts/reference/make_gpt2_small.py OUT_DIR
"""

import sys

import torch
from transformers import GPT2Config, GPT2LMHeadModel

torch.manual_seed(0)
GPT2LMHeadModel(GPT2Config()).save_pretrained(sys.argv[1], safe_serialization=True)
