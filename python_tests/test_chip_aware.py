"""mta.adapt_on_chip: chip-aware (fault-aware) adaption of a task to one programmed chip.

Fixed seeds throughout; the effects asserted are far inside what was measured, so the tests fail
when the adaption stops using the chip, not on noise."""
from __future__ import annotations

import copy
import dataclasses
import functools

import pytest
import torch
import torch.nn.functional as F

import xma2_ops
from xma2_ops import DeviceModel, mta
from xma2_ops import programmed as programmed_mod
from xma2_ops.device import cell_weight_codes
from xma2_ops.mta import chip_aware
from xma2_ops.mta.masks import from_kn
from xma2_ops.mta.task import task_info

from mta_net import make_model
from test_deploy import _task, on_chip

STUCK = DeviceModel(saf_low=0.04, saf_high=0.08)  # stuck cells only: every other cell holds its level exactly


def loader(x, y, bs: int = 64):
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, len(y), bs)]


def trained_task(method: str = "xma2", budget: float = 0.25):
    """A task trained on ideal cells (4 quadrant classes), its training data (a fresh copy)."""
    m, x, y = _trained(method, budget)
    return copy.deepcopy(m), x, y


@functools.lru_cache(maxsize=None)
def _trained(method: str, budget: float):
    torch.manual_seed(0)
    x, y = _task(256, 0)
    m = make_model(0)
    mta.prepare(m, mta.MethodSpec(method, budget=budget), 4, head="fc")
    mta.fit(m, loader(x, y), mta.Schedule(stage1_epochs=1, stage2_epochs=3, hw_epochs=1), progress=False)
    return m, x, y


def chip_loss(m, x, y) -> float:
    m.eval()
    with torch.no_grad():
        return float(F.cross_entropy(m(x), y))


def test_fault_weight_error_is_what_the_stuck_cells_add():
    """With stuck cells only, the cells hold the weight codes except at stuck cells: the error is
    cell_weight_codes(cells) - codes, times the weight scale, in the weight's layout."""
    m, _, _ = trained_task()
    on_chip(m, STUCK, seed=3)
    checked = 0
    for _, layer in mta.xbar_layers(m):
        st = layer.programmed
        held = cell_weight_codes(st.cells.read(0), layer.config.cell_bits, STUCK.frac_bits)
        expected = from_kn((held - st.codes.double()) * st.scale.double(), layer.weight.shape).float()
        got = mta.fault_weight_error(layer)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
        checked += int((got != 0).sum())
    assert checked > 10  # the chip has faults where it matters


def test_adapt_on_chip_lowers_the_chips_loss_and_keeps_its_backbone_cells():
    """Measured: training loss 1.306 on ideal cells, 1.497 on the chip, 1.370 after 3 chip-aware
    epochs (two thirds of the gap closed; 10 epochs: 1.328)."""
    m, x, y = trained_task()
    ideal = chip_loss(m, x, y)
    on_chip(m, STUCK, seed=3)
    before = chip_loss(m, x, y)
    cells_before = {n: layer.programmed.cells.g.clone() for n, layer in mta.xbar_layers(m)}
    pes_before = sum(int(ad.pe_sel.sum()) for _, ad in mta.layer_adapters(m))
    r = mta.adapt_on_chip(m, loader(x, y), mta.Schedule(stage1_epochs=0, stage2_epochs=0, hw_epochs=3))
    after = chip_loss(m, x, y)
    assert after - ideal < 0.5 * (before - ideal), (ideal, before, after)
    assert r.seed == 3 and r.epochs == 3 and r.stuck_cells > 0
    for n, layer in mta.xbar_layers(m):  # the backbone's cells are the chip's write 0, unchanged
        assert torch.equal(layer.programmed.cells.g, cells_before[n]), n
        assert layer.noise_aware is False and layer.chip.writes < chip_aware.TRAINING_COUNTER_OFFSET
    assert sum(int(ad.pe_sel.sum()) for _, ad in mta.layer_adapters(m)) == pes_before  # the budget is kept
    assert not any(p.requires_grad for p in m.parameters()) and not m.training


def test_training_never_draws_the_evaluation_writes(monkeypatch):
    """Every cell write during the training uses a write number >= TRAINING_COUNTER_OFFSET; the
    others are the chip's own programming (small numbers)."""
    m, x, y = trained_task()
    on_chip(m, STUCK, seed=3)
    writes = []
    real = programmed_mod.program_cells

    def spy(codes, weight_bits, cell_bits, device, layer, write):
        writes.append(write)
        return real(codes, weight_bits, cell_bits, device, layer, write)

    monkeypatch.setattr(programmed_mod, "program_cells", spy)
    mta.adapt_on_chip(m, loader(x, y), reselect=False)
    big = [w for w in writes if w >= chip_aware.TRAINING_COUNTER_OFFSET]
    small = [w for w in writes if w < chip_aware.TRAINING_COUNTER_OFFSET]
    assert len(big) >= 4 * 2  # 4 training batches, 2 layers (backbone and task weights re-drawn)
    assert small and max(small) < 10


def test_fault_aware_selection_takes_the_faulty_pe(monkeypatch):
    """With a large fault_weight, a PE whose stuck cells cost the loss is selected: the fault error is
    put in one PE only (c2's last row tile), which the snip score alone does not pick."""
    m, x, y = trained_task(budget=0.25)  # 4 PEs: c1 (1x1), c2 (3x1): one PE re-programmed
    on_chip(m, STUCK, seed=3)
    ads = dict(mta.layer_adapters(m))
    assert float(ads["c2"].pe_sel[2, 0]) == 0.0

    def one_pe(layer):
        err = torch.zeros(layer.weight.shape[0], layer.weight[0].numel())
        if layer is m.c2:
            err[:, 64:] = 0.5  # rows 64..71: c2's third row tile (32-row PEs)
        return err.reshape(layer.weight.shape)

    monkeypatch.setattr(chip_aware, "fault_weight_error", one_pe)
    r = mta.adapt_on_chip(m, loader(x, y), mta.Schedule(stage1_epochs=0, stage2_epochs=0, hw_epochs=1),
                          fault_weight=1e6)
    assert float(ads["c2"].pe_sel[2, 0]) == 1.0 and r.pes_swapped == 1
    assert sum(int(ad.pe_sel.sum()) for ad in ads.values()) == 1


@pytest.mark.parametrize("fault_c2_last, picked", [(0.0, "c1"), (2.0, "c2_last")])
def test_fault_aware_selection_scores_per_cell_under_snip_per_cell(monkeypatch, fault_c2_last, picked):
    """criterion="snip_per_cell": the re-selection ranks PEs by (snip + fault_weight * fault) per cell
    the PE holds, as fit's selection does.  Sums given: snip c1 = 1, c2 = (3, 3, 1) over 72, 512, 512,
    128 cells (x 2 x slices): per cell c1 leads (1/72), where the layer-mean form picks c2's first tile
    (1.29 vs 1.0); a fault term of 2 on c2's last tile (8 rows) makes it (3/128) the one."""
    m, x, y = trained_task(budget=0.25)  # one PE of 4
    on_chip(m, STUCK, seed=3)
    task_info(m).spec = dataclasses.replace(task_info(m).spec, criterion="snip_per_cell")

    def given(model, loader, batches, loss_fn, *factors):
        sens = [torch.tensor([[1.0]]), torch.tensor([[3.0], [3.0], [1.0]])]
        fault = [torch.zeros(1, 1), torch.tensor([[0.0], [0.0], [fault_c2_last]])]
        return [sens, fault]

    monkeypatch.setattr(chip_aware, "grad_products", given)
    mta.adapt_on_chip(m, loader(x, y), mta.Schedule(stage1_epochs=0, stage2_epochs=0, hw_epochs=0))
    ads = dict(mta.layer_adapters(m))
    sel = {"c1": ads["c1"].pe_sel[0, 0], "c2_last": ads["c2"].pe_sel[2, 0]}
    assert sum(int(ad.pe_sel.sum()) for ad in ads.values()) == 1 and float(sel[picked]) == 1.0


def test_refusals():
    m, x, y = trained_task()
    with pytest.raises(ValueError, match="config.device"):
        mta.adapt_on_chip(m, loader(x, y))
    on_chip(m, STUCK, seed=3)
    with pytest.raises(ValueError, match="fault_weight"):
        mta.adapt_on_chip(m, loader(x, y), fault_weight=-1.0)
    with pytest.raises(TypeError, match="schedule"):
        mta.adapt_on_chip(m, loader(x, y), schedule=3)
    # a re-selection probed on 0 batches would score every PE 0 (as fit refuses for its probe)
    for kw in ({"score_batches": 0}, {"score_batches": -2}, {"score_batches": 1.5},
               {"schedule": mta.Schedule(sensitivity_batches=0)}):
        with pytest.raises(ValueError, match=r"score_batches: expected an int >= 1 \(default schedule\.sensitivity_batches\)"):
            mta.adapt_on_chip(m, loader(x, y), **kw)
    m.c1.config = dataclasses.replace(m.c1.config, device=dataclasses.replace(STUCK, seed=4))
    with pytest.raises(ValueError, match="device seeds differ"):
        mta.adapt_on_chip(m, loader(x, y))
    fresh = xma2_ops.program(on_chip(make_model(0), STUCK))
    with pytest.raises(RuntimeError, match="no task prepared"):
        mta.adapt_on_chip(fresh, loader(x, y))


@pytest.mark.parametrize("size, swapped", [(0.5, 1), (1e-7, 0)])
def test_the_fault_term_scales_with_what_the_faults_cost(monkeypatch, size, swapped):
    """At the default fault_weight the fault term is in units of the layer's mean snip score: a
    fault error of half a weight range in one PE takes it, a residue of 1e-7 (what stuck-aware
    programming leaves) changes nothing.  Normalising the fault term to mean 1 per layer on its own
    made the two alike, and on the example backbone (typical chip, stuck-aware programming) swapped
    4 of xma2@10 %'s 6 PEs for PEs without trained task weights: 86.3 -> 75.8 % on animals."""
    m, x, y = trained_task(budget=0.25)
    on_chip(m, STUCK, seed=3)
    ads = dict(mta.layer_adapters(m))

    def one_pe(layer):
        err = torch.zeros(layer.weight.shape[0], layer.weight[0].numel())
        if layer is m.c2:
            err[:, 64:] = size  # c2's third row tile only
        return err.reshape(layer.weight.shape)

    monkeypatch.setattr(chip_aware, "fault_weight_error", one_pe)
    r = mta.adapt_on_chip(m, loader(x, y), mta.Schedule(stage1_epochs=0, stage2_epochs=0, hw_epochs=0))
    assert r.pes_swapped == swapped and float(ads["c2"].pe_sel[2, 0]) == float(swapped)


def test_deploy_loader_adapts_on_the_calibrated_chip_and_keeps_its_gains(monkeypatch):
    """With ``deploy_loader``: mta.deploy(CALIBRATE_BEFORE) first; every training forward runs on the
    chip with exactly the gains that calibration fitted, the BN statistics held; then each BN shifted by
    what the training changed and the corrections folded (a second gain fit would pull the adapted
    weights' outputs back towards their ideal-cell outputs)."""
    m, x, y = trained_task()
    on_chip(m, DeviceModel.preset("typical"), seed=3)
    seen, calls = [], []

    def spy(layer, args, out):
        if layer.training:
            seen.append((layer, layer.noise_aware, None if layer.out_gain is None else layer.out_gain.clone()))

    def bn_means(model):
        return {n: bn.running_mean.clone() for n, bn in mta.bn_layers(model)}

    real_deploy, real_shift = chip_aware.deploy, chip_aware.shift_bn

    def deploy_spy(model, loader, steps, **kw):
        r = real_deploy(model, loader, steps, **kw)
        calls.append(("deploy", steps, bn_means(model)))
        return r

    def shift_spy(model, base, now):
        calls.append(("shift", None, bn_means(model)))
        real_shift(model, base, now)

    monkeypatch.setattr(chip_aware, "deploy", deploy_spy)
    monkeypatch.setattr(chip_aware, "shift_bn", shift_spy)
    layers = dict(mta.xbar_layers(m))
    handles = [layer.register_forward_hook(spy) for layer in layers.values()]
    try:
        r = mta.adapt_on_chip(m, loader(x, y), mta.Schedule(stage1_epochs=0, stage2_epochs=0, hw_epochs=1),
                              reselect=False, deploy_loader=loader(x, y))
    finally:
        for h in handles:
            h.remove()
    assert r.calibrated_before.steps == chip_aware.CALIBRATE_BEFORE == ("adc", "gain", "bn_shift")
    assert r.calibrated_after.steps == ("fold",)
    assert [c[:2] for c in calls] == [("deploy", chip_aware.CALIBRATE_BEFORE), ("shift", None), ("deploy", ("fold",))]
    for n, mean in calls[0][2].items():  # the training held the calibrated BN statistics
        torch.testing.assert_close(calls[1][2][n], mean, rtol=0, atol=0)
    assert len(seen) == 4 * len(layers)  # 4 training batches through every layer
    for layer, noise_aware, gain in seen:
        name = next(n for n, lay in layers.items() if lay is layer)
        fitted = r.calibrated_before.layer(name)
        assert noise_aware and gain is not None, name
        assert (float(gain.min()), float(gain.max())) == pytest.approx((fitted.gain_min, fitted.gain_max), rel=1e-6)
    assert [lc.folded_into for lc in r.calibrated_after.layers] == ["b1", "b2"]
    assert all(layer.out_gain is None for layer in layers.values()) and not m.training
    assert all(bn.momentum == 0.1 for _, bn in mta.bn_layers(m))
    plain = mta.adapt_on_chip(m, loader(x, y), mta.Schedule(stage1_epochs=0, stage2_epochs=0, hw_epochs=0),
                              reselect=False)
    assert plain.calibrated_before is None and plain.calibrated_after is None


class _CountingLoader:
    """A loader that counts how often it is iterated."""

    def __init__(self, batches):
        self.batches, self.iterations = batches, 0

    def __iter__(self):
        self.iterations += 1
        return iter(self.batches)


def test_deploy_loader_is_read_once_and_the_shift_starts_from_calibrations_chip_estimate(monkeypatch):
    """The chip estimate the calibration's bn_shift step measured is the base of the shift after the
    training (``Deployment.bn_chip``), on the same inputs: the loader is read once, the chip's BN
    statistics measured once before the training."""
    m, x, y = trained_task()
    on_chip(m, DeviceModel.preset("typical"), seed=3)
    bases = []
    real_shift = chip_aware.shift_bn
    monkeypatch.setattr(chip_aware, "shift_bn", lambda model, base, now: (bases.append(base),
                                                                          real_shift(model, base, now)))
    calib = _CountingLoader(loader(x, y))
    r = mta.adapt_on_chip(m, loader(x, y), mta.Schedule(stage1_epochs=0, stage2_epochs=0, hw_epochs=1),
                          reselect=False, deploy_loader=calib)
    assert calib.iterations == 1
    assert r.calibrated_before.bn_chip is not None and len(bases) == 1 and bases[0] is r.calibrated_before.bn_chip
    assert sorted(r.calibrated_before.bn_chip) == sorted(n for n, _ in mta.bn_layers(m))


def test_deploy_loader_leaves_a_shared_backbone_bn_alone():
    """task_bn=False: the BNs are the backbone's, shared by every task on the chip; chip-aware adaption
    with calibration must not shift them (as mta.deploy's bn steps do not)."""
    torch.manual_seed(0)
    x, y = _task(256, 0)
    m = make_model(0)
    mta.prepare(m, mta.MethodSpec("xma2", budget=0.25, task_bn=False), 4, head="fc")
    mta.fit(m, loader(x, y), mta.Schedule(stage1_epochs=1, stage2_epochs=1, hw_epochs=0), progress=False)
    on_chip(m, DeviceModel.preset("typical"), seed=3)
    bn = {n: {k: v.clone() for k, v in b.state_dict().items()} for n, b in mta.bn_layers(m)}
    r = mta.adapt_on_chip(m, loader(x, y), mta.Schedule(stage1_epochs=0, stage2_epochs=0, hw_epochs=1),
                          reselect=False, deploy_loader=loader(x, y))
    assert r.calibrated_before.bn_skipped is not None and r.calibrated_before.bn_chip is None
    for n, b in mta.bn_layers(m):
        for k, v in b.state_dict().items():
            torch.testing.assert_close(v, bn[n][k], rtol=0, atol=0, msg=f"{n}.{k}")
