"""Backend "triton", the host side of a launch: block sizes, grid and the kernels' arguments
(the argument checks are xma2_ops.checks', run by ops.py before a launch)."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ...config import GemmParams, adc_multiply_shift
from .kernels import _cell_kernel, _xbar_kernel  # noqa: F401  (the kernels these functions launch)

# Tile sizes picked from ptxas register/spill reports for sm_80 and sm_90 (Triton compiled ahead of
# time, scripts/check_triton_compile.py prints them): a 64 x 64 output block with
# 8 warps; a row tile of up to 128 rows (the default crossbar) has its codes loaded once and kept in
# registers, with a 64 x 32 block above 64 rows (no spills at the default config; 64 x 64 spills
# ~200 bytes); longer row tiles stream K in steps of 32.  The cell kernel (int32 conductances of up to
# 5 base-128 digits) keeps its codes in registers up to 64 rows.
_BLOCK_M = 64
_BLOCK_N = 64
_BLOCK_N_WIDE_K = 32
_NUM_WARPS = 8
_MAX_SINGLE_K = 128
_CELL_MAX_SINGLE_K = 64
_STREAM_K = 32


def xbar_launch(kernel, x_codes: torch.Tensor, wb_codes: torch.Tensor, wt_codes: Optional[torch.Tensor],
                 coef_b: Optional[torch.Tensor], coef_t: Optional[torch.Tensor], out: torch.Tensor,
                 p: GemmParams) -> None:
    m, k = x_codes.shape
    n = wb_codes.shape[1]
    n_tiles = -(-k // p.rows)
    single_k = p.rows <= _MAX_SINGLE_K
    block_k = max(32, triton.next_power_of_2(p.rows)) if single_k else _STREAM_K
    levels = max(p.adc_levels, 1)  # unused when lossless (levels 0 is the ideal ADC)
    signed_digits = 7  # base-128 digits: |code| < 2^bits needs ceil(bits / 7) of them
    adc_mul = None if p.adc_identity else adc_multiply_shift(p.adc_levels, p.adc_clip, p.pmax)
    mult, shift = adc_mul if adc_mul else (1, 32)
    block_n = _BLOCK_N_WIDE_K if single_k and block_k > 64 else _BLOCK_N
    grid = (triton.cdiv(m, _BLOCK_M), triton.cdiv(n, block_n))
    kernel[grid](
        x_codes, wb_codes, wt_codes if wt_codes is not None else wb_codes,
        coef_b if coef_b is not None else out, coef_t if coef_t is not None else out, out,
        m, n, k, m * n, x_codes.stride(0), x_codes.stride(1), wb_codes.stride(0), wb_codes.stride(1),
        p.rows, n_tiles, p.chunks, p.slices, levels, p.adc_clip, 2 * p.adc_clip, mult, shift - 32,
        X_POLS=2 if p.input_signed else 1, DB=p.dac_bits, CB=p.cell_bits, LOSSLESS=p.adc_identity,
        X_DIGITS=-(-p.x_bits // signed_digits), W_DIGITS=-(-(p.weight_bits - 1) // signed_digits),
        SINGLE_K=single_k, X_T=_narrow_x(p), W_T=tl.int8 if p.weight_bits <= 8 else tl.int16,
        ADC_MUL=adc_mul is not None, T_T=tl.int32 if p.tile_sum_bound < 1 << 31 else tl.int64,
        MVM=coef_b is not None, HAS_T=wt_codes is not None,
        BLOCK_M=_BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=_NUM_WARPS,
    )


def _narrow_x(p: GemmParams):
    """The narrowest integer type that holds every input code (|code| <= 2^x_bits - 1)."""
    if not p.input_signed and p.x_bits <= 8:
        return tl.uint8
    return tl.int16 if p.x_bits <= 15 else tl.int32


def cell_launch(kernel, x_codes: torch.Tensor, gb: torch.Tensor, gt: Optional[torch.Tensor],
                 coef_b: Optional[torch.Tensor], coef_t: Optional[torch.Tensor], out: torch.Tensor,
                 p: GemmParams, frac_bits: int, g_digits: int) -> None:
    m, k = x_codes.shape
    n = gb.shape[3]
    n_tiles = -(-k // p.rows)
    single_k = p.rows <= _CELL_MAX_SINGLE_K
    block_k = max(32, triton.next_power_of_2(p.rows)) if single_k else _STREAM_K
    ideal = p.adc_levels == 0
    xw = 7 if ideal else p.dac_bits  # ideal ADC: base-128 digits of the input instead of DAC chunks
    grid = (triton.cdiv(m, _BLOCK_M), triton.cdiv(n, _BLOCK_N))
    kernel[grid](
        x_codes, gb, gt if gt is not None else gb,
        coef_b if coef_b is not None else out, coef_t if coef_t is not None else out, out,
        m, n, k, m * n, x_codes.stride(0), x_codes.stride(1), gb.stride(0), gb.stride(1), gb.stride(2), gb.stride(3),
        p.rows, n_tiles, -(-p.x_bits // xw), p.slices, max(p.adc_levels, 1), p.adc_clip << frac_bits,
        2 * (p.adc_clip << frac_bits),
        X_POLS=2 if p.input_signed else 1, XW=xw, CB=p.cell_bits, IDEAL=ideal, X8=xw == 8, G_DIGITS=g_digits,
        SINGLE_K=single_k, MVM=coef_b is not None, HAS_T=gt is not None,
        BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_K=block_k,
        num_warps=_NUM_WARPS,
    )
