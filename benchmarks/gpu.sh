#!/usr/bin/env bash
# tunelab vs TRL+PEFT on one CUDA GPU: a Qwen2-0.5B-shaped model (random weights, vocab 151,936),
# bf16, LoRA r=16 on all linear layers and full fine-tuning, 40 steps each (5 untimed), batch 8,
# max length 512, the same Alpaca-like data set as the CPU benchmark, TRL with and without its
# default gradient checkpointing. About 6 minutes on an H200 (BENCHMARKS.md has its figures).
#
#   bash benchmarks/gpu.sh [RESULTS_DIR [RUN_ARGS...]]   # gpu.txt and gpu.json there ($OUT by default)
#
# RUN_ARGS go to `python -m benchmarks.run --suite gpu` (e.g. --only lora --steps 60).
#
# Needs torch (CUDA), transformers, peft, accelerate and datasets. TRL travels as a wheel in
# benchmarks/wheels/ (pip download trl==1.16.0 --no-deps -d benchmarks/wheels) and is installed
# from it, without network, when missing. WHEELS=DIR installs every wheel in DIR instead (no
# dependencies resolved, into a private folder put first on PYTHONPATH): the way to bring the
# versions the CPU benchmark used onto a machine that has others. Peak memory here is
# torch.cuda.max_memory_allocated.
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-${OUT:-benchmarks/.cache}}
shift || true
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$RESULTS"

SITE=/tmp/tunelab-bench-site
if [ -n "${WHEELS:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
elif ! $PY -c "import trl" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target "$SITE" benchmarks/wheels/trl-1.16.0-py3-none-any.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
$PY - <<'EOF'
import importlib.util, sys
import torch
missing = [m for m in ("transformers", "peft", "trl", "accelerate", "datasets") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu.sh: missing Python packages: {', '.join(missing)}")
if not torch.cuda.is_available():
    sys.exit("gpu.sh: no CUDA device")
import importlib.metadata as md
versions = ", ".join(f"{m} {md.version(m)}" for m in ("transformers", "peft", "trl", "accelerate", "datasets"))
print(f"torch {torch.__version__}, {versions}; {torch.cuda.get_device_name(0)}")
EOF

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
timeout 470 $PY -u -m benchmarks.run --suite gpu --cache /tmp/tunelab-bench-gpu --json "$RESULTS/gpu.json" "$@" \
  2>&1 | tee "$RESULTS/gpu.txt"
