#!/usr/bin/env bash
# One-GPU check of the MSD step at Qwen2-1.5B size (bf16, LoRA, batch 8, 128 + 128 tokens,
# 10 timed steps), with TRL's DistillationTrainer beside it when trl is installed. Target: one
# run under 8 minutes on an H100/H200. Without a GPU it runs a tiny CPU configuration (a test of
# the script, not a measurement). Results: docs/PERFORMANCE.md. Extra arguments go to gpu_check.py.
#
#   bash bench/gpu_check.sh                # from the repository root
#   bash bench/gpu_check.sh --no-trl --steps 5
#
# On a machine without network access, fetch the missing wheels first where pip works
# (bash bench/fetch_gpu_wheels.sh: trl, datasets and msd's own light dependencies into .whl/)
# and carry .whl/ along: they are installed into a private folder, msd is imported from src/.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/_env.sh
exec timeout 470 "$PY" bench/gpu_check.py "$@"
