"""The "triton" backend against the reference, bit for bit (docs/SPEC.md sections 2-4).

Without a GPU the kernels run on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1, set
here before xma2_ops.triton_kernels is first imported); with a GPU they run compiled on CUDA.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

import xma2_ops  # noqa: E402
from xma2_ops import _ops, reference  # noqa: E402
from xma2_ops.config import GemmParams, XbarConfig  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def triton_be() -> _ops.Backend:
    be = _ops._BACKENDS.get("triton")
    if be is None:
        pytest.skip("xma2_ops.triton_kernels did not load")
    if DEVICE not in be.devices:
        # Triton reads TRITON_INTERPRET when it is first imported: a conftest that imports xma2_ops
        # must set it first (os.environ.setdefault("TRITON_INTERPRET", "1") when CUDA is absent).
        pytest.skip("Triton was imported before TRITON_INTERPRET=1 was set: no interpreter for CPU tensors")
    return be


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
]


def _params(cfg_tuple) -> tuple[XbarConfig, GemmParams]:
    rows, cols, wb, cb, ab, db, ba, clip, signed = cfg_tuple
    cfg = XbarConfig(rows=rows, cols=cols, weight_bits=wb, cell_bits=cb, input_bits=ab, dac_bits=db,
                     adc_bits=ba, adc_clip=clip, input_signed=signed)
    return cfg, GemmParams.from_config(cfg, signed)


def _codes(cfg: XbarConfig, signed: bool, m: int, k: int, n: int, g: torch.Generator):
    qx, qw = cfg.input_qmax(signed), cfg.weight_qmax
    x = torch.randint(-qx if signed else 0, qx + 1, (m, k), generator=g, dtype=torch.int32)
    # Many codes at the extremes so that partial sums reach Pmax and the ADC saturates.
    x = torch.where(torch.rand(m, k, generator=g) < 0.3, torch.full_like(x, qx), x)
    w = torch.randint(-qw, qw + 1, (k, n), generator=g, dtype=torch.int32)
    w = torch.where(torch.rand(k, n, generator=g) < 0.3, torch.full_like(w, qw), w)
    return x, w


def _shape(i: int, g: torch.Generator) -> tuple[int, int, int]:
    m = int(torch.randint(1, 90, (), generator=g))
    k = int(torch.randint(1, 120, (), generator=g)) if i % 3 else int(torch.randint(1, 12, (), generator=g))
    n = int(torch.randint(1, 80, (), generator=g))
    return m, k, n


@pytest.mark.parametrize("case", range(len(CONFIGS)))
def test_tile_sums_bit_exact(triton_be, case):
    g = torch.Generator().manual_seed(100 + case)
    cfg, p = _params(CONFIGS[case])
    m, k, n = _shape(case, g)
    x, w = _codes(cfg, p.input_signed, m, k, n, g)
    got = triton_be.tile_sums(x.to(DEVICE), w.to(DEVICE), p)
    assert got.dtype == torch.int64 and got.device.type == DEVICE
    assert torch.equal(got.cpu(), reference.tile_sums(x, w, p))


@pytest.mark.parametrize("case", range(len(CONFIGS)))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mvm_matches_reference(triton_be, case, dtype):
    g = torch.Generator().manual_seed(200 + case)
    cfg, p = _params(CONFIGS[case])
    m, k, n = _shape(case + 1, g)
    x, wb = _codes(cfg, p.input_signed, m, k, n, g)
    _, wt = _codes(cfg, p.input_signed, 1, k, n, g)
    tr, tc = cfg.tiles(k, n)
    mask = torch.randint(0, 3, (tr, tc), generator=g).double() / 2  # 0, 1/2, 1 per PE
    m_col = reference.column_tiles(mask, n, cfg.cols)
    coef_b = ((1 - m_col) * torch.rand(tr, n, generator=g, dtype=torch.float64)).to(dtype)
    coef_t = (m_col * torch.rand(tr, n, generator=g, dtype=torch.float64)).to(dtype)
    with_task = case % 2 == 0
    args = (x, wb, wt if with_task else None, coef_b, coef_t if with_task else None)
    want = _ops._reference_mvm(*args, p)
    got = triton_be.mvm(*(a.to(DEVICE) if a is not None else None for a in args), p)
    assert got.dtype == dtype
    tol = dict(rtol=1e-12, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(got.cpu(), want, **tol)


@pytest.mark.parametrize("case", [0, 1, 6, 8])
def test_conv2d_matches_reference_backend(triton_be, case):
    g = torch.Generator().manual_seed(300 + case)
    cfg, _ = _params(CONFIGS[case])
    cin, cout = 5, 23
    x = torch.randn(2, cin, 7, 6, generator=g, dtype=torch.float64)
    if not cfg.input_signed:
        x = x.abs()
    w = torch.randn(cout, cin, 3, 3, generator=g, dtype=torch.float64)
    wt = torch.randn(cout, cin, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(cout, generator=g, dtype=torch.float64)
    tr, tc = cfg.tiles(cin * 9, cout)
    mask = torch.tensor([0.0, 1.0, 0.25], dtype=torch.float64)[torch.randint(0, 3, (tr, tc), generator=g)]
    alpha = 0.5 + torch.rand(tr, cout, generator=g, dtype=torch.float64)

    def run(backend: str, dev: str):
        leaves = [t.to(dev).requires_grad_() for t in (x, w, wt, mask, alpha)]
        y = xma2_ops.xbar_conv2d(leaves[0], leaves[1], bias.to(dev), stride=(1, 2), padding=1, config=cfg,
                                 task_weight=leaves[2], pe_mask=leaves[3], col_scale=leaves[4], backend=backend)
        y.backward(torch.ones_like(y))
        return [y.detach().cpu()] + [t.grad.cpu() for t in leaves]

    for got, want in zip(run("triton", DEVICE), run("reference", "cpu")):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mask_value", [0.0, 1.0])
def test_linear_hard_masks(triton_be, mask_value):
    """Masks exactly 0 or 1 leave one weight path unused (functional.py drops it, or coef = 0 skips it)."""
    g = torch.Generator().manual_seed(400)
    cfg = XbarConfig(rows=32, cols=16, weight_bits=6, cell_bits=2, input_bits=6, dac_bits=2, adc_bits=5)
    x = torch.randn(9, 70, generator=g)
    w, wt = torch.randn(2, 40, 70, generator=g)
    mask = torch.full(cfg.tiles(70, 40), mask_value)
    kw = dict(config=cfg, task_weight=wt, pe_mask=mask)
    got = xma2_ops.xbar_linear(x.to(DEVICE), w.to(DEVICE), **{**kw, "task_weight": wt.to(DEVICE),
                                                               "pe_mask": mask.to(DEVICE)}, backend="triton")
    want = xma2_ops.xbar_linear(x, w, **kw, backend="reference")
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)


def test_empty_and_bad_inputs(triton_be):
    _, p = _params(CONFIGS[0])
    x = torch.zeros(0, 30, dtype=torch.int32, device=DEVICE)
    w = torch.zeros(30, 5, dtype=torch.int32, device=DEVICE)
    assert triton_be.tile_sums(x, w, p).shape == (2, 0, 5)
    with pytest.raises(RuntimeError, match="x_codes must hold codes"):
        triton_be.tile_sums(torch.full((3, 30), -1, dtype=torch.int32, device=DEVICE), w, p)
    with pytest.raises(RuntimeError, match="int32"):
        triton_be.tile_sums(torch.zeros(3, 30, device=DEVICE), w, p)
    with pytest.raises(RuntimeError, match="K=29"):
        triton_be.tile_sums(torch.zeros(3, 29, dtype=torch.int32, device=DEVICE), w, p)
    with pytest.raises(RuntimeError, match="coef_b must be"):
        triton_be.mvm(torch.zeros(3, 30, dtype=torch.int32, device=DEVICE), w, None,
                      torch.zeros(1, 5, dtype=torch.float64, device=DEVICE), None, p)
