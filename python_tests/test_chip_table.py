"""``python -m xma2_ops.mta chip-table``: one chip table from several runs' results.json."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List

import pytest

from xma2_ops.mta.experiment import cli
from xma2_ops.mta.experiment.chip_table import load_runs, markdown_table
from xma2_ops.mta.experiment.stats import device_summary

T975_DF2 = 4.302652729911275  # Student's t, 97.5 % quantile, 2 degrees of freedom (3 chips)
DEVICE = {"on_off": 10.0, "sigma_rel": 0.05, "seed": 0}
CONFIG = {"rows": 128, "cols": 128, "sensing": "differential"}


def _acc(method: str, task: str, mode: str, chip: int) -> float:
    """A made-up chip accuracy: every (method, task, mode, chip) different."""
    base = {"finetune": 90.0, "xma2@10%/snip": 85.0}[method] + {"a": 2.0, "b": -4.0}[task]
    loss = {"naive": 6.0, "calibrated": 1.5, "chip-aware": 1.0}[mode]
    return round(base - loss - 0.3 * chip + (0.1 if task == "b" else 0.0) * chip, 2)


def _ideal(method: str, task: str) -> float:
    return {"finetune": 90.0, "xma2@10%/snip": 85.0}[method] + {"a": 2.0, "b": -4.0}[task]


def _rows(task: str, chips: int = 3) -> List[dict]:
    out = []
    for method, modes in [("finetune", ["naive", "calibrated"]), ("xma2@10%/snip", ["naive", "calibrated", "chip-aware"])]:
        for mode in modes:
            for chip in range(chips):
                out.append({"seed": 0, "task": task, "method": method, "mode": mode, "chip": chip, "device_seed": chip,
                            "n_test": 1000, "ideal_acc": _ideal(method, task), "acc": _acc(method, task, mode, chip),
                            "pes_swapped": ""})
    return out


def _run(tmp_path: Path, name: str, rows: List[dict], device=DEVICE, config=CONFIG, **args) -> str:
    d = tmp_path / name
    d.mkdir()
    meta = {"args": {"device": "typical", "device_chips": 3, **args}, "device": device, "config": config,
            "adc_clips": {"stem.0": 18}}
    (d / "results.json").write_text(json.dumps({"meta": meta, "rows": [], "device_rows": rows}))
    return str(d)


def _expected_average(method: str, mode: str):
    """Per chip the mean drop over tasks a and b, then mean and 95 % t interval over the 3 chips."""
    drops = [sum(_ideal(method, t) - _acc(method, t, mode, c) for t in "ab") / 2 for c in range(3)]
    m = sum(drops) / 3
    sd = math.sqrt(sum((d - m) ** 2 for d in drops) / 2)
    half = T975_DF2 * sd / math.sqrt(3)
    acc = sum(sum(_acc(method, t, mode, c) for t in "ab") / 2 for c in range(3)) / 3
    return m, m - half, m + half, acc


def test_runs_split_by_task_merge_into_one_table(tmp_path, capsys):
    runs = [_run(tmp_path, "a", _rows("a")), _run(tmp_path, "b", _rows("b"))]
    summary = cli.main(["chip-table", *runs, "--markdown"])
    avg = {(r["method"], r["mode"]): r for r in summary if r["task"] == "AVERAGE"}
    assert len(avg) == 5
    for (method, mode), r in avg.items():
        drop, lo, hi, acc = _expected_average(method, mode)
        assert r["n"] == 3
        assert r["ideal_acc"] == pytest.approx((_ideal(method, "a") + _ideal(method, "b")) / 2, abs=0.005)
        assert r["acc"] == pytest.approx(acc, abs=0.005)
        assert r["drop"] == pytest.approx(drop, abs=0.005)
        assert (r["drop_ci95_lo"], r["drop_ci95_hi"]) == (pytest.approx(lo, abs=0.005), pytest.approx(hi, abs=0.005))
    out = capsys.readouterr().out
    ca = avg[("xma2@10%/snip", "chip-aware")]
    assert f"target MET    typical: chip-aware xma2@10%/snip within 2.0 points of ideal: drop {ca['drop']:.2f}" in out
    ft = avg[("finetune", "calibrated")]
    assert f"finetune within 1.5 points of ideal (calibrated): drop {ft['drop']:.2f}" in out
    # finetune has no chip-aware rows: its markdown cell says so; per task both tasks' drops
    line = next(ln for ln in out.splitlines() if ln.startswith("| finetune |"))
    assert "| - | - |" in line
    drop_a = _ideal("finetune", "a") - sum(_acc("finetune", "a", "naive", c) for c in range(3)) / 3
    assert f"naive: {drop_a:.2f} / " in line


def test_identical_duplicates_kept_once_conflicting_ones_refused(tmp_path, capsys):
    a = _run(tmp_path, "a", _rows("a"))
    again = _run(tmp_path, "again", _rows("a"))  # the same adapters on the same chips: the same bits
    rows, _ = load_runs([a, again])
    assert len(rows) == len(_rows("a"))
    changed = _rows("a")
    changed[4]["acc"] += 0.1
    other = _run(tmp_path, "other", changed)
    with pytest.raises(ValueError, match="different accuracies"):
        load_runs([a, other])
    with pytest.raises(SystemExit):
        cli.main(["chip-table", a, other])
    assert "different accuracies" in capsys.readouterr().err


@pytest.mark.parametrize("field", ["device", "config"])
def test_runs_on_other_chips_refused(tmp_path, field):
    a = _run(tmp_path, "a", _rows("a"))
    kw = {"device": dict(DEVICE, sigma_rel=0.1)} if field == "device" else {"config": dict(CONFIG, sensing="per_polarity")}
    b = _run(tmp_path, "b", _rows("b"), **kw)
    with pytest.raises(ValueError, match=f"differ in '{field}'"):
        load_runs([a, b])


def test_runs_without_chips_refused(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_runs([str(tmp_path / "missing")])
    d = tmp_path / "ideal"
    d.mkdir()
    (d / "results.json").write_text(json.dumps({"meta": {"device": None}, "rows": []}))
    with pytest.raises(ValueError, match="no chip rows"):
        load_runs([str(d)])


def test_markdown_lists_every_mode_of_every_method(tmp_path):
    rows, _ = load_runs([_run(tmp_path, "a", _rows("a"))])
    md = markdown_table(device_summary(rows)).splitlines()
    assert md[0].count("drop [95 %]") == 3 and len(md) == 2 + 2
    assert md[3].startswith(f"| xma2@10%/snip | {_ideal('xma2@10%/snip', 'a'):.2f} |")
    assert md[3].count("**") == 6  # three modes' drops in bold


def test_averages_over_different_tasks_are_pointed_out(tmp_path, capsys):
    only_xma2 = [r for r in _rows("b") if r["method"] == "xma2@10%/snip"]
    cli.main(["chip-table", _run(tmp_path, "a", _rows("a")), _run(tmp_path, "b", only_xma2)])
    note = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("note:"))
    assert "a (finetune naive, finetune calibrated)" in note
    assert "a/b (xma2@10%/snip naive, xma2@10%/snip calibrated, xma2@10%/snip chip-aware)" in note
    cli.main(["chip-table", _run(tmp_path, "a2", _rows("a"))])
    assert "note:" not in capsys.readouterr().out


def test_targets_method_read_from_the_runs_arguments(tmp_path, capsys):
    """Without --ref the targets are stated for xma2@10 % of the runs' own sweep (--budget-unit,
    --criterion); runs from before those flags swept PEs with snip; runs made for different ones need --ref."""
    cells = [dict(r, method=r["method"].replace("xma2@10%/snip", "xma2@10%cells/snip_per_cell")) for r in _rows("a")]
    new = _run(tmp_path, "cells", cells, budget_unit="cells", selection="sensitivity", criterion="snip_per_cell")
    cli.main(["chip-table", new])
    assert "chip-aware xma2@10%cells/snip_per_cell within 2.0 points of ideal" in capsys.readouterr().out
    old = _run(tmp_path, "old", _rows("b"))
    with pytest.raises(SystemExit, match=r"different targets' methods .*xma2@10%cells/snip_per_cell.*--ref"):
        cli.main(["chip-table", new, old])
    cli.main(["chip-table", new, old, "--ref", "xma2@10%/snip"])
    assert "chip-aware xma2@10%/snip within 2.0 points of ideal" in capsys.readouterr().out
    shifted = [dict(r, method=r["method"].replace("xma2@10%/snip", "xma2@10%/snip/shift-4..2")) for r in _rows("a")]
    cli.main(["chip-table", _run(tmp_path, "shift", shifted, shift_levels=[-4, 2])])  # --shift-levels' runs
    assert "chip-aware xma2@10%/snip/shift-4..2 within 2.0 points of ideal" in capsys.readouterr().out
