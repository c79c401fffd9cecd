"""Statistics over seeds: per-task and task-average summaries, paired differences with t intervals."""
from __future__ import annotations

from typing import Dict, List, Tuple

def mean_std(xs: List[float]) -> Tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0

def _t975(df: int) -> float:
    """Two-sided 95 % quantile of Student's t with ``df`` degrees of freedom."""
    from scipy.stats import t
    return float(t.ppf(0.975, df))

def _per_seed_acc(rows: List[dict]) -> Dict[str, Dict[int, Dict[str, float]]]:
    """method -> seed -> task -> accuracy."""
    out: Dict[str, Dict[int, Dict[str, float]]] = {}
    for r in rows:
        out.setdefault(r["method"], {}).setdefault(r["seed"], {})[r["task"]] = r["acc"]
    return out

def summarize(rows: List[dict]) -> List[dict]:
    """Per method: per task the mean +- std over seeds of the accuracy; AVERAGE: the mean over
    tasks per seed, then mean +- std over seeds.  Cost columns: means (they vary with the
    selection only)."""
    out = []
    acc = _per_seed_acc(rows)
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]
        tasks = list(dict.fromkeys(r["task"] for r in rs))
        for task in tasks + ["AVERAGE"]:
            sel = rs if task == "AVERAGE" else [r for r in rs if r["task"] == task]
            row = {k: round(sum(r[k] for r in sel) / len(sel), 4) for k in sel[0]
                   if k not in ("seed", "task", "method", "acc") and isinstance(sel[0][k], (int, float))}
            per_seed = [(sum(t.values()) / len(t)) if task == "AVERAGE" else t[task] for t in acc[method].values()
                        if task == "AVERAGE" or task in t]
            m, sd = mean_std(per_seed)
            out.append({"seed": "mean", "task": task, "method": method, "acc": round(m, 2), "acc_std": round(sd, 2),
                        "n_seeds": len(per_seed), **row})
    return out

def paired_differences(rows: List[dict], ref: str) -> List[dict]:
    """``ref`` minus every other method, paired by seed (and task): mean, std and the 95 % t
    interval of the mean difference, on the task average and per task."""
    acc = _per_seed_acc(rows)
    if ref not in acc:
        return []
    out = []
    for method, by_seed in acc.items():
        if method == ref:
            continue
        seeds = [s for s in by_seed if s in acc[ref]]
        tasks = sorted(set.intersection(*[set(by_seed[s]) & set(acc[ref][s]) for s in seeds])) if seeds else []
        if not tasks:
            continue
        for task in ["AVERAGE"] + tasks:
            def val(table, s):
                return sum(table[s][t] for t in tasks) / len(tasks) if task == "AVERAGE" else table[s][task]
            d = [val(acc[ref], s) - val(by_seed, s) for s in seeds]
            m, sd = mean_std(d)
            half = _t975(len(d) - 1) * sd / len(d) ** 0.5 if len(d) > 1 else float("nan")
            out.append({"method": method, "task": task, "n": len(d), "diff": round(m, 2), "std": round(sd, 2),
                        "ci95_lo": round(m - half, 2), "ci95_hi": round(m + half, 2)})
    return out
