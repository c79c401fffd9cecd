"""The experiment's report: the printed tables and the plots."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List

import numpy as np

def print_table(summary: List[dict], n_seeds: int) -> None:
    tasks = list(dict.fromkeys(r["task"] for r in summary if r["task"] != "AVERAGE"))
    by = {(r["task"], r["method"]): r for r in summary}
    pm = " +- std" if n_seeds > 1 else ""
    hdr = (f"{'method':<28} " + " ".join(f"{t[:10]:>15}" for t in tasks + ["AVERAGE"])
           + f" {'PEs %':>6} {'write uJ':>9} {'infer nJ':>9} {'lat us':>7} {'ADC/img':>9}")
    print(f"\naccuracy % (mean{pm} over {n_seeds} seed(s)), quantised crossbar forward; costs averaged over tasks")
    print(hdr + "\n" + "-" * len(hdr))
    for method in dict.fromkeys(r["method"] for r in summary):
        a = by[("AVERAGE", method)]
        cells = [f"{by[(t, method)]['acc']:6.2f}" + (f" +-{by[(t, method)]['acc_std']:5.2f}" if n_seeds > 1 else "")
                 if (t, method) in by else "-" for t in tasks + ["AVERAGE"]]
        line = (f"{method:<28} " + " ".join(f"{c:>15}" for c in cells)
                + f" {a['pe_pct']:>6.2f} {a['energy_uJ']:>9.3f} {a['infer_nJ']:>9.1f} {a['latency_us']:>7.1f}"
                  f" {int(a['adc_per_img']):>9d}")
        print(line)

def print_device_table(chip_summary: List[dict], device: str, chips: int) -> None:
    """The chip table: per method and --deploy mode, the task-average accuracy on the chips and its drop
    from the ideal cells (same images) with the paired 95 % interval; per task below."""
    avg = [r for r in chip_summary if r["task"] == "AVERAGE"]
    print(f"\non {device} chips ({chips} per run; accuracy mean +- std over chips and seeds, drop = ideal - chip on "
          f"the same images, paired per chip, 95 % t interval)")
    hdr = f"{'method':<28} {'mode':<11} {'ideal':>6} {'chip':>15} {'drop':>6} {'95 % interval':>17}"
    print(hdr + "\n" + "-" * len(hdr))
    for task in ["AVERAGE"] + list(dict.fromkeys(r["task"] for r in chip_summary if r["task"] != "AVERAGE")):
        if task != "AVERAGE":
            print(f"{task}:")
        for r in (avg if task == "AVERAGE" else [r for r in chip_summary if r["task"] == task]):
            print(f"{r['method']:<28} {r['mode']:<11} {r['ideal_acc']:>6.2f} {r['acc']:>7.2f} +-{r['acc_std']:>5.2f} "
                  f"{r['drop']:>6.2f} [{r['drop_ci95_lo']:>6.2f}, {r['drop_ci95_hi']:>6.2f}]")

def print_paired(paired: List[dict], ref: str, n_seeds: int) -> None:
    avg = [d for d in paired if d["task"] == "AVERAGE"]
    if not avg:
        return
    print(f"\npaired difference {ref} - method, task average, over {n_seeds} seed(s)"
          + (" (95 % t interval)" if n_seeds > 1 else " (one seed: no interval)"))
    for d in avg:
        print(f"  {d['method']:<28} {d['diff']:+6.2f}" + (f"  [{d['ci95_lo']:+6.2f}, {d['ci95_hi']:+6.2f}]"
                                                         if n_seeds > 1 else ""))


# ------------------------------------------------------------------ plots
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt

def plot_accuracy(summary: List[dict], path: Path) -> None:
    """Per task: mean accuracy over seeds against the % of PEs re-programmed, one line per family."""
    plt = _plt()
    tasks = sorted({r["task"] for r in summary if r["task"] != "AVERAGE"})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        families: Dict[str, list] = {}
        for r in summary:
            if r["task"] == task and not r["method"].endswith(("sharedBN", "weight-only")):
                families.setdefault(re.sub(r"@\d+%", "", r["method"]), []).append((r["pe_pct"], r["acc"],
                                                                                    r["acc_std"]))
        for fam, pts in families.items():
            pts.sort()
            xs, ys, es = zip(*pts)
            ax.errorbar(xs, ys, yerr=es, fmt="o-" if len(pts) > 1 else "x", capsize=2, label=fam)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel("% PEs re-programmed")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(task)
        if families:
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

MARKERS = "os^vD<>p*hX"


def plot_energy(summary: List[dict], path: Path, n_seeds: int) -> None:
    """Average accuracy (mean +- std over seeds) against re-programming energy per task switch
    and against inference energy per image, one point per method."""
    plt = _plt()
    avg = [r for r in summary if r["task"] == "AVERAGE"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "energy_uJ", "re-programming energy per task switch (uJ)"),
                           (axes[1], "infer_nJ", "inference energy per image (nJ)")):
        for i, r in enumerate(avg):
            # 11 markers against 10 colours: no two of the first 110 methods look alike (the default
            # run has 11, and its first and last were both blue circles)
            ax.errorbar(r[key], r["acc"], yerr=r["acc_std"], fmt=MARKERS[i % len(MARKERS)], capsize=2,
                        color=f"C{i % 10}", label=r["method"])
        if key == "energy_uJ":
            ax.set_xscale("symlog", linthresh=max(1e-3, min([r[key] for r in avg if r[key] > 0] or [1.0])))
        ax.set_xlabel(label)
        ax.set_ylabel(f"average accuracy (%), mean +- std over {n_seeds} seed(s)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

def plot_masks(masks: Dict[str, Dict[str, np.ndarray]], path: Path, title: str) -> None:
    """One heatmap per crossbar layer: for each PE, the number of tasks that re-programmed it."""
    plt = _plt()
    layers = list(next(iter(masks.values())).keys())
    total = {l: sum(m[l] for m in masks.values()) for l in layers}
    ncol = min(5, len(layers))
    nrow = -(-len(layers) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.8 * ncol, 2.8 * nrow), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, l in zip(axes.flat, layers):
        ax.axis("on")
        im = ax.imshow(total[l], vmin=0, vmax=len(masks), cmap="viridis", aspect="auto", interpolation="nearest")
        tr, tc = total[l].shape
        ax.set_xticks(range(tc))
        ax.set_yticks(range(0, tr, max(1, tr // 6)))
        ax.tick_params(labelsize=6)
        ax.set_title(f"{l} ({tr}x{tc} PEs)", fontsize=7)
        ax.set_xlabel("column tile", fontsize=6)
        ax.set_ylabel("row tile", fontsize=6)
    fig.colorbar(im, ax=axes.ravel().tolist(), label="tasks re-programming the PE")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(out: Path, rows: List[dict], summary: List[dict], paired: List[dict], targets: List[dict],
                  meta: dict, chip_rows: List[dict] = (), chip_summary: List[dict] = ()) -> None:
    """results.csv (every run, then the summary rows), results.json (meta, rows, averages, paired,
    targets, and with --device the chip rows and the chip table) and with --device device.csv (one row
    per run, --deploy mode and chip, then the chip table's rows)."""
    import csv
    import json
    with open(out / "results.csv", "w", newline="") as f:
        fields = list(dict.fromkeys(k for r in rows + summary for k in r))
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows + summary)
    res = {"meta": meta, "rows": rows, "average": summary, "paired": paired, "targets": targets}
    if chip_rows:
        res.update(device_rows=list(chip_rows), device_summary=list(chip_summary))
        with open(out / "device.csv", "w", newline="") as f:
            both = list(chip_rows) + [dict(r, seed="mean", chip="mean") for r in chip_summary]
            w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in both for k in r)))
            w.writeheader()
            w.writerows(both)
    (out / "results.json").write_text(json.dumps(res, indent=1))
