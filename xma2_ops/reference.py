"""The readable oracle of docs/SPEC.md, in plain PyTorch.

Also the one place where the Python side computes each quantisation rule (weight codes,
input codes, the ADC); the functional API and the other backends import them from here.
Nothing in this file is meant to be fast.
"""
from __future__ import annotations

from typing import Optional

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


def adc_codes(p: torch.Tensor, levels: int, clip: int, frac_bits: int = 0) -> torch.Tensor:
    """ADC of SPEC 3 on int64 partial sums: clamp(floor((2 P n + clip) / (2 clip)), 0, n); with
    fixed-point conductances (SPEC 7.2) P is P_F = P 2^F and clip is clip 2^F."""
    c = clip << frac_bits
    return torch.clamp(torch.div(2 * p * levels + c, 2 * c, rounding_mode="floor"), 0, levels)


# ---------------------------------------------------------------- the crossbar GEMM (SPEC 3)
def bit_field(v: torch.Tensor, index: int, width: int) -> torch.Tensor:
    """(v >> (index*width)) & (2^width - 1) for non-negative int64 v."""
    return torch.bitwise_and(torch.bitwise_right_shift(v, index * width), 2 ** width - 1)


def tile_sums(x_codes: torch.Tensor, w_codes: torch.Tensor, p: GemmParams) -> torch.Tensor:
    """T_int[r, m, n] of SPEC 3 as int64, literally: loops over row tiles, polarities,
    input chunks and weight slices, every partial sum through the ADC.

    ``x_codes`` [M, K] and ``w_codes`` [K, N] hold integer codes.  The returned integers
    are the digital shift-and-add of ADC codes; multiply by ``XbarConfig.adc_step`` to get T.
    """
    x = x_codes.to(torch.int64)
    w = w_codes.to(torch.int64)
    m_rows, k_total = x.shape
    n_total = w.shape[1]
    rows = p.rows
    tr = -(-k_total // rows)
    db, cb = p.dac_bits, p.cell_bits
    x_pols = [(1, x.clamp(min=0)), (-1, (-x).clamp(min=0))] if p.input_signed else [(1, x)]
    w_pols = [(1, w.clamp(min=0)), (-1, (-w).clamp(min=0))]
    out = torch.zeros(tr, m_rows, n_total, dtype=torch.int64)
    for r in range(tr):
        k0, k1 = r * rows, min((r + 1) * rows, k_total)
        for sx, xp in x_pols:
            for sw, wq in w_pols:
                for i in range(p.chunks):
                    x_chunk = bit_field(xp[:, k0:k1], i, db)
                    for j in range(p.slices):
                        w_slice = bit_field(wq[k0:k1], j, cb)
                        # exact: int64 matmul is not available everywhere, float64 holds these
                        psum = (x_chunk.double() @ w_slice.double()).round().to(torch.int64)
                        code = psum if p.adc_levels == 0 else adc_codes(psum, p.adc_levels, p.adc_clip)
                        out[r] += sx * sw * (2 ** (i * db + j * cb)) * code
    return out


def cell_tile_sums(x_codes: torch.Tensor, gq: torch.Tensor, p: GemmParams, frac_bits: int) -> torch.Tensor:
    """T_int[r, m, n] of SPEC 7.2 as int64, literally: the partial sums of the input chunks with the
    fixed-point conductances ``gq`` [2, S, K, N] (polarity +/-, slice) of the programmed cells,
    every one through the fixed-point ADC.  ``adc_levels == 0`` (ideal ADC): T_int is in units of
    2^-F (the caller's adc_step is 2^-F)."""
    x = x_codes.to(torch.int64)
    g = gq.to(torch.int64)
    m_rows, k_total = x.shape
    n_total = g.shape[3]
    rows, db, cb = p.rows, p.dac_bits, p.cell_bits
    tr = -(-k_total // rows)
    x_pols = [(1, x.clamp(min=0)), (-1, (-x).clamp(min=0))] if p.input_signed else [(1, x)]
    out = torch.zeros(tr, m_rows, n_total, dtype=torch.int64)
    for r in range(tr):
        k0, k1 = r * rows, min((r + 1) * rows, k_total)
        for sx, xp in x_pols:
            for q, sw in ((0, 1), (1, -1)):
                for i in range(p.chunks):
                    x_chunk = bit_field(xp[:, k0:k1], i, db)
                    for j in range(g.shape[1]):
                        psum = (x_chunk.double() @ g[q, j, k0:k1].double()).round().to(torch.int64)
                        code = psum if p.adc_levels == 0 else adc_codes(psum, p.adc_levels, p.adc_clip, frac_bits)
                        out[r] += sx * sw * (2 ** (i * db + j * cb)) * code
    return out


def expand_tiles(t: torch.Tensor, k_total: int, n_total: int, rows: int, cols: int) -> torch.Tensor:
    """[Tr, Tc] per-PE values -> [K, N] per-weight values."""
    return t.repeat_interleave(rows, 0)[:k_total].repeat_interleave(cols, 1)[:, :n_total]


def expand_rows(t: torch.Tensor, k_total: int, rows: int) -> torch.Tensor:
    """[Tr, N] per-(row tile, column) values -> [K, N]."""
    return t.repeat_interleave(rows, 0)[:k_total]


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
    m_kn = expand_rows(m_col, k_total, config.rows)  # [K, N]
    # Quantisation happens in the tensors' own dtype (as in every backend); sums in float64.
    if not config.quantized:
        # Ideal crossbar, or weight-only fake quantisation (SPEC 4, quantisation switched off).
        def dequant(w: torch.Tensor, given) -> torch.Tensor:
            w = w.detach()
            if config.weight_bits is not None:
                s = _scale(given, w, config.weight_qmax).reshape(-1, 1, 1, 1)
                w = quantize_weight(w, s, config.weight_bits) * s
            return w.double().reshape(cout, -1).T

        w_eff = (1 - m_kn) * expand_rows(alpha, k_total, config.rows) * dequant(weight, weight_scale)
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

        wb_codes, s_w = codes(weight, weight_scale)
        t_b = tile_sums(x_codes, wb_codes, gp).double() * config.adc_step  # [Tr, M, N]
        y = ((1 - m_col) * alpha * s_w).unsqueeze(1).mul(t_b).sum(0)
        if task_weight is not None:
            wt_codes, s_t = codes(task_weight, task_weight_scale)
            t_t = tile_sums(x_codes, wt_codes, gp).double() * config.adc_step
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
