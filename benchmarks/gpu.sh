#!/usr/bin/env bash
# tunelab vs TRL+PEFT on one CUDA GPU: a Qwen2-0.5B-shaped model (random weights, vocab 151,936),
# bf16, LoRA r=16 on all linear layers and full fine-tuning, 40 steps each (5 untimed), batch 8,
# max length 512, the same Alpaca-like data set as the CPU benchmark. About 5-8 minutes on an H100.
#
#   bash benchmarks/gpu.sh [RESULTS_DIR]     # writes gpu.txt and gpu.json there ($OUT by default)
#
# Needs torch (CUDA), transformers, peft, accelerate and datasets. TRL travels as a wheel in
# benchmarks/wheels/ (pip download trl==1.16.0 --no-deps -d benchmarks/wheels) and is installed
# from it, without network, when missing. Peak memory here is torch.cuda.max_memory_allocated.
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-${OUT:-benchmarks/.cache}}
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$RESULTS"

if ! $PY -c "import trl" 2>/dev/null; then
  $PY -m pip install --quiet --no-deps --no-index benchmarks/wheels/trl-1.16.0-py3-none-any.whl
fi
$PY - <<'EOF'
import importlib.util, sys
import torch
missing = [m for m in ("transformers", "peft", "trl", "accelerate", "datasets") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu.sh: missing Python packages: {', '.join(missing)}")
if not torch.cuda.is_available():
    sys.exit("gpu.sh: no CUDA device")
print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
EOF

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
timeout 470 $PY -u -m benchmarks.run --suite gpu --cache /tmp/tunelab-bench-gpu --json "$RESULTS/gpu.json" \
  2>&1 | tee "$RESULTS/gpu.txt"
