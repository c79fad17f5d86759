#!/usr/bin/env bash
# The prepared GPU check: one command on a lent GPU machine, done in well under 8 minutes, JSON in $OUT.
#
# Here (dev box), once: .venv/bin/python bench/gpu_check.py --prepare bench/.gpu/tokenizer
#   and, for packages the GPU image lacks (pydantic, fastapi, ..., vllm), wheels in bench/.gpu/wheels.
# There: bash bench/gpu_check.sh   (with `carry: ["bench/.gpu"]`); without a GPU it runs on the CPU (--quick).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu-check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if compgen -G "bench/.gpu/wheels/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-site \
    bench/.gpu/wheels/*.whl && export PYTHONPATH="/tmp/gpu-site:${PYTHONPATH:-}"
fi
export PYTHONPATH=".:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.csv" 2>&1 || true
EXTRA=()
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || EXTRA=(--quick)
timeout 450 "$PY" bench/gpu_check.py --tokenizer bench/.gpu/tokenizer --out "$OUT/gpu_check.json" "${EXTRA[@]}" \
  2>&1 | tee "$OUT/gpu_check.log"
