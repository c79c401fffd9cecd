#!/usr/bin/env bash
# On a machine with a GPU, a CUDA build of torch, Triton and nvcc (no network needed):
# build and install xma2_ops with its CUDA kernels, run the GPU tests, then the GPU benchmark.
# Each step has its own time limit (140 + 160 + 60 + 60 s, plus ~40 s of compile checks): under 8 minutes.
#   usage: scripts/gpu_check.sh            (PYTHON=... to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHON="${PYTHON:-python}"  # also used by check_cuda_compile.sh

if ! command -v nvcc >/dev/null; then
  echo "gpu_check: nvcc not found" >&2
  exit 1
fi
# torch guesses CUDA_HOME from the nvcc on PATH, which is wrong when that nvcc is a wrapper script:
# ask nvcc where it really lives.
if [[ -z "${CUDA_HOME:-}" ]]; then
  here="$(echo 'int main() { return 0; }' > /tmp/gpu_check_probe.cu &&
          nvcc --dryrun -c /tmp/gpu_check_probe.cu -o /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n 1)"
  export CUDA_HOME="$(cd "$here/.." && pwd)"
fi
echo "gpu_check: CUDA_HOME=$CUDA_HOME"
"$PYTHON" - <<'EOF'
import torch
assert torch.version.cuda, f"torch {torch.__version__} is not a CUDA build"
assert torch.cuda.is_available(), "no GPU visible to torch"
print(f"gpu_check: torch {torch.__version__} (CUDA {torch.version.cuda}) on {torch.cuda.get_device_name()}")
EOF

scripts/check_cuda_compile.sh

echo "gpu_check: building (pip install --no-build-isolation .)"
export XMA2_CUDA=1  # build the CUDA kernels, and test_cuda.py fails (not skips) without them
MAX_JOBS="${MAX_JOBS:-8}" timeout 140 "$PYTHON" -m pip install --no-build-isolation --no-deps -q .

# Run from outside the source tree so that the installed package (with _C) is the one tested.
tests="$(pwd)/python_tests"
cd /tmp
echo "gpu_check: GPU tests"
timeout 160 "$PYTHON" -m pytest -q -rs "$tests/test_cuda.py" "$tests/test_triton.py"
cd - >/dev/null

echo "gpu_check: benchmark"
if [[ ! -f benchmarks/bench_ops.py ]]; then
  echo "gpu_check: benchmarks/bench_ops.py is missing" >&2
  exit 1
fi
timeout 60 "$PYTHON" benchmarks/bench_ops.py --device cuda
echo "gpu_check: whole networks (ResNet-18, batch 64 and 1; the layers' default backend on CUDA)"
timeout 60 "$PYTHON" benchmarks/bench_models.py --device cuda --cases resnet18-b64 resnet18-b1 \
  --configs default lossless ideal --repeats 3
echo "gpu_check: OK"
