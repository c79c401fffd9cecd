"""The readable oracle of docs/SPEC.md, in plain PyTorch, and the "reference" backend.

``tile_sums`` / ``cell_tile_sums`` compute T_int of SPEC 3, 7.2 and 8 literally (loops over row
tiles, polarities, input chunks and weight slices, every conversion through the ADC);
``xbar_conv2d_reference`` is SPEC 1-4 for a conv2d, step by step.  The quantisation rules come
from xma2_ops.quant.  Nothing in this file is meant to be fast.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..config import GemmParams, XbarConfig
from ..quant import (adc_codes, bit_field, column_tiles, derived_scale, expand_rows, quantize_input,
                     quantize_weight)
from .base import BackendBase, mvm_from_tile_sums


# ---------------------------------------------------------------- the crossbar GEMM (SPEC 3 and 8)
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


# ---------------------------------------------------------------- the backend
def _backend_tile_sums(x_codes, w_codes, p: GemmParams) -> torch.Tensor:
    return tile_sums(x_codes, w_codes, p).to(x_codes.device)


def mvm(x_codes, wb_codes, wt_codes, coef_b, coef_t, p: GemmParams) -> torch.Tensor:
    """y [M, N] = sum_r coef_b T_b_int + coef_t T_t_int from the literal tile sums (base.ordered_sum's order)."""
    return mvm_from_tile_sums(lambda x, w: _backend_tile_sums(x, w, p), x_codes, wb_codes, wt_codes, coef_b,
                              coef_t, wb_codes.shape[1])


def _backend_cell_tile_sums(x_codes, gq, p: GemmParams, frac_bits: int) -> torch.Tensor:
    return cell_tile_sums(x_codes.cpu(), gq.cpu(), p, frac_bits).to(x_codes.device)


BACKEND = BackendBase("reference", _backend_tile_sums, mvm, ("cpu", "cuda"), cell_tile_sums=_backend_cell_tile_sums)
