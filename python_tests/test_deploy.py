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
        r = mta.deploy(chip, batches(xtr, 64))  # default: 256 inputs, steps adc, gain, bn
        assert r.inputs == 256 and r.steps == ("adc", "gain", "bn") and r.bn_layers == ["b1", "b2"]
        with torch.no_grad():
            deployed = chip(xte)
        err_naive = float((naive - ideal).norm() / ideal.norm())
        err_deployed = float((deployed - ideal).norm() / ideal.norm())
        assert err_deployed < 0.8 * err_naive, (seed, err_naive, err_deployed)
        for info in r.layers:
            assert info.error_after < info.error_before


# ------------------------------------------------------------------ (4) task files
def _xma2_task(x: torch.Tensor) -> nn.Module:
    m = on_chip(backbone(x), DeviceModel.preset("typical"))
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
