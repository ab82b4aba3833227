#!/usr/bin/env bash
# Sharded-training smoke check for a machine with GPUs (msd's FSDP2; DeepSpeed ZeRO-3 when
# deepspeed is installed): train a few steps, SIGKILL after a checkpoint, resume, save, reload,
# for full fine-tuning and LoRA. NOT RUN on GPUs yet (see docs/SCALING.md); without GPUs it runs
# the FSDP2 cases on 2 CPU processes (a test of the script). Extra arguments go to the .py file.
#
#   bash bench/gpu_scale_check.sh                  # all GPUs of this machine
#   bash bench/gpu_scale_check.sh --gpus 2 --engines fsdp2
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/_env.sh
exec timeout 1200 "$PY" bench/gpu_scale_check.py "$@"
