"""The readable oracle of docs/SPEC.md, in plain PyTorch.

Also the one place where the Python side computes each quantisation rule (weight codes,
input codes, the ADC); the functional API and the other backends import them from here.
Nothing in this file is meant to be fast.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .config import GemmParams, XbarConfig


# ---------------------------------------------------------------- quantisation rules (SPEC 2)
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


# ---------------------------------------------------------------- the crossbar GEMM (SPEC 3 and 8)
def bit_field(v: torch.Tensor, index: int, width: int) -> torch.Tensor:
    """(v >> (index*width)) & (2^width - 1) for non-negative int64 v."""
    return torch.bitwise_and(torch.bitwise_right_shift(v, index * width), 2 ** width - 1)


def tile_sums(x_codes: torch.Tensor, w_codes: torch.Tensor, p: GemmParams) -> torch.Tensor:
    """T_int[r, m, n] of SPEC 3 / 8 as int64, literally: loops over row tiles, polarities,
    input chunks and weight slices, every conversion through the ADC.

    ``x_codes`` [M, K] and ``w_codes`` [K, N] hold integer codes.  The returned integers
    are the digital shift-and-add of ADC codes; multiply tile r by ``p.tile_steps(K)[r]`` to get T.
    """
    w = w_codes.to(torch.int64)
    cb = p.cell_bits
    slices = [[bit_field(wq, j, cb) for j in range(p.slices)] for wq in (w.clamp(min=0), (-w).clamp(min=0))]
    return _periphery_tile_sums(x_codes, slices, p, 0)


def cell_tile_sums(x_codes: torch.Tensor, gq: torch.Tensor, p: GemmParams, frac_bits: int) -> torch.Tensor:
    """T_int[r, m, n] of SPEC 7.2 / 8 as int64, literally: the partial sums of the input chunks with the
    fixed-point conductances ``gq`` [2, S, K, N] (polarity +/-, slice) of the programmed cells,
    every conversion through the fixed-point ADC.  ``adc_levels == 0`` (ideal ADC): T_int is in units of
    2^-F (the caller's step is 2^-F)."""
    g = gq.to(torch.int64)
    return _periphery_tile_sums(x_codes, [[g[q, j] for j in range(g.shape[1])] for q in range(2)], p, frac_bits)


def _periphery_tile_sums(x_codes: torch.Tensor, w_slices, p: GemmParams, frac_bits: int) -> torch.Tensor:
    """SPEC 8.1-8.3 written out: ``w_slices[q][j]`` [K, N] is what slice j of weight polarity q holds
    (levels, or fixed-point conductances with ``frac_bits``)."""
    x = x_codes.to(torch.int64)
    m_rows, k_total = x.shape
    n_total = w_slices[0][0].shape[1] if w_slices[0] else 0
    db, cb = p.dac_bits, p.cell_bits
    sign_magnitude = p.input_signed and p.has("signed_inputs")
    # Input polarities (sign, codes): one signed pass under sign_magnitude, two passes when signed.
    if sign_magnitude or not p.input_signed:
        x_pols = [(1, x)]
    else:
        x_pols = [(1, x.clamp(min=0)), (-1, (-x).clamp(min=0))]

    def chunk(v: torch.Tensor, i: int) -> torch.Tensor:  # c_i of SPEC 8.1, signed under sign_magnitude
        return torch.sign(v) * bit_field(v.abs(), i, db)

    def psum(xc: torch.Tensor, wk: torch.Tensor) -> torch.Tensor:
        # exact: int64 matmul is not available everywhere, float64 holds these integers
        return (xc.double() @ wk.double()).round().to(torch.int64)

    differential, analog = p.has("sensing"), p.has("input_accumulation")
    # Which (weight polarity, sign) and which chunks one conversion sums (SPEC 8.1).
    q_groups = [[(0, 1), (1, -1)]] if differential else [[(0, 1)], [(1, -1)]]
    i_groups = [list(range(p.chunks))] if analog else [[i] for i in range(p.chunks)]
    tiles = p.tile_rows(k_total)
    out = torch.zeros(len(tiles), m_rows, n_total, dtype=torch.int64)
    k0 = 0
    for r, rows in enumerate(tiles):
        k1 = k0 + rows
        levels, clip = p.tile_adc(rows)
        for sx, xp in x_pols:
            for j in range(len(w_slices[0])):
                for qg in q_groups:
                    for ig in i_groups:
                        v = 0
                        for q, sw in qg:
                            for i in ig:
                                pv = psum(chunk(xp[:, k0:k1], i), w_slices[q][j][k0:k1])
                                v = v + (sw if differential else 1) * (2 ** (i * db) if analog else 1) * pv
                        code = v if levels == 0 else adc_codes(v, levels, clip, frac_bits, p.adc_signed,
                                                               p.has("adc_rounding"))
                        sign = sx * (1 if differential else qg[0][1])
                        shift = j * cb + (0 if analog else ig[0] * db)
                        out[r] += sign * (2 ** shift) * code
        k0 = k1
    return out


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


# ---------------------------------------------------------------- the whole op (SPEC 1-4)
def xbar_conv2d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride=1,
    padding=0,
    dilation=1,
    *,
    config: XbarConfig,
    task_weight: Optional[torch.Tensor] = None,
    pe_mask: Optional[torch.Tensor] = None,
    col_scale: Optional[torch.Tensor] = None,
    input_scale=None,
    weight_scale=None,
    task_weight_scale=None,
) -> torch.Tensor:
    """SPEC sections 1-4 for a conv2d (groups=1), written out step by step.  No autograd
    beyond what plain PyTorch gives; the functional API is the differentiable entry point."""
    cout = weight.shape[0]
    kh, kw = weight.shape[2], weight.shape[3]
    k_total = weight[0].numel()
    b, _, h, wd = x.shape
    stride, padding, dilation = (_pair(stride), _pair(padding), _pair(dilation))
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    tr, tc = config.tiles(k_total, cout)
    mask = torch.zeros(tr, tc, dtype=torch.float64) if pe_mask is None else pe_mask.detach().double()
    alpha = torch.ones(tr, cout, dtype=torch.float64) if col_scale is None else col_scale.detach().double()

    def unfold(t: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [M, K], PyTorch's (c, i, j) order
        cols_ = F.unfold(t, (kh, kw), dilation=dilation, padding=padding, stride=stride)
        return cols_.transpose(1, 2).reshape(-1, k_total)

    m_col = column_tiles(mask, cout, config.cols)  # [Tr, N]
    m_kn = expand_rows(m_col, k_total, config.row_layout(k_total))  # [K, N]
    # Quantisation happens in the tensors' own dtype (as in every backend); sums in float64.
    if not config.quantized:
        # Ideal crossbar, or weight-only fake quantisation (SPEC 4, quantisation switched off).
        def dequant(w: torch.Tensor, given) -> torch.Tensor:
            w = w.detach()
            if config.weight_bits is not None:
                s = _scale(given, w, config.weight_qmax).reshape(-1, 1, 1, 1)
                w = quantize_weight(w, s, config.weight_bits) * s
            return w.double().reshape(cout, -1).T

        w_eff = (1 - m_kn) * expand_rows(alpha, k_total, config.row_layout(k_total)) * dequant(weight, weight_scale)
        if task_weight is not None:
            w_eff = w_eff + m_kn * dequant(task_weight, task_weight_scale)
        y = unfold(x.detach().double()) @ w_eff
    else:
        signed = config.resolve_signed(bool((x < 0).any()))
        s_x = _scale(input_scale, x, config.input_qmax(signed))
        x_codes = unfold(quantize_input(x.detach(), s_x, config.input_bits, signed).double())
        gp = GemmParams.from_config(config, signed)

        def codes(w: torch.Tensor, given) -> tuple[torch.Tensor, torch.Tensor]:
            s = _scale(given, w, config.weight_qmax).reshape(-1)  # a scalar or one per output column
            w_codes = quantize_weight(w.detach().reshape(cout, -1), s.reshape(-1, 1), config.weight_bits)
            return w_codes.double().T, s.double()

        steps = torch.tensor(gp.tile_steps(k_total), dtype=torch.float64).reshape(-1, 1, 1)
        wb_codes, s_w = codes(weight, weight_scale)
        t_b = tile_sums(x_codes, wb_codes, gp).double() * steps  # [Tr, M, N]
        y = ((1 - m_col) * alpha * s_w).unsqueeze(1).mul(t_b).sum(0)
        if task_weight is not None:
            wt_codes, s_t = codes(task_weight, task_weight_scale)
            t_t = tile_sums(x_codes, wt_codes, gp).double() * steps
            y = y + (m_col * s_t).unsqueeze(1).mul(t_t).sum(0)
        y = s_x.double() * y
    if bias is not None:
        y = y + bias.detach().double()
    return y.reshape(b, ho, wo, cout).permute(0, 3, 1, 2).to(x.dtype)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _scale(given, t: torch.Tensor, qmax: int) -> torch.Tensor:
    if given is None:
        return derived_scale(t, qmax)
    return torch.as_tensor(given, dtype=t.dtype).detach()
