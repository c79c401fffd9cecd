"""Partial sums over non-ideal cells (docs/SPEC.md 7.2) through exact float GEMMs (ATen / BLAS):
the device-model path of the "cpu" backend (also correct on CUDA tensors).

Per row tile and input chunk, one GEMM of the chunk values [M, R] with every polarity's and
slice's fixed-point conductances [R, 2 S N] gives all partial sums P_F of that chunk; they are
integers below 2^24 (float32) or 2^53 (float64; the caller checks P_F < 2^52), so the GEMM is
exact.  Then the fixed-point ADC of SPEC 7.2 and the digital shift-and-add, in int64.
"""
from __future__ import annotations

import torch

from . import reference as ref
from .config import GemmParams

_ROW_BLOCK = 4096  # input rows per step (bounds the [rows, 2 S N] int64 temporaries)


def cell_tile_sums(x_codes: torch.Tensor, gq: torch.Tensor, p: GemmParams, frac_bits: int) -> torch.Tensor:
    """T_int [Tr, M, N] int64 of the cells ``gq`` [2, S, K, N] int32 (same contract as
    reference.cell_tile_sums)."""
    x = x_codes.to(torch.int64)
    m_total, k_total = x.shape
    s, n = gq.shape[1], gq.shape[3]
    tr = -(-k_total // p.rows)
    g_max = int(gq.max()) if gq.numel() else 0
    exact = torch.float32 if p.rows * (2 ** p.dac_bits - 1) * g_max < 2 ** 24 else torch.float64
    x_pols = [(1, x.clamp(min=0)), (-1, (-x).clamp(min=0))] if p.input_signed else [(1, x)]
    out = torch.empty(tr, m_total, n, dtype=torch.int64, device=x.device)
    for r in range(tr):
        k0, k1 = r * p.rows, min((r + 1) * p.rows, k_total)
        g_r = gq[:, :, k0:k1, :].permute(2, 0, 1, 3).reshape(k1 - k0, 2 * s * n).to(exact)
        for m0 in range(0, m_total, _ROW_BLOCK):
            m1 = min(m0 + _ROW_BLOCK, m_total)
            t = torch.zeros(m1 - m0, n, dtype=torch.int64, device=x.device)
            for sx, xp in x_pols:
                for i in range(p.chunks):
                    chunk = ref.bit_field(xp[m0:m1, k0:k1], i, p.dac_bits).to(exact)
                    psum = (chunk @ g_r).to(torch.int64).view(m1 - m0, 2, s, n)
                    code = psum if p.adc_levels == 0 else ref.adc_codes(psum, p.adc_levels, p.adc_clip, frac_bits)
                    weights = torch.tensor([[sx * sw * 2 ** (i * p.dac_bits + j * p.cell_bits) for j in range(s)]
                                            for sw in (1, -1)], dtype=torch.int64, device=x.device)
                    t += (code * weights.view(1, 2, s, 1)).sum((1, 2))
            out[r, m0:m1] = t
    return out
