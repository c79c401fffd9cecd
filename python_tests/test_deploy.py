"""mta.deploy: on-chip calibration (ADC clips from the cells, per-column gain/offset, BN, drift).

Fixed seeds throughout; the effect sizes asserted are well inside what was measured (see the
comments), so the tests fail when a step stops working, not on noise."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn

import xma2_ops
from xma2_ops import DeviceModel, mta
from xma2_ops.calibration import calibrate_adc
from xma2_ops.mta.deploy import DEFAULT_STEPS

from mta_net import make_model
from test_mta_load import rewrite


def inputs(n: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def batches(x: torch.Tensor, bs: int = 32) -> list:
    return [x[i:i + bs] for i in range(0, x.shape[0], bs)]


def on_chip(model: nn.Module, device: DeviceModel, seed: int = 1, **overrides) -> nn.Module:
    """Put every crossbar layer on ``device`` (and config ``overrides``), program chip ``seed``."""
    for _, layer in mta.xbar_layers(model):
        layer.config = dataclasses.replace(layer.config, device=device, **overrides)
    return xma2_ops.program(model, seed)


def backbone(x: torch.Tensor, adc: bool = True, **overrides) -> nn.Module:
    """make_model with its input ranges (and, with ``adc``, ideal-code ADC clips) from ``x``."""
    m = make_model(0)
    for _, layer in mta.xbar_layers(m):
        layer.config = dataclasses.replace(layer.config, **overrides)
    m.eval()
    m(x)
    if adc:
        calibrate_adc(m, [x], batches=1)
    return m


# ------------------------------------------------------------------ (1) ideal device: nothing material changes
def test_ideal_device_changes_nothing_material():
    x = inputs()
    m = on_chip(backbone(x, adc=False), DeviceModel.preset("ideal"))
    expected_clips = calibrate_adc(m, batches(x), batches=2)  # the ideal-code calibration on the same inputs
    before = m(x)
    r = mta.deploy(m, batches(x), steps=("adc", "gain", "drift"))
    assert r.steps == ("adc", "gain", "drift") and r.inputs == 64 and r.batches == 2
    for name, layer in mta.xbar_layers(m):
        info = r.layer(name)
        assert info.new_clip == expected_clips[name] == layer.config.adc_clip
        torch.testing.assert_close(layer.out_gain, torch.ones_like(layer.out_gain), rtol=0, atol=1e-6)
        torch.testing.assert_close(layer.out_offset, torch.zeros_like(layer.out_offset), rtol=0, atol=1e-6)
        assert info.error_before == 0.0 and abs(info.drift - 1.0) < 1e-9
    torch.testing.assert_close(m(x), before, rtol=1e-5, atol=1e-5)


def test_no_correction_is_the_plain_op_bit_for_bit():
    x = inputs()
    m = backbone(x)
    before = m(x)
    m.c1.set_output_correction(torch.full((8,), 2.0), torch.zeros(8))
    assert not torch.equal(m(x), before)
    m.c1.set_output_correction(None, None)
    assert torch.equal(m(x), before)
    m.c2.set_output_correction(torch.ones(16), torch.zeros(16))  # the identity correction: the same values
    torch.testing.assert_close(m(x), before, rtol=0, atol=0)


# ------------------------------------------------------------------ (2) finite on/off ratio, drift
def test_on_off_only_per_polarity_adc_step_covers_g0():
    """g0 > 0 under per-polarity sensing: every conversion carries g0 * sum(x) more current.  It
    cancels in the digital subtraction of the polarities except where it saturates the ADC, so
    the ADC clips from the cells must grow, and they remove the error (measured on_off=2: layer
    errors 0.33 / 0.46 -> 0.0027 / 0.0010); the column gain cannot undo saturation (0.33 -> 0.31)."""
    x = inputs()
    naive = on_chip(backbone(x), DeviceModel(on_off=2.0))
    assert naive.c1.config.sensing == "per_polarity"
    ideal_clips = {n: l.config.adc_clip for n, l in mta.xbar_layers(naive)}
    deployed = copy.deepcopy(naive)
    r_naive = mta.deploy(naive, batches(x), steps=("gain",))
    r = mta.deploy(deployed, batches(x), steps=("adc", "gain"))
    for name, _ in mta.xbar_layers(deployed):
        assert r.layer(name).old_clip == ideal_clips[name]
        assert r.layer(name).new_clip > 2 * ideal_clips[name]  # (measured 29 vs 11, 62 vs 20)
        assert r.layer(name).error_before < r_naive.layer(name).error_before / 20
        for info in (r.layer(name), r_naive.layer(name)):  # least squares never worsens the fit
            assert info.error_after <= info.error_before * (1 + 1e-9)


def test_cells_clips_exceed_code_clips_on_off_only():
    x = inputs()
    m = on_chip(backbone(x, adc=False), DeviceModel(on_off=10.0))
    codes = calibrate_adc(copy.deepcopy(m), [x], batches=1)
    cells = calibrate_adc(m, [x], batches=1, cells=True)
    assert all(cells[n] > codes[n] for n in codes), (codes, cells)  # (measured 13 vs 11, 24 vs 20)


@pytest.mark.parametrize("nu_std, factor", [(0.0, 1000.0), (0.01, 4.0)])
def test_gain_step_removes_drift(nu_std, factor):
    """Drift scales every conductance by t^-nu: with an ideal ADC the chip output is the ideal one
    times ~t^-nu_mean per column, which the gain fit removes (measured: 0.43 -> 1e-7 with one nu,
    0.43 -> 0.07 with nu_std=0.01, the per-cell spread a column gain cannot fix)."""
    x = inputs()
    m = on_chip(backbone(x, adc=False, adc_bits=None), DeviceModel(nu_mean=0.05, nu_std=nu_std, read_time=86400.0))
    r = mta.deploy(m, batches(x), steps=("gain",))
    for info in r.layers:
        assert info.error_before > 0.3
        assert info.error_after < info.error_before / factor, info
        assert info.gain_min > 1.5  # 86400^0.05 = 1.77


def test_drift_step_is_the_global_ratio():
    x = inputs()
    m = on_chip(backbone(x, adc=False, adc_bits=None), DeviceModel(nu_mean=0.05, read_time=86400.0))
    r = mta.deploy(m, batches(x), steps=("drift",))
    for (name, layer), info in zip(mta.xbar_layers(m), r.layers):
        assert abs(info.drift - 86400.0 ** 0.05) < 2e-3, info  # uniform drift: exactly the inverse decay
        torch.testing.assert_close(layer.out_gain, torch.full_like(layer.out_gain, info.drift))
        assert bool((layer.out_offset == 0).all())


# ------------------------------------------------------------------ (3) typical chip, trained model
def _task(n: int, seed: int):
    """4 classes: which quadrant holds a bright square, in noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = 0.3 * torch.randn(n, 1, 16, 16, generator=g)
    for i in range(n):
        r, c = divmod(int(y[i]), 2)
        x[i, 0, r * 8 + 2:r * 8 + 6, c * 8 + 2:c * 8 + 6] += 1.5
    return x, y


def test_typical_chip_deploy_brings_outputs_closer_to_ideal():
    """Measured (chips 3, 4): logits' relative error to the ideal model 0.083 -> 0.057 and 0.074 ->
    0.048 with the default steps; accuracy ideal 93.6 %, naive 92.0 / 92.8 %, deployed 91.6 /
    89.6 % (test set of 512: within its noise)."""
    torch.manual_seed(0)
    xtr, ytr = _task(512, 0)
    xte, yte = _task(512, 1)
    m = make_model(0)
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    m.train()
    for _ in range(3):
        for i in range(0, 512, 64):
            loss = nn.functional.cross_entropy(m(xtr[i:i + 64]), ytr[i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    m.eval()
    calibrate_adc(m, [xtr[:256]], batches=1)
    mta.refresh_bn_stats(m, [(xtr[:256], None)], 1)
    with torch.no_grad():
        ideal = m(xte)
    assert float((ideal.argmax(1) == yte).float().mean()) > 0.85  # the ideal model solves the task
    for seed in (3, 4):
        chip = on_chip(copy.deepcopy(m), DeviceModel.preset("typical"), seed=seed)
        with torch.no_grad():
            naive = chip(xte)
        r = mta.deploy(chip, batches(xtr, 64))  # default: 256 inputs, steps adc, gain, bn_shift, fold
        assert r.inputs == 256 and r.steps == ("adc", "gain", "bn_shift", "fold") and r.bn_layers == ["b1", "b2"]
        with torch.no_grad():
            deployed = chip(xte)
        err_naive = float((naive - ideal).norm() / ideal.norm())
        err_deployed = float((deployed - ideal).norm() / ideal.norm())
        assert err_deployed < 0.8 * err_naive, (seed, err_naive, err_deployed)
        for info in r.layers:
            assert info.error_after < info.error_before


# ------------------------------------------------------------------ (4) task files
def _xma2_task(x: torch.Tensor, **device) -> nn.Module:
    m = on_chip(backbone(x), dataclasses.replace(DeviceModel.preset("typical"), **device))
    mta.prepare(m, mta.MethodSpec("xma2", budget=0.5), 10)
    m.eval()
    return m


def test_task_file_round_trip_keeps_the_correction(tmp_path):
    x = inputs()
    m = _xma2_task(x)
    old = tmp_path / "old.safetensors"
    mta.save_task(m, old)  # no correction yet: the format as before
    mta.deploy(m, batches(x), steps=("gain", "drift"))
    new = tmp_path / "new.safetensors"
    mta.save_task(m, new)
    fresh = _xma2_task(x)
    mta.load_task(fresh, new)
    for (name, a), (_, b) in zip(mta.xbar_layers(m), mta.xbar_layers(fresh)):
        assert torch.equal(a.out_gain, b.out_gain) and torch.equal(a.out_offset, b.out_offset), name
    _, tensors = mta.read_task(old)
    assert not any("out_gain" in k or "out_offset" in k for k in tensors)
    mta.load_task(fresh, old)  # an old file loads, and the task it describes has no correction
    assert all(layer.out_gain is None and layer.out_offset is None for _, layer in mta.xbar_layers(fresh))


@pytest.mark.parametrize("change, match", [
    (lambda t: t.__setitem__("c1.out_gain", torch.full((8,), float("nan"))), "c1.out_gain: expected finite"),
    (lambda t: t.__setitem__("c2.out_offset", torch.zeros(15)), r"c2.out_offset: expected shape \(16,\)"),
    (lambda t: t.__setitem__("c1.out_gain", torch.ones(8, dtype=torch.float64)), "c1.out_gain: expected dtype"),
    (lambda t: t.pop("c2.out_offset"), "c2.out_offset: missing"),
])
def test_task_file_bad_correction_refused(tmp_path, change, match):
    x = inputs()
    m = _xma2_task(x)
    mta.deploy(m, batches(x), steps=("gain",))
    path = tmp_path / "t.safetensors"
    mta.save_task(m, path)
    meta, tensors = mta.read_task(path)
    tensors = dict(tensors)
    change(tensors)
    rewrite(path, meta, tensors)
    fresh = _xma2_task(x)
    with pytest.raises((ValueError, TypeError), match=match):
        mta.load_task(fresh, path)
    assert all(layer.out_gain is None for _, layer in mta.xbar_layers(fresh))  # untouched


# ------------------------------------------------------------------ (5) bad arguments
def test_bad_arguments_refused():
    x = inputs()
    m = on_chip(backbone(x), DeviceModel.preset("typical"))
    with pytest.raises(ValueError, match="steps: unknown step 'calib'"):
        mta.deploy(m, batches(x), steps=("adc", "calib"))
    with pytest.raises(TypeError, match="steps"):
        mta.deploy(m, batches(x), steps="adc")
    with pytest.raises(ValueError, match="steps"):
        mta.deploy(m, batches(x), steps=())
    with pytest.raises(ValueError, match="steps"):
        mta.deploy(m, batches(x), steps=("gain", "gain"))
    with pytest.raises(ValueError, match="batches"):
        mta.deploy(m, batches(x), batches=0)
    with pytest.raises(ValueError, match="loader: expected at least one batch"):
        mta.deploy(m, [])
    with pytest.raises(TypeError, match="loader"):
        mta.deploy(m, 3)
    with pytest.raises(TypeError, match="loader: expected a non-empty iterable"):
        mta.ideal_bn_stats(m, [])
    with pytest.raises(ValueError, match="model: has no crossbar layers"):
        mta.deploy(nn.Sequential(nn.Linear(4, 4)), [torch.zeros(2, 4)])
    with pytest.raises(TypeError, match="model"):
        mta.deploy("net", batches(x))
    with pytest.raises(ValueError, match=r"model: crossbar layer\(s\) \['c1', 'c2'\] have no config.device"):
        mta.deploy(backbone(x), batches(x))
    with pytest.raises(ValueError, match="cells: layer"):
        calibrate_adc(backbone(x), [x], cells=True)
    with pytest.raises(TypeError, match="cells"):
        calibrate_adc(m, [x], cells=1)
    with pytest.raises(ValueError, match=r"gain: expected a tensor of shape \(8,\)"):
        m.c1.set_output_correction(torch.ones(7), torch.zeros(7))
    with pytest.raises(ValueError, match="offset: expected finite"):
        m.c1.set_output_correction(torch.ones(8), torch.full((8,), float("inf")))


# ------------------------------------------------------------------ (6) cost
def test_report_counts_the_correction():
    x = inputs()
    m = _xma2_task(x)
    plain = mta.report(m, example_input=x[:2])
    assert plain.total.correction_muls == 0 and "correction_muls" not in plain.table()
    mta.deploy(m, batches(x), steps=("gain",))
    rep = mta.report(m, example_input=x[:2])
    per_layer = {lc.name: (lc.correction_muls, lc.correction_adds) for lc in rep.layers}
    assert per_layer == {"c1": (8 * 8 * 8, 8 * 8 * 8), "c2": (4 * 4 * 16, 4 * 4 * 16)}  # positions x N
    assert "correction_muls" in rep.table()
    for a, b in zip(plain.layers, rep.layers):  # nothing else changes
        assert (a.adc_conversions, a.shift_adds, a.inference_energy_j) == (b.adc_conversions, b.shift_adds,
                                                                            b.inference_energy_j)


def test_adc_step_clips_are_part_of_the_checked_config(tmp_path):
    """The clips live in the layer config, which task files record: a file saved before the adc
    step no longer matches (documented in docs/MTA.md)."""
    x = inputs()
    m = _xma2_task(x)
    path = tmp_path / "before.safetensors"
    mta.save_task(m, path)
    mta.deploy(m, batches(x), steps=("adc",))
    with pytest.raises(ValueError, match="crossbar config: layer c1 config"):
        mta.load_task(m, path)


def test_prepare_starts_a_task_without_the_previous_correction():
    x = inputs()
    m = _xma2_task(x)
    mta.deploy(m, batches(x), steps=("gain",))
    assert m.c1.out_gain is not None
    mta.prepare(m, mta.MethodSpec("classifier"), 10)
    assert all(layer.out_gain is None and layer.out_offset is None for _, layer in mta.xbar_layers(m))


# ------------------------------------------------------------------ (7) fold: the correction into the BN
class _Branchy(nn.Module):
    """c1 -> b1 (foldable); c2's output also feeds a residual add (not foldable); c3 has no BN."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, 1, 1, bias=True)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 4, 1, bias=True)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        y = self.c2(x)
        x = torch.relu(self.b2(y) + y)
        return self.fc(self.c3(x).mean((2, 3)))


def _branchy() -> nn.Module:
    torch.manual_seed(5)
    m = xma2_ops.convert(_Branchy(), xma2_ops.XbarConfig(rows=32, cols=32), skip=lambda n, _: n == "fc")
    for bn in (m.b1, m.b2):  # statistics and affine parameters that are not the identity
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.3, 0.3)
    m.eval()
    return m


def _random_corrections(m: nn.Module) -> None:
    g = torch.Generator().manual_seed(11)
    for _, layer in mta.xbar_layers(m):
        n = layer.weight.shape[0]
        layer.set_output_correction(0.7 + 0.6 * torch.rand(n, generator=g), 0.2 * torch.randn(n, generator=g))


def _tap(m: nn.Module, names, x) -> dict:
    """The outputs of modules ``names`` on x."""
    out, hooks = {}, [m.get_submodule(n).register_forward_hook(
        lambda mod, a, y, n=n: out.__setitem__(n, y.detach().clone())) for n in names]
    try:
        with torch.no_grad():
            out["model"] = m(x)
    finally:
        for h in hooks:
            h.remove()
    return out


def test_fold_moves_the_correction_into_the_bn_it_feeds_exactly():
    """Any correction (random gains and offsets here) folds into b1 with the BN output unchanged; c2
    (its output also feeds the residual add) and c3 (no BN) keep theirs."""
    x = inputs(16)
    m = on_chip(_branchy(), DeviceModel.preset("ideal"))
    m(x)  # input ranges
    _random_corrections(m)
    before = _tap(m, ["b1", "b2", "c3"], x)
    g1 = m.c1.out_gain.clone()
    r = mta.deploy(m, batches(x), steps=("fold",))
    assert r.layer("c1").folded_into == "b1" and r.layer("c1").not_folded is None
    assert m.c1.out_gain is None and m.c1.out_offset is None
    for name in ("c2", "c3"):
        assert r.layer(name).folded_into is None and "one BatchNorm only" in r.layer(name).not_folded
        assert getattr(m, name).out_gain is not None
    after = _tap(m, ["b1", "b2", "c3"], x)
    for key in ("b1", "b2", "c3", "model"):
        torch.testing.assert_close(after[key], before[key], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(m.b1.weight, m.b1.weight / g1)  # the gain went into gamma


def test_fold_after_a_typical_chip_deploy_keeps_the_outputs_and_costs_nothing(tmp_path):
    """On the two-conv net every correction goes into its BN with the outputs kept, the report
    counts no correction, and the task file (its BN) carries the folded task."""
    x = inputs()
    m = _xma2_task(x, sigma_read=0.0)  # (without read noise every read of the chip is the same)
    mta.deploy(m, batches(x), steps=("gain", "bn"))  # (no adc step: the task file checks the clips)
    assert all(layer.out_gain is not None for _, layer in mta.xbar_layers(m))
    before = _tap(m, ["b1", "b2"], x)
    r = mta.deploy(m, batches(x), steps=("fold",))
    after = _tap(m, ["b1", "b2"], x)
    assert [r.layer(n).folded_into for n in ("c1", "c2")] == ["b1", "b2"]
    assert all(layer.out_gain is None for _, layer in mta.xbar_layers(m))
    for key in ("b1", "b2", "model"):
        torch.testing.assert_close(after[key], before[key], rtol=1e-4, atol=1e-4)
    assert mta.report(m, example_input=x[:2]).total.correction_muls == 0
    path = tmp_path / "folded.safetensors"
    mta.save_task(m, path)
    fresh = _xma2_task(x, sigma_read=0.0)
    mta.load_task(fresh, path)
    for a, b in zip(mta.bn_layers(m), mta.bn_layers(fresh)):
        for k, v in a[1].state_dict().items():
            assert torch.equal(v, b[1].state_dict()[k]), (a[0], k)


def test_default_deploy_folds_and_matches_the_unfolded_deploy_on_a_noiseless_chip():
    """Default steps = adc, gain, bn_shift, fold; with read noise off the folded model's outputs equal the
    unfolded deploy's (same chip, same fit) to float rounding."""
    x = inputs()
    dev = dataclasses.replace(DeviceModel.preset("typical"), sigma_read=0.0)
    a = on_chip(backbone(x), dev)
    b = copy.deepcopy(a)
    r = mta.deploy(a, batches(x))
    assert r.steps == ("adc", "gain", "bn_shift", "fold") == DEFAULT_STEPS
    assert [lc.folded_into for lc in r.layers] == ["b1", "b2"]
    mta.deploy(b, batches(x), steps=("adc", "gain", "bn_shift"))
    assert all(layer.out_gain is not None for _, layer in mta.xbar_layers(b))
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=1e-4, atol=1e-4)


def test_fold_keeps_the_correction_where_it_cannot_go():
    x = inputs()
    m = _xma2_task(x)
    m.b1.weight = None  # (an affine-free BN: nothing to fold the gain into)
    m.b1.bias = None
    _random_corrections(m)
    r = mta.deploy(m, batches(x), steps=("fold",))
    assert r.layer("c1").folded_into is None and "no affine weight" in r.layer("c1").not_folded
    assert r.layer("c2").folded_into == "b2"
    shared = on_chip(backbone(x), DeviceModel.preset("typical"))
    mta.prepare(shared, mta.MethodSpec("xma2", budget=0.5, task_bn=False), 10)
    shared.eval()
    _random_corrections(shared)
    r = mta.deploy(shared, batches(x), steps=("fold",))
    assert all("task_bn=False" in lc.not_folded for lc in r.layers)
    assert all(layer.out_gain is not None for _, layer in mta.xbar_layers(shared))
    with pytest.raises(ValueError, match="steps: 'fold' must be the last step"):
        mta.deploy(m, batches(x), steps=("fold", "bn"))


def test_bn_shift_keeps_the_trained_statistics_on_an_ideal_chip():
    """On ideal cells the chip's forward is the ideal one bit for bit: "bn_shift" leaves the trained
    statistics as they are (the 64 inputs' sampling error cancels), "bn" replaces them by the 64
    inputs' estimate."""
    x = inputs()
    trained = _xma2_task(x)
    with torch.no_grad():  # trained statistics that the calibration inputs do not reproduce
        for _, bn in mta.bn_layers(trained):
            bn.running_mean.add_(0.3)
            bn.running_var.mul_(1.7)
    ideal = DeviceModel.preset("ideal")
    for step, moved in (("bn_shift", False), ("bn", True)):
        m = on_chip(copy.deepcopy(trained), ideal)
        before = {n: (bn.running_mean.clone(), bn.running_var.clone()) for n, bn in mta.bn_layers(m)}
        r = mta.deploy(m, batches(x), steps=(step,))
        assert r.bn_layers == ["b1", "b2"]
        for n, bn in mta.bn_layers(m):
            change = max(float((bn.running_mean - before[n][0]).abs().max()),
                         float((bn.running_var / before[n][1] - 1).abs().max()))
            assert (change > 0.1) if moved else (change < 1e-5), (step, n, change)


def _bn_estimate(model: nn.Module, x: torch.Tensor) -> dict:
    """{BN name: (mean, var)} of mta.refresh_bn_stats over x on ideal cells (config.device None)."""
    m = copy.deepcopy(model)
    for _, layer in mta.xbar_layers(m):
        layer.config = dataclasses.replace(layer.config, device=None)
    mta.refresh_bn_stats(m, [(xb, None) for xb in batches(x)], batches=len(batches(x)))
    return {n: (bn.running_mean.double(), bn.running_var.double()) for n, bn in mta.bn_layers(m)}


@pytest.mark.parametrize("with_base", [False, True])
def test_bn_shift_is_the_chip_minus_ideal_shift_of_the_estimates(with_base):
    """On a typical chip: running mean = base + (chip - ideal-cell) estimate on the same inputs, running
    var = base x chip / ideal-cell estimate; the chip's estimate is what the "bn" step sets, the ideal-cell
    ones are the model as deploy found it (before the adc and gain steps); the base is the trained
    statistics, or with ``bn_base`` the ideal-cell estimate over those inputs."""
    x = inputs()
    trained = _xma2_task(x)
    dev = DeviceModel.preset("typical")  # (read noise too: the ideal-cell pass must not read or re-write the chip)
    ideal = _bn_estimate(trained, x)
    base_x = inputs(96, seed=5)
    base = _bn_estimate(trained, base_x) if with_base else {
        n: (bn.running_mean.double(), bn.running_var.double()) for n, bn in mta.bn_layers(trained)}
    chip_est = on_chip(copy.deepcopy(trained), dev)
    mta.deploy(chip_est, batches(x), steps=("adc", "gain", "bn"))
    m = on_chip(copy.deepcopy(trained), dev)
    bn_base = mta.ideal_bn_stats(m, [(xb, None) for xb in batches(base_x)]) if with_base else None
    r = mta.deploy(m, batches(x), steps=("adc", "gain", "bn_shift"), bn_base=bn_base)
    assert r.steps == ("adc", "gain", "bn_shift") and r.bn_layers == ["b1", "b2"]
    chip = dict(mta.bn_layers(chip_est))
    moved = 0.0
    for n, bn in mta.bn_layers(m):
        mean = base[n][0] + chip[n].running_mean.double() - ideal[n][0]
        var = base[n][1] * chip[n].running_var.double() / ideal[n][1]
        torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-6)
        moved = max(moved, float((bn.running_mean.double() - base[n][0]).abs().max()))
    assert moved > 1e-3  # the chip moves the statistics


@pytest.mark.parametrize("step", ["bn", "bn_shift"])
def test_bn_step_leaves_a_shared_backbone_bn_alone(tmp_path, step):
    # task_bn=False: the BNs are the backbone's, shared by every task and not in the task file; the bn
    # step must not re-estimate them on one task's inputs (every other task would change, and a reloaded
    # task would not get them back)
    x = inputs()
    m = on_chip(backbone(x), DeviceModel.preset("typical"))
    mta.prepare(m, mta.MethodSpec("xma2", budget=0.5, task_bn=False), 10)
    m.eval()
    before = {n: (bn.running_mean.clone(), bn.running_var.clone()) for n, bn in mta.bn_layers(m)}
    r = mta.deploy(m, batches(x), steps=("adc", "gain", step))
    for n, bn in mta.bn_layers(m):
        torch.testing.assert_close(bn.running_mean, before[n][0], rtol=0, atol=0)
        torch.testing.assert_close(bn.running_var, before[n][1], rtol=0, atol=0)
    assert r.bn_layers == [] and "task_bn=False" in r.bn_skipped
    own = _xma2_task(x)  # the task's own BNs are re-estimated
    r = mta.deploy(own, batches(x), steps=("adc", "gain", step))
    assert r.bn_layers == [n for n, _ in mta.bn_layers(own)] and r.bn_skipped is None
