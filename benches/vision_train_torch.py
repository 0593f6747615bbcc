"""PyTorch side of the ViT training benchmark on Fashion-MNIST.

Usage:
    python benches/vision_train_torch.py --data DIR [--steps 6] [--batch 128] [--threads 2]

DIR holds the Fashion-MNIST training set in IDX format: train-images-idx3-ubyte and
train-labels-idx1-ubyte, each gzipped (.gz) or not. Run it with the environment of
scripts/reference/setup-venv.sh.

The model is a new `transformers.ViTForImageClassification` (by default image 28x28, patch
4, one channel, width 64, 6 layers, 4 heads, MLP 128, exact GELU, LayerNorm eps 1e-12, no
dropout, 10 classes) built after torch.manual_seed(0), in train mode. Each step is the
forward pass with labels (so the model computes the mean cross-entropy itself), backward,
clipping the gradients to norm 1, an AdamW update (lr 1e-3, weight decay 0.05 on every
parameter) and zeroing the gradients. The batches are the first (steps + 1) * batch
training images in file order (cycling if the set is shorter), scaled to
(x / 255 - 0.5) / 0.5 and built before any step runs, so reading data is never timed. The
first step warms up and is not timed.

Prints one line per step on stderr, then one JSON line on stdout:
images_per_second (batch / median step time), step_seconds_median, peak_rss_mb, batch and
params (the number of parameters).
"""

import argparse
import gzip
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import ViTConfig, ViTForImageClassification

NUM_CLASSES = 10
IMAGES_MAGIC = 2051  # IDX: unsigned bytes, 3 dimensions
LABELS_MAGIC = 2049  # IDX: unsigned bytes, 1 dimension


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, type=Path, help="folder with Fashion-MNIST IDX files")
    ap.add_argument("--steps", type=int, default=6, help="timed steps (after one warm-up step)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=28)
    ap.add_argument("--patch", type=int, default=4)
    ap.add_argument("--channels", type=int, default=1, help="the gray channel is repeated")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--mlp", type=int, default=128)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    for name in ("steps", "batch", "image_size", "patch", "channels", "hidden", "layers",
                 "heads", "mlp", "threads"):
        if getattr(a, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1, found {getattr(a, name)}")
    if a.image_size % a.patch != 0:
        fail(f"--image-size {a.image_size} is not a multiple of --patch {a.patch}")
    if a.hidden % a.heads != 0:
        fail(f"--hidden {a.hidden} is not a multiple of --heads {a.heads}")
    if not 0.0 <= a.dropout < 1.0:
        fail(f"--dropout must be in [0, 1), found {a.dropout}")
    return a


def read_idx(folder, stem, magic):
    """The bytes of an IDX file (stem or stem.gz in folder) as an array of its dimensions."""
    for path in (folder / f"{stem}.gz", folder / stem):
        if path.is_file():
            break
    else:
        fail(f"neither {folder / stem}.gz nor {folder / stem} exists")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
        fail(f"{path}: IDX magic {found}, expected {magic}")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    count = int(np.prod(dims))
    if len(raw) - header != count:
        fail(f"{path}: header says {dims} ({count} bytes), found {len(raw) - header} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims), path


def load_batches(a):
    images, images_path = read_idx(a.data, "train-images-idx3-ubyte", IMAGES_MAGIC)  # [N, H, W]
    labels, labels_path = read_idx(a.data, "train-labels-idx1-ubyte", LABELS_MAGIC)  # [N]
    if images.shape[0] != labels.shape[0]:
        fail(f"{images_path} has {images.shape[0]} images but {labels_path} "
             f"has {labels.shape[0]} labels")
    if images.shape[0] == 0:
        fail(f"{images_path} holds no images")
    if images.shape[1:] != (a.image_size, a.image_size):
        fail(f"{images_path} holds {images.shape[1]}x{images.shape[2]} images, "
             f"--image-size is {a.image_size}")
    if labels.max() >= NUM_CLASSES:
        fail(f"{labels_path} holds label {labels.max()}, expected 0..{NUM_CLASSES - 1}")
    batches = []
    for step in range(a.steps + 1):
        idx = np.arange(step * a.batch, (step + 1) * a.batch) % images.shape[0]
        x = torch.from_numpy(images[idx].astype(np.float32))  # [B, H, W]
        x = ((x / 255.0 - 0.5) / 0.5).unsqueeze(1)  # [B, 1, H, W]
        x = x.expand(-1, a.channels, -1, -1).contiguous()  # [B, C, H, W]
        y = torch.from_numpy(labels[idx].astype(np.int64))  # [B]
        batches.append((x, y))
    return batches


def main():
    a = parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    batches = load_batches(a)

    config = ViTConfig(
        image_size=a.image_size,
        patch_size=a.patch,
        num_channels=a.channels,
        hidden_size=a.hidden,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        intermediate_size=a.mlp,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        hidden_dropout_prob=a.dropout,
        attention_probs_dropout_prob=a.dropout,
        qkv_bias=True,
        num_labels=NUM_CLASSES,
    )
    model = ViTForImageClassification(config)
    model.train()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)

    times = []
    for step, (x, y) in enumerate(batches):
        t0 = time.perf_counter()
        loss = model(pixel_values=x, labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        what = "warm-up" if step == 0 else f"step {step}"
        print(f"{what}: loss {loss.item():.4f}, {dt:.3f} s", file=sys.stderr, flush=True)
        if step > 0:
            times.append(dt)

    med = statistics.median(times)
    print(json.dumps({
        "images_per_second": a.batch / med,
        "step_seconds_median": med,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "batch": a.batch,
        "params": sum(p.numel() for p in params),
    }))


if __name__ == "__main__":
    main()
