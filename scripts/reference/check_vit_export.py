"""Checks that an image classifier written by `smelt vision train` loads in PyTorch
`transformers` and predicts what smelt predicts.

Usage (inside the reference venv of setup-venv.sh, plus Pillow):
    smelt vision predict --model OUT_DIR --top-k 3 --json IMG... > preds.jsonl
    python scripts/reference/check_vit_export.py --model OUT_DIR --predictions preds.jsonl

OUT_DIR is the folder smelt wrote: config.json (with id2label), model.safetensors and
preprocessor_config.json. preds.jsonl holds one JSON object per image, as
`smelt vision predict --json` prints them:
    {"image": "<path>", "top": [["<label>", <probability>], ...]}
with probabilities in descending order. Relative image paths are read from --image-root
(default: the current folder), which should be the folder `smelt vision predict` ran in.

For every line the image is opened with Pillow, converted to "RGB" for a 3-channel model or
to "L" for a 1-channel (gray) one, and preprocessed with AutoImageProcessor.from_pretrained
(OUT_DIR). Without torchvision, transformers 5.23 resolves that to ViTImageProcessorPil, its
Pillow backend; no torchvision is needed. The model is loaded with
ViTForImageClassification.from_pretrained (eager attention, float32, eval mode); its softmax
gives the top-K labels, K being the length of that line's "top" list.

Pixel values come from one of two paths, and the summary counts each:
  processor  the image processor's output, used whenever it has the model's shape
             [1, num_channels, image_size, image_size];
  manual     (x * rescale_factor - mean) / std computed here from the processor's settings,
             used only for an image already image_size x image_size (so the resize does
             nothing) when the processor cannot give the model's channel count, e.g. a gray
             model whose preprocessor_config.json repeats one statistic three times.
Any other mismatch stops the script with an error.

A label's probability is compared with the probability transformers gives the same label.
The script prints the keys reported missing or unexpected while loading, then one JSON
summary line, and exits 1 if any top-1 label differs or any probability differs by more
than --tolerance (default 1e-4); 2 on bad input.

Exact agreement is expected only for images already at the model's size. smelt resizes
with the `image` crate's triangle filter and first shrinks an image whose shorter side
exceeds twice the model's size; Pillow resizes in one step with its own bilinear filter.
The summary counts the images that needed resizing: for those, pixels may differ by one
level in 255, so pass a larger --tolerance (e.g. 5e-3) or compare at the model's size. Likewise, for a gray model smelt turns a colour image into gray with
the weights 0.2126, 0.7152, 0.0722 and Pillow with 0.299, 0.587, 0.114; such images are
counted as well. Images of more than 8 bits a sample are refused: Pillow clips them to 8
bits where smelt rescales them.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, ViTForImageClassification

# 8-bit Pillow modes that hold no colour: smelt decodes these as gray too.
GRAY_MODES = {"1", "L", "LA", "La"}


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="folder smelt wrote")
    parser.add_argument(
        "--predictions",
        type=Path,
        required=True,
        help="JSON lines from `smelt vision predict --json`",
    )
    parser.add_argument(
        "--image-root",
        type=Path,
        default=Path("."),
        help="folder that relative image paths are read from (default: current folder)",
    )
    parser.add_argument(
        "--tolerance", type=float, default=1e-4, help="largest probability difference"
    )
    args = parser.parse_args()
    if not math.isfinite(args.tolerance) or args.tolerance < 0:
        fail(f"--tolerance must be a finite number >= 0, found {args.tolerance}")
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        if not (args.model / name).is_file():
            fail(f"{args.model}: no {name}")
    if not args.predictions.is_file():
        fail(f"--predictions {args.predictions} is not a file")
    return args


def read_predictions(path):
    """[(line number, image path, [(label, probability), ...])] from the JSON lines."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                fail(f"{where}: not valid JSON: {e}")
            if not isinstance(row, dict):
                fail(f"{where}: expected an object, found {type(row).__name__}")
            image, top = row.get("image"), row.get("top")
            if not isinstance(image, str) or not image:
                fail(f'{where}: field "image": expected a path, found {image!r}')
            if not isinstance(top, list) or not top:
                fail(f'{where}: field "top": expected a non-empty list, found {top!r}')
            pairs = []
            for i, pair in enumerate(top):
                ok = (
                    isinstance(pair, list)
                    and len(pair) == 2
                    and isinstance(pair[0], str)
                    and isinstance(pair[1], (int, float))
                    and not isinstance(pair[1], bool)
                    and 0.0 <= pair[1] <= 1.0
                )
                if not ok:
                    fail(f'{where}: field "top"[{i}]: expected ["label", p in [0, 1]], '
                         f"found {pair!r}")
                pairs.append((pair[0], float(pair[1])))
            if any(a[1] < b[1] for a, b in zip(pairs, pairs[1:])):
                fail(f'{where}: field "top": probabilities are not in descending order')
            if len({label for label, _ in pairs}) != len(pairs):
                fail(f'{where}: field "top": a label appears twice')
            rows.append((number, image, pairs))
    if not rows:
        fail(f"{path}: no predictions")
    return rows


def one_value(values, field, channels):
    """A per-channel statistic as `channels` floats; one repeated value is spread."""
    values = [float(v) for v in np.atleast_1d(np.asarray(values, dtype=np.float64))]
    if len(values) != channels and all(v == values[0] for v in values):
        values = [values[0]] * channels
    if len(values) != channels:
        fail(f"processor {field} has {len(values)} values for a {channels}-channel model")
    return np.asarray(values, dtype=np.float64).reshape(channels, 1, 1)


def manual_pixels(image, processor, channels):
    """(x * rescale_factor - mean) / std of an image needing no resize, [1, C, H, W]."""
    x = np.asarray(image, dtype=np.float64)  # [H, W] or [H, W, C]
    if x.ndim == 2:
        x = x[:, :, None]
    x = x.transpose(2, 0, 1)  # [C, H, W]
    if getattr(processor, "do_rescale", True):
        x = x * float(processor.rescale_factor)
    if getattr(processor, "do_normalize", True):
        mean = one_value(processor.image_mean, "image_mean", channels)
        std = one_value(processor.image_std, "image_std", channels)
        x = (x - mean) / std
    return torch.from_numpy(x.astype(np.float32))[None]


def pixel_values(path, processor, channels, size):
    """The model's input for one image, the path used, whether a resize happened, and
    whether a colour image was turned to gray."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode == "F" or im.mode.startswith("I"):
                fail(
                    f"{path}: a {im.mode} image (more than 8 bits a sample); Pillow clips it "
                    "to 8 bits where smelt rescales it, so convert it to 8 bits first"
                )
            coloured = im.mode not in GRAY_MODES
            image = im.convert("L" if channels == 1 else "RGB")
    except (OSError, ValueError) as e:
        fail(f"{path}: cannot read the image: {e}")
    resized = image.size != (size, size)
    shape = (1, channels, size, size)
    try:
        values = processor(images=image, return_tensors="pt")["pixel_values"]
        problem = None if tuple(values.shape) == shape else f"shape {tuple(values.shape)}"
    except Exception as e:  # any refusal by the processor is reported below
        values, problem = None, f"error: {e}"
    if problem is None:
        return values.to(torch.float32), "processor", resized, coloured and channels == 1
    if resized:
        fail(
            f"{path}: the image processor does not give {list(shape)} ({problem}), and the "
            f"image is {image.size[0]}x{image.size[1]}, so no exact manual path exists"
        )
    return manual_pixels(image, processor, channels), "manual", False, coloured and channels == 1


def resolve(image, root):
    path = Path(image)
    return path if path.is_absolute() else root / path


def main():
    args = parse_args()
    torch.set_num_threads(2)
    rows = read_predictions(args.predictions)

    processor = AutoImageProcessor.from_pretrained(args.model)
    model, info = ViTForImageClassification.from_pretrained(
        args.model, dtype=torch.float32, output_loading_info=True
    )
    model.set_attn_implementation("eager")
    model.eval()
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        found = sorted(map(str, info.get(kind) or []))
        print(f"{kind}: {found if found else 'none'}")

    config = model.config
    channels, size = config.num_channels, config.image_size
    labels = [config.id2label[i] for i in range(config.num_labels)]
    if len(set(labels)) != len(labels):
        fail(f"{args.model}/config.json: id2label repeats a label: {labels}")
    index = {label: i for i, label in enumerate(labels)}

    worst, worst_where = 0.0, None
    top1_agree, rank_swaps = 0, 0
    paths = {"processor": 0, "manual": 0}
    resized_count, gray_from_colour = 0, 0
    failures = []
    for number, image, ours in rows:
        where = f"{args.predictions}:{number}"
        if len(ours) > len(labels):
            fail(f"{where}: {len(ours)} predictions for a model with {len(labels)} labels")
        for label, _ in ours:
            if label not in index:
                fail(f"{where}: label {label!r} is not in id2label {labels}")
        x, used, resized, to_gray = pixel_values(
            resolve(image, args.image_root), processor, channels, size
        )
        paths[used] += 1
        resized_count += resized
        gray_from_colour += to_gray
        with torch.no_grad():
            probs = torch.softmax(model(pixel_values=x).logits[0].to(torch.float64), dim=-1)
        order = torch.argsort(probs, descending=True, stable=True)[: len(ours)].tolist()
        theirs = [labels[i] for i in order]
        if theirs[0] == ours[0][0]:
            top1_agree += 1
        else:
            failures.append(f"{image}: top-1 smelt {ours[0][0]!r}, transformers {theirs[0]!r}")
        rank_swaps += sum(a != b for a, (b, _) in zip(theirs[1:], ours[1:]))
        for label, p in ours:
            d = abs(float(probs[index[label]]) - p)
            if d > worst:
                worst, worst_where = d, f"{image} {label!r}"
            if d > args.tolerance:
                failures.append(
                    f"{image}: {label!r} smelt {p:.6g}, transformers "
                    f"{float(probs[index[label]]):.6g} (differ by {d:.3g})"
                )

    for message in failures[:20]:
        print(f"mismatch: {message}", file=sys.stderr)
    if len(failures) > 20:
        print(f"mismatch: ... and {len(failures) - 20} more", file=sys.stderr)
    summary = {
        "images": len(rows),
        "max_prob_diff": worst,
        "max_at": worst_where,
        "top1_agree": top1_agree,
        "lower_rank_swaps": rank_swaps,
        "tolerance": args.tolerance,
        "pixels": paths,
        "processor": type(processor).__name__,
        "channels": channels,
        "image_size": size,
        "resized": resized_count,
        "gray_from_colour": gray_from_colour,
        "ok": not failures,
    }
    print(json.dumps(summary))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
