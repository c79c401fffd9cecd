"""The custom ops the layers call (``torch.ops.xma2_ops.<name>``), their autograd and fakes.

- ``crossbar_mvm``: the backend's mvm (backends/dispatch.py picks it) with its autograd registered
  at the op level: exact gradients for the coefficients (SPEC 5);
- ``crossbar_mvm_cells``: the same over the device model's cells (SPEC 7.2);
- ``straight_through_conv2d`` / ``straight_through_linear``: zero-valued ops whose gradient is the
  straight-through estimator for x and the weights.

With these, the layers trace into one graph under torch.compile (no Python autograd.Function with
object arguments).  The C++ ops (``xbar_*``) are registered by the extension (backends/cpp.py).
"""
from __future__ import annotations

from typing import List, Optional

import torch

from .backends import backend_for
from .config import GemmParams
from .lowering import ConvLowering, LinearLowering


# ------------------------------------------------------------------ the ops the layers call (autograd at op level)
@torch.library.custom_op("xma2_ops::crossbar_mvm", mutates_args=())
def _crossbar_mvm(x_codes: torch.Tensor, wb_codes: torch.Tensor, wt_codes: Optional[torch.Tensor],
                  coef_b: torch.Tensor, coef_t: Optional[torch.Tensor], rows: int, cols: int, input_bits: int,
                  input_signed: bool, dac_bits: int, weight_bits: int, cell_bits: int, adc_levels: int,
                  adc_clip: int, periphery: int, backend: str, wb_packed: Optional[torch.Tensor] = None,
                  wt_packed: Optional[torch.Tensor] = None) -> torch.Tensor:
    p = GemmParams(rows, cols, input_bits, input_signed, dac_bits, weight_bits, cell_bits, adc_levels, adc_clip,
                   periphery)
    be, p = backend_for(backend, x_codes.device, p)
    return be.mvm_with(x_codes, wb_codes, wb_packed, wt_codes, wt_packed, coef_b, coef_t, p)


@_crossbar_mvm.register_fake
def _crossbar_mvm_fake(x_codes, wb_codes, wt_codes, coef_b, coef_t, *args, wb_packed=None, wt_packed=None):
    torch._check(x_codes.dim() == 2 and wb_codes.dim() == 2)
    torch._check(x_codes.shape[1] == wb_codes.shape[0])
    return coef_b.new_empty((x_codes.shape[0], wb_codes.shape[1]))


def _crossbar_mvm_setup(ctx, inputs, output) -> None:
    x_codes, wb_codes, wt_codes, coef_b, coef_t, *ints, backend, wb_packed, wt_packed = inputs
    ctx.save_for_backward(x_codes, wb_codes, wt_codes, wb_packed, wt_packed)
    ctx.params = GemmParams(*ints)
    ctx.backend = backend
    ctx.coef_dtype = coef_b.dtype


def _crossbar_mvm_backward(ctx, gy):
    # Exact: y is linear in the coefficients, dy/dcoef[r, n] = T_int[r, :, n] (SPEC 5).
    x_codes, wb_codes, wt_codes, wb_packed, wt_packed = ctx.saved_tensors
    be, p = backend_for(ctx.backend, x_codes.device, ctx.params)
    g_b = g_t = None
    if ctx.needs_input_grad[3]:
        g_b = be.coef_gradient(x_codes, wb_codes, gy, p, wb_packed).to(ctx.coef_dtype)
    if wt_codes is not None and ctx.needs_input_grad[4]:
        g_t = be.coef_gradient(x_codes, wt_codes, gy, p, wt_packed).to(ctx.coef_dtype)
    return (None, None, None, g_b, g_t) + (None,) * 13


_crossbar_mvm.register_autograd(_crossbar_mvm_backward, setup_context=_crossbar_mvm_setup)


def crossbar_mvm(x_codes, wb_codes, wt_codes, coef_b, coef_t, p: GemmParams, backend: str, wb_packed=None,
                 wt_packed=None) -> torch.Tensor:
    """y [M, N] = sum_r coef_b T_b_int + coef_t T_t_int on ``backend``, differentiable in the coefficients;
    ``wb_packed``/``wt_packed``: the backend's packed forms of the codes (ProgrammedWeight.packed), or None."""
    return torch.ops.xma2_ops.crossbar_mvm(x_codes, wb_codes, wt_codes, coef_b, coef_t, *p.op_args(), backend,
                                           wb_packed, wt_packed)


@torch.library.custom_op("xma2_ops::straight_through_conv2d", mutates_args=())
def _ste_conv2d(x: torch.Tensor, w: torch.Tensor, stride: List[int], padding: List[int],
                dilation: List[int]) -> torch.Tensor:
    low = ConvLowering(tuple(x.shape), tuple(w.shape), tuple(stride), tuple(padding), tuple(dilation))
    return x.new_zeros(low.out_shape)


@_ste_conv2d.register_fake
def _ste_conv2d_fake(x, w, stride, padding, dilation):
    low = ConvLowering(tuple(x.shape), tuple(w.shape), tuple(stride), tuple(padding), tuple(dilation))
    return x.new_empty(low.out_shape)


@torch.library.custom_op("xma2_ops::straight_through_linear", mutates_args=())
def _ste_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.new_zeros((*x.shape[:-1], w.shape[0]))


@_ste_linear.register_fake
def _ste_linear_fake(x, w):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def _ste_setup(ctx, inputs, output) -> None:
    x, w, *geometry = inputs
    ctx.save_for_backward(x, w)
    ctx.geometry = tuple(tuple(g) for g in geometry)


def _ste_backward(ctx, gy):
    x, w = ctx.saved_tensors
    low = (ConvLowering(tuple(x.shape), tuple(w.shape), *ctx.geometry) if ctx.geometry
           else LinearLowering(tuple(x.shape), tuple(w.shape)))
    gx, gw = low.ste_grads(gy, x, w)
    return (gx if ctx.needs_input_grad[0] else None, gw if ctx.needs_input_grad[1] else None) + (None,) * len(
        ctx.geometry)


_ste_conv2d.register_autograd(_ste_backward, setup_context=_ste_setup)
_ste_linear.register_autograd(_ste_backward, setup_context=_ste_setup)


def straight_through(x: torch.Tensor, w: torch.Tensor, lowering) -> torch.Tensor:
    """Zeros of the layer's output shape whose gradient is the float layer's at (x, w)."""
    if isinstance(lowering, ConvLowering):
        return torch.ops.xma2_ops.straight_through_conv2d(x, w, list(lowering.stride), list(lowering.padding),
                                                          list(lowering.dilation))
    return torch.ops.xma2_ops.straight_through_linear(x, w)


@torch.library.custom_op("xma2_ops::crossbar_mvm_cells", mutates_args=())
def _crossbar_mvm_cells(x_codes: torch.Tensor, gb: torch.Tensor, gt: Optional[torch.Tensor], coef_b: torch.Tensor,
                        coef_t: Optional[torch.Tensor], rows: int, cols: int, input_bits: int, input_signed: bool,
                        dac_bits: int, weight_bits: int, cell_bits: int, adc_levels: int, adc_clip: int,
                        periphery: int, frac_bits: int, backend: str) -> torch.Tensor:
    p = GemmParams(rows, cols, input_bits, input_signed, dac_bits, weight_bits, cell_bits, adc_levels, adc_clip,
                   periphery)
    be, p = backend_for(backend, x_codes.device, p, cells=True)
    return be.cell_mvm(x_codes, gb, gt, coef_b, coef_t, p, frac_bits)


@_crossbar_mvm_cells.register_fake
def _crossbar_mvm_cells_fake(x_codes, gb, gt, coef_b, coef_t, *args):
    torch._check(x_codes.dim() == 2 and gb.dim() == 4)
    torch._check(x_codes.shape[1] == gb.shape[2])
    return coef_b.new_empty((x_codes.shape[0], gb.shape[3]))


def _crossbar_mvm_cells_setup(ctx, inputs, output) -> None:
    x_codes, gb, gt, coef_b, coef_t, *ints, frac_bits, backend = inputs
    ctx.save_for_backward(x_codes, gb, gt)
    ctx.params = GemmParams(*ints)
    ctx.frac_bits, ctx.backend, ctx.coef_dtype = frac_bits, backend, coef_b.dtype


def _crossbar_mvm_cells_backward(ctx, gy):
    x_codes, gb, gt = ctx.saved_tensors
    be, p = backend_for(ctx.backend, x_codes.device, ctx.params, cells=True)
    g_b = g_t = None
    if ctx.needs_input_grad[3]:
        g_b = be.cell_coef_gradient(x_codes, gb, gy, p, ctx.frac_bits).to(ctx.coef_dtype)
    if gt is not None and ctx.needs_input_grad[4]:
        g_t = be.cell_coef_gradient(x_codes, gt, gy, p, ctx.frac_bits).to(ctx.coef_dtype)
    return (None, None, None, g_b, g_t) + (None,) * 12


_crossbar_mvm_cells.register_autograd(_crossbar_mvm_cells_backward, setup_context=_crossbar_mvm_cells_setup)


def crossbar_mvm_cells(x_codes, gb, gt, coef_b, coef_t, p: GemmParams, frac_bits: int, backend: str) -> torch.Tensor:
    """crossbar_mvm over non-ideal cells: conductances gb/gt [2, S, K, N] int32 (SPEC 7.2)."""
    return torch.ops.xma2_ops.crossbar_mvm_cells(x_codes, gb, gt, coef_b, coef_t, *p.op_args(), frac_bits, backend)
