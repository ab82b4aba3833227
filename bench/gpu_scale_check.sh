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
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
date -u +"date: %Y-%m-%dT%H:%M:%SZ"
"$PY" - <<'PYEOF'
import torch, transformers, peft, accelerate
print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
      f"accelerate {accelerate.__version__}, cuda {torch.version.cuda}, gpus {torch.cuda.device_count()}")
PYEOF
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONWARNINGS=ignore
exec timeout 1200 "$PY" bench/gpu_scale_check.py "$@"
