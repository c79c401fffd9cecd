"""The "triton" backend against the reference, bit for bit (docs/SPEC.md sections 2-4).

Without a GPU the kernels run on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1, set
before Triton is first imported: here, or by xma2_ops.backends.triton with a CPU-only torch);
with a GPU they run compiled on CUDA.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

import xma2_ops  # noqa: E402
from xma2_ops.backends import BackendBase, dispatch, reference  # noqa: E402
from xma2_ops.config import XbarConfig  # noqa: E402
from xbar_cases import CONFIGS, make_codes, make_mvm_case, make_params, make_shape  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def triton_be() -> BackendBase:
    be = dispatch._BACKENDS.get("triton")
    if be is None:
        pytest.skip("xma2_ops.backends.triton did not load")
    if DEVICE not in be.supported_devices:
        # A CUDA build of torch without a GPU, and xma2_ops imported before this module set the variable.
        pytest.skip("Triton was imported before TRITON_INTERPRET=1 was set: no interpreter for CPU tensors")
    return be


@pytest.mark.parametrize("case", range(len(CONFIGS)))
def test_tile_sums_bit_exact(triton_be, case):
    g = torch.Generator().manual_seed(100 + case)
    cfg, p = make_params(CONFIGS[case])
    m, k, n = make_shape(case, g)
    x, w = make_codes(cfg, p.input_signed, m, k, n, g)
    got = triton_be.tile_sums(x.to(DEVICE), w.to(DEVICE), p)
    assert got.dtype == torch.int64 and got.device.type == DEVICE
    assert torch.equal(got.cpu(), reference.tile_sums(x, w, p))


@pytest.mark.parametrize("case", range(len(CONFIGS)))
def test_mvm_matches_reference(triton_be, case):
    g = torch.Generator().manual_seed(200 + case)
    args, p, dtype, tol = make_mvm_case(case, make_shape(case + 1, g), g)
    want = reference.mvm(*args, p)
    got = triton_be.mvm(*(a.to(DEVICE) if a is not None else None for a in args), p)
    assert got.dtype == dtype
    torch.testing.assert_close(got.cpu(), want, **tol)


@pytest.mark.parametrize("case", [0, 1, 6, 8])
def test_conv2d_matches_reference_backend(triton_be, case):
    g = torch.Generator().manual_seed(300 + case)
    cfg, _ = make_params(CONFIGS[case])
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
        # Only the mask and scale gradients come from the backend (its coefficient gradient); those of
        # x and the weights are the same straight-through code for every backend (test_autograd checks it).
        m, a = mask.to(dev).requires_grad_(), alpha.to(dev).requires_grad_()
        y = xma2_ops.xbar_conv2d(x.to(dev), w.to(dev), bias.to(dev), stride=(1, 2), padding=1, config=cfg,
                                 task_weight=wt.to(dev), pe_mask=m, col_scale=a, backend=backend)
        y.backward(torch.ones_like(y))
        return [y.detach().cpu(), m.grad.cpu(), a.grad.cpu()]

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


def test_strided_codes(triton_be):
    """The kernel reads codes through their strides (no copies)."""
    g = torch.Generator().manual_seed(500)
    cfg, p = make_params(CONFIGS[0])
    x, w = make_codes(cfg, p.input_signed, 50, 45, 33, g)
    x_t = x.T.contiguous().to(DEVICE).T
    w_t = w.T.contiguous().to(DEVICE).T
    assert torch.equal(triton_be.tile_sums(x_t, w_t, p).cpu(), reference.tile_sums(x, w, p))


def test_empty_and_bad_inputs(triton_be):
    _, p = make_params(CONFIGS[0])
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


def test_adc_argument_checks(triton_be):
    """As the C++ ops: adc_levels <= adc_clip (levels > clip >= Pmax is a lossy ADC, not the identity),
    adc_levels < 2^24, adc_clip <= MAX_ADC_CLIP, with messages that name the argument."""
    from dataclasses import replace

    from xma2_ops.config import MAX_ADC_CLIP, GemmParams
    x = torch.zeros(3, 30, dtype=torch.int32, device=DEVICE)
    w = torch.zeros(30, 5, dtype=torch.int32, device=DEVICE)
    p = GemmParams(rows=16, cols=4, input_bits=4, input_signed=False, dac_bits=1, weight_bits=5, cell_bits=2,
                   adc_levels=48, adc_clip=48)
    assert p.adc_identity and triton_be.tile_sums(x, w, p).shape == (2, 3, 5)
    for bad, name in [(dict(adc_levels=53), "adc_levels"), (dict(adc_levels=1 << 24, adc_clip=1 << 25), "adc_levels"),
                      (dict(adc_clip=MAX_ADC_CLIP + 1), "adc_clip"), (dict(cols=1 << 17), "cols"),
                      (dict(adc_clip=0), "adc_clip")]:
        with pytest.raises(RuntimeError, match=name):
            triton_be.tile_sums(x, w, replace(p, **bad))


# ------------------------------------------------------------------ the triton_ops (torch.library.triton_op)
def _small_op_args(seed: int):
    g = torch.Generator().manual_seed(seed)
    cfg, p = make_params(CONFIGS[1])
    x, w = make_codes(cfg, p.input_signed, 3, 30, 6, g)
    _, wt = make_codes(cfg, p.input_signed, 1, 30, 6, g)
    cb = torch.rand(2, 6, dtype=torch.float64, generator=g)
    return p, [t.to(DEVICE) for t in (x, w, wt, cb, 3 * cb)]


@pytest.mark.parametrize("op", ["triton_tile_sums", "triton_mvm"])
def test_opcheck_triton_ops(triton_be, op):
    """Schema, fake impl, autograd registration and the AOTAutograd decomposition agree with eager."""
    from torch._library.triton import triton_ops_to_kernels
    assert f"xma2_ops::{op}" in triton_ops_to_kernels  # registered by torch.library.triton_op
    p, (x, w, wt, cb, ct) = _small_op_args(600)
    args = (x, w, *p.as_args()) if op == "triton_tile_sums" else (x, w, wt, cb, ct, *p.as_args())
    torch.library.opcheck(getattr(torch.ops.xma2_ops, op).default, args)
    if op == "triton_tile_sums":
        assert torch.equal(torch.ops.xma2_ops.triton_tile_sums(*args).cpu(), reference.tile_sums(x.cpu(), w.cpu(), p))


def test_backend_calls_the_triton_ops_and_compiles(triton_be):
    """The backend's mvm / tile_sums go through the triton_ops, and a torch.compile'd caller
    (AOTAutograd decomposes the op into its body) gives the eager values."""
    from helpers import OpLog as Log

    p, (x, w, wt, cb, ct) = _small_op_args(601)
    with Log() as log:
        y = triton_be.mvm(x, w, wt, cb, ct, p)
        t = triton_be.tile_sums(x, w, p)
    assert "xma2_ops.triton_mvm.default" in log.ops and "xma2_ops.triton_tile_sums.default" in log.ops
    assert torch.equal(t.cpu(), reference.tile_sums(x.cpu(), w.cpu(), p))
    torch.testing.assert_close(y.cpu(), reference.mvm(x.cpu(), w.cpu(), wt.cpu(), cb.cpu(), ct.cpu(), p),
                               rtol=1e-12, atol=1e-12)
    f = torch.compile(lambda *a: torch.ops.xma2_ops.triton_mvm(*a) * 2, backend="aot_eager", fullgraph=True)
    assert torch.equal(f(x, w, wt, cb, ct, *p.as_args()), 2 * y)


def test_packed_mvm_checks_weights_once(triton_be):
    """The layers' path (mvm_packed): weight codes checked once by pack_weights, the input codes'
    range asserted on the device (no read-back), the same bits as mvm."""
    cfg, p = make_params(CONFIGS[3])
    x, w = make_codes(cfg, p.input_signed, 21, 70, 30, torch.Generator().manual_seed(5))
    x, w = x.to(DEVICE), w.to(DEVICE)
    tr = -(-70 // p.rows)
    coef = torch.randn(tr, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    packed = triton_be.pack_weights(w, p)
    y = triton_be.mvm_packed(x, w, packed, w, packed, coef, coef, p)
    assert torch.equal(y, triton_be.mvm(x, w, w, coef, coef, p))
    with pytest.raises(RuntimeError, match="w_codes must hold codes"):
        triton_be.pack_weights(torch.full_like(w, 1 << 20), p)
    with pytest.raises(RuntimeError, match="wb_packed is not the packed form"):
        triton_be.mvm_packed(x, w, w.clone(), None, None, coef, None, p)
    if DEVICE == "cpu":  # (on a GPU the device-side assertion would end the CUDA context)
        with pytest.raises(RuntimeError, match="x_codes must hold codes"):
            triton_be.mvm_packed(torch.full_like(x, 1 << 20), w, packed, None, None, coef, None, p)
