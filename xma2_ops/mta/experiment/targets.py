"""The targets for xma2 at 10 % (docs/MTA.md) and on the chip table (docs/DEVICE.md), evaluated on a run."""
from __future__ import annotations

from typing import List

from ..methods import shift_label_part

def check_targets(summary: List[dict], paired: List[dict], ref: str) -> List[dict]:
    """The issue's targets for xma2 at 10 % (docs/MTA.md), evaluated on this run."""
    by = {(r["task"], r["method"]): r for r in summary}
    if ("AVERAGE", ref) not in by:
        return []
    out = []
    x = by[("AVERAGE", ref)]
    if ("AVERAGE", "finetune") in by:
        ft = by[("AVERAGE", "finetune")]
        out.append({"target": f"{ref} average within 1 point of finetune", "met": x["acc"] >= ft["acc"] - 1.0,
                    "value": f"{x['acc']:.2f} vs {ft['acc']:.2f} ({x['acc'] - ft['acc']:+.2f})"})
        ratio = ft["energy_uJ"] / x["energy_uJ"] if x["energy_uJ"] > 0 else float("inf")
        out.append({"target": f"{ref} >= 10x less re-programming energy than finetune", "met": ratio >= 10,
                    "value": f"{ratio:.1f}x ({x['energy_uJ']:.3f} vs {ft['energy_uJ']:.3f} uJ)"})
    tasks = [t for (t, m) in by if m == ref and t != "AVERAGE"]
    shift = shift_label_part(ref)  # --shift-levels: xma's label has them, pe's not
    for other in ("piggyback", "xbm", "xma" + shift):
        if all((t, other) in by for t in tasks):
            worse = [t for t in tasks if by[(t, ref)]["acc"] <= by[(t, other)]["acc"]]
            out.append({"target": f"{ref} above {other} on every task", "met": not worse,
                        "value": "all tasks" if not worse else f"not on {', '.join(worse)}"})
    pe = ref.replace("xma2", "pe", 1).replace(shift, "")
    p = [d for d in paired if d["method"] == pe and d["task"] == "AVERAGE"]
    if p:
        d = p[0]
        out.append({"target": f"{ref} above {pe} by more than the paired 95 % interval",
                    "met": d["ci95_lo"] > 0 if d["n"] > 1 else None,
                    "value": f"{d['diff']:+.2f} [{d['ci95_lo']:+.2f}, {d['ci95_hi']:+.2f}] over {d['n']} seeds"
                    if d["n"] > 1 else f"{d['diff']:+.2f} (one seed: no interval)"})
    return out

def check_device_targets(chip_summary: List[dict], device: str, ref: str) -> List[dict]:
    """The deployment issue's targets on the chip table (task averages over the chips, docs/DEVICE.md):
    ``typical``: chip-aware ``ref`` within 2.0 points of its ideal-cell accuracy, fine-tuning (its best
    mode) within 1.5; ``mnsim``: every method within 0.5 after calibration; ``chen2017``: chip-aware
    ``ref`` at least 20 points above naive.  Only the targets whose rows this run has."""
    by = {(r["method"], r["mode"]): r for r in chip_summary if r["task"] == "AVERAGE"}

    def drop(method: str, mode: str) -> str:
        r = by[(method, mode)]
        return f"drop {r['drop']:.2f} [{r['drop_ci95_lo']:.2f}, {r['drop_ci95_hi']:.2f}] ({r['ideal_acc']:.2f} -> {r['acc']:.2f})"

    out = []
    if device == "typical":
        if (ref, "chip-aware") in by:
            out.append({"target": f"typical: chip-aware {ref} within 2.0 points of ideal",
                        "met": by[(ref, "chip-aware")]["drop"] <= 2.0, "value": drop(ref, "chip-aware")})
        modes = [m for m in ("chip-aware", "calibrated", "naive") if ("finetune", m) in by]
        if modes:
            best = min(modes, key=lambda m: by[("finetune", m)]["drop"])
            out.append({"target": f"typical: finetune within 1.5 points of ideal ({best})",
                        "met": by[("finetune", best)]["drop"] <= 1.5, "value": drop("finetune", best)})
    if device == "mnsim":
        cal = [m for (m, mode) in by if mode == "calibrated"]
        if cal:
            worst = max(cal, key=lambda m: by[(m, "calibrated")]["drop"])
            out.append({"target": "mnsim: every method within 0.5 points of ideal after calibration",
                        "met": by[(worst, "calibrated")]["drop"] <= 0.5,
                        "value": f"worst {worst}: " + drop(worst, "calibrated")})
    if device == "chen2017" and (ref, "chip-aware") in by and (ref, "naive") in by:
        gain = by[(ref, "chip-aware")]["acc"] - by[(ref, "naive")]["acc"]
        out.append({"target": f"chen2017: chip-aware {ref} >= 20 points above naive", "met": gain >= 20.0,
                    "value": f"{gain:+.2f} ({by[(ref, 'naive')]['acc']:.2f} -> {by[(ref, 'chip-aware')]['acc']:.2f})"})
    return out
