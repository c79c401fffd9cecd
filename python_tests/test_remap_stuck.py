"""DeviceModel.remap_stuck: stuck-aware programming (docs/DEVICE.md "Stuck-aware programming").

Each weight with a stuck cell gets the levels, among all its + / - cell levels that leave the stuck
cells at their stuck value, whose shift-and-add is closest to its code; checked against an
exhaustive search over every level of every cell, on several cell widths."""
from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

import xma2_ops
from xma2_ops import DeviceModel, mta
from xma2_ops.device import cell_levels, cell_weight_codes, program_cells, stuck_aware_levels
from xma2_ops.mta.masks import from_kn

from test_chip_aware import trained_task
from test_deploy import on_chip


def _held(levels, low, high, top):
    return torch.where(high, top, torch.where(low, 0, levels))


def _codes_held(levels, low, high, cell_bits):
    h = _held(levels, low, high, 2 ** cell_bits - 1)
    base = torch.tensor([1 << (j * cell_bits) for j in range(h.shape[1])])
    return ((h[0] - h[1]) * base[:, None, None]).sum(0)


@pytest.mark.parametrize("weight_bits, cell_bits, rate, seed", [(8, 2, 0.1, 0), (6, 1, 0.2, 1), (8, 3, 0.3, 2),
                                                                 (8, 4, 0.3, 3), (8, 8, 0.3, 4), (5, 2, 0.5, 5)])
def test_remap_is_the_closest_encoding_of_every_weight(weight_bits, cell_bits, rate, seed):
    g = torch.Generator().manual_seed(seed)
    q, top = 2 ** (weight_bits - 1) - 1, 2 ** cell_bits - 1
    codes = torch.randint(-q, q + 1, (24, 20), generator=g)
    levels = cell_levels(codes, weight_bits, cell_bits)
    u = torch.rand(levels.shape, generator=g)
    low, high = u < rate / 2, u >= 1 - rate / 2
    remapped = stuck_aware_levels(levels, low, high, cell_bits)
    assert remapped.dtype == torch.int64 and int(remapped.min()) >= 0 and int(remapped.max()) <= top
    hit = (low | high).flatten(0, 1).any(0)
    assert torch.equal(remapped[:, :, ~hit], levels[:, :, ~hit])  # weights without a stuck cell: SPEC 2
    err = (_codes_held(remapped, low, high, cell_bits) - codes).abs()
    before = (_codes_held(levels, low, high, cell_bits) - codes).abs()
    assert bool((err <= before).all()) and int(err.sum()) < int(before.sum())
    s = levels.shape[1]
    every = torch.tensor(list(itertools.product(range(top + 1), repeat=s)))  # [C, S]: every level of s cells
    base = torch.tensor([1 << (j * cell_bits) for j in range(s)])
    for k, n in hit.nonzero().tolist()[:60]:
        plus = torch.where(low[0, :, k, n], 0, torch.where(high[0, :, k, n], top, every))
        minus = torch.where(low[1, :, k, n], 0, torch.where(high[1, :, k, n], top, every))
        sums = (plus * base).sum(1)[:, None] - (minus * base).sum(1)[None, :]
        assert int(err[k, n]) == int((sums - codes[k, n]).abs().min()), (k, n)


def test_remap_off_is_spec_and_on_keeps_every_draw():
    """Off (the default): the cells of SPEC 7.1.  On: the same faults, variation draws and stuck
    values; only the levels of weights with a stuck cell differ."""
    codes = torch.randint(-127, 128, (64, 48), generator=torch.Generator().manual_seed(7))
    dev = DeviceModel(saf_low=0.05, saf_high=0.05, sigma_abs=0.02, seed=3)
    assert dev.remap_stuck is False
    off = program_cells(codes, 8, 2, dev, layer=1, write=0)
    on = program_cells(codes, 8, 2, dataclasses.replace(dev, remap_stuck=True), layer=1, write=0)
    assert torch.equal(off.levels, cell_levels(codes, 8, 2)) and torch.equal(off.stuck, on.stuck)
    assert torch.equal(on.g[on.stuck], off.g[off.stuck])
    same = on.levels == off.levels
    assert torch.equal(on.g[same], off.g[same])  # a cell written at the same level drew the same variation
    assert not bool(same.all())
    hit = on.stuck.flatten(0, 1).any(0)
    assert bool(same[:, :, ~hit].all())


def test_a_layer_on_a_stuck_chip_holds_codes_closer_to_its_weights():
    """Stuck cells only: without remap the layer's cells miss its codes wherever a cell is stuck;
    with it almost every such weight is exact, and fault_weight_error is still what the cells add."""
    stuck = DeviceModel(saf_low=0.04, saf_high=0.08)
    errs = {}
    for remap in (False, True):
        m, _, _ = trained_task()
        on_chip(m, dataclasses.replace(stuck, remap_stuck=remap), seed=3)
        total = 0.0
        for _, layer in mta.xbar_layers(m):
            st = layer.programmed
            held = cell_weight_codes(st.cells.read(0), layer.config.cell_bits, stuck.frac_bits)
            total += float((held - st.codes.double()).abs().sum())
            expected = from_kn((held - st.codes.double()) * st.scale.double(), layer.weight.shape).float()
            torch.testing.assert_close(mta.fault_weight_error(layer), expected, rtol=1e-6, atol=1e-7)
        errs[remap] = total
    assert errs[True] < 0.1 * errs[False], errs  # measured: ~10x less code error at 12 % stuck cells


def test_remap_refusals():
    with pytest.raises(TypeError, match="DeviceModel.remap_stuck: expected a bool"):
        DeviceModel(remap_stuck=1)
    levels = cell_levels(torch.tensor([[5]]), 16, 1)  # 15 slices of 1 bit: 3^14 digit choices per weight
    stuck = torch.zeros(levels.shape, dtype=torch.bool)
    stuck[0, 0] = True
    with pytest.raises(ValueError, match="DeviceModel.remap_stuck: 4782969 digit choices"):
        stuck_aware_levels(levels, stuck, torch.zeros_like(stuck), 1)


def test_remap_is_remembered_per_chip_layer_and_codes(monkeypatch):
    """Noise-aware training re-programs the same codes every batch: the search runs once per
    (fault map, codes); other codes, another layer or another chip search again."""
    from xma2_ops import device as device_mod
    calls = []
    real = device_mod.stuck_aware_levels
    monkeypatch.setattr(device_mod, "stuck_aware_levels", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(device_mod, "_REMAP_CACHE", type(device_mod._REMAP_CACHE)())
    codes = torch.randint(-127, 128, (40, 30), generator=torch.Generator().manual_seed(1))
    dev = DeviceModel(saf_low=0.05, saf_high=0.05, sigma_rel=0.05, seed=2, remap_stuck=True)
    first = program_cells(codes, 8, 2, dev, layer=0, write=0)
    again = program_cells(codes, 8, 2, dev, layer=0, write=1)
    assert len(calls) == 1 and torch.equal(first.levels, again.levels) and not torch.equal(first.g, again.g)
    other = codes.clone()
    other[0, 0] = -other[0, 0] + 1
    for args in ((other, dev, 0), (codes, dev, 1), (codes, dataclasses.replace(dev, seed=3), 0)):
        program_cells(args[0], 8, 2, args[1], layer=args[2], write=0)
    assert len(calls) == 4
    fresh = stuck_aware_levels(cell_levels(codes, 8, 2), *[t for t in _fault_map(dev, 0, first.levels.shape)], 2)
    assert torch.equal(fresh, first.levels)


def _fault_map(dev, layer, shape):
    from xma2_ops.device import stream
    u = torch.rand(shape, generator=stream(dev.seed, layer, "fault"), dtype=torch.float64)
    return u < dev.saf_low, u >= 1.0 - dev.saf_high
