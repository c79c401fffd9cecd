"""Random cases shared by the tests."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import xma2_ops
from xma2_ops import XbarConfig
from xma2_ops.config import GemmParams


@dataclass
class ConvCase:
    config: XbarConfig
    x: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    task_weight: Optional[torch.Tensor]
    pe_mask: Optional[torch.Tensor]
    col_scale: Optional[torch.Tensor]
    stride: int
    padding: int
    dilation: int
    weight_scale: Optional[torch.Tensor]

    def kwargs(self) -> dict:
        return dict(bias=self.bias, stride=self.stride, padding=self.padding, dilation=self.dilation,
                    config=self.config, task_weight=self.task_weight, pe_mask=self.pe_mask,
                    col_scale=self.col_scale, weight_scale=self.weight_scale)


def random_config(rng: random.Random, quantized: bool = True) -> XbarConfig:
    if not quantized:
        return XbarConfig(rows=rng.randint(1, 40), cols=rng.randint(1, 12), weight_bits=None, input_bits=None,
                          adc_bits=None)
    rows = rng.choice([1, 3, 7, 16, 27, 33, 64, 70])
    cell_bits, dac_bits = rng.randint(1, 4), rng.randint(1, 4)
    pmax = rows * (2 ** dac_bits - 1) * (2 ** cell_bits - 1)
    adc_bits = rng.choice([None, 1, 2, 3, 4, 5, 6, 8, 10])
    clip = rng.choice([None, None, max(1, pmax // 3), pmax, pmax * 2, rng.randint(1, pmax + 5)])
    return XbarConfig(rows=rows, cols=rng.choice([1, 2, 5, 8, 13]), weight_bits=rng.randint(2, 8),
                      cell_bits=cell_bits, input_bits=rng.randint(2, 8), dac_bits=dac_bits, adc_bits=adc_bits,
                      adc_clip=clip, input_signed=rng.choice([None, True, False]))


def random_mask(rng: random.Random, gen: torch.Generator, shape, dtype) -> Optional[torch.Tensor]:
    kind = rng.choice(["none", "zeros", "ones", "binary", "soft"])
    if kind == "none":
        return None
    if kind == "zeros":
        return torch.zeros(shape, dtype=dtype)
    if kind == "ones":
        return torch.ones(shape, dtype=dtype)
    if kind == "binary":
        return (torch.rand(shape, generator=gen) < 0.5).to(dtype)
    return torch.rand(shape, generator=gen, dtype=dtype)


def random_conv_case(seed: int, quantized: bool = True, dtype=torch.float64) -> ConvCase:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    cfg = random_config(rng, quantized)
    b, cin, cout = rng.randint(1, 3), rng.randint(1, 5), rng.randint(1, 9)
    kh, kw = rng.randint(1, 3), rng.randint(1, 3)
    stride, padding, dilation = rng.randint(1, 2), rng.randint(0, 2), rng.randint(1, 2)
    h = rng.randint(dilation * (kh - 1) + 1, 9)
    w = rng.randint(dilation * (kw - 1) + 1, 9)
    x = torch.randn(b, cin, h, w, generator=gen, dtype=dtype)
    if cfg.input_signed is False or rng.random() < 0.3:
        x = x.abs()  # non-negative inputs (post-ReLU)
    weight = torch.randn(cout, cin, kh, kw, generator=gen, dtype=dtype)
    tr, tc = cfg.tiles(cin * kh * kw, cout)
    pe_mask = random_mask(rng, gen, (tr, tc), dtype)
    task_weight = torch.randn(cout, cin, kh, kw, generator=gen, dtype=dtype) if (
        pe_mask is not None or rng.random() < 0.3) else None
    if task_weight is None:
        pe_mask = None
    col_scale = None if rng.random() < 0.3 else torch.randn(tr, cout, generator=gen, dtype=dtype)
    bias = None if rng.random() < 0.4 else torch.randn(cout, generator=gen, dtype=dtype)
    weight_scale = None
    if quantized and rng.random() < 0.3:  # a per-output-column scale that clips some weights
        weight_scale = weight.abs().reshape(cout, -1).amax(1) / (2 ** (cfg.weight_bits - 1) - 1) * 0.7
    return ConvCase(cfg, x, weight, bias, task_weight, pe_mask, col_scale, stride, padding, dilation, weight_scale)


def ordered_mvm(x, wb, wt, cb, ct, p):
    """The summation order every CPU path uses: row tile outer, then the base set, then the task
    set, each term coef * T_int rounded to float64 and added in float64; one rounding at the end."""
    from xma2_ops.backends import reference as ref
    tb = ref.tile_sums(x, wb, p).double()
    tt = ref.tile_sums(x, wt, p).double() if wt is not None else None
    acc = torch.zeros(x.shape[0], wb.shape[1], dtype=torch.float64)
    for r in range(tb.shape[0]):
        acc = acc + cb[r].double() * tb[r]
        if wt is not None:
            acc = acc + ct[r].double() * tt[r]
    return acc.to(cb.dtype)


# Input rows per block of the coefficient gradients' sum (kGradRows in csrc/cpu/coef_grad.h).
GRAD_ROWS = 128


def ordered_coef_grad(t: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """The summation order of every CPU coefficient gradient, G [Tr, N] from T_int [Tr, M, N] and
    gy [M, N]: per block of GRAD_ROWS input rows S_b = sum over its rows m, in ascending order, of
    gy[m] * T_int[:, m] (each product and each sum rounded to float64), then G = sum of the S_b in
    block order."""
    t, gy = t.double(), gy.double()
    g = torch.zeros(t.shape[0], t.shape[2], dtype=torch.float64)
    for b0 in range(0, t.shape[1], GRAD_ROWS):
        s = torch.zeros_like(g)
        for m in range(b0, min(b0 + GRAD_ROWS, t.shape[1])):
            s += gy[m] * t[:, m]
        g += s
    return g


class OpLog(TorchDispatchMode):
    """Records the name of every op dispatched inside its ``with`` block (``.ops``)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


# A small lossy config that every instruction set computes (the probe of cpu_isas).
ISA_PROBE = GemmParams(rows=16, cols=8, input_bits=4, input_signed=False, dac_bits=1, weight_bits=4, cell_bits=1,
                       adc_levels=3, adc_clip=16)


def cpu_isas() -> list:
    """The instruction sets (XMA2_CPU_ISA) this machine and build run, asked of the C++ kernel itself;
    [] without the C++ CPU backend.  XMA2_CPU_ISA is restored afterwards."""
    if "cpu" not in xma2_ops.available_backends():
        return []
    out, old = [], os.environ.get("XMA2_CPU_ISA")
    try:
        for isa in ("scalar", "avx2", "avx512", "amx"):
            os.environ["XMA2_CPU_ISA"] = isa
            try:
                torch.ops.xma2_ops.xbar_tile_sums(torch.ones(2, 20, dtype=torch.int32),
                                                  torch.ones(20, 3, dtype=torch.int32), *ISA_PROBE.as_args())
                out.append(isa)
            except RuntimeError as e:
                assert "cannot run" in str(e)
    finally:
        if old is None:
            os.environ.pop("XMA2_CPU_ISA", None)
        else:
            os.environ["XMA2_CPU_ISA"] = old
    return out
