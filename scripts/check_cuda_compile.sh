#!/usr/bin/env bash
# Compile-check the torch-free CUDA kernels (csrc/cuda/xbar_kernel.cu) with plain `nvcc -c` for
# sm_80 and sm_90.  Needs no GPU and no CUDA build of torch; exits 0 with a note when nvcc is absent.
set -euo pipefail
cd "$(dirname "$0")/.."

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
