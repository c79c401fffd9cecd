"""Test setup: Triton kernels run in interpreter mode on CPU tensors when no GPU is present
(must be set before any Triton kernel is defined), and the C++ extension must be built."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import strategies  # noqa: E402,F401  (registers the Hypothesis profiles "ci"/"long" before --hypothesis-profile is read)
import xma2_ops  # noqa: E402
from xma2_ops.backends import cpp  # noqa: E402

if not cpp.HAS_C:
    raise RuntimeError(f"xma2_ops._C is not built ({cpp.C_ERROR}); run `pip install --no-build-isolation -e .` first")
