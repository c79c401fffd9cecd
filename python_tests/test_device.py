"""The device model (docs/SPEC.md section 7): off means bit-identical, backends agree bit for bit
on non-ideal cells, the draws have the stated statistics and are reproducible from the seed."""
import dataclasses
import math
import random

import pytest
import torch
from scipy import stats

import xma2_ops
from xma2_ops import quant
from xma2_ops import DeviceModel, XbarConfig
from xma2_ops.backends import reference as ref
from xma2_ops.config import GemmParams
from xma2_ops.device import CellState, cell_levels, program_cells

from helpers import random_conv_case

ALL_ON = DeviceModel(on_off=8.0, sigma_abs=0.02, sigma_rel=0.05, saf_low=0.02, saf_high=0.02, nu_mean=0.02,
                     nu_std=0.01, read_time=3600.0, sigma_read=0.01, seed=7, frac_bits=6)


# ------------------------------------------------------------------ off = bit for bit
@pytest.mark.parametrize("seed", range(40))
def test_ideal_device_is_bit_identical(seed):
    """A device model with every non-ideality off gives exactly the results without one."""
    case = random_conv_case(seed)
    kw = case.kwargs()
    with_device = {**kw, "config": dataclasses.replace(case.config, device=DeviceModel(seed=seed, frac_bits=seed % 9))}
    for backend in ("cpu", "reference"):
        y = xma2_ops.xbar_conv2d(case.x, case.weight, **kw, backend=backend)
        assert torch.equal(xma2_ops.xbar_conv2d(case.x, case.weight, **with_device, backend=backend), y)


def _params(rng: random.Random) -> GemmParams:
    rows = rng.choice([1, 5, 16, 33, 70])
    cb, db = rng.randint(1, 3), rng.randint(1, 3)
    pmax = rows * (2 ** db - 1) * (2 ** cb - 1)
    adc_bits = rng.choice([None, 1, 3, 5, 8])
    clip = rng.choice([pmax, max(1, pmax // 3), pmax * 2])
    levels = 0 if adc_bits is None else min(2 ** adc_bits - 1, clip)
    return GemmParams(rows, rng.randint(1, 6), rng.randint(2, 7), rng.random() < 0.5, db, rng.randint(2, 7), cb,
                      levels, clip)


def gemm_cell_tile_sums(x, gq, p: GemmParams, frac_bits: int) -> torch.Tensor:
    """The cpu backend's device-model tile sums (the C++ op)."""
    return torch.ops.xma2_ops.xbar_cell_tile_sums(x, gq, *p.as_args(), frac_bits)


def _x_codes(gen, m, k, p: GemmParams) -> torch.Tensor:
    q = 2 ** p.x_bits - 1
    return torch.randint(-q if p.input_signed else 0, q + 1, (m, k), generator=gen, dtype=torch.int32)


@pytest.mark.parametrize("seed", range(30))
def test_ideal_cells_give_the_integer_tile_sums(seed):
    """SPEC 7.2 with Gq = L 2^F reduces exactly to SPEC 3: same codes (ideal ADC: times 2^F)."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    p = _params(rng)
    k, n, f = rng.randint(1, 90), rng.randint(1, 9), rng.randint(0, 10)
    qw = 2 ** (p.weight_bits - 1) - 1
    w = torch.randint(-qw, qw + 1, (k, n), generator=gen, dtype=torch.int32)
    x = _x_codes(gen, rng.randint(1, 7), k, p)
    cells = program_cells(w, p.weight_bits, p.cell_bits, DeviceModel(frac_bits=f), 0, 0)
    gq = cells.read()
    assert torch.equal(gq, (cell_levels(w, p.weight_bits, p.cell_bits) << f).to(torch.int32))
    want = ref.tile_sums(x, w, p) * (2 ** f if p.adc_levels == 0 else 1)
    assert torch.equal(ref.cell_tile_sums(x, gq, p, f), want)
    assert torch.equal(gemm_cell_tile_sums(x, gq, p, f), want)


@pytest.mark.parametrize("seed", range(40))
def test_cpu_cells_match_reference_bit_for_bit(seed):
    """Every non-ideality on: the cpu backend's cell path equals the reference's literal loops."""
    rng, gen = random.Random(1000 + seed), torch.Generator().manual_seed(1000 + seed)
    p = _params(rng)
    k, n = rng.randint(1, 90), rng.randint(1, 9)
    dev = dataclasses.replace(ALL_ON, seed=seed, frac_bits=rng.randint(0, 10))
    qw = 2 ** (p.weight_bits - 1) - 1
    w = torch.randint(-qw, qw + 1, (k, n), generator=gen, dtype=torch.int32)
    x = _x_codes(gen, rng.randint(1, 9), k, p)
    gq = program_cells(w, p.weight_bits, p.cell_bits, dev, rng.randint(0, 5), 0).read(rng.randint(0, 3))
    assert torch.equal(gemm_cell_tile_sums(x, gq, p, dev.frac_bits), ref.cell_tile_sums(x, gq, p, dev.frac_bits))


@pytest.mark.parametrize("seed", range(12))
def test_whole_op_with_device_cpu_vs_reference(seed):
    case = random_conv_case(200 + seed)
    cfg = dataclasses.replace(case.config, device=dataclasses.replace(ALL_ON, seed=seed))
    kw = {**case.kwargs(), "config": cfg}
    y_cpu = xma2_ops.xbar_conv2d(case.x, case.weight, **kw, backend="cpu")
    y_ref = xma2_ops.xbar_conv2d(case.x, case.weight, **kw, backend="reference")
    torch.testing.assert_close(y_cpu, y_ref, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ statistics of the draws
def _binomial_ok(count: int, n: int, rate: float) -> bool:
    lo, hi = stats.binom.ppf(0.0005, n, rate), stats.binom.ppf(0.9995, n, rate)
    return lo <= count <= hi


def test_stuck_at_rates_within_binomial_interval():
    dev = DeviceModel(saf_low=0.01, saf_high=0.03, seed=11)
    codes = torch.zeros(400, 100, dtype=torch.int32)  # 2 polarities x 4 slices x 40000 = 320000 cells
    cells = program_cells(codes, 9, 2, dev, layer=3, write=0)
    g, n = cells.g, cells.g.numel()
    assert n >= 10 ** 5
    assert _binomial_ok(int((g == 3.0).sum()), n, 0.03)  # stuck high: top level (g0 = 0)
    assert _binomial_ok(int(cells.stuck.sum()) - int((g == 3.0).sum()), n, 0.01)  # stuck low: level 0 cells
    assert int(cells.stuck.sum()) == int((g == 3.0).sum()) + int((cells.stuck & (g == 0.0)).sum())


@pytest.mark.parametrize("which", ["abs", "rel", "read"])
def test_variation_sigma_within_chi_square_interval(which):
    sigma = 0.07
    dev = DeviceModel(**{f"sigma_{which}": sigma}, seed=5, frac_bits=16)
    codes = torch.full((300, 100), 2, dtype=torch.int32)  # level 2 in slice 0 of w+, every other cell level 0
    cells = program_cells(codes, 3, 2, dev, layer=0, write=0)
    g = cells.read(0).double() / 2 ** 16 if which == "read" else cells.g
    dev_vals = g[0, 0] - 2.0  # the level-2 cells: deviations from their level (clamping at 0 is far away)
    expected_std = sigma * (3.0 if which != "rel" else 2.0)
    n = dev_vals.numel()
    s2 = float(dev_vals.var(unbiased=False)) + float(dev_vals.mean()) ** 2  # the mean is 0 by construction
    lo = stats.chi2.ppf(0.0005, n) / n * expected_std ** 2
    hi = stats.chi2.ppf(0.9995, n) / n * expected_std ** 2
    fixed_point_slack = 2 ** -16  # rounding to 16 fractional bits
    assert lo - fixed_point_slack <= s2 <= hi + fixed_point_slack, (s2, lo, hi)


def test_drift_is_monotone_in_read_time():
    base = dict(nu_mean=0.05, nu_std=0.02, seed=3)
    codes = torch.randint(-63, 64, (64, 32), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    gs = [program_cells(codes, 7, 2, DeviceModel(**base, read_time=t), 0, 0).g for t in (1.0, 10.0, 1e3, 1e6)]
    assert torch.equal(gs[0], cell_levels(codes, 7, 2).double())  # read at t0: no drift yet
    for a, b in zip(gs, gs[1:]):
        assert bool((b <= a).all()) and bool((b < a).any())


def test_read_noise_redrawn_per_call_and_reproducible():
    torch.manual_seed(0)
    cfg = XbarConfig(rows=16, cols=4, device=DeviceModel(sigma_read=0.05, seed=9))
    layer = xma2_ops.XbarLinear(20, 6, config=cfg)
    x = torch.rand(4, 20)
    layer(x)
    layer.eval()
    xma2_ops.program(layer)
    y1, y2 = layer(x), layer(x)
    assert not torch.equal(y1, y2)  # a new read, new noise
    xma2_ops.program(layer)  # the counters restart: the same chip, the same reads
    assert torch.equal(layer(x), y1) and torch.equal(layer(x), y2)
    # the functional API is stateless: the same read every call
    f = [xma2_ops.xbar_linear(x, layer.weight, config=cfg, input_scale=0.01) for _ in range(2)]
    assert torch.equal(f[0], f[1])


def test_same_seed_same_chip_other_seed_other_chip():
    cfg = XbarConfig(rows=16, cols=8, device=ALL_ON)
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 16, 5))
    xma2_ops.convert(net, cfg)
    x = torch.rand(2, 3, 6, 6)
    net(x)
    net.eval()
    outs = []
    for seed in (1, 1, 2):
        xma2_ops.program(net, seed=seed)
        outs.append(net(x))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    layers = [m for m in net.modules() if isinstance(m, xma2_ops.XbarLinear)]
    assert layers[0].chip.layer == 1  # numbered in model order: the conv is layer 0


def test_reprogramming_keeps_faults_and_changes_only_reprogrammed_pes():
    """A task re-programs some PEs: every stuck cell stays stuck, PEs not re-programmed keep their cells."""
    dev = dataclasses.replace(ALL_ON, sigma_read=0.0)
    cfg = XbarConfig(rows=8, cols=4, device=dev)
    torch.manual_seed(2)
    layer = xma2_ops.XbarLinear(24, 12, config=cfg)
    x = torch.rand(5, 24)
    layer(x)
    layer.eval()
    xma2_ops.program(layer)
    backbone = layer.programmed.cells
    tr, tc = layer.tiles
    mask = torch.zeros(tr, tc)
    mask[1, 2] = mask[0, 0] = 1.0
    layer.task_weight = torch.nn.Parameter(torch.randn(12, 24))
    layer.pe_mask = mask
    y_task = layer(x)
    task = layer.programmed_task.cells
    assert layer.programmed.cells is backbone  # the backbone PEs were not written again
    assert torch.equal(task.stuck, backbone.stuck)
    stuck = backbone.stuck
    assert bool(stuck.any()) and torch.equal(task.g[stuck], backbone.g[stuck])  # stuck cells ignore the write
    # what the chip holds after the switch: task cells in re-programmed PEs, backbone cells elsewhere
    m_kn = quant.expand_tiles(mask, 24, 12, 8, 4).bool()
    held = torch.where(m_kn, task.g, backbone.g)
    assert torch.equal(held[:, :, ~m_kn], backbone.g[:, :, ~m_kn])
    assert not torch.equal(held[:, :, m_kn], backbone.g[:, :, m_kn])
    # and the output is the op over exactly these cells
    layer.pe_mask = torch.zeros(tr, tc)
    assert not torch.equal(layer(x), y_task)


def test_noise_aware_training_redraws_per_batch():
    cfg = XbarConfig(rows=16, cols=4, input_bits=None, adc_bits=None, device=dataclasses.replace(ALL_ON, sigma_read=0))
    torch.manual_seed(3)
    layer = xma2_ops.XbarLinear(20, 6, config=cfg)
    plain = xma2_ops.XbarLinear(20, 6, config=dataclasses.replace(cfg, device=None))
    plain.load_state_dict(layer.state_dict())
    x = torch.rand(4, 20)
    assert torch.equal(layer(x), plain(x))  # training on ideal cells unless noise-aware
    layer.noise_aware = True
    y1, y2 = layer(x), layer(x)
    assert not torch.equal(y1, y2) and not torch.equal(y1, plain(x))
    y1.sum().backward()  # straight-through gradients reach the weight
    assert layer.weight.grad is not None and bool(layer.weight.grad.abs().sum() > 0)


def test_weight_only_mode_uses_the_weights_the_cells_hold():
    dev = dataclasses.replace(ALL_ON, sigma_read=0.0)
    cfg = XbarConfig(rows=16, cols=4, input_bits=None, adc_bits=None, device=dev)
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(3, 20, generator=g, dtype=torch.float64), torch.randn(6, 20, generator=g, dtype=torch.float64)
    y = xma2_ops.xbar_linear(x, w, config=cfg)
    s = quant.derived_scale(w, cfg.weight_qmax)
    codes = quant.quantize_weight(w, s, cfg.weight_bits).T.to(torch.int32)
    gq = program_cells(codes, cfg.weight_bits, cfg.cell_bits, dev, 0, 0).read(0).double()
    shifts = torch.tensor([4.0 ** j for j in range(gq.shape[1])], dtype=torch.float64)
    held = ((gq[0] - gq[1]) * shifts.view(-1, 1, 1)).sum(0) / 2 ** dev.frac_bits  # [K, N] codes the cells hold
    torch.testing.assert_close(y, x @ (held * s), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(sigma_abs=-0.1), ValueError, "sigma_abs"),
    (dict(sigma_rel=float("nan")), ValueError, "sigma_rel"),
    (dict(sigma_read=-1), ValueError, "sigma_read"),
    (dict(saf_low=1.5), ValueError, "saf_low"),
    (dict(saf_high=-0.01), ValueError, "saf_high"),
    (dict(saf_low=0.6, saf_high=0.6), ValueError, "saf_low \\+ saf_high"),
    (dict(on_off=1.0), ValueError, "on_off"),
    (dict(on_off=0.5), ValueError, "on_off"),
    (dict(frac_bits=17), ValueError, "frac_bits"),
    (dict(frac_bits=-1), ValueError, "frac_bits"),
    (dict(frac_bits=2.5), TypeError, "frac_bits"),
    (dict(read_time=0.5), ValueError, "read_time"),
    (dict(nu_std=-1.0), ValueError, "nu_std"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed="a"), TypeError, "seed"),
    (dict(sigma_abs="x"), TypeError, "sigma_abs"),
])
def test_bad_device_fields(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        DeviceModel(**kwargs)


def test_device_needs_weight_bits_and_presets():
    with pytest.raises(ValueError, match="device"):
        XbarConfig(weight_bits=None, input_bits=None, adc_bits=None, device=DeviceModel())
    with pytest.raises(TypeError, match="device"):
        XbarConfig(device={"sigma_abs": 0.1})
    with pytest.raises(ValueError, match="preset"):
        DeviceModel.preset("nope")
    assert DeviceModel.preset("ideal").ideal
    assert not DeviceModel.preset("typical").ideal
    assert DeviceModel.preset("chen2017", seed=4).seed == 4
    assert math.isinf(DeviceModel().on_off)


def test_backend_without_cells_refuses_device_models_clearly():
    """A backend without a device-model kernel (the CUDA kernel today) refuses, naming the backend."""
    from xma2_ops.backends import dispatch
    be = dataclasses.replace(dispatch._BACKENDS["reference"], name="cuda", cell_tile_sums=None, cell_mvm_kernel=None)
    p = GemmParams(8, 4, 4, False, 1, 4, 2, 15, 48)
    g = torch.zeros(2, 2, 8, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="'cuda' does not implement the device model"):
        be.cell_mvm(torch.zeros(2, 8, dtype=torch.int32), g, None, torch.ones(1, 3), None, p, 8)


def test_sums_too_large_for_exact_arithmetic_are_refused():
    """16-bit inputs and weights, 8-bit cells and DAC, an ideal ADC and 16 fractional bits: the
    fixed-point tile sums would leave float64's exact range; refused, never wrapped."""
    cfg = XbarConfig(rows=4096, cols=4, weight_bits=16, cell_bits=8, input_bits=16, dac_bits=8, adc_bits=None,
                     device=DeviceModel(sigma_abs=0.01, frac_bits=16))
    with pytest.raises(ValueError, match="too large for exact arithmetic"):
        xma2_ops.xbar_linear(torch.rand(2, 4096), torch.randn(3, 4096), config=cfg)


@pytest.mark.parametrize("seed", range(4))
def test_read_is_spec_7_1_and_7_2_and_leaves_the_noise_and_cells_alone(seed):
    """CellState.read: Gq = round_half_even(max(G + (2^cb - 1) sigma_read eps3, 0) 2^F) as int32 (SPEC 7.1, 7.2),
    written here out of place; the read works in place on its own temporary, so the shared eps3 and the
    programmed G must come out unchanged."""
    rng = random.Random(seed)
    dev = DeviceModel(sigma_abs=0.1, sigma_rel=0.1, sigma_read=rng.choice([0.02, 0.3, 1.5]), seed=seed,
                      frac_bits=rng.randint(0, 12))
    cb = rng.choice([1, 2, 4])
    w = torch.randint(-127, 128, (rng.randint(1, 40), rng.randint(1, 40)), dtype=torch.int32,
                      generator=torch.Generator().manual_seed(seed))
    cells = program_cells(w, 8, cb, dev, 0, 0)
    g0, eps = cells.g.clone(), cells.read_noise(3)
    eps0 = eps.clone()
    want = torch.round((cells.g + (2 ** cb - 1) * dev.sigma_read * eps).clamp_min(0.0) * 2.0 ** dev.frac_bits)
    assert bool((want == 0).any()) or dev.sigma_read < 1  # (large noise: the clamp is exercised)
    got = cells.read(3, eps)
    assert got.dtype == torch.int32 and torch.equal(got, want.to(torch.int32))
    assert torch.equal(cells.read(3), got)  # drawn inside: the same stream
    assert torch.equal(eps, eps0) and torch.equal(cells.g, g0)


def test_read_beyond_int32_is_refused_with_the_conductance():
    cells = program_cells(torch.ones(2, 2, dtype=torch.int32), 8, 2, DeviceModel(sigma_read=0.01, frac_bits=12), 0, 0)
    big = dataclasses.replace(cells, g=torch.full_like(cells.g, 2.0 ** 20))
    with pytest.raises(ValueError, match=r"a conductance of 1\.0\d*e\+06 level steps does not fit int32 at frac_bits=12"):
        big.read(0)
