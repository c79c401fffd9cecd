"""mta.cost with a device model (docs/SPEC.md 7.3): a cell write counts whatever its outcome, so the
stuck cells of a re-programmed PE cost their write attempt like every other cell; the device model
changes neither cells_written, cells_changed, energy nor endurance."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn

import xma2_ops
from xma2_ops import DeviceModel, XbarConfig, XbarLinear
from xma2_ops import mta
from xma2_ops.reference import expand_tiles

# 30 % of the cells stuck (15 % low, 15 % high): every re-programmed PE holds hundreds of stuck cells
DEVICE = DeviceModel(saf_low=0.15, saf_high=0.15, sigma_rel=0.05, seed=7)
CFG = XbarConfig(rows=32, cols=32)
SLICES = CFG.weight_slices  # 4 cells per polarity


def linear_task(config: XbarConfig, method: str = "pe") -> tuple:
    """Linear 40 -> 40 on 32x32 PEs (PE grid 2x2, used blocks 32x32, 32x8, 8x32, 8x8), PEs (0, 0)
    and (1, 1) re-programmed with task weights that differ from the backbone's."""
    torch.manual_seed(0)
    lin = XbarLinear(40, 40, bias=False, config=config)
    with torch.no_grad():  # integer weights with max 127: scale 1, codes = values
        lin.weight.copy_(torch.randint(-100, 100, (40, 40)).float())
        lin.weight[0, 0] = 127.0
    model = nn.ModuleDict({"lin": lin, "fc": nn.Linear(40, 3)})
    mta.prepare(model, mta.MethodSpec(method, budget=0.5), 3, head="fc")
    ad = lin.adapter
    with torch.no_grad():
        ad.pe_sel.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        ad.task_weight.copy_(torch.randint(-100, 100, (40, 40)).float())
        ad.task_weight[0, 0] = 127.0
    model.eval()
    return model, lin


def stuck_cells_in_reprogrammed_pes(model: nn.Module, lin: XbarLinear) -> tuple:
    """(stuck, all) cells of the re-programmed PEs as the programmed task cells hold them."""
    xma2_ops.program(model)
    cells = lin.programmed_task.cells
    assert cells is not None and cells.stuck.shape == (2, SLICES, 40, 40)  # [polarity, slice, K, N]
    sel = expand_tiles(lin.adapter.pe_sel > 0, 40, 40, 32, 32)  # [K, N]
    stuck = int((cells.stuck & sel).sum())
    return stuck, int(sel.sum()) * 2 * SLICES


def test_stuck_cells_in_reprogrammed_pes_cost_their_write():
    model, lin = linear_task(dataclasses.replace(CFG, device=DEVICE))
    stuck, cells = stuck_cells_in_reprogrammed_pes(model, lin)
    assert cells == (32 * 32 + 8 * 8) * SLICES * 2
    assert 0.2 * cells < stuck < 0.4 * cells  # the high fault rates really give stuck cells there
    lc = mta.report(model).layers[0]
    assert lc.reprogrammed_pes == 2
    # every cell of the two PEs is written: the stuck ones too (counting only the cells that took
    # their level would give cells - stuck)
    assert lc.cells_written == cells != cells - stuck
    assert lc.energy_j == pytest.approx(cells * mta.EnergyModel().write_energy_j)


def test_device_model_changes_no_count():
    with_dev, lin = linear_task(dataclasses.replace(CFG, device=DEVICE))
    xma2_ops.program(with_dev)
    ideal, _ = linear_task(CFG)
    a, b = mta.report(with_dev).as_dict(), mta.report(ideal).as_dict()
    for lay in a["layers"] + b["layers"]:  # config-independent comparison of the counts
        lay.pop("name")
    assert a == b
    assert a["total"]["cells_changed"] > 0


def test_switch_and_endurance_count_stuck_cells(tmp_path):
    """A -> B re-writes PEs of A (restored to the backbone) and of B, stuck cells included;
    endurance counts writes per PE, not per successful cell."""
    model, lin = linear_task(dataclasses.replace(CFG, device=DEVICE))
    ad = lin.adapter
    with torch.no_grad():
        ad.pe_sel.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    mta.save_task(model, tmp_path / "a.safetensors")
    with torch.no_grad():
        ad.pe_sel.copy_(torch.tensor([[0.0, 0.0], [0.0, 1.0]]))
    mta.save_task(model, tmp_path / "b.safetensors")
    stuck, _ = stuck_cells_in_reprogrammed_pes(model, lin)
    assert stuck > 0
    r = mta.report(model, tmp_path / "a.safetensors")
    assert r.total.cells_written == (32 * 32 + 8 * 8) * SLICES * 2 and r.total.reprogrammed_pes == 1
    w = mta.endurance(model, [tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "a.safetensors"])
    assert w["lin"].tolist() == [[3, 0], [0, 2]]
