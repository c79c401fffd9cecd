"""mta.cost: the cell levels of the cost model are the bit slices of exactly the weight codes the
op uses (quantised in the weight's compute dtype: float64 stays float64, other floats float32)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from xma2_ops import XbarConfig, XbarLinear, xbar_linear
from xma2_ops import mta

CFG = XbarConfig(rows=32, cols=32)  # 8-bit weights, 2-bit cells: 4 slices per polarity


def rounding_sensitive_values(count: int) -> list:
    """float32 weights w (for max|w| = 1) whose code round(w / s), s = 1/127, differs between
    float32 and float64 arithmetic: values within a few ulps of a half-way point."""
    s32 = torch.tensor(1.0) / 127
    s64 = torch.tensor(1.0, dtype=torch.float64) / 127
    out = []
    for k in range(126):
        w = torch.tensor((k + 0.5) / 127, dtype=torch.float32)
        for step in (0, 1, -1, 2, -2, 3, -3):
            v = w.clone()
            for _ in range(abs(step)):
                v = torch.nextafter(v, torch.tensor(2.0 if step > 0 else -2.0))
            if torch.round(v / s32) != torch.round(v.double() / s64):
                out.append(float(v))
                break
        if len(out) == count:
            return out
    raise AssertionError("no rounding-sensitive value found")


def crafted(n: int, k: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(n, k, generator=g) * 2 - 1
    w[0, 0] = 1.0  # max|w| = 1: scale 1/127
    vals = rounding_sensitive_values(12)
    for i, v in enumerate(vals):  # spread over the PEs, both signs
        w[(7 * i + 3) % n, (11 * i + 5) % k] = v if i % 2 else -v
    return w.to(dtype)


def op_codes(lin: XbarLinear, w: torch.Tensor, task: bool) -> torch.Tensor:
    """[K, N] integer codes the op uses for ``w``: the op's weight-only forward of the identity
    gives the dequantised weight s * codes, divided by the scale max|w| / 127 (in w's compute
    dtype), cross-checked against the quantiser written out here."""
    cd = torch.float64 if w.dtype == torch.float64 else torch.float32
    k = w.shape[1]
    cfg = mta.weight_only(CFG)
    eye = torch.eye(k, dtype=w.dtype)
    with torch.no_grad():
        if task:
            ones = torch.ones(lin.tiles, dtype=w.dtype)
            y = xbar_linear(eye, lin.weight, None, config=cfg, task_weight=w, pe_mask=ones)
        else:
            y = xbar_linear(eye, w, None, config=cfg)
    s = w.detach().to(cd).abs().amax() / 127
    codes = torch.round(y.to(cd) / s)
    by_hand = torch.clamp(torch.round(w.detach().to(cd) / s), -127, 127).T
    assert torch.equal(codes, by_hand)
    return codes.to(torch.int64)


def slices(codes: torch.Tensor) -> torch.Tensor:
    """[K, N, 2, 4] 2-bit slices of the positive and the negative part, plain Python ints."""
    out = torch.zeros(*codes.shape, 2, 4, dtype=torch.int64)
    for (i, j), c in zip(torch.cartesian_prod(torch.arange(codes.shape[0]), torch.arange(codes.shape[1])).tolist(),
                         codes.reshape(-1).tolist()):
        for p, mag in enumerate((max(c, 0), max(-c, 0))):
            for b in range(4):
                out[i, j, p, b] = (mag >> (2 * b)) & 3
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cell_levels_are_the_bit_slices_of_the_op_codes(dtype):
    torch.manual_seed(0)
    lin = XbarLinear(40, 36, bias=False, config=CFG).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(crafted(36, 40, 1, dtype))
    model = nn.ModuleDict({"lin": lin, "fc": nn.Linear(36, 3).to(dtype)})
    mta.prepare(model, mta.MethodSpec("pe", budget=1.0), 3, head="fc")
    ad = lin.adapter
    with torch.no_grad():
        ad.pe_sel.fill_(1.0)
        ad.task_weight.copy_(crafted(36, 40, 2, dtype) * 0.5)  # its own scale: max|w_t| = 0.5
        ad.task_weight[1, 1] = 0.5
    base_codes = op_codes(lin, lin.weight, task=False)
    task_codes = op_codes(lin, ad.task_weight, task=True)
    if dtype == torch.float32:  # the test is sharp: float64 quantisation would give other codes
        w64 = lin.weight.detach().double()
        codes64 = torch.clamp(torch.round(w64 / (w64.abs().amax() / 127)), -127, 127).T.to(torch.int64)
        assert not torch.equal(codes64, base_codes)
    _, base_levels = mta.backbone_state(model)["lin"]
    assert base_levels.dtype == torch.int64 and base_levels.shape == (40, 36, 2, 4)
    assert torch.equal(base_levels, slices(base_codes))
    mask, levels = mta.deployed_state(model)["lin"]
    assert mask.all()
    assert torch.equal(levels, slices(task_codes))
