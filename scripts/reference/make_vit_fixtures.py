"""Reference values for smelt's ViT image classifier, computed with PyTorch.

Usage:
    python scripts/reference/make_vit_fixtures.py [--out crates/smelt-tasks/tests/fixtures]

Run it with the environment made by scripts/reference/setup-venv.sh plus Pillow (torch
2.15.0, transformers 5.23.0, safetensors, numpy, pillow). The script refuses other torch or
transformers versions unless --any-version is given, because the fixture records what those
versions compute. CPU, two threads, a few seconds.

No pretrained ViT weights can be had here, so the model is a tiny random one: a
`transformers.ViTForImageClassification` (image 32x32, patch 8, 3 channels, hidden 64,
2 layers, 4 heads, MLP 128, exact GELU, LayerNorm eps 1e-12, QKV bias, 5 labels) built after
torch.manual_seed(0). Hugging Face initialises LayerNorm to weight 1, bias 0 and the linear
biases to 0; to make every tensor matter, noise drawn from N(0, 0.02^2) is then added to
every parameter, the LayerNorms, class token and position embeddings included.

Writes, under OUT:

  vit-tiny/                 the model as `save_pretrained` writes it (config.json,
                            model.safetensors in F32 with Hugging Face's tensor names) and
                            the ViTImageProcessor (preprocessor_config.json): resize to
                            32x32 with PIL bilinear, scale by 1/255, normalise with mean 0.5
                            and std 0.5 per channel. Nothing else is kept in the folder.
  vit-tiny-input.png        a 48x40 (width x height) RGB test image, lossless PNG, with
                            pixel (x, y) = ((7x + 3y) % 256, (5xy + 11) % 256, (x^2 + 2y) % 256)
  vit_tiny_reference.json
      shape                 [2, 3, 32, 32], the shape of pixel_values
      pixel_values          torch.randn of that shape after torch.manual_seed(1),
                            flattened row-major
      logits                [2][5], the model in eval mode on pixel_values
      cls_features          [2][64], model.vit(pixel_values).last_hidden_state[:, 0]
                            (the class token after the final LayerNorm, which is what the
                            classifier reads)
      image_pixel_values    the processor's output for vit-tiny-input.png ([1, 3, 32, 32],
                            flattened row-major)
      image_logits          [5], the model on image_pixel_values
      versions              torch and transformers versions that computed the values

Every float is a float32 value written with enough digits to be read back exactly.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import PIL
import torch
import transformers
from PIL import Image
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

TORCH_VERSION = "2.15.0"
TRANSFORMERS_VERSION = "5.23.0"

LABELS = ["ankle", "bag", "coat", "dress", "shirt"]
MODEL_SEED = 0
INPUT_SEED = 1
NOISE_STD = 0.02
BATCH = 2
IMAGE_SIZE = 32
CHANNELS = 3
HIDDEN = 64
# PIL.Image.Resampling.BILINEAR; written as the integer that preprocessor_config.json holds.
PIL_BILINEAR = 2
IMAGE_WIDTH, IMAGE_HEIGHT = 48, 40
KEEP = {"config.json", "model.safetensors", "preprocessor_config.json"}

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "crates/smelt-tasks/tests/fixtures"


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})"
    )
    parser.add_argument(
        "--any-version", action="store_true", help="run with other torch/transformers versions"
    )
    args = parser.parse_args()
    if not args.out.is_dir():
        fail(f"output folder {args.out} does not exist")
    found = (torch.__version__.split("+")[0], transformers.__version__)
    if found != (TORCH_VERSION, TRANSFORMERS_VERSION) and not args.any_version:
        fail(
            f"expected torch {TORCH_VERSION} and transformers {TRANSFORMERS_VERSION}, "
            f"found torch {found[0]} and transformers {found[1]} (--any-version to go on)"
        )
    return args


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


def replace_dir(path, write):
    """Call write(tmp_dir) on a new folder beside path, then put it in place of path."""
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    old = None
    try:
        write(tmp)
        os.chmod(tmp, 0o755)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.rename(path, old)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old)


def build_model():
    config = ViTConfig(
        image_size=IMAGE_SIZE,
        patch_size=8,
        num_channels=CHANNELS,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        qkv_bias=True,
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={name: i for i, name in enumerate(LABELS)},
    )
    torch.manual_seed(MODEL_SEED)
    model = ViTForImageClassification(config)
    # Eager attention: the plain softmax(QK^T / sqrt(d)) V that smelt computes.
    model.set_attn_implementation("eager")
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape) * NOISE_STD)
    model.eval()
    return model


def build_processor():
    # The PIL backend of ViTImageProcessor: resizing goes through PIL.Image.resize, the
    # path a plain `pip install transformers pillow` takes when torchvision is absent.
    return ViTImageProcessorPil(
        do_resize=True,
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=PIL_BILINEAR,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def test_image():
    """The [height, width, 3] uint8 test image."""
    y, x = np.mgrid[0:IMAGE_HEIGHT, 0:IMAGE_WIDTH].astype(np.int64)  # each [H, W]
    rgb = np.stack(
        [(7 * x + 3 * y) % 256, (5 * x * y + 11) % 256, (x * x + 2 * y) % 256], axis=-1
    )  # [H, W, 3]
    return rgb.astype(np.uint8)


def floats(t):
    """A float32 tensor as nested lists of Python floats (each exactly the float32 value)."""
    t = torch.as_tensor(t)
    if t.dtype != torch.float32:
        fail(f"expected a float32 tensor, found {t.dtype}")
    if not torch.isfinite(t).all():
        fail("non-finite value in a reference tensor")
    return t.detach().tolist()


def main():
    args = parse_args()
    torch.set_num_threads(2)

    model = build_model()
    processor = build_processor()

    # Inputs: a random batch, and the test image through the processor.
    torch.manual_seed(INPUT_SEED)
    pixel_values = torch.randn(BATCH, CHANNELS, IMAGE_SIZE, IMAGE_SIZE)  # [B, C, H, W]

    image_path = args.out / "vit-tiny-input.png"
    write_atomic(image_path, lambda tmp: Image.fromarray(test_image(), "RGB").save(tmp, "PNG"))
    with Image.open(image_path) as im:
        image = im.convert("RGB")
    if image.size != (IMAGE_WIDTH, IMAGE_HEIGHT):
        fail(f"{image_path} is {image.size}, expected {(IMAGE_WIDTH, IMAGE_HEIGHT)}")
    if not np.array_equal(np.asarray(image), test_image()):
        fail(f"{image_path} does not read back as the pixels written")
    image_pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
    if tuple(image_pixel_values.shape) != (1, CHANNELS, IMAGE_SIZE, IMAGE_SIZE):
        fail(f"processor output has shape {tuple(image_pixel_values.shape)}")
    image_pixel_values = image_pixel_values.to(torch.float32)  # [1, C, H, W]

    with torch.no_grad():
        logits = model(pixel_values=pixel_values).logits  # [B, num_labels]
        cls_features = model.vit(pixel_values=pixel_values).last_hidden_state[:, 0]  # [B, hidden]
        image_logits = model(pixel_values=image_pixel_values).logits[0]  # [num_labels]
        # The classifier reads the class token after the final LayerNorm.
        if not torch.allclose(model.classifier(cls_features), logits, atol=1e-6, rtol=0):
            fail("classifier(cls_features) disagrees with the model's logits")

    # The model folder, and a check that it loads back to the same outputs.
    def write_model(tmp):
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        for entry in Path(tmp).iterdir():
            if entry.name not in KEEP:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        missing = KEEP - {entry.name for entry in Path(tmp).iterdir()}
        if missing:
            fail(f"save_pretrained did not write {sorted(missing)}")
        for entry in Path(tmp).iterdir():
            os.chmod(entry, 0o644)

    model_dir = args.out / "vit-tiny"
    replace_dir(model_dir, write_model)
    reloaded = ViTForImageClassification.from_pretrained(model_dir, dtype=torch.float32)
    reloaded.set_attn_implementation("eager")
    reloaded.eval()
    with torch.no_grad():
        if not torch.equal(reloaded(pixel_values=pixel_values).logits, logits):
            fail(f"{model_dir} does not load back to the same logits")
    for name, tensor in reloaded.state_dict().items():
        if tensor.dtype != torch.float32:
            fail(f"{model_dir}: {name} is {tensor.dtype}, expected float32")

    reference = {
        "shape": list(pixel_values.shape),
        "pixel_values": floats(pixel_values.reshape(-1)),
        "logits": floats(logits),
        "cls_features": floats(cls_features),
        "image_pixel_values": floats(image_pixel_values.reshape(-1)),
        "image_logits": floats(image_logits),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    json_path = args.out / "vit_tiny_reference.json"

    def write_json(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(reference, f, separators=(",", ":"))
            f.write("\n")

    write_atomic(json_path, write_json)

    sizes = {p.name: p.stat().st_size for p in sorted(model_dir.iterdir())}
    print(
        f"wrote {model_dir} {sizes}, {image_path}, {json_path} "
        f"({json_path.stat().st_size} bytes); pillow {PIL.__version__}; "
        f"logits[0] {[round(v, 5) for v in logits[0].tolist()]}, "
        f"image argmax {LABELS[int(image_logits.argmax())]}"
    )


if __name__ == "__main__":
    main()
