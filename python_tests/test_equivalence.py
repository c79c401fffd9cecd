"""C++ backend vs the reference: bit-exact tile sums, tight float64 outputs, on random cases."""
import dataclasses
import random

import pytest
import torch

import xma2_ops
from xma2_ops import quant
from xma2_ops import XbarConfig
from xma2_ops.backends import reference as ref
from xma2_ops.backends import get_backend
from xma2_ops.config import GemmParams

from helpers import random_config, random_conv_case

BACKENDS = [b for b in xma2_ops.available_backends() if b in ("cpu", "triton")]


def cases(n: int):
    """(backend, seed) pairs: every seed on the C++ backend, every 4th on Triton (its interpreter is
    slow on CPU; python_tests/test_triton.py has its own random cases)."""
    return [(b, s) for b in BACKENDS for s in range(n) if b != "triton" or s % 4 == 0]


def _random_codes(seed):
    rng = random.Random(seed)
    cfg = random_config(rng)
    signed = rng.random() < 0.5 and cfg.input_bits >= 2
    p = GemmParams.from_config(cfg, signed)
    gen = torch.Generator().manual_seed(seed)
    m, k, n = rng.randint(1, 9), rng.randint(1, 150), rng.randint(1, 20)
    qx = cfg.input_qmax(signed)
    x = torch.randint(-qx if signed else 0, qx + 1, (m, k), generator=gen, dtype=torch.int32)
    if rng.random() < 0.3:  # sparse inputs: many all-zero chunks
        x = x * (torch.rand(m, k, generator=gen) < 0.2)
    w = torch.randint(-cfg.weight_qmax, cfg.weight_qmax + 1, (k, n), generator=gen, dtype=torch.int32)
    if rng.random() < 0.2:  # saturate: the largest codes everywhere
        x = torch.full_like(x, qx)
        w = torch.full_like(w, cfg.weight_qmax)
    return cfg, p, x, w


@pytest.mark.parametrize("backend,seed", cases(120))
def test_tile_sums_bit_exact(backend, seed):
    cfg, p, x, w = _random_codes(seed)
    expected = ref.tile_sums(x, w, p)
    got = get_backend(backend, x.device).tile_sums(x, w, p)
    assert got.dtype == torch.int64
    assert torch.equal(got, expected), f"config {cfg}, signed={p.input_signed}"


@pytest.mark.parametrize("backend,seed", cases(40))
def test_mvm_matches_reference(backend, seed):
    cfg, p, x, wb = _random_codes(seed)
    gen = torch.Generator().manual_seed(1000 + seed)
    tr = -(-x.shape[1] // cfg.rows)
    n = wb.shape[1]
    wt = torch.randint(-cfg.weight_qmax, cfg.weight_qmax + 1, wb.shape, generator=gen, dtype=torch.int32)
    coef_b = torch.randn(tr, n, generator=gen, dtype=torch.float64)
    coef_t = torch.randn(tr, n, generator=gen, dtype=torch.float64)
    if seed % 3 == 0:  # whole PEs with zero coefficients are skipped: result must not change
        coef_b[:, : cfg.cols] = 0
    expected = (coef_b.unsqueeze(1) * ref.tile_sums(x, wb, p).double()).sum(0) + (
        coef_t.unsqueeze(1) * ref.tile_sums(x, wt, p).double()).sum(0)
    got = get_backend(backend, x.device).mvm(x, wb, wt, coef_b, coef_t, p)
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-9)


def _one_code_tolerance(case):
    """Half the output change caused by one ADC code in the lowest slice: any wrong code fails."""
    cfg = case.config
    signed = cfg.resolve_signed(bool((case.x < 0).any()))
    s_x = quant.derived_scale(case.x, cfg.input_qmax(signed))
    s_w = quant.derived_scale(case.weight, cfg.weight_qmax) if case.weight_scale is None else case.weight_scale.min()
    step = float(s_x * s_w * cfg.adc_step)
    scales = [1.0] if case.col_scale is None else case.col_scale.abs().flatten().tolist()
    nonzero = [s for s in scales if s > 1e-3] or [1.0]
    return 0.5 * step * min(nonzero)


@pytest.mark.parametrize("backend,seed", cases(220))
def test_conv2d_matches_reference(backend, seed):
    case = random_conv_case(seed)
    y_ref = ref.xbar_conv2d_reference(case.x, case.weight, **case.kwargs())
    y = xma2_ops.xbar_conv2d(case.x, case.weight, **case.kwargs(), backend=backend)
    tol = _one_code_tolerance(case)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=min(tol, 1e-9))


@pytest.mark.parametrize("seed", range(30))
def test_linear_matches_reference(seed):
    case = random_conv_case(seed)
    cout = case.weight.shape[0]
    w2 = case.weight.reshape(cout, -1)
    x2 = torch.randn(4, 3, w2.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    if case.config.input_signed is False:
        x2 = x2.abs()
    tw = None if case.task_weight is None else case.task_weight.reshape(cout, -1)
    y = xma2_ops.xbar_linear(x2, w2, case.bias, config=case.config, task_weight=tw, pe_mask=case.pe_mask,
                             col_scale=case.col_scale, weight_scale=case.weight_scale, backend="cpu")
    # A linear layer is a 1x1 conv over a [B*3, K, 1, 1] input.
    y_ref = ref.xbar_conv2d_reference(x2.reshape(-1, w2.shape[1], 1, 1), w2.reshape(cout, -1, 1, 1),
                                      case.bias, config=case.config,
                                      task_weight=None if tw is None else tw.reshape(cout, -1, 1, 1),
                                      pe_mask=case.pe_mask, col_scale=case.col_scale,
                                      weight_scale=case.weight_scale)
    torch.testing.assert_close(y, y_ref.reshape(4, 3, cout), rtol=0, atol=1e-9)


def test_float32_inputs_quantise_in_float32():
    case = random_conv_case(5, dtype=torch.float32)
    y_ref = ref.xbar_conv2d_reference(case.x, case.weight, **case.kwargs())
    y = xma2_ops.xbar_conv2d(case.x, case.weight, **case.kwargs(), backend="cpu")
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, rtol=2e-6, atol=1e-6)


def test_wrong_single_code_is_detected():
    """The tolerance used above really catches one ADC code off in the lowest slice."""
    case = random_conv_case(7)
    case.config = XbarConfig(rows=4, cols=2, adc_bits=3)
    case.col_scale = None
    y_ref = ref.xbar_conv2d_reference(case.x, case.weight, **case.kwargs())
    tol = _one_code_tolerance(case)
    signed = bool((case.x < 0).any())
    s_x = quant.derived_scale(case.x, case.config.input_qmax(signed))
    s_w = quant.derived_scale(case.weight, case.config.weight_qmax)
    bumped = y_ref.clone()
    bumped.view(-1)[0] += float(s_x * s_w * case.config.adc_step)  # one code more, shift 2^0
    with pytest.raises(AssertionError):
        torch.testing.assert_close(bumped, y_ref, rtol=0, atol=min(tol, 1e-9))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_quantise_in_float32(dtype):
    """Half-precision tensors are quantised (scales too) in float32: the result is the float32
    reference of the same values, rounded once to the half dtype."""
    case = random_conv_case(11, dtype=torch.float32)
    x, w = case.x.to(dtype), case.weight.to(dtype)
    y = xma2_ops.xbar_conv2d(x, w, config=case.config, backend="cpu")
    y_ref = ref.xbar_conv2d_reference(x.float(), w.float(), config=case.config)
    assert y.dtype == dtype
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(y.float(), y_ref, rtol=eps, atol=eps * float(y_ref.abs().max()) * 1e-2)


@pytest.mark.parametrize("seed", range(24))
def test_reference_backend_has_the_cpu_bits(seed):
    """backend="reference" adds coef * T_int in the order of the CPU kernel (row tile outer, then the
    base set, then the task set, csrc/cpu/driver.h), so a whole conv with task weights and fractional
    pe_mask / col_scale gives the cpu backend's bits, in float32 and float64, without a device model
    and with an all-off DeviceModel (SPEC 7: bit for bit)."""
    kw, x, weight = _masked_conv(seed, None if seed % 4 < 2 else xma2_ops.DeviceModel(seed=seed))
    y_cpu = xma2_ops.xbar_conv2d(x, weight, **kw, backend="cpu")
    y_ref = xma2_ops.xbar_conv2d(x, weight, **kw, backend="reference")
    assert torch.equal(y_ref, y_cpu), (seed, kw["config"], (y_ref - y_cpu).abs().max())


@pytest.mark.parametrize("seed", range(12))
def test_reference_backend_mask_gradients_have_the_cpu_bits(seed):
    """The pe_mask / col_scale gradients of backend="reference" are summed in the order of the CPU
    kernels (csrc/cpu/coef_grad.h): the cpu backend's bits, over more than one block of input rows,
    without a device model, with an all-off one and with a noisy one."""
    device = (None, xma2_ops.DeviceModel(seed=seed), xma2_ops.DeviceModel.preset("typical"))[seed % 3]
    kw, x, weight = _masked_conv(seed, device, batch=6)
    grads = []
    for backend in ("cpu", "reference"):
        mask, scale = kw["pe_mask"].clone().requires_grad_(True), kw["col_scale"].clone().requires_grad_(True)
        y = xma2_ops.xbar_conv2d(x, weight, **{**kw, "pe_mask": mask, "col_scale": scale}, backend=backend)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype))
        grads.append((mask.grad, scale.grad))
    assert torch.equal(grads[1][0], grads[0][0]) and torch.equal(grads[1][1], grads[0][1]), seed


def _masked_conv(seed, device, batch=2):
    """A random quantised conv with task weights and fractional pe_mask / col_scale (several row tiles)."""
    rng, gen = random.Random(5000 + seed), torch.Generator().manual_seed(5000 + seed)
    cfg = random_config(rng)
    dtype = (torch.float64, torch.float32)[seed % 2]
    cin, cout, kh = rng.randint(3, 9), rng.randint(2, 12), rng.choice([1, 3])
    x = torch.randn(batch, cin, 6, 6, generator=gen, dtype=dtype)
    weight = torch.randn(cout, cin, kh, kh, generator=gen, dtype=dtype)
    task_weight = torch.randn(cout, cin, kh, kh, generator=gen, dtype=dtype)
    tr, tc = cfg.tiles(cin * kh * kh, cout)
    pe_mask = torch.rand(tr, tc, generator=gen, dtype=dtype)
    col_scale = torch.rand(tr, cout, generator=gen, dtype=dtype) * 2 - 0.5
    kw = dict(config=dataclasses.replace(cfg, device=device), task_weight=task_weight, pe_mask=pe_mask,
              col_scale=col_scale, padding=kh // 2)
    return kw, x, weight
