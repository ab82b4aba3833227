#!/usr/bin/env bash
# Fetch, from PyPI, the wheels that bench/gpu_check.sh needs on a GPU machine that cannot reach
# the network: what msd, TRL's trainers and `datasets` need beyond a CUDA PyTorch image with
# transformers, peft, accelerate, pyarrow, pandas and matplotlib. They land in .whl/ (ignored
# by git), well under 64 MiB; gpu_check.sh installs them into a private folder when present.
#
#   bash bench/fetch_gpu_wheels.sh            # Python 3.12, x86-64 Linux (the GPU image)
#   PYVER=3.11 bash bench/fetch_gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER="${PYVER:-3.12}"
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
mkdir -p .whl
# Pure-Python wheels (no platform tag needed) and their missing requirements.
WHEELS=(trl datasets dill multiprocess py3langid)
for name in "${WHEELS[@]}"; do
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl "$name"
done
du -sh .whl
ls .whl
