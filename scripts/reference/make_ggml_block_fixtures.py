"""Reference decodings of GGML quantized blocks, computed by the `gguf` Python package
(the reader that ships with llama.cpp), for smelt's dequantization tests.

Usage: python scripts/reference/make_ggml_block_fixtures.py OUT.json

For every block type smelt reads, two blocks of random bytes are drawn (seed 0) with their
f16 scale fields replaced by finite values in [-2, 2], then decoded with
`gguf.quants.dequantize`. The JSON maps each type name to {"hex": bytes, "values": floats}.
"""

import json
import sys

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

# Byte offsets of the f16 scale fields inside one block.
SCALES = {
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
    "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
}


def main():
    rng = np.random.default_rng(0)
    out = {}
    for name, offsets in SCALES.items():
        ty = T[name]
        block_size, type_size = quants.GGML_QUANT_SIZES[ty]
        raw = bytearray(rng.integers(0, 256, size=2 * type_size, dtype=np.uint8).tobytes())
        for b in range(2):
            for off in offsets:
                v = np.float16(rng.uniform(-2, 2)).tobytes()
                raw[b * type_size + off: b * type_size + off + 2] = v
        data = np.frombuffer(bytes(raw), dtype=np.uint8).reshape(1, -1)
        values = quants.dequantize(data, ty).reshape(-1)
        assert values.shape[0] == 2 * block_size
        out[name] = {"hex": bytes(raw).hex(), "values": [float(v) for v in values]}
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
