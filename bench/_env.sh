# Shared set-up of the GPU check scripts (sourced, from the repository root): the Python to use,
# wheels carried in .whl/ (bench/fetch_gpu_wheels.sh) installed into a private folder, msd
# imported from src/, the library versions printed, quiet offline settings exported.
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  SITE="${TMPDIR:-/tmp}/msd-bench-site"
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl; then
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "bench: the wheels in .whl/ do not fit this Python (fetch them with PYVER=...); using what is installed"
  fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
date -u +"date: %Y-%m-%dT%H:%M:%SZ"
"$PY" - <<'PYEOF'
import torch, transformers, peft, accelerate
print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
      f"accelerate {accelerate.__version__}, cuda {torch.version.cuda}, gpus {torch.cuda.device_count()}")
PYEOF
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONWARNINGS=ignore
