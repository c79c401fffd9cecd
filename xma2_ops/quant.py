"""The quantisation rules of docs/SPEC.md in Python, each written once: weight and input codes
(SPEC 2), the ADC (SPEC 3 / 8.2), bit fields, and the per-PE to per-weight expansions (SPEC 1, 4).

Every Python path (the functional API, the layers, the reference and periphery backends,
calibration, mta) imports them from here.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch


# ---------------------------------------------------------------- quantisation rules (SPEC 2)
def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """Quantisers run in the tensor's dtype, half precisions in float32 (so 16-bit codes stay exact)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def derived_scale(t: torch.Tensor, qmax: int, amax: Optional[torch.Tensor] = None) -> torch.Tensor:
    """max|t| / qmax over the whole tensor; a scale of 0 (all-zero tensor) becomes 1.
    ``amax``: max|t|, when the caller has already computed it."""
    if amax is None:
        amax = t.detach().abs().amax() if t.numel() else t.new_zeros(())
    s = amax / qmax
    return torch.where(s > 0, s, torch.ones_like(s))


def quantize_weight(w: torch.Tensor, scale: torch.Tensor, weight_bits: int) -> torch.Tensor:
    """Signed weight codes clamp(round(w / s), -Qw, Qw) (float tensor of integers)."""
    q = 2 ** (weight_bits - 1) - 1
    return torch.clamp(torch.round(w / scale), -q, q)


def quantize_input(x: torch.Tensor, scale: torch.Tensor, input_bits: int, signed: bool) -> torch.Tensor:
    """Input codes: signed in [-Qx, Qx] or unsigned in [0, Qx] (float tensor of integers)."""
    if signed:
        q = 2 ** (input_bits - 1) - 1
        return torch.clamp(torch.round(x / scale), -q, q)
    return torch.clamp(torch.round(x / scale), 0, 2 ** input_bits - 1)


def input_in_range(x: torch.Tensor, scale: torch.Tensor, input_bits: int, signed: bool) -> torch.Tensor:
    """True where the input quantiser did not clip (the straight-through estimator passes there)."""
    r = torch.round(x / scale)
    q = 2 ** (input_bits - 1) - 1 if signed else 2 ** input_bits - 1
    return (r <= q) & (r >= (-q if signed else 0))


def adc_codes(p: torch.Tensor, levels: int, clip: int, frac_bits: int = 0, signed: bool = False,
              half_even: bool = False) -> torch.Tensor:
    """ADC of SPEC 3 / 8.2 on int64 values V: with lo = 0 (unsigned) or -clip (signed),
    hi - lo = span, code = clamp(floor((2 (V - lo) n + span) / (2 span)), 0, n), a tie rounded to the
    even code under half_even.  With fixed-point conductances (SPEC 7.2) V is V_F and clip is clip 2^F.
    Returns the code, minus n/2 for the signed ADC (so that code * (span / n) is the value V_hat)."""
    c = clip << frac_bits
    span = 2 * c if signed else c
    u = torch.clamp(p + c if signed else p, 0, span)  # V outside [lo, hi] gives code 0 or n either way
    num = 2 * u * levels + span
    code = torch.div(num, 2 * span, rounding_mode="floor")
    if half_even:  # q = num / (2 span) is an integer exactly at a tie
        code = code - ((num % (2 * span) == 0) & (code % 2 == 1)).to(code.dtype)
    return code - levels // 2 if signed else code


# ---------------------------------------------------------------- bit fields and the PE grid (SPEC 1, 3)
def bit_field(v: torch.Tensor, index: int, width: int) -> torch.Tensor:
    """(v >> (index*width)) & (2^width - 1) for non-negative int64 v."""
    return torch.bitwise_and(torch.bitwise_right_shift(v, index * width), 2 ** width - 1)


RowLayout = Union[int, Tuple[int, ...]]  # R (fixed split) or each row tile's rows (XbarConfig.row_layout)


def expand_tiles(t: torch.Tensor, k_total: int, n_total: int, rows: RowLayout, cols: int) -> torch.Tensor:
    """[Tr, Tc] per-PE values -> [K, N] per-weight values."""
    return expand_rows(t, k_total, rows).repeat_interleave(cols, 1)[:, :n_total]


def expand_rows(t: torch.Tensor, k_total: int, rows: RowLayout) -> torch.Tensor:
    """[Tr, N] per-(row tile, column) values -> [K, N]; ``rows``: R, or the tiles' row counts."""
    if isinstance(rows, int):
        return t.repeat_interleave(rows, 0)[:k_total]
    return t.repeat_interleave(torch.tensor(rows, device=t.device), 0, output_size=k_total)


def column_tiles(t: torch.Tensor, n_total: int, cols: int) -> torch.Tensor:
    """[Tr, Tc] per-PE values -> [Tr, N] (each column gets its PE's value)."""
    return t.repeat_interleave(cols, 1)[:, :n_total]
