#!/bin/sh
# Create the Python environment used by the PyTorch reference scripts in
# scripts/reference/ and benches/*.py.
#
# Usage: scripts/reference/setup-venv.sh [DIR]
#
# DIR defaults to $HOME/.cache/smelt/reference-venv. It must lie outside the
# repository, so that the environment is never committed or copied along with
# the sources. Running the script again on a working environment does nothing.
# pip reads its usual environment variables (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL),
# for example to pick a CPU-only torch wheel.
# The last line printed is the path of the environment's python.
set -eu

TORCH_VERSION=2.15.0
TRANSFORMERS_VERSION=5.23.0

dir=${1:-"$HOME/.cache/smelt/reference-venv"}

# Refuse a path inside the repository (checked before anything is created).
case "$dir" in
    /*) dir_abs=$dir ;;
    *) dir_abs="$PWD/$dir" ;;
esac
script_dir=$(dirname "$0")
for repo_root in "$(cd "$script_dir/../.." && pwd -L)" "$(cd "$script_dir/../.." && pwd -P)"; do
    case "$dir_abs/" in
        "$repo_root"/*)
            echo "error: venv dir $dir_abs is inside the repository $repo_root;" \
                "pick a path outside it" >&2
            exit 2
            ;;
    esac
done

python="$dir_abs/bin/python"

# The versions are checked too, so a stale environment gets upgraded.
check_env() {
    "$python" - "$TORCH_VERSION" "$TRANSFORMERS_VERSION" <<'EOF' >/dev/null 2>&1
import sys
import numpy, safetensors, torch, transformers, gguf, accelerate, peft, PIL
want_torch, want_transformers = sys.argv[1], sys.argv[2]
assert torch.__version__.split("+")[0] == want_torch, torch.__version__
assert transformers.__version__ == want_transformers, transformers.__version__
EOF
}

if [ -x "$python" ] && check_env; then
    echo "reference venv already set up" >&2
    echo "$python"
    exit 0
fi

if [ ! -x "$python" ]; then
    mkdir -p "$dir_abs"
    python3 -m venv "$dir_abs"
fi
"$python" -m pip install --upgrade pip >&2
"$python" -m pip install \
    "torch==$TORCH_VERSION" \
    "transformers==$TRANSFORMERS_VERSION" \
    safetensors \
    numpy \
    gguf accelerate peft pillow >&2

if ! check_env; then
    echo "error: $python cannot import torch $TORCH_VERSION, transformers $TRANSFORMERS_VERSION," \
        "safetensors and numpy after installing them" >&2
    exit 1
fi
echo "$python"
