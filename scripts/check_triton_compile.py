"""Compile the Triton kernels of xma2_ops/triton_kernels.py ahead of time for sm_80 and sm_90, without
a GPU, in each code path: the code kernel (sliced/lossless, single/streamed K, tile_sums/mvm, 8-bit
fields) and the device-model cell kernel (lossy/ideal ADC, conductance digits, 8-bit DAC chunks).
Exits 0 with a note when Triton is not installed.

    python scripts/check_triton_compile.py
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter

try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:
    print("check_triton_compile: Triton not installed, skipping")
    sys.exit(0)

from xma2_ops import triton_kernels as tk  # noqa: E402

RUNTIME_ARGS = {"x_ptr": "*i32", "wb_ptr": "*i32", "wt_ptr": "*i32", "cb_ptr": "*fp32", "ct_ptr": "*fp32",
                "out_ptr": "*fp32", **{name: "i32" for name in (
                    "M", "N", "K", "plane", "sxm", "sxk", "swk", "swn", "rows", "n_tiles", "chunks", "slices",
                    "adc_levels", "adc_clip", "adc_den")}}
BASE = dict(X_POLS=2, DB=1, CB=2, LOSSLESS=False, X_DIGITS=1, W_DIGITS=1, SINGLE_K=True, MVM=True, HAS_T=True,
            BLOCK_M=tk._BLOCK_M, BLOCK_N=tk._BLOCK_N, BLOCK_K=tk._MAX_SINGLE_K)
CELL_ARGS = {"x_ptr": "*i32", "gb_ptr": "*i32", "gt_ptr": "*i32", "cb_ptr": "*fp32", "ct_ptr": "*fp32",
             "out_ptr": "*fp32", **{name: "i32" for name in (
                 "M", "N", "K", "plane", "sxm", "sxk", "sgq", "sgj", "sgk", "sgn", "rows", "n_tiles", "chunks",
                 "slices", "adc_levels")}, "adc_half": "i64", "adc_den": "i64"}
CELL_BASE = dict(X_POLS=2, XW=1, CB=2, IDEAL=False, X8=False, G_DIGITS=2, SINGLE_K=True, MVM=True, HAS_T=True,
                 BLOCK_M=tk._BLOCK_M, BLOCK_N=tk._BLOCK_N, BLOCK_K=tk._MAX_SINGLE_K)
CELL_VARIANTS = {
    "cells mvm, lossy ADC, single K": {},
    "cells mvm, streamed K, 8-bit DAC, 5 digits": dict(SINGLE_K=False, BLOCK_K=tk._STREAM_K, XW=8, X8=True,
                                                       G_DIGITS=5, CB=8),
    "cells tile_sums, ideal ADC, unsigned": dict(MVM=False, HAS_T=False, X_POLS=1, IDEAL=True, XW=7, G_DIGITS=3),
}
VARIANTS = {
    "mvm, sliced, single K": {},
    "mvm, sliced, streamed K, 8-bit fields": dict(SINGLE_K=False, BLOCK_K=tk._STREAM_K, DB=8, CB=8),
    "mvm, lossless, 16-bit codes": dict(LOSSLESS=True, X_DIGITS=3, W_DIGITS=3, HAS_T=False),
    "tile_sums, sliced, unsigned": dict(MVM=False, HAS_T=False, X_POLS=1),
}


def main() -> None:
    jobs = [(tk._xbar_kernel, RUNTIME_ARGS, BASE, name, change) for name, change in VARIANTS.items()]
    jobs += [(tk._cell_kernel, CELL_ARGS, CELL_BASE, name, change) for name, change in CELL_VARIANTS.items()]
    for arch in (80, 90):
        for fn, args, base, name, change in jobs:
            consts = {**base, **change}
            sig = {**args, **{k: "constexpr" for k in consts}}
            if not consts["MVM"]:
                sig["out_ptr"] = "*i64"
            src = ASTSource(fn=fn, signature=sig, constexprs={(list(sig).index(k),): v for k, v in consts.items()})
            kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": tk._NUM_WARPS})
            assert "cubin" in kernel.asm
            assert ".s8.s8" in kernel.asm["ptx"], "the exact dots should be int8 tensor-core MMAs"
            print(f"check_triton_compile: sm_{arch} {name}: OK")


if __name__ == "__main__":
    main()
