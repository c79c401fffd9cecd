"""Seeded crossbar-GEMM cases shared by the GPU-backend tests (test_triton.py, test_cuda.py)."""
from __future__ import annotations

import torch

from xma2_ops.backends import reference as xma2_reference
from xma2_ops import quant
from xma2_ops.config import GemmParams, XbarConfig

# (rows, cols, weight_bits, cell_bits, input_bits, dac_bits, adc_bits, adc_clip, input_signed)
CONFIGS = [
    (24, 20, 6, 2, 4, 1, 4, None, False),      # lossy ADC, rows/cols not dividing K/N
    (24, 20, 5, 1, 5, 2, 6, 50, True),         # clip below Pmax: saturation
    (40, 30, 7, 2, 4, 1, 10, 2000, False),     # clip above Pmax, n < clip
    (33, 16, 8, 4, 6, 2, 10, None, True),      # 10-bit ADC below Pmax levels
    (12, 8, 4, 2, 3, 3, 2, None, True),        # dac_bits > input magnitude bits, 2-bit ADC
    (17, 9, 8, 3, 8, 3, None, None, False),    # ideal ADC: lossless digit path
    (64, 64, 8, 2, 8, 1, 8, None, True),       # 8-bit ADC with n = clip = Pmax: lossless
    (20, 7, 16, 3, 16, 3, None, None, True),   # 16-bit codes, three base-128 digits
    (150, 40, 9, 8, 9, 8, 9, 20000, True),     # rows > 128 (streamed K), 8-bit DAC and cells
    (200, 50, 3, 4, 2, 2, 3, None, False),     # cell_bits > weight magnitude bits, streamed K
    (5, 3, 6, 1, 5, 1, 3, 7, True),            # tiny crossbars, many partial sums
    (31, 13, 8, 3, 7, 2, 5, 100, False),       # odd sizes everywhere
    (64, 16, 7, 3, 7, 3, 24, 2**32 - 1, True),  # clip and ADC arithmetic beyond int32 (MAX_ADC_CLIP = 2**32)
    (128, 128, 8, 2, 8, 1, 8, None, False),    # the default XbarConfig: 128 rows, lossy 8-bit ADC at Pmax
    (96, 24, 16, 1, 16, 1, 6, None, False),    # 16-bit unsigned inputs, 15 weight slices: |T_int| >= 2^31
]


def make_params(cfg_tuple) -> tuple[XbarConfig, GemmParams]:
    rows, cols, wb, cb, ab, db, ba, clip, signed = cfg_tuple
    cfg = XbarConfig(rows=rows, cols=cols, weight_bits=wb, cell_bits=cb, input_bits=ab, dac_bits=db,
                     adc_bits=ba, adc_clip=clip, input_signed=signed)
    return cfg, GemmParams.from_config(cfg, signed)


def make_codes(cfg: XbarConfig, signed: bool, m: int, k: int, n: int, g: torch.Generator):
    qx, qw = cfg.input_qmax(signed), cfg.weight_qmax
    x = torch.randint(-qx if signed else 0, qx + 1, (m, k), generator=g, dtype=torch.int32)
    # Many codes at the extremes so that partial sums reach Pmax and the ADC saturates.
    x = torch.where(torch.rand(m, k, generator=g) < 0.3, torch.full_like(x, qx), x)
    w = torch.randint(-qw, qw + 1, (k, n), generator=g, dtype=torch.int32)
    w = torch.where(torch.rand(k, n, generator=g) < 0.3, torch.full_like(w, qw), w)
    return x, w


def make_shape(i: int, g: torch.Generator) -> tuple[int, int, int]:
    m = int(torch.randint(1, 90, (), generator=g))
    k = int(torch.randint(1, 120, (), generator=g)) if i % 3 else int(torch.randint(1, 12, (), generator=g))
    n = int(torch.randint(1, 80, (), generator=g))
    return m, k, n


def make_mvm_case(case: int, shape: tuple[int, int, int], g: torch.Generator):
    """(args, params, dtype, tolerance) of one mvm check: masks 0, 1/2 and 1 per PE, with and
    without task weights, float32 and float64 coefficients."""
    cfg, p = make_params(CONFIGS[case])
    m, k, n = shape
    x, wb = make_codes(cfg, p.input_signed, m, k, n, g)
    _, wt = make_codes(cfg, p.input_signed, 1, k, n, g)
    with_task = case % 2 == 0
    dtype = (torch.float64, torch.float32)[case // 2 % 2]
    tr, tc = cfg.tiles(k, n)
    mask = torch.randint(0, 3, (tr, tc), generator=g).double() / 2
    m_col = quant.column_tiles(mask, n, cfg.cols)
    coef_b = ((1 - m_col) * torch.rand(tr, n, generator=g, dtype=torch.float64)).to(dtype)
    coef_t = (m_col * torch.rand(tr, n, generator=g, dtype=torch.float64)).to(dtype)
    args = (x, wb, wt if with_task else None, coef_b, coef_t if with_task else None)
    tol = dict(rtol=1e-12, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-3)
    return args, p, dtype, tol
