#!/usr/bin/env bash
# Download, here (PyPI reachable), the wheels bench/gpu/run.sh installs on the lent GPU machine: the project's pins
# that its image lacks or holds in another version, for CPython 3.12 on x86-64 manylinux. Torch, accelerate,
# tokenizers, safetensors, huggingface-hub, pyarrow, pandas and xxhash come from the image (its torch 2.11 + CUDA 13
# is inside pyproject's torch range); run.sh's stack step reports any requirement the result leaves unmet.
#
#   bash bench/gpu/download_wheels.sh [DEST]          # DEST defaults to bench/gpu/wheels (git-ignored)
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=${1:-bench/gpu/wheels}
PY=${PYTHON:-python3}
pin() { grep -E "^$1==" .ci/constraints.txt; }  # one source of truth for the pinned versions
PACKAGES=(
    "$(pin transformers)" "$(pin trl)" "$(pin peft)" "$(pin datasets)"
    # datasets' own needs missing from the image (fsspec: datasets 5.2 caps it at 2026.9.0)
    "dill==0.4.1" "multiprocess==0.70.19" "fsspec==2026.9.0"
)
mkdir -p "$DEST"
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "${PACKAGES[@]}"
ls -la "$DEST"
du -sh "$DEST"
