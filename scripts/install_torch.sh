#!/usr/bin/env bash
# Install torch into the virtualenv unless one is already there.
# A machine with an NVIDIA GPU gets the newest CUDA build pip resolves; a machine without one gets
# torch 2.13.0, which this project's CPU machines hold as a CPU wheel on local disk. Elsewhere, add
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu to fetch the small CPU build. TORCH_SPEC
# overrides the choice entirely (e.g. TORCH_SPEC="torch==2.9.1").
set -euo pipefail
python=${1:?usage: install_torch.sh PYTHON}
if "$python" -c "import torch" 2>/dev/null; then
  echo "torch $("$python" -c 'import torch; print(torch.__version__)') already installed"
  exit 0
fi
if [ -n "${TORCH_SPEC:-}" ]; then
  spec=$TORCH_SPEC
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  spec="torch>=2.6"
else
  spec="torch==2.13.0"
fi
args=()
if [ -n "${TORCH_INDEX_URL:-}" ]; then args+=(--index-url "$TORCH_INDEX_URL"); fi
echo "installing $spec"
"$python" -m pip install -q "${args[@]}" "$spec"
