"""The C++ (csrc/) kernels as backends: "cpu" (every CPU, bit-plane kernels) and "cuda" (a build with
nvcc).  The one place that loads the extension ``xma2_ops._C`` (which registers the ops
``torch.ops.xma2_ops.xbar_*``) and warns when it did not load; the ops' fake (meta) implementations
for torch.compile live here too, beside the backend entries that call the ops.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Dict, Optional

import torch

from ..config import KERNEL_PERIPHERY, GemmParams
from .base import BackendBase

try:
    from .. import _C  # noqa: F401  (registers TORCH_LIBRARY(xma2_ops) and its CPU/CUDA kernels)
    HAS_C = True
    C_ERROR: Optional[BaseException] = None
except ImportError as _err:  # a source checkout without a build, or a build for another torch
    HAS_C = False
    C_ERROR = _err

C_HINT = ("the C++ extension xma2_ops._C did not load ({err}); only the slow 'reference' backend runs on the "
          "CPU.  Rebuild it against the installed torch: `pip install --no-build-isolation -e .` (or "
          "`pip install --no-build-isolation .`) in the xma2_ops source folder, after installing torch")
_WARNED_NO_C = False


def warn_no_c() -> None:
    """Warn once per process that CPU calls fall back to the (much slower) reference."""
    global _WARNED_NO_C
    if not _WARNED_NO_C:
        _WARNED_NO_C = True
        warnings.warn(C_HINT.format(err=C_ERROR), RuntimeWarning, stacklevel=3)


if not HAS_C:
    warn_no_c()


# ------------------------------------------------------------------ fake impls of the C++ ops (torch.compile / opcheck)
if HAS_C:
    @torch.library.register_fake("xma2_ops::xbar_tile_sums")
    def _tile_sums_fake(x_codes, w_codes, rows, cols, input_bits, input_signed, dac_bits, weight_bits,
                        cell_bits, adc_levels, adc_clip, periphery=0):
        torch._check(x_codes.dim() == 2 and w_codes.dim() == 2)
        torch._check(x_codes.shape[1] == w_codes.shape[0])
        tr = (x_codes.shape[1] + rows - 1) // rows
        return x_codes.new_empty((tr, x_codes.shape[0], w_codes.shape[1]), dtype=torch.int64)

    @torch.library.register_fake("xma2_ops::xbar_mvm")
    def _mvm_fake(x_codes, wb_codes, wt_codes, coef_b, coef_t, rows, cols, input_bits, input_signed, dac_bits,
                  weight_bits, cell_bits, adc_levels, adc_clip, periphery=0):
        torch._check(x_codes.dim() == 2 and wb_codes.dim() == 2)
        torch._check(x_codes.shape[1] == wb_codes.shape[0])
        return coef_b.new_empty((x_codes.shape[0], wb_codes.shape[1]))

    @torch.library.register_fake("xma2_ops::xbar_coef_grad")
    def _coef_grad_fake(x_codes, w_codes, gy, rows, cols, input_bits, input_signed, dac_bits, weight_bits,
                        cell_bits, adc_levels, adc_clip, periphery=0):
        torch._check(x_codes.dim() == 2 and w_codes.dim() == 2)
        torch._check(x_codes.shape[1] == w_codes.shape[0])
        tr = (x_codes.shape[1] + rows - 1) // rows
        return gy.new_empty((tr, w_codes.shape[1]), dtype=torch.float64)

    @torch.library.register_fake("xma2_ops::xbar_pack_weights")
    def _pack_weights_fake(w_codes, *args):
        torch._check(w_codes.dim() == 2)
        return w_codes.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.int32)

    @torch.library.register_fake("xma2_ops::xbar_mvm_packed")
    def _mvm_packed_fake(x_codes, wb_codes, wb_packed, wt_codes, wt_packed, coef_b, coef_t, *args):
        return _mvm_fake(x_codes, wb_codes, wt_codes, coef_b, coef_t, *args)

    @torch.library.register_fake("xma2_ops::xbar_coef_grad_packed")
    def _coef_grad_packed_fake(x_codes, w_codes, w_packed, gy, *args):
        return _coef_grad_fake(x_codes, w_codes, gy, *args)

    @torch.library.register_fake("xma2_ops::xbar_unfold_codes")
    def _unfold_codes_fake(x, kernel_size, dilation, padding, stride):
        torch._check(x.dim() == 4)
        b, c, h, w = x.shape
        ho, wo = ((size + 2 * p - d * (k - 1) - 1) // s + 1
                  for size, k, d, p, s in zip((h, w), kernel_size, dilation, padding, stride))
        return x.new_empty((b * ho * wo, c * kernel_size[0] * kernel_size[1]))


if HAS_C and hasattr(torch.ops.xma2_ops, "xbar_cell_tile_sums"):
    @torch.library.register_fake("xma2_ops::xbar_cell_tile_sums")
    def _cell_tile_sums_fake(x_codes, g, rows, *args):
        torch._check(x_codes.dim() == 2 and g.dim() == 4)
        torch._check(x_codes.shape[1] == g.shape[2])
        tr = (x_codes.shape[1] + rows - 1) // rows
        return x_codes.new_empty((tr, x_codes.shape[0], g.shape[3]), dtype=torch.int64)

    @torch.library.register_fake("xma2_ops::xbar_cell_mvm")
    def _cell_mvm_fake(x_codes, gb, gt, coef_b, coef_t, *args):
        torch._check(x_codes.dim() == 2 and gb.dim() == 4)
        torch._check(x_codes.shape[1] == gb.shape[2])
        return coef_b.new_empty((x_codes.shape[0], gb.shape[3]))

    @torch.library.register_fake("xma2_ops::xbar_cell_coef_grad")
    def _cell_coef_grad_fake(x_codes, g, gy, rows, *args):
        torch._check(x_codes.dim() == 2 and g.dim() == 4)
        tr = (x_codes.shape[1] + rows - 1) // rows
        return gy.new_empty((tr, g.shape[3]), dtype=torch.float64)


# ------------------------------------------------------------------ the backends
def _torch_op_backend(name: str, devices: tuple, periphery: int = 0) -> BackendBase:
    """The C++ ops of one dispatch key as a backend; ``periphery``: the SPEC 8 bits its codes ops compute
    (passed to them as their last argument; without any, the ops get the Sections 2-3 arguments)."""
    def args(p: GemmParams) -> tuple:
        return p.as_args(with_periphery=True) if periphery else p.as_args()

    def tile_sums(x_codes, w_codes, p: GemmParams):
        return torch.ops.xma2_ops.xbar_tile_sums(x_codes, w_codes, *args(p))

    def mvm(x_codes, wb_codes, wt_codes, coef_b, coef_t, p: GemmParams):
        return torch.ops.xma2_ops.xbar_mvm(x_codes, wb_codes, wt_codes, coef_b, coef_t, *args(p))

    key = "CUDA" if "cuda" in devices else "CPU"
    coef_grad = unfold_codes = None
    packed = {}
    if torch._C._dispatch_has_kernel_for_dispatch_key("xma2_ops::xbar_pack_weights", key):
        def pack_weights(w_codes, p: GemmParams):
            return torch.ops.xma2_ops.xbar_pack_weights(w_codes, *args(p))

        def mvm_packed(x_codes, wb_codes, wb_packed, wt_codes, wt_packed, coef_b, coef_t, p: GemmParams):
            return torch.ops.xma2_ops.xbar_mvm_packed(x_codes, wb_codes, wb_packed, wt_codes, wt_packed, coef_b, coef_t,
                                                      *args(p))

        def coef_grad_packed(x_codes, w_codes, w_packed, gy, p: GemmParams):
            return torch.ops.xma2_ops.xbar_coef_grad_packed(x_codes, w_codes, w_packed, gy, *args(p))

        packed = dict(pack_weights=pack_weights, mvm_packed=mvm_packed, coef_grad_packed=coef_grad_packed)
    if torch._C._dispatch_has_kernel_for_dispatch_key("xma2_ops::xbar_coef_grad", key):
        def coef_grad(x_codes, w_codes, gy, p: GemmParams):
            return torch.ops.xma2_ops.xbar_coef_grad(x_codes, w_codes, gy, *args(p))
    if torch._C._dispatch_has_kernel_for_dispatch_key("xma2_ops::xbar_unfold_codes", key):
        def unfold_codes(x_codes, kernel_size, dilation, padding, stride):
            return torch.ops.xma2_ops.xbar_unfold_codes(x_codes, kernel_size, dilation, padding, stride)
    return BackendBase(name, tile_sums, mvm, devices, coef_grad, small_codes=(key == "CPU"), unfold_codes=unfold_codes,
                   periphery=periphery, **packed)


def _torch_op_cells(key: str) -> dict:
    """The C++ device-model ops of a dispatch key, when the extension registers them."""
    if not (hasattr(torch.ops.xma2_ops, "xbar_cell_tile_sums")
            and torch._C._dispatch_has_kernel_for_dispatch_key("xma2_ops::xbar_cell_tile_sums", key)):
        return {}

    def _cell_args(p: GemmParams, frac_bits: int) -> tuple:
        """as_args, frac_bits, then the periphery bits (the cell ops' schema)."""
        return p.as_args(with_periphery=True)[:-1] + (frac_bits, p.periphery)

    def tile_sums(x_codes, gq, p: GemmParams, frac_bits: int):
        return torch.ops.xma2_ops.xbar_cell_tile_sums(x_codes, gq, *_cell_args(p, frac_bits))

    def mvm(x_codes, gb, gt, coef_b, coef_t, p: GemmParams, frac_bits: int):
        return torch.ops.xma2_ops.xbar_cell_mvm(x_codes, gb, gt, coef_b, coef_t, *_cell_args(p, frac_bits))

    def coef_grad(x_codes, gq, gy, p: GemmParams, frac_bits: int):
        return torch.ops.xma2_ops.xbar_cell_coef_grad(x_codes, gq, gy, *_cell_args(p, frac_bits))

    # The cell ops compute the same SPEC 8 bits as the codes ops (csrc/cpu/cells.cpp).
    return dict(cell_tile_sums=tile_sums, cell_mvm_kernel=mvm, cell_coef_grad=coef_grad,
                cell_periphery=KERNEL_PERIPHERY)


def backends() -> Dict[str, BackendBase]:
    """The C++ backends this build registers: "cpu", and "cuda" when built with its CUDA kernels."""
    out: Dict[str, BackendBase] = {}
    if HAS_C:
        # The CPU bit-plane kernels compute differential sensing, sign-magnitude inputs, half-even rounding
        # (csrc/cpu/xbar_cpu_block.h), the even row split and the per-tile ADC range (csrc/cpu/plan.h), and so do
        # its cell ops (csrc/cpu/cells.cpp); the CUDA kernel none of SPEC 8.
        out["cpu"] = dataclasses.replace(_torch_op_backend("cpu", ("cpu",), KERNEL_PERIPHERY), **_torch_op_cells("CPU"))
        if torch._C._dispatch_has_kernel_for_dispatch_key("xma2_ops::xbar_mvm", "CUDA"):
            out["cuda"] = _torch_op_backend("cuda", ("cuda",))
    return out
