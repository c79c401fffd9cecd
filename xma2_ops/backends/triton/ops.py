"""Backend "triton": the ops (``torch.library.triton_op``) and the backend's entry points.

The entry points (tile_sums, mvm, pack_weights, mvm_packed, cell_tile_sums, cell_mvm) check the
arguments and the data (xma2_ops.checks, the messages of the C++ ops) and call the ops, whose
bodies launch the kernels of kernels.py (launch.py).
"""
from __future__ import annotations

from typing import Optional

import torch

from ... import checks
from ...config import GemmParams
from .kernels import DEVICES, INTERPRET, _cell_kernel, _xbar_kernel  # noqa: F401  (DEVICES: the backend's)
from .launch import cell_launch, xbar_launch

# ------------------------------------------------------------------ the ops (torch.library.triton_op)
# Each kernel call is a ``torch.library.triton_op`` whose body launches the kernel through
# ``torch.library.wrap_triton``: torch.compile / make_fx see the kernel itself (a
# triton_kernel_wrapper_functional node that Inductor can schedule), not an opaque op.  The bodies
# check shapes, dtypes, devices and parameters only (they also run on fake tensors while tracing);
# the checks of values (codes in range, conductances that could overflow) need the data and live in
# the Python entry points below (tile_sums, mvm, cell_tile_sums, cell_mvm), which call the ops.
#
# The interpreter (TRITON_INTERPRET=1, CPU tensors): torch 2.13's wrap_triton hands an interpreted
# kernel (triton.runtime.interpreter.InterpretedFunction) back unchanged (torch/_library/triton.py,
# _is_interpreted_triton_kernel): there is no triton_kernel_wrapper HOP for it, so the body would
# launch the interpreter on whatever tensors it gets.  Eager calls on CPU tensors are fine (the body
# is the same as on a GPU), but the triton_op's fake impl (its body on FakeTensors) and its
# decomposition under FunctionalTensorMode (AOTAutograd) would hand fake tensors to the interpreter,
# which copies their (absent) storage and fails ("Attempted to set the storage of a tensor on
# device meta to a storage on different device cpu").  So in interpreter mode a body that runs under
# any dispatch mode or on a tensor subclass calls an opaque twin custom op (same schema, fake impl =
# the body's allocation) instead: traced graphs hold the twin, which launches the interpreter on real
# tensors at run time.  On CUDA (compiled Triton) the twins do not exist.
def _interpreted_trace(*tensors) -> bool:
    return INTERPRET and (torch._C._len_torch_dispatch_stack() > 0
                           or any(t is not None and type(t) is not torch.Tensor for t in tensors))


def _params(*ints) -> GemmParams:
    return GemmParams(*ints)


def _tile_sums_body(x_codes, w_codes, p: GemmParams, launch: bool = True) -> torch.Tensor:
    checks.check_gemm(x_codes, w_codes, p)
    m, k = x_codes.shape
    out = x_codes.new_empty((-(-k // p.rows), m, w_codes.shape[1]), dtype=torch.int64)
    if launch and out.numel():
        xbar_launch(torch.library.wrap_triton(_xbar_kernel), x_codes, w_codes, None, None, None, out, p)
    return out


def _mvm_body(x_codes, wb_codes, wt_codes, coef_b, coef_t, p: GemmParams, launch: bool = True) -> torch.Tensor:
    checks.check_gemm(x_codes, wb_codes, p)
    m, k = x_codes.shape
    n = wb_codes.shape[1]
    n_tiles = -(-k // p.rows)
    checks.check_coefs(x_codes, n, n_tiles, ("wb_codes", "wt_codes"), wb_codes, wt_codes, coef_b, coef_t, "xbar_mvm")
    if wt_codes is not None:  # the kernel indexes both weights with wb's strides
        wb_codes, wt_codes, coef_t = wb_codes.contiguous(), wt_codes.contiguous(), coef_t.contiguous()
    y = x_codes.new_zeros((m, n), dtype=coef_b.dtype)
    if launch and y.numel() and n_tiles:
        xbar_launch(torch.library.wrap_triton(_xbar_kernel), x_codes, wb_codes, wt_codes, coef_b.contiguous(),
                     coef_t, y, p)
    return y


def _cell_tile_sums_body(x_codes, gq, p: GemmParams, frac_bits: int, g_digits: int,
                         launch: bool = True) -> torch.Tensor:
    checks.check_cells(x_codes, gq, p, frac_bits)
    checks.check_digits(g_digits)
    m, k = x_codes.shape
    out = x_codes.new_empty((-(-k // p.rows), m, gq.shape[3]), dtype=torch.int64)
    if launch and out.numel():
        cell_launch(torch.library.wrap_triton(_cell_kernel), x_codes, gq, None, None, None, out, p, frac_bits,
                     g_digits)
    return out


def _cell_mvm_body(x_codes, gb, gt, coef_b, coef_t, p: GemmParams, frac_bits: int, g_digits: int,
                   launch: bool = True) -> torch.Tensor:
    checks.check_cells(x_codes, gb, p, frac_bits, "gb")
    checks.check_digits(g_digits)
    m, k = x_codes.shape
    n = gb.shape[3]
    n_tiles = -(-k // p.rows)
    checks.check_coefs(x_codes, n, n_tiles, checks.CELL_NAMES, gb, gt, coef_b, coef_t, "xbar_cell_mvm")
    if gt is not None:  # the kernel indexes both with gb's strides
        gb, gt, coef_t = gb.contiguous(), gt.contiguous(), coef_t.contiguous()
    y = x_codes.new_zeros((m, n), dtype=coef_b.dtype)
    if launch and y.numel() and n_tiles:
        cell_launch(torch.library.wrap_triton(_cell_kernel), x_codes, gb, gt, coef_b.contiguous(), coef_t, y, p,
                     frac_bits, g_digits)
    return y


Tensor = torch.Tensor


@torch.library.triton_op("xma2_ops::triton_tile_sums", mutates_args=())
def _op_tile_sums(x_codes: Tensor, w_codes: Tensor, rows: int, cols: int, input_bits: int, input_signed: bool,
                  dac_bits: int, weight_bits: int, cell_bits: int, adc_levels: int, adc_clip: int) -> Tensor:
    ints = (rows, cols, input_bits, input_signed, dac_bits, weight_bits, cell_bits, adc_levels, adc_clip)
    if _interpreted_trace(x_codes, w_codes):
        return torch.ops.xma2_ops.triton_tile_sums_interpreted(x_codes, w_codes, *ints)
    return _tile_sums_body(x_codes, w_codes, _params(*ints))


@torch.library.triton_op("xma2_ops::triton_mvm", mutates_args=())
def _op_mvm(x_codes: Tensor, wb_codes: Tensor, wt_codes: Optional[Tensor], coef_b: Tensor, coef_t: Optional[Tensor],
            rows: int, cols: int, input_bits: int, input_signed: bool, dac_bits: int, weight_bits: int,
            cell_bits: int, adc_levels: int, adc_clip: int) -> Tensor:
    ints = (rows, cols, input_bits, input_signed, dac_bits, weight_bits, cell_bits, adc_levels, adc_clip)
    if _interpreted_trace(x_codes, wb_codes, wt_codes, coef_b, coef_t):
        return torch.ops.xma2_ops.triton_mvm_interpreted(x_codes, wb_codes, wt_codes, coef_b, coef_t, *ints)
    return _mvm_body(x_codes, wb_codes, wt_codes, coef_b, coef_t, _params(*ints))


@torch.library.triton_op("xma2_ops::triton_cell_tile_sums", mutates_args=())
def _op_cell_tile_sums(x_codes: Tensor, gq: Tensor, rows: int, cols: int, input_bits: int, input_signed: bool,
                       dac_bits: int, weight_bits: int, cell_bits: int, adc_levels: int, adc_clip: int,
                       frac_bits: int, g_digits: int) -> Tensor:
    ints = (rows, cols, input_bits, input_signed, dac_bits, weight_bits, cell_bits, adc_levels, adc_clip)
    if _interpreted_trace(x_codes, gq):
        return torch.ops.xma2_ops.triton_cell_tile_sums_interpreted(x_codes, gq, *ints, frac_bits, g_digits)
    return _cell_tile_sums_body(x_codes, gq, _params(*ints), frac_bits, g_digits)


@torch.library.triton_op("xma2_ops::triton_cell_mvm", mutates_args=())
def _op_cell_mvm(x_codes: Tensor, gb: Tensor, gt: Optional[Tensor], coef_b: Tensor, coef_t: Optional[Tensor],
                 rows: int, cols: int, input_bits: int, input_signed: bool, dac_bits: int, weight_bits: int,
                 cell_bits: int, adc_levels: int, adc_clip: int, frac_bits: int, g_digits: int) -> Tensor:
    ints = (rows, cols, input_bits, input_signed, dac_bits, weight_bits, cell_bits, adc_levels, adc_clip)
    if _interpreted_trace(x_codes, gb, gt, coef_b, coef_t):
        return torch.ops.xma2_ops.triton_cell_mvm_interpreted(x_codes, gb, gt, coef_b, coef_t, *ints, frac_bits,
                                                               g_digits)
    return _cell_mvm_body(x_codes, gb, gt, coef_b, coef_t, _params(*ints), frac_bits, g_digits)


if INTERPRET:  # the opaque twins of the ops for traces in interpreter mode (see above)
    def _twin(name: str, body, n_tensors: int) -> None:
        def impl(*args, launch: bool = True):
            ints = args[n_tensors:n_tensors + 9]
            return body(*args[:n_tensors], _params(*ints), *args[n_tensors + 9:], launch=launch)

        schema = str(getattr(torch.ops.xma2_ops, name).default._schema)
        twin = torch.library.custom_op(f"xma2_ops::{name}_interpreted", impl, mutates_args=(),
                                       schema=schema[schema.index("("):])
        twin.register_fake(lambda *args: impl(*args, launch=False))

    _twin("triton_tile_sums", _tile_sums_body, 2)
    _twin("triton_mvm", _mvm_body, 5)
    _twin("triton_cell_tile_sums", _cell_tile_sums_body, 2)
    _twin("triton_cell_mvm", _cell_mvm_body, 5)


# ------------------------------------------------------------------ entry points (the backend's functions)
def tile_sums(x_codes: torch.Tensor, w_codes: torch.Tensor, p: GemmParams) -> torch.Tensor:
    """T_int [Tr, M, N] int64 (contract in backends/base.py)."""
    checks.check_gemm(x_codes, w_codes, p)
    checks.check_data(x_codes, w_codes, p)
    return torch.ops.xma2_ops.triton_tile_sums(x_codes, w_codes, *p.as_args())


def mvm(x_codes: torch.Tensor, wb_codes: torch.Tensor, wt_codes: Optional[torch.Tensor], coef_b: torch.Tensor,
        coef_t: Optional[torch.Tensor], p: GemmParams) -> torch.Tensor:
    """y [M, N] = sum_r coef_b T_b_int + coef_t T_t_int, in coef_b's dtype (contract in backends/base.py)."""
    checks.check_gemm(x_codes, wb_codes, p)
    m, k = x_codes.shape
    checks.check_coefs(x_codes, wb_codes.shape[1], -(-k // p.rows), ("wb_codes", "wt_codes"), wb_codes, wt_codes,
                       coef_b, coef_t, "xbar_mvm")
    checks.check_data(x_codes, wb_codes, p)
    if wt_codes is not None:
        qw = (1 << (p.weight_bits - 1)) - 1
        checks.check_codes("wt_codes", wt_codes, -qw, qw)
    return torch.ops.xma2_ops.triton_mvm(x_codes, wb_codes, wt_codes, coef_b, coef_t, *p.as_args())


def pack_weights(w_codes: torch.Tensor, p: GemmParams) -> torch.Tensor:
    """The programmed weight's form for ``mvm_packed``: the int32 codes themselves, their range checked
    here, once per programmed weight (xma2_ops/programmed.py), instead of on every call."""
    if w_codes.dim() != 2 or w_codes.dtype != torch.int32:
        raise RuntimeError(f"xbar: w_codes must be int32 [K, N], got {w_codes.dtype} {tuple(w_codes.shape)}")
    checks.check_params(p)
    qw = (1 << (p.weight_bits - 1)) - 1
    checks.check_codes("w_codes", w_codes, -qw, qw)
    return w_codes


def mvm_packed(x_codes: torch.Tensor, wb_codes: torch.Tensor, wb_packed: Optional[torch.Tensor],
               wt_codes: Optional[torch.Tensor], wt_packed: Optional[torch.Tensor], coef_b: torch.Tensor,
               coef_t: Optional[torch.Tensor], p: GemmParams) -> torch.Tensor:
    """``mvm`` without a host synchronisation (the layers' path on CUDA): the weights were checked by
    ``pack_weights``; the input codes' range is asserted on the device (``torch._assert_async``: an
    out-of-range code stops the program with a device-side assertion instead of being read back)."""
    for name, codes, packed in (("wb", wb_codes, wb_packed), ("wt", wt_codes, wt_packed)):
        if codes is not None and packed is not None and not (
                packed.shape == codes.shape and packed.dtype == codes.dtype and packed.device == codes.device
                and packed.data_ptr() == codes.data_ptr()):
            raise RuntimeError(f"xbar: {name}_packed is not the packed form of {name}_codes (pack_weights)")
    if (wb_packed is None) or (wt_codes is not None and wt_packed is None):
        return mvm(x_codes, wb_codes, wt_codes, coef_b, coef_t, p)
    checks.check_gemm(x_codes, wb_codes, p)
    m, k = x_codes.shape
    checks.check_coefs(x_codes, wb_codes.shape[1], -(-k // p.rows), ("wb_codes", "wt_codes"), wb_codes, wt_codes,
                       coef_b, coef_t, "xbar_mvm")
    if x_codes.numel():
        qx = (1 << p.x_bits) - 1
        lo, hi = torch.aminmax(x_codes)
        torch._assert_async((lo >= (-qx if p.input_signed else 0)) & (hi <= qx),
                            f"xbar: x_codes must hold codes in [{-qx if p.input_signed else 0}, {qx}]")
    return torch.ops.xma2_ops.triton_mvm(x_codes, wb_codes, wt_codes, coef_b, coef_t, *p.as_args())


def cell_tile_sums(x_codes: torch.Tensor, gq: torch.Tensor, p: GemmParams, frac_bits: int) -> torch.Tensor:
    """T_int [Tr, M, N] int64 over the cells' fixed-point conductances ``gq`` [2, S, K, N] int32
    (SPEC 7.2; the contract of backends.reference.cell_tile_sums: with the ideal ADC T_int is in units of 2^-F)."""
    checks.check_cells(x_codes, gq, p, frac_bits)
    checks.check_x_values(x_codes, p)
    digits = checks.cell_digits(p, x_codes.shape[1], frac_bits, ("gq", gq))
    return torch.ops.xma2_ops.triton_cell_tile_sums(x_codes, gq, *p.as_args(), frac_bits, digits)


def cell_mvm(x_codes: torch.Tensor, gb: torch.Tensor, gt: Optional[torch.Tensor], coef_b: torch.Tensor,
             coef_t: Optional[torch.Tensor], p: GemmParams, frac_bits: int) -> torch.Tensor:
    """y [M, N] = sum_r coef_b T_b_int + coef_t T_t_int over the cells gb / gt [2, S, K, N] int32, in coef_b's
    dtype, accumulated in float64 (row tile outer, then base, then task; contract in backends/base.py)."""
    checks.check_cells(x_codes, gb, p, frac_bits, "gb")
    m, k = x_codes.shape
    checks.check_coefs(x_codes, gb.shape[3], -(-k // p.rows), checks.CELL_NAMES, gb, gt, coef_b, coef_t,
                       "xbar_cell_mvm")
    checks.check_x_values(x_codes, p)
    digits = checks.cell_digits(p, k, frac_bits, ("gb", gb), ("gt", gt))
    return torch.ops.xma2_ops.triton_cell_mvm(x_codes, gb, gt, coef_b, coef_t, *p.as_args(), frac_bits, digits)
