"""mta.cost with a device model (docs/SPEC.md 7.3): a cell write counts whatever its outcome, so the
stuck cells of a re-programmed PE cost their write attempt like every other cell; the device model
changes neither cells_written, cells_changed, energy nor endurance.  With write-verify (SPEC 7.4)
every pulse is a cell write: cell_writes, energy and endurance count the pulses."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn

import xma2_ops
from xma2_ops import DeviceModel, XbarConfig, XbarLinear
from xma2_ops import mta
from xma2_ops.quant import expand_tiles

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


# ------------------------------------------------------------------ write-verify (SPEC 7.4): every pulse is a write
VERIFY = dataclasses.replace(DEVICE, verify_tolerance=0.05, verify_max_pulses=6)


def _pulses_in(cells, pe_sel: torch.Tensor) -> torch.Tensor:
    """The pulses [2, S, cells] that ``cells`` took in the PEs ``pe_sel`` [2, 2] of the 40x40 layer."""
    return cells.pulses[:, :, expand_tiles(pe_sel > 0, 40, 40, 32, 32)].long()


def test_without_verify_every_written_cell_is_one_pulse():
    model, _ = linear_task(dataclasses.replace(CFG, device=DEVICE))
    lc = mta.report(model).layers[0]
    assert lc.cell_writes == lc.cells_written > 0 and lc.max_pulses == 1 and lc.mean_pulses == 1.0
    assert lc.energy_j == pytest.approx(lc.cells_written * mta.EnergyModel().write_energy_j)
    assert "cell_writes" not in mta.report(model).table()


def test_verify_counts_every_pulse_in_energy_and_writes():
    plain_model, _ = linear_task(dataclasses.replace(CFG, device=DEVICE))
    plain = mta.report(plain_model)
    model, lin = linear_task(dataclasses.replace(CFG, device=VERIFY))
    xma2_ops.program(model)
    rep = mta.report(model)
    assert lin.programmed_task.cells.pulses is not None  # the report reused the programmed cells
    lc = rep.layers[0]
    pulses = _pulses_in(lin.programmed_task.cells, lin.adapter.pe_sel)
    assert lc.cells_written == plain.layers[0].cells_written == pulses.numel()  # the same cells are written
    assert lc.cells_changed == plain.layers[0].cells_changed
    assert lc.cell_writes == int(pulses.sum()) > 1.5 * lc.cells_written
    # stuck cells away from their target use every pulse
    assert lc.max_pulses == int(pulses.max()) == VERIFY.verify_max_pulses == rep.total.max_pulses
    assert lc.mean_pulses == pytest.approx(float(pulses.double().mean()), rel=1e-12)
    assert lc.energy_j == pytest.approx(lc.cell_writes * mta.EnergyModel().write_energy_j, rel=1e-12)
    d = rep.as_dict()
    assert d["total"]["cell_writes"] == lc.cell_writes and d["layers"][0]["mean_pulses"] == lc.mean_pulses
    assert "cell_writes" in rep.table() and "max_pulses" in rep.table()


def test_verify_report_programs_a_layer_not_yet_programmed():
    model, lin = linear_task(dataclasses.replace(CFG, device=VERIFY))
    assert lin.programmed is None
    lc = mta.report(model).layers[0]
    assert lc.cell_writes == int(_pulses_in(lin.programmed_task.cells, lin.adapter.pe_sel).sum())


def test_verify_switch_and_endurance_count_pulses(tmp_path):
    """A -> B: the PE of A is restored with the backbone's pulses, the PE of B takes B's task pulses;
    endurance adds up every pulse per cell and reports each PE's most-written cell."""
    model, lin = linear_task(dataclasses.replace(CFG, device=VERIFY))
    ad = lin.adapter
    pe_a, pe_b = torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    with torch.no_grad():
        ad.pe_sel.copy_(pe_a)
    mta.save_task(model, tmp_path / "a.safetensors")
    with torch.no_grad():
        ad.pe_sel.copy_(pe_b)
    mta.save_task(model, tmp_path / "b.safetensors")
    xma2_ops.program(model)
    r = mta.report(model, tmp_path / "a.safetensors")
    restored = _pulses_in(lin.programmed.cells, pe_a)
    task_b = _pulses_in(lin.programmed_task.cells, pe_b)
    assert r.total.cells_written == restored.numel() + task_b.numel()
    assert r.total.cell_writes == int(restored.sum()) + int(task_b.sum())
    assert r.total.max_pulses == max(int(restored.max()), int(task_b.max()))
    # endurance over a, b, a: per cell the pulses of each write it took, from each task's deployed cells
    pulses = {}
    for t in ("a", "b"):
        other = copy.deepcopy(model)
        mta.load_task(other, tmp_path / f"{t}.safetensors")
        pulses[t] = mta.deployed_pulses(other)["lin"]  # [K, N, 2, S]
    per_cell = torch.zeros_like(pulses["a"])
    for prev_sel, sel, p in ((None, pe_a, pulses["a"]), (pe_a, pe_b, pulses["b"]), (pe_b, pe_a, pulses["a"])):
        write = sel > 0 if prev_sel is None else (sel > 0) | (prev_sel > 0)
        per_cell += torch.where(expand_tiles(write, 40, 40, 32, 32)[:, :, None, None], p, 0)
    want = per_cell.amax((-1, -2))
    want = torch.tensor([[int(want[:32, :32].max()), 0], [0, int(want[32:, 32:].max())]])
    w = mta.endurance(model, [tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "a.safetensors"])
    assert torch.equal(w["lin"], want)
    assert bool((w["lin"] > torch.tensor([[3, 0], [0, 2]])).sum() == 2)  # more than one write per switch
