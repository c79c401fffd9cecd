"""Compile the Triton kernels of xma2_ops/backends/triton/kernels.py ahead of time for sm_80 and sm_90, without
a GPU, in each code path: the code kernel (sliced/lossless, single/streamed K, tile_sums/mvm, 8-bit
fields) and the device-model cell kernel (lossy/ideal ADC, conductance digits, 8-bit DAC chunks).
Exits 0 with a note when Triton is not installed.

    python scripts/check_triton_compile.py
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter

try:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:
    print("check_triton_compile: Triton not installed, skipping")
    sys.exit(0)

from xma2_ops.backends.triton import kernels as tk, launch  # noqa: E402

RUNTIME_ARGS = {"x_ptr": "*i32", "wb_ptr": "*i32", "wt_ptr": "*i32", "cb_ptr": "*fp32", "ct_ptr": "*fp32",
                "out_ptr": "*fp32", **{name: "i32" for name in (
                    "M", "N", "K", "plane", "sxm", "sxk", "swk", "swn", "rows", "n_tiles", "chunks", "slices",
                    "adc_levels", "adc_clip", "adc_den", "adc_mult", "adc_shift")}}
BASE = dict(X_POLS=2, DB=1, CB=2, LOSSLESS=False, X_DIGITS=1, W_DIGITS=1, SINGLE_K=True, X_T=tl.int16, W_T=tl.int8,
            ADC_MUL=True, T_T=tl.int32, MVM=True, HAS_T=True, BLOCK_M=launch._BLOCK_M, BLOCK_N=launch._BLOCK_N, BLOCK_K=64)
CELL_ARGS = {"x_ptr": "*i32", "gb_ptr": "*i32", "gt_ptr": "*i32", "cb_ptr": "*fp32", "ct_ptr": "*fp32",
             "out_ptr": "*fp32", **{name: "i32" for name in (
                 "M", "N", "K", "plane", "sxm", "sxk", "sgq", "sgj", "sgk", "sgn", "rows", "n_tiles", "chunks",
                 "slices", "adc_levels")}, "adc_half": "i64", "adc_den": "i64"}
CELL_BASE = dict(X_POLS=2, XW=1, CB=2, IDEAL=False, X8=False, G_DIGITS=2, SINGLE_K=True, MVM=True, HAS_T=True,
                 BLOCK_M=launch._BLOCK_M, BLOCK_N=launch._BLOCK_N, BLOCK_K=launch._CELL_MAX_SINGLE_K)
CELL_VARIANTS = {
    "cells mvm, lossy ADC, single K": {},
    "cells mvm, streamed K, 8-bit DAC, 5 digits": dict(SINGLE_K=False, BLOCK_K=launch._STREAM_K, XW=8, X8=True,
                                                       G_DIGITS=5, CB=8),
    "cells tile_sums, ideal ADC, unsigned": dict(MVM=False, HAS_T=False, X_POLS=1, IDEAL=True, XW=7, G_DIGITS=3),
}
DEFAULT = "mvm, default config (128 rows, unsigned 8-bit codes), single K"
VARIANTS = {
    DEFAULT: dict(X_POLS=1, X_T=tl.uint8, BLOCK_K=launch._MAX_SINGLE_K, BLOCK_N=launch._BLOCK_N_WIDE_K, HAS_T=False),
    "mvm, sliced, signed, base and task weights, single K": {},
    "mvm, 16-bit codes, int64 ADC and tile sums, single K": dict(X_T=tl.int32, W_T=tl.int16, DB=4, CB=4,
                                                                  ADC_MUL=False, T_T=tl.int64),
    "mvm, sliced, streamed K, 8-bit fields": dict(SINGLE_K=False, BLOCK_K=launch._STREAM_K, DB=8, CB=8),
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
            kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": launch._NUM_WARPS})
            assert "cubin" in kernel.asm
            assert ".s8.s8" in kernel.asm["ptx"], "the exact dots should be int8 tensor-core MMAs"
            report = registers(kernel.asm["ptx"], arch)
            if report is None:
                print(f"check_triton_compile: sm_{arch} {name}: OK (no ptxas report)", flush=True)
                continue
            regs, stored, loaded = report
            print(f"check_triton_compile: sm_{arch} {name}: OK ({regs} registers, spills {stored} B stored / "
                  f"{loaded} B loaded)", flush=True)
            if name == DEFAULT:
                assert stored == loaded == 0, "the default config's kernel should not spill registers"


def registers(ptx: str, arch: int) -> Optional[Tuple[int, int, int]]:
    """ptxas' report of a kernel: (registers, spill bytes stored, spill bytes loaded); Triton's bundled
    ptxas, no GPU needed.  None without ptxas or its report."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        return None
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        err = subprocess.run([str(ptxas), f"-arch=sm_{arch}{'a' if arch == 90 else ''}", "-v", str(src), "-o", str(Path(d) / "k.cubin")],
                             capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", err)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", err)
    if not (regs and spills):
        return None
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))


if __name__ == "__main__":
    main()
