"""The issue's targets for xma2 at 10 % (docs/MTA.md), evaluated on a run's summary."""
from __future__ import annotations

from typing import List

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
    for other in ("piggyback", "xbm", "xma"):
        if all((t, other) in by for t in tasks):
            worse = [t for t in tasks if by[(t, ref)]["acc"] <= by[(t, other)]["acc"]]
            out.append({"target": f"{ref} above {other} on every task", "met": not worse,
                        "value": "all tasks" if not worse else f"not on {', '.join(worse)}"})
    pe = ref.replace("xma2", "pe", 1)
    p = [d for d in paired if d["method"] == pe and d["task"] == "AVERAGE"]
    if p:
        d = p[0]
        out.append({"target": f"{ref} above {pe} by more than the paired 95 % interval",
                    "met": d["ci95_lo"] > 0 if d["n"] > 1 else None,
                    "value": f"{d['diff']:+.2f} [{d['ci95_lo']:+.2f}, {d['ci95_hi']:+.2f}] over {d['n']} seeds"
                    if d["n"] > 1 else f"{d['diff']:+.2f} (one seed: no interval)"})
    return out
