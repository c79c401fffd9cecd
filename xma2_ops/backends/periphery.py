"""The periphery conventions of docs/SPEC.md section 8, computed fast and exactly on any device.

Under a non-default convention every conversion of SPEC 8.1 sees V = X_g @ W_g over one row tile,
where X_g is an input chunk (or, under analog accumulation, the whole input magnitude; signed under
sign_magnitude) and W_g a weight slice (or, under differential sensing, the difference of the + and -
slices).  So each (row tile, input group) is ONE dense GEMM against all weight groups side by side,
done in floating point where every partial sum is an integer below the float's exact range (so the
result does not depend on the summation order), then the ADC of SPEC 8.2 in int64 and the
shift-and-add of 8.3.  The readable oracle is ``reference._periphery_tile_sums`` (loops, one
conversion at a time); this module is what the cpu, triton and cuda backends run for section 8
(``BACKEND``, chosen by dispatch.backend_for), and what calibration.py reads the values V from
(``gemm_operands`` and ``conversions``).

Every function returns T_int[r, m, n] in units of ``GemmParams.tile_steps(K)[r]``, like the kernels.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch

from ..config import GemmParams
from ..quant import adc_codes, bit_field
from .base import BackendBase, mvm_from_tile_sums

# Output rows per GEMM block: bounds the float/int64 temporaries to about this many elements.
_BLOCK_ELEMS = 1 << 23


def input_groups(x: torch.Tensor, p: GemmParams) -> List[Tuple[int, Optional[int], torch.Tensor]]:
    """(sign, chunk index or None under analog accumulation, values [M, K]) of what one pass drives."""
    if not p.input_signed or p.has("signed_inputs"):
        pols = [(1, x)]  # unsigned, or one signed pass (sign_magnitude)
    else:
        pols = [(1, x.clamp(min=0)), (-1, (-x).clamp(min=0))]
    out = []
    for sx, xp in pols:
        if p.has("input_accumulation"):  # sum_i 2^(i db) c_i(x) is x itself
            out.append((sx, None, xp))
        else:
            mag, sgn = xp.abs(), torch.sign(xp)
            out.extend((sx, i, sgn * bit_field(mag, i, p.dac_bits)) for i in range(p.chunks))
    return out


def weight_groups(slices: List[List[torch.Tensor]], p: GemmParams) -> Tuple[List[Tuple[int, int]], torch.Tensor]:
    """([(sign, slice j)] per group, W [K, G, N]) from slices[q][j] [K, N] (q = + / -)."""
    if p.has("sensing"):
        return [(1, j) for j in range(len(slices[0]))], torch.stack([a - b for a, b in zip(*slices)], 1)
    meta = [(1, j) for j in range(len(slices[0]))] + [(-1, j) for j in range(len(slices[1]))]
    return meta, torch.stack(slices[0] + slices[1], 1)


def _gemm_dtype(bound: int, device: torch.device) -> torch.dtype:
    """float32 when every partial sum is below 2^24 and float32 matmuls are true float32 here; else float64."""
    exact32 = bound < (1 << 24) and torch.get_float32_matmul_precision() == "highest"
    if device.type == "cuda":
        exact32 = exact32 and not torch.backends.cuda.matmul.allow_tf32
    return torch.float32 if exact32 else torch.float64


def gemm_operands(x_codes: torch.Tensor, slices: List[List[torch.Tensor]], w_max: int, p: GemmParams):
    """(input groups' (sign, chunk) [Gi], X [Gi, M, K], weight groups' (sign, slice) [Gw], W [K, Gw, N]) in
    the GEMM dtype: float32 where every partial sum |V| <= rows (2^D - 1) w_max is exact in it, else float64
    (refused beyond float64's exact range).  ``slices[q][j]`` [K, N]: weight slice j of polarity q, values
    up to ``w_max``."""
    x = x_codes.to(torch.int64)
    groups_in = input_groups(x, p)
    w_meta, w = weight_groups(slices, p)  # [K, G, N]
    bound = p.conversion_bound(w_max)
    if bound >= 1 << 53:
        raise ValueError(f"xbar: partial sums up to {bound} are beyond exact float64 arithmetic (rows, bits, "
                         f"conductances too large)")
    gdt = _gemm_dtype(bound, x.device)
    x_all = torch.stack([g.to(gdt) for _, _, g in groups_in])  # [Gi, M, K]
    return [(sx, i) for sx, i, _ in groups_in], x_all, w_meta, w.to(gdt)


def conversions(x_all: torch.Tensor, w: torch.Tensor, p: GemmParams):
    """Yields (row tile r, its rows, first input row m0, V [Gi, m, Gw, N]): every value one conversion of
    SPEC 8.1 sees, one dense GEMM per row tile (in blocks of input rows), exact integers."""
    gi, m_rows, k_total = x_all.shape
    gw, n_total = w.shape[1], w.shape[2]
    block = max(1, _BLOCK_ELEMS // max(1, gi * gw * n_total))
    k0 = 0
    for r, rows in enumerate(p.tile_rows(k_total)):
        k1 = k0 + rows
        wt = w[k0:k1].reshape(rows, -1)  # [rows, Gw*N]
        for m0 in range(0, m_rows, block):
            xb = x_all[:, m0:m0 + block, k0:k1]  # a strided view: the GEMM reads it in place
            yield r, rows, m0, torch.matmul(xb, wt).view(gi, xb.shape[1], gw, n_total)
        k0 = k1


def _tile_sums(x_codes: torch.Tensor, slices: List[List[torch.Tensor]], w_max: int, p: GemmParams,
               frac_bits: int) -> torch.Tensor:
    in_meta, x_all, w_meta, w = gemm_operands(x_codes, slices, w_max, p)
    m_rows, k_total = x_codes.shape
    n_total = w.shape[2]
    bound = p.conversion_bound(w_max)
    analog = p.has("input_accumulation")
    # T[r] = sum over (input group, weight group) of sign * 2^shift * code: one exact float64 contraction
    shift_w = torch.tensor([[sx * sw * float(1 << (j * p.cell_bits + (0 if analog else i * p.dac_bits)))
                             for sw, j in w_meta] for sx, i in in_meta], dtype=torch.float64, device=x_all.device)
    out = torch.empty(len(p.tile_rows(k_total)), m_rows, n_total, dtype=torch.int64, device=x_all.device)
    for r, rows, m0, v in conversions(x_all, w, p):
        levels, clip = p.tile_adc(rows)
        code = v if levels == 0 else _adc(v, levels, clip, frac_bits, p)
        # float32 where every partial sum of the contraction is an integer below 2^24, else float64
        t_max = float(shift_w.abs().sum()) * (bound if levels == 0 else levels)
        cdt = torch.float32 if t_max < (1 << 24) and code.dtype == torch.float32 else torch.float64
        t = torch.einsum("imgn,ig->mn", code.to(cdt), shift_w.to(cdt))
        out[r, m0:m0 + v.shape[1]] = t.round_().to(torch.int64)
    return out


def _adc(v: torch.Tensor, levels: int, clip: int, frac_bits: int, p: GemmParams) -> torch.Tensor:
    """quant.adc_codes on the exact integer values ``v`` (a float tensor), as float codes: a lookup in
    the table of every code of [lo, hi] (made by quant.adc_codes itself) when it is small, else in
    int64 arithmetic."""
    c = clip << frac_bits
    span = 2 * c if p.adc_signed else c
    if span < _MAX_ADC_TABLE:
        table = _adc_table(levels, clip, frac_bits, p.adc_signed, p.has("adc_rounding"), v.device)
        u = (v + c if p.adc_signed else v).clamp_(0, span).to(torch.int64)
        return table[u]
    return adc_codes(v.round().to(torch.int64), levels, clip, frac_bits, p.adc_signed,
                     p.has("adc_rounding")).double()


_MAX_ADC_TABLE = 1 << 20


@functools.lru_cache(maxsize=64)
def _adc_table(levels: int, clip: int, frac_bits: int, signed: bool, half_even: bool,
               device: torch.device) -> torch.Tensor:
    """code (float32, centred when signed) of every V in [lo, hi], indexed by V - lo."""
    c = clip << frac_bits
    lo = -c if signed else 0
    values = torch.arange(lo, c + 1, dtype=torch.int64)
    return adc_codes(values, levels, clip, frac_bits, signed, half_even).to(torch.float32).to(device)


def code_slices(w_codes: torch.Tensor, p: GemmParams) -> List[List[torch.Tensor]]:
    w = w_codes.to(torch.int64)
    return [[bit_field(wq, j, p.cell_bits) for j in range(p.slices)] for wq in (w.clamp(min=0), (-w).clamp(min=0))]


def tile_sums(x_codes: torch.Tensor, w_codes: torch.Tensor, p: GemmParams) -> torch.Tensor:
    """T_int [Tr, M, N] int64 of the codes ``w_codes`` [K, N] (SPEC 8)."""
    _check_codes(x_codes, w_codes, p)
    return _tile_sums(x_codes, code_slices(w_codes, p), (1 << p.cell_bits) - 1, p, 0)


def cell_tile_sums(x_codes: torch.Tensor, gq: torch.Tensor, p: GemmParams, frac_bits: int) -> torch.Tensor:
    """T_int [Tr, M, N] int64 of the fixed-point conductances ``gq`` [2, S, K, N] (SPEC 7.2 and 8)."""
    _check_codes(x_codes, None, p)
    g = gq.to(torch.int64)
    g_max = int(g.abs().max()) if g.numel() else 0
    return _tile_sums(x_codes, [[g[q, j] for j in range(g.shape[1])] for q in range(2)], g_max, p, frac_bits)


def _check_codes(x_codes: torch.Tensor, w_codes: Optional[torch.Tensor], p: GemmParams) -> None:
    """The codes' ranges (SPEC 6): a wrong code would silently give a wrong sum here."""
    qx = (1 << p.x_bits) - 1
    lo = -qx if p.input_signed else 0
    if x_codes.numel() and (int(x_codes.min()) < lo or int(x_codes.max()) > qx):
        raise ValueError(f"x_codes: expected codes in [{lo}, {qx}], got values in [{int(x_codes.min())}, "
                         f"{int(x_codes.max())}]")
    if w_codes is not None and w_codes.numel():
        qw = (1 << (p.weight_bits - 1)) - 1
        if int(w_codes.abs().max()) > qw:
            raise ValueError(f"w_codes: expected codes in [{-qw}, {qw}], got |w| up to {int(w_codes.abs().max())}")


def _mvm(x_codes, wb, wt, coef_b, coef_t, p: GemmParams) -> torch.Tensor:
    return mvm_from_tile_sums(lambda x, w: tile_sums(x, w, p), x_codes, wb, wt, coef_b, coef_t, wb.shape[1])


# What cpu, cuda and triton run under a periphery (SPEC 8) that their kernels do not compute: this module's
# exact GEMM-per-conversion form, the same bits on every device; mvm and the coefficient gradients from its
# tile sums in the one order of every backend.
BACKEND = BackendBase("periphery", tile_sums, _mvm, ("cpu", "cuda"), small_codes=True, cell_tile_sums=cell_tile_sums)
