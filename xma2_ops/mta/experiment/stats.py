"""Statistics over seeds (and chips): per-task and task-average summaries, paired differences with t
intervals, the device table."""
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
            m, sd, lo, hi = t_interval(d)
            out.append({"method": method, "task": task, "n": len(d), "diff": round(m, 2), "std": round(sd, 2),
                        "ci95_lo": round(lo, 2), "ci95_hi": round(hi, 2)})
    return out

def t_interval(d: List[float]) -> Tuple[float, float, float, float]:
    """(mean, std, lower, upper) of the 95 % t interval of the mean of ``d`` (nan bounds for one value)."""
    m, sd = mean_std(d)
    half = _t975(len(d) - 1) * sd / len(d) ** 0.5 if len(d) > 1 else float("nan")
    return m, sd, m - half, m + half

def device_summary(chip_rows: List[dict]) -> List[dict]:
    """Per (method, --deploy mode) and task, and on the task AVERAGE: the accuracy over the chips
    (and seeds) -- mean, std -- and the drop from the ideal-cell accuracy of the same images, paired
    per chip, with its 95 % t interval.  AVERAGE: per (seed, chip) the mean over the tasks."""
    out = []
    groups: Dict[Tuple[str, str], List[dict]] = {}
    for r in chip_rows:
        groups.setdefault((r["method"], r["mode"]), []).append(r)
    for (method, mode), rs in groups.items():
        tasks = list(dict.fromkeys(r["task"] for r in rs))
        per_task = {t: [r for r in rs if r["task"] == t] for t in tasks}
        pairs = sorted({(r["seed"], r["chip"]) for r in rs})
        complete = [p for p in pairs if all(any((r["seed"], r["chip"]) == p for r in per_task[t]) for t in tasks)]
        for task in tasks + ["AVERAGE"]:
            if task == "AVERAGE":
                by = {(r["seed"], r["chip"], r["task"]): r for r in rs}
                accs = [sum(by[p + (t,)]["acc"] for t in tasks) / len(tasks) for p in complete]
                ideals = [sum(by[p + (t,)]["ideal_acc"] for t in tasks) / len(tasks) for p in complete]
            else:
                accs = [r["acc"] for r in per_task[task]]
                ideals = [r["ideal_acc"] for r in per_task[task]]
            if not accs:
                continue
            acc, acc_std = mean_std(accs)
            drop, _, lo, hi = t_interval([i - a for i, a in zip(ideals, accs)])
            out.append({"method": method, "task": task, "mode": mode, "n": len(accs),
                        "ideal_acc": round(sum(ideals) / len(ideals), 2), "acc": round(acc, 2),
                        "acc_std": round(acc_std, 2), "drop": round(drop, 2), "drop_ci95_lo": round(lo, 2),
                        "drop_ci95_hi": round(hi, 2)})
    return out
