"""``python -m xma2_ops.mta chip-table DIR [DIR ...]``: one chip table from several runs.

A long chip evaluation is often split (one run per task, or per preset's mode, with ``--adapters-from``);
this merges the runs' per-chip rows (``results.json``'s ``device_rows``) and prints the table, the
deployment targets and, with ``--markdown``, the table as docs/DEVICE.md shows it.  Runs are merged only
when they describe the same chips: the same device model, crossbar config and ADC clips.  A (seed,
task, method, mode, chip) found in two runs is kept once when both agree (the same adapter on the same
chip gives the same bits) and refused when they differ."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .report import print_device_table
from .runs import ref_label
from .stats import device_summary
from .targets import check_device_targets

# What must be equal for two runs' chips to be the same chips.
SAME_CHIPS = ("device", "config", "adc_clips")
ROW_KEY = ("seed", "task", "method", "mode", "chip")


def load_runs(dirs: List[str]) -> Tuple[List[dict], Dict[str, dict]]:
    """The per-chip rows of the runs in ``dirs`` (each an ``--out`` folder of a run with ``--device``),
    duplicates kept once, and each run's meta (in ``dirs`` order).  Raises ValueError naming the run and
    what differs."""
    rows: List[dict] = []
    metas: Dict[str, dict] = {}
    seen: dict = {}
    first: Optional[Tuple[str, dict]] = None
    for d in dirs:
        path = Path(d) / "results.json"
        if not path.is_file():
            raise ValueError(f"chip-table: {path} not found (expected the --out folder of a run)")
        res = json.loads(path.read_text())
        meta = res.get("meta", {})
        if not res.get("device_rows") or not meta.get("device"):
            raise ValueError(f"chip-table: {path} has no chip rows (a run without --device)")
        metas[d] = meta
        if first is None:
            first = (d, meta)
        for field in SAME_CHIPS:
            if meta.get(field) != first[1].get(field):
                raise ValueError(f"chip-table: {d} and {first[0]} differ in {field!r}: not the same chips")
        for r in res["device_rows"]:
            key = tuple(r[k] for k in ROW_KEY)
            if key in seen:
                if (seen[key]["acc"], seen[key]["ideal_acc"]) != (r["acc"], r["ideal_acc"]):
                    raise ValueError(f"chip-table: {dict(zip(ROW_KEY, key))} is in {seen[key]['_run']} and {d} "
                                     f"with different accuracies ({seen[key]['acc']} vs {r['acc']})")
                continue
            seen[key] = dict(r, _run=d)
            rows.append(r)
    if first is None:
        raise ValueError("chip-table: no run given")
    return rows, metas


def runs_ref(metas: Dict[str, dict]) -> str:
    """The targets' method the runs (load_runs' metas) were made for (runs.ref_label of their arguments;
    runs from before --budget-unit/--criterion swept the PE budget with snip).  Raises SystemExit when
    they differ."""
    old = {"budget_unit": "pes", "selection": "sensitivity", "criterion": "snip"}
    refs = {d: ref_label(argparse.Namespace(**{**old, **meta["args"]})) for d, meta in metas.items()}
    if len(set(refs.values())) > 1:
        raise SystemExit("chip-table: the runs were made for different targets' methods ("
                         + ", ".join(f"{d}: {r}" for d, r in refs.items()) + "): name one with --ref")
    return next(iter(refs.values()))


def markdown_table(chip_summary: List[dict]) -> str:
    """Per method: the ideal-cell task average, per mode the chips' accuracy (mean +- std) and the drop
    with its 95 % interval, then the drop per task."""
    modes = list(dict.fromkeys(r["mode"] for r in chip_summary))
    tasks = list(dict.fromkeys(r["task"] for r in chip_summary if r["task"] != "AVERAGE"))
    by = {(r["method"], r["mode"], r["task"]): r for r in chip_summary}
    head = ["method", "ideal"] + [f"{m} | drop [95 %]" for m in modes] + [f"drop per task ({' / '.join(tasks)})"]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|" + "---:|---:|" * len(modes) + "---|"]
    for method in dict.fromkeys(r["method"] for r in chip_summary):
        cells, per_task, ideal = [], [], ""
        for mode in modes:
            a = by.get((method, mode, "AVERAGE"))
            if a is None:
                cells.append("- | -")
                continue
            ideal = f"{a['ideal_acc']:.2f}"
            cells.append(f"{a['acc']:.2f} ± {a['acc_std']:.2f} | **{a['drop']:.2f}** "
                         f"[{a['drop_ci95_lo']:.2f}, {a['drop_ci95_hi']:.2f}]")
            per_task.append(f"{mode}: " + " / ".join(f"{by[(method, mode, t)]['drop']:.2f}"
                                                     if (method, mode, t) in by else "-" for t in tasks))
        lines.append(f"| {method} | {ideal} | " + " | ".join(cells) + " | " + "; ".join(per_task) + " |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None, prog: str = "python -m xma2_ops.mta chip-table") -> List[dict]:
    """Print the merged chip table of the runs named in ``argv``; returns its rows (device_summary's)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="--out folders of runs with --device (their results.json)")
    p.add_argument("--ref", help="the method of the targets (default: the runs' own, xma2@10%% of their budget "
                                 "sweep: e.g. xma2@10%%/snip, or xma2@10%%cells/snip_per_cell)")
    p.add_argument("--markdown", action="store_true", help="also print the table in markdown (per method, per mode)")
    args = p.parse_args(argv)
    try:
        rows, metas = load_runs(args.runs)
    except ValueError as e:
        p.error(str(e))
    ref = args.ref or runs_ref(metas)
    summary = device_summary(rows)
    task_sets = {}
    for r in rows:
        task_sets.setdefault((r["method"], r["mode"]), set()).add(r["task"])
    groups: dict = {}
    for (method, mode), tasks in task_sets.items():
        groups.setdefault("/".join(sorted(tasks)), []).append(f"{method} {mode}")
    if len(groups) > 1:
        print("note: the AVERAGE rows average different tasks: " + "; ".join(
            f"{t} ({', '.join(g) if len(g) <= 3 else f'{len(g)} method-modes'})" for t, g in groups.items()))
    device = next(iter(metas.values()))["args"]["device"]  # a run with chip rows was run with --device
    print_device_table(summary, device, len({r["chip"] for r in rows}))
    for t in check_device_targets(summary, device, ref):
        print(f"target {'MET   ' if t['met'] else 'MISSED'} {t['target']}: {t['value']}")
    if args.markdown:
        print("\n" + markdown_table(summary))
    return summary
