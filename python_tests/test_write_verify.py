"""Write-verify programming (docs/SPEC.md 7.4): off means bit-identical to before, the pulses have
the stated statistics (binomial / truncated-geometric with 99.9 % intervals), stuck cells, drift
after the last pulse, the verify read's own stream, known faults, determinism, and a layer that
verifies holds weights closer to its ideal ones."""
import dataclasses
import math

import pytest
import torch
from scipy import stats

import xma2_ops
from xma2_ops import quant
from xma2_ops import DeviceModel, XbarConfig
from xma2_ops.backends import reference as ref
from xma2_ops.device import CellState, cell_levels, fixed_point, program_cells, stream

ALPHA = 0.001  # every statistical test: a 99.9 % interval


def _legacy_program_cells(codes, weight_bits, cell_bits, device, layer, write):
    """device.program_cells as it was before write-verify (commit 06ec7a8), verbatim: the
    no-verify path must keep giving exactly these conductances."""
    levels = cell_levels(codes.cpu(), weight_bits, cell_bits).to(torch.float64)
    shape = levels.shape
    top = float(2 ** cell_bits - 1)
    g0 = device.g0(cell_bits)
    g = levels + g0
    gen = stream(device.seed, layer, "write", write)
    if device.sigma_abs > 0 or device.sigma_rel > 0:
        e1 = torch.randn(shape, generator=gen, dtype=torch.float64)
        e2 = torch.randn(shape, generator=gen, dtype=torch.float64)
        g = (g + top * device.sigma_abs * e1 + g * device.sigma_rel * e2).clamp_min(0.0)
    if device.read_time > 1.0 and (device.nu_mean > 0 or device.nu_std > 0):
        nu = (device.nu_mean + device.nu_std * torch.randn(shape, generator=gen, dtype=torch.float64)).clamp_min(0.0)
        g = (g * torch.pow(torch.tensor(device.read_time, dtype=torch.float64), -nu)).clamp_min(0.0)
    u = torch.rand(shape, generator=stream(device.seed, layer, "fault"), dtype=torch.float64)
    low, high = u < device.saf_low, u >= 1.0 - device.saf_high
    g = torch.where(low, torch.full_like(g, g0), torch.where(high, torch.full_like(g, top + g0), g))
    return g, low | high


def _codes(k: int, n: int, weight_bits: int, seed: int) -> torch.Tensor:
    q = 2 ** (weight_bits - 1) - 1
    return torch.randint(-q, q + 1, (k, n), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)


def _binom_interval(n: int, p: float) -> tuple:
    return stats.binom.ppf(ALPHA / 2, n, p), stats.binom.ppf(1 - ALPHA / 2, n, p)


def _truncated_geometric(p: float, max_pulses: int) -> torch.Tensor:
    """P(pulses = k), k = 1 .. P: pass at pulse k < P, or reach pulse P (pass or not)."""
    pmf = [(1 - p) ** (k - 1) * p for k in range(1, max_pulses)] + [(1 - p) ** (max_pulses - 1)]
    return torch.tensor(pmf, dtype=torch.float64)


ALL_ON = DeviceModel(on_off=8.0, sigma_abs=0.02, sigma_rel=0.05, saf_low=0.02, saf_high=0.02, nu_mean=0.02,
                     nu_std=0.01, read_time=3600.0, sigma_read=0.01, seed=7, frac_bits=6)


# ------------------------------------------------------------------ off / exact writes: nothing changes
@pytest.mark.parametrize("device", [DeviceModel.preset(p, seed=5) for p in DeviceModel.presets()] + [ALL_ON],
                         ids=DeviceModel.presets() + ["all_on"])
def test_no_verify_is_bit_identical_to_before(device):
    assert device.verify_tolerance is None  # the default
    codes = _codes(150, 40, 8, 1)
    for layer, write in ((0, 0), (3, 2)):
        cells = program_cells(codes, 8, 2, device, layer, write)
        g, stuck = _legacy_program_cells(codes, 8, 2, device, layer, write)
        assert torch.equal(cells.g, g) and torch.equal(cells.stuck, stuck)
        assert cells.pulses is None and cells.verify_failed is None
        assert not bool(cells.known_faults().any())
        assert torch.equal(cells.write_pulses(), torch.ones(g.shape, dtype=torch.int16))


def test_tolerance_every_write_meets_changes_nothing():
    """Pulse 1 is the write of SPEC 7.1 (its stream, then the drift exponents): when every cell
    passes at once the conductances and the forward's reads are those without verify."""
    dev = dataclasses.replace(ALL_ON, saf_low=0.0, saf_high=0.0)
    codes = _codes(120, 30, 8, 2)
    plain = program_cells(codes, 8, 2, dev, 1, 4)
    ver = program_cells(codes, 8, 2, dataclasses.replace(dev, verify_tolerance=1e6), 1, 4)
    assert torch.equal(ver.g, plain.g)
    assert torch.equal(ver.pulses, torch.ones_like(ver.pulses)) and not bool(ver.verify_failed.any())
    for counter in (0, 5):  # the verify reads drew from their own streams, not the forward's
        assert torch.equal(ver.read(counter), plain.read(counter))


def test_verify_alone_is_an_ideal_device():
    """An exact write passes its first verify: verify without any other non-ideality is ideal,
    bit for bit, and its cells (when programmed directly) hold their levels after one pulse."""
    dev = DeviceModel(verify_tolerance=0.25, verify_max_pulses=7, seed=3)
    assert dev.ideal and not XbarConfig(device=dev).uses_cells
    codes = _codes(64, 16, 8, 3)
    cells = program_cells(codes, 8, 2, dev, 0, 0)
    assert torch.equal(cells.g, cell_levels(codes, 8, 2).double())
    assert bool((cells.pulses == 1).all()) and not bool(cells.verify_failed.any())
    g = torch.Generator().manual_seed(3)
    x, w = torch.rand(4, 3, 8, 8, generator=g), torch.randn(6, 3, 3, 3, generator=g)
    cfg = XbarConfig(rows=16, cols=4)
    assert torch.equal(xma2_ops.xbar_conv2d(x, w, config=dataclasses.replace(cfg, device=dev)),
                       xma2_ops.xbar_conv2d(x, w, config=cfg))


# ------------------------------------------------------------------ statistics of the pulses
# sigma_abs only, cb = 2 (range 3 level steps) and on_off = 2 (g0 = 3): every target is >= 3 level
# steps, > 10 sigma away from the clamp at 0, so each pulse passes independently with
# p = P(|3 sigma eps| <= tau) = erf(tau / (3 sigma sqrt 2)).
SIGMA, TAU, MAX_PULSES = 0.1, 0.3, 4
STAT_DEV = DeviceModel(on_off=2.0, sigma_abs=SIGMA, verify_tolerance=TAU, verify_max_pulses=MAX_PULSES, seed=21)
P_PASS = math.erf(TAU / (SIGMA * 3 * math.sqrt(2)))


@pytest.fixture(scope="module")
def stat_cells() -> CellState:
    cells = program_cells(_codes(300, 200, 9, 4), 9, 2, STAT_DEV, 2, 1)  # 2 x 4 slices x 60000 = 480000 cells
    assert cells.g.numel() == 480_000
    return cells


def test_first_pulse_pass_fraction_within_binomial_interval(stat_cells):
    n = stat_cells.g.numel()
    passed_first = int((stat_cells.pulses == 1).sum())
    lo, hi = _binom_interval(n, P_PASS)
    assert lo <= passed_first <= hi, (passed_first / n, P_PASS)


def test_pulses_follow_the_truncated_geometric_distribution(stat_cells):
    pulses = stat_cells.pulses.to(torch.int64).flatten()
    n = pulses.numel()
    assert int(pulses.min()) == 1 and int(pulses.max()) == MAX_PULSES
    pmf = _truncated_geometric(P_PASS, MAX_PULSES)
    k = torch.arange(1, MAX_PULSES + 1, dtype=torch.float64)
    mean, var = float((k * pmf).sum()), float((k * k * pmf).sum() - (k * pmf).sum() ** 2)
    assert mean == pytest.approx((1 - (1 - P_PASS) ** MAX_PULSES) / P_PASS, rel=1e-12)
    z = stats.norm.ppf(1 - ALPHA / 2)
    assert abs(float(pulses.double().mean()) - mean) <= z * math.sqrt(var / n), (float(pulses.double().mean()), mean)
    observed = torch.bincount(pulses, minlength=MAX_PULSES + 1)[1:].double()
    chi2 = float(((observed - n * pmf) ** 2 / (n * pmf)).sum())
    assert chi2 <= stats.chi2.ppf(1 - ALPHA, MAX_PULSES - 1), (observed.tolist(), (n * pmf).tolist())


def test_failures_after_every_pulse_within_binomial_interval(stat_cells):
    n = stat_cells.g.numel()
    failed = int(stat_cells.verify_failed.sum())
    lo, hi = _binom_interval(n, (1 - P_PASS) ** MAX_PULSES)
    assert lo <= failed <= hi, (failed / n, (1 - P_PASS) ** MAX_PULSES)
    assert bool((stat_cells.pulses[stat_cells.verify_failed] == MAX_PULSES).all())
    assert torch.equal(stat_cells.known_faults(), stat_cells.verify_failed)


def test_residual_of_passed_cells_is_within_tolerance(stat_cells):
    """No read noise and no drift: a passed cell holds its target within tau exactly, a failed one
    (its last write failed) does not."""
    ideal = cell_levels(_codes(300, 200, 9, 4), 9, 2).double() + STAT_DEV.g0(2)
    err = (stat_cells.g - ideal).abs()
    failed = stat_cells.verify_failed
    assert float(err[~failed].max()) <= TAU
    assert bool((err[failed] > TAU).all())
    plain = program_cells(_codes(300, 200, 9, 4), 9, 2, dataclasses.replace(STAT_DEV, verify_tolerance=None), 2, 1)
    assert float((plain.g - ideal).abs().max()) > 3 * TAU  # without verify the errors are far larger


def test_verify_read_noise_is_drawn_per_pulse():
    """Exact writes, noisy verify reads: every cell holds its target exactly, yet it passes each
    verify only with p = erf(tau / (3 sigma_read sqrt 2)), fresh at every pulse."""
    sigma_read, tau, max_pulses = 0.1, 0.2, 3
    dev = DeviceModel(on_off=2.0, sigma_read=sigma_read, verify_tolerance=tau, verify_max_pulses=max_pulses, seed=8)
    codes = _codes(250, 100, 9, 5)
    cells = program_cells(codes, 9, 2, dev, 0, 0)
    assert torch.equal(cells.g, cell_levels(codes, 9, 2).double() + dev.g0(2))
    p = math.erf(tau / (sigma_read * 3 * math.sqrt(2)))
    n = cells.g.numel()
    for count, rate in ((int((cells.pulses == 1).sum()), p), (int(cells.verify_failed.sum()), (1 - p) ** max_pulses)):
        lo, hi = _binom_interval(n, rate)
        assert lo <= count <= hi, (count / n, rate)
    # the verify reads are not the forward's reads: the cells that passed at once are not those
    # whose first forward read lies within tau
    within_read0 = (cells.read(0).double() / 2 ** dev.frac_bits - cells.g).abs() <= tau
    assert not torch.equal(cells.pulses == 1, within_read0)
    assert abs(float(((cells.pulses == 1) & within_read0).double().mean()) - p * p) < 0.01  # independent draws


# ------------------------------------------------------------------ stuck cells, drift, streams
@pytest.mark.parametrize("sigma_abs,tau", [(0.0, 0.5), (0.4, 1.0)])
def test_stuck_cells_pass_only_within_tolerance_else_use_every_pulse(sigma_abs, tau):
    max_pulses = 5
    dev = DeviceModel(sigma_abs=sigma_abs, saf_low=0.1, saf_high=0.1, verify_tolerance=tau,
                      verify_max_pulses=max_pulses, seed=9)
    codes = _codes(200, 50, 8, 6)
    cells = program_cells(codes, 8, 2, dev, 1, 0)
    levels = cell_levels(codes, 8, 2).double()
    stuck = cells.stuck
    assert int(stuck.sum()) > 5000
    within = (cells.g - levels).abs() <= tau  # a stuck cell holds its stuck value whatever was written
    ok = stuck & within
    bad = stuck & ~within
    assert bool(ok.any()) and bool(bad.any())
    assert torch.equal(cells.verify_failed & stuck, bad)
    assert bool((cells.pulses[bad] == max_pulses).all())
    if sigma_abs == 0:  # noiseless and exact: a stuck cell within tau passes at once, every other cell too
        assert bool((cells.pulses[ok] == 1).all()) and bool((cells.pulses[~stuck] == 1).all())
        assert torch.equal(cells.known_faults(), bad)
    else:  # a stuck cell within tau passes at the first pulse that verifies it (no read noise: pulse 1)
        assert bool((cells.pulses[ok] == 1).all())
        assert bool((cells.pulses[~stuck] > 1).any())


def test_drift_starts_after_the_last_pulse():
    """The same chip read at t0 and at t: the same pulses (verify happens before drift), and the
    conductances at t are those at t0 times t^-nu, nu drawn from the write's stream after
    pulse 1's variation (as without verify)."""
    base = DeviceModel(sigma_abs=0.05, sigma_rel=0.02, nu_mean=0.05, nu_std=0.02, saf_low=0.01,
                       verify_tolerance=0.1, verify_max_pulses=6, seed=12)
    codes = _codes(100, 40, 8, 7)
    t0 = program_cells(codes, 8, 2, base, 0, 3)
    t = program_cells(codes, 8, 2, dataclasses.replace(base, read_time=1e4), 0, 3)
    assert torch.equal(t.pulses, t0.pulses) and torch.equal(t.verify_failed, t0.verify_failed)
    assert bool((t0.pulses > 1).any())
    gen = stream(base.seed, 0, "write", 3)
    shape = t0.g.shape
    torch.randn(shape, generator=gen, dtype=torch.float64), torch.randn(shape, generator=gen, dtype=torch.float64)
    nu = (base.nu_mean + base.nu_std * torch.randn(shape, generator=gen, dtype=torch.float64)).clamp_min(0.0)
    want = torch.where(t0.stuck, t0.g, (t0.g * torch.pow(torch.tensor(1e4, dtype=torch.float64), -nu)).clamp_min(0.0))
    assert torch.equal(t.g, want)
    levels = cell_levels(codes, 8, 2).double()
    passed = ~t0.verify_failed & ~t0.stuck
    assert float((t0.g - levels)[passed].abs().max()) <= 0.1
    assert float((t.g - levels)[passed].abs().max()) > 0.1  # drift moved verified cells away again


def test_same_seed_same_pulses_other_seed_other_write_differ():
    dev = dataclasses.replace(ALL_ON, verify_tolerance=0.05, verify_max_pulses=8)
    codes = _codes(80, 30, 8, 8)
    a, b = program_cells(codes, 8, 2, dev, 2, 1), program_cells(codes, 8, 2, dev, 2, 1)
    for f in ("g", "stuck", "pulses", "verify_failed"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    for other in (program_cells(codes, 8, 2, dataclasses.replace(dev, seed=8), 2, 1),
                  program_cells(codes, 8, 2, dev, 2, 2)):
        assert not torch.equal(other.g, a.g) and not torch.equal(other.pulses, a.pulses)


def test_a_cells_pulses_do_not_depend_on_other_cells():
    """Every pulse draws full tensors from its own stream: changing other weights (so that other
    cells fail or pass) leaves the pulses and conductances of every cell with the same level alone."""
    dev = DeviceModel(sigma_abs=0.05, sigma_rel=0.05, sigma_read=0.02, saf_low=0.05, verify_tolerance=0.1,
                      verify_max_pulses=6, seed=13)
    a = _codes(120, 40, 8, 9)
    b = a.clone()
    b[:60] = _codes(60, 40, 8, 10)
    ca, cb = program_cells(a, 8, 2, dev, 0, 0), program_cells(b, 8, 2, dev, 0, 0)
    same = cell_levels(a, 8, 2) == cell_levels(b, 8, 2)
    assert not bool(same.all()) and not torch.equal(ca.pulses[~same], cb.pulses[~same])
    assert torch.equal(ca.pulses[same], cb.pulses[same]) and torch.equal(ca.g[same], cb.g[same])


def test_verify_read_noise_has_its_own_stream():
    """With read noise the verify reads are reproducible (programming twice gives the same chip)
    and the forward's read noise is the read stream's, whatever the verify drew."""
    dev = dataclasses.replace(ALL_ON, verify_tolerance=0.1, verify_max_pulses=5)
    codes = _codes(90, 20, 8, 11)
    a, b = program_cells(codes, 8, 2, dev, 1, 0), program_cells(codes, 8, 2, dev, 1, 0)
    assert torch.equal(a.g, b.g) and torch.equal(a.pulses, b.pulses) and bool((a.pulses > 1).any())
    # without the verify read noise other cells pass: the verify reads are noisy draws of their own
    quiet = program_cells(codes, 8, 2, dataclasses.replace(dev, sigma_read=0.0), 1, 0)
    assert not torch.equal(quiet.pulses, a.pulses)
    for counter in (0, 3):
        eps = torch.randn(a.g.shape, generator=stream(dev.seed, 1, "read", counter), dtype=torch.float64)
        assert torch.equal(a.read(counter), fixed_point((a.g + 3 * dev.sigma_read * eps).clamp_min(0.0), dev.frac_bits))


# ------------------------------------------------------------------ layers: known faults, outputs
def test_layer_known_faults_follow_the_cells_the_chip_holds():
    dev = DeviceModel(sigma_abs=0.03, saf_low=0.05, saf_high=0.05, verify_tolerance=0.2, verify_max_pulses=3, seed=14)
    cfg = XbarConfig(rows=8, cols=4, device=dev)
    torch.manual_seed(5)
    layer = xma2_ops.XbarLinear(24, 12, config=cfg).eval()
    xma2_ops.program(layer)
    faults = layer.known_faults()
    backbone = layer.programmed.cells
    assert faults.shape == (2, cfg.weight_slices, 24, 12) and faults.dtype == torch.bool
    assert torch.equal(faults, backbone.verify_failed) and bool(faults.any())
    tr, tc = layer.tiles
    mask = torch.zeros(tr, tc)
    mask[1, 2] = 1.0
    layer.task_weight = torch.nn.Parameter(torch.randn(12, 24))
    layer.pe_mask = mask
    faults = layer.known_faults()
    task = layer.programmed_task.cells
    sel = quant.expand_tiles(mask > 0, 24, 12, 8, 4)
    assert torch.equal(faults, torch.where(sel, task.verify_failed, backbone.verify_failed))
    assert not torch.equal(task.verify_failed[:, :, sel], backbone.verify_failed[:, :, sel])  # a new write
    for off in (dataclasses.replace(dev, verify_tolerance=None), DeviceModel(verify_tolerance=0.2)):
        layer.config = dataclasses.replace(cfg, device=off)
        assert faults.shape == layer.known_faults().shape and not bool(layer.known_faults().any())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_verify_brings_layer_outputs_closer_to_ideal_cells(seed):
    """The same chip with and without write-verify: verified cells hold their levels within tau,
    so the outputs are far closer to the ideal-cell outputs (squared error at least 4x smaller;
    measured 30-40x)."""
    torch.manual_seed(seed)
    lin = xma2_ops.XbarLinear(128, 32, config=XbarConfig(rows=64, cols=16, adc_bits=None))
    x = torch.rand(16, 128)
    lin.eval()
    lin(x)  # calibrate the input range on ideal cells
    with torch.no_grad():
        y_ideal = lin(x)
    dev = DeviceModel(sigma_abs=0.05, sigma_rel=0.1, seed=100 + seed)
    errs = []
    for d in (dev, dataclasses.replace(dev, verify_tolerance=0.05, verify_max_pulses=20)):
        lin.config = XbarConfig(rows=64, cols=16, adc_bits=None, device=d)
        xma2_ops.program(lin)
        with torch.no_grad():
            errs.append(float(((lin(x) - y_ideal) ** 2).mean()))
    assert errs[1] < errs[0] / 4, errs


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(verify_tolerance=-0.1), ValueError, "DeviceModel.verify_tolerance"),
    (dict(verify_tolerance=float("nan")), ValueError, "DeviceModel.verify_tolerance"),
    (dict(verify_tolerance=float("inf")), ValueError, "DeviceModel.verify_tolerance"),
    (dict(verify_tolerance="0.1"), TypeError, "DeviceModel.verify_tolerance: expected a number"),
    (dict(verify_tolerance=True), TypeError, "DeviceModel.verify_tolerance"),
    (dict(verify_max_pulses=0), ValueError, "DeviceModel.verify_max_pulses: expected an int in \\[1, 1000\\], got 0"),
    (dict(verify_max_pulses=1001), ValueError, "DeviceModel.verify_max_pulses"),
    (dict(verify_max_pulses=2.0), TypeError, "DeviceModel.verify_max_pulses: expected an int"),
    (dict(verify_max_pulses=None), TypeError, "DeviceModel.verify_max_pulses"),
])
def test_bad_verify_fields(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        DeviceModel(**kwargs)


def test_verify_fields_defaults_and_single_pulse():
    d = DeviceModel()
    assert d.verify_tolerance is None and d.verify_max_pulses == 10
    assert DeviceModel(verify_tolerance=0).verify_tolerance == 0  # tau = 0 is allowed (exact writes pass)
    # P = 1: verify only tells the chip which cells failed; nothing is re-written
    dev = dataclasses.replace(STAT_DEV, verify_max_pulses=1)
    codes = _codes(60, 20, 9, 12)
    cells = program_cells(codes, 9, 2, dev, 0, 0)
    plain = program_cells(codes, 9, 2, dataclasses.replace(dev, verify_tolerance=None), 0, 0)
    assert torch.equal(cells.g, plain.g) and bool((cells.pulses == 1).all())
    ideal = cell_levels(codes, 9, 2).double() + dev.g0(2)
    assert torch.equal(cells.verify_failed, (plain.g - ideal).abs() > TAU)
