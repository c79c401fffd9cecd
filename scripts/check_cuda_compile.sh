#!/usr/bin/env bash
# Compile-check the GPU kernels for sm_80 and sm_90 without a GPU: the torch-free CUDA kernels
# (csrc/cuda/xbar_kernel.cu) with plain `nvcc -c`, and the Triton kernel ahead of time when the
# Python on PATH has torch and Triton.  Each check is skipped with a note when its tool is absent.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if "$PYTHON" -c "import torch, triton" 2>/dev/null; then
  "$PYTHON" scripts/check_triton_compile.py
else
  echo "check_cuda_compile: no torch+Triton for $PYTHON, skipping the Triton compile check"
fi

NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$NVCC" ]]; then
  echo "check_cuda_compile: nvcc not found, skipping the CUDA compile check"
  exit 0
fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
"$NVCC" --version | tail -n 1
for arch in 80 90; do
  "$NVCC" -c -std=c++17 -O2 -Xcompiler -Wall -Werror all-warnings \
    -gencode "arch=compute_${arch},code=sm_${arch}" csrc/cuda/xbar_kernel.cu -o "$out/xbar_kernel_sm${arch}.o"
  echo "check_cuda_compile: csrc/cuda/xbar_kernel.cu OK for sm_${arch}"
done
