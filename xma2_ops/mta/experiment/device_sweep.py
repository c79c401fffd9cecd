"""Accuracy of the example backbone on imperfect ReRAM cells (docs/SPEC.md section 7, docs/DEVICE.md).

The backbone of the mta experiment (small ResNet, MNIST digits, 128x128 PEs, default XbarConfig
otherwise; trained, or loaded from the cache under --out, by the experiment's own code) is
evaluated with its quantised crossbar forward (eval mode) on many simulated chips:

* vs programming variation: ``DeviceModel(sigma_rel=s)`` for s in --sigmas;
* vs stuck-at faults: ``DeviceModel(saf_low=r, saf_high=r)`` for r in --rates;
* on the named presets of --presets (default ``typical``: finite on/off ratio and every other
  non-ideality, docs/DEVICE.md);

each point under every periphery sensing of --sensing (SPEC 8; default both: ``per_polarity``
converts each polarity's column on its own, ``differential`` subtracts the pair before the ADC, which
cancels the off-state conductance g0 of the cells), on the same chips;

every point on --chips chips (``xma2_ops.program(model, seed=chip)``: chip c has the same fault
map and draws in every sweep and for every model), mean +- std of the accuracy over the chips.
The models swept on the same chips (--variants; default backbone and noise-aware):

* ``backbone``: the trained backbone as it is;
* ``ft-ideal`` (optional control): the backbone fine-tuned for --ft-epochs on ideal cells (as
  much extra training as the noise-aware model, without the noise);
* ``noise-aware``: the same fine-tune with ``layer.noise_aware = True`` on every crossbar layer and
  ``DeviceModel(sigma_rel=--na-sigma)`` in the config: the cells are programmed anew on every
  training forward (fresh variation per batch), the standard noise-aware training recipe.

Fine-tunes run in weight-only mode (as the example trains), then the input ranges are
calibrated on ideal cells; every accuracy comes from the bit-exact quantised forward.
Outputs under --out: device_sweep.csv, device_sweep.json (with wall time and load), device_sweep.png.

    python -m xma2_ops.mta device-sweep           # default run (backbone cached under --out)
    python -m xma2_ops.mta device-sweep --quick   # CI: tiny backbone, 2 points per sweep, 3 chips
    python examples/device_sweep.py ...           # the same
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import functools
import json
import os
import statistics
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ... import DeviceModel, calibrate_adc, program
from .. import calibrate_inputs, use_config, weight_only, xbar_layers
from .backbone import backbone as load_backbone
from .cli import parse_args as parse_experiment_args
from .data import source_task
from .evaluate import evaluate
from .runtime import make_loader, run_forked

VARIANTS = ("backbone", "ft-ideal", "noise-aware")


def parse_args(argv=None, prog: str = "python -m xma2_ops.mta device-sweep"):
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="xma2_out", help="output directory; the backbone cache of the mta experiment lives here")
    p.add_argument("--quick", action="store_true", help="CI: the example's --quick backbone, 2 points per sweep, "
                                                         "3 chips, 100 test images")
    p.add_argument("--sigmas", type=float, nargs="+", help="sigma_rel values (default 0 0.02 0.05 0.1 0.2)")
    p.add_argument("--rates", type=float, nargs="+",
                   help="stuck-at rates, saf_low = saf_high = r (default 0 0.005 0.01 0.02 0.05)")
    p.add_argument("--presets", nargs="*", help="DeviceModel presets to evaluate (default typical)")
    p.add_argument("--sensing", nargs="+", choices=["per_polarity", "differential"],
                   default=["per_polarity", "differential"], help="periphery sensing (SPEC 8) of every point")
    p.add_argument("--adc-clip", default="percentile", choices=["pmax", "percentile", "mse"],
                   help="each sensing's ADC range: calibrated on the source data (xma2_ops.calibrate_adc) or Pmax")
    p.add_argument("--chips", type=int, help="chips (device seeds 0..chips-1) per point (default 5)")
    p.add_argument("--n-eval", type=int, help="test images per evaluation (default 150; the first of the "
                                              "example's MNIST test split)")
    p.add_argument("--na-sigma", type=float, default=0.05, help="sigma_rel of the noise-aware fine-tune")
    p.add_argument("--ft-epochs", type=float, help="fine-tune epochs over the backbone's training set (default 1)")
    p.add_argument("--ft-lr", type=float, default=5e-4)
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                   help="models to sweep (default: backbone noise-aware; ft-ideal is the fine-tune control)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for the backbone and the fine-tunes (0: torch default); evaluations use 1 "
                        "per worker.  Default 1: on the shared 2-core test box two threads made these small ops "
                        "several times slower (threads spinning against other processes)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="processes for the sweep's evaluations (default: min(2, CPUs))")
    p.add_argument("--eval-batch", type=int, default=25)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    q = args.quick
    args.sigmas = args.sigmas if args.sigmas is not None else ([0.0, 0.2] if q else [0.0, 0.02, 0.05, 0.1, 0.2])
    args.rates = args.rates if args.rates is not None else ([0.0, 0.05] if q else [0.0, 0.005, 0.01, 0.02, 0.05])
    args.presets = args.presets if args.presets is not None else ["typical"]
    args.chips = args.chips if args.chips is not None else (3 if q else 5)
    args.n_eval = args.n_eval if args.n_eval is not None else (100 if q else 150)
    args.ft_epochs = args.ft_epochs if args.ft_epochs is not None else (0.25 if q else 1.0)
    args.variants = args.variants or ["backbone", "noise-aware"]
    if min(args.chips, args.n_eval, args.workers, args.eval_batch) < 1:
        raise SystemExit("--chips, --n-eval, --workers and --eval-batch must be >= 1")
    return args


def example_args(args) -> argparse.Namespace:
    """The experiment's own arguments (same backbone, same cache key)."""
    ex = ["--out", args.out, "--seed", str(args.seed), "--no-progress"] + (["--quick"] if args.quick else [])
    return parse_experiment_args(ex)


def set_device(model: nn.Module, device, sensing: str = "per_polarity", clips=None) -> None:
    """Every crossbar layer's config with ``device`` (None: ideal cells), periphery ``sensing`` and the
    ADC clips {layer: clip} calibrated for that sensing (None: keep each layer's clip)."""
    for name, m in xbar_layers(model):
        clip = m.config.adc_clip if clips is None else clips[name]
        m.config = dataclasses.replace(m.config, device=device, sensing=sensing, adc_clip=clip)


def adc_clips_per_sensing(model: nn.Module, data, ex, args) -> Dict[str, Dict[str, int]]:
    """{sensing: {layer: clip}}: each sensing's ADC range calibrated on the source data with ideal cells
    (--adc-clip, as the example does for its backbone), so that each periphery gets its own ADC design."""
    out = {}
    orig = {name: m.config.adc_clip for name, m in xbar_layers(model)}
    for sensing in args.sensing:
        set_device(model, None, sensing, {name: None for name in orig})
        if args.adc_clip == "pmax":
            out[sensing] = {name: None for name, _ in xbar_layers(model)}
        else:
            out[sensing] = calibrate_adc(model, make_loader(data, ex.batch, args.seed), batches=2,
                                                  method=args.adc_clip)
    set_device(model, None, "per_polarity", orig)
    return out


def fine_tune(model: nn.Module, src_train, ex, args, noise_aware: bool, progress: bool) -> nn.Module:
    """A copy of ``model`` fine-tuned for args.ft_epochs (weight-only mode, Adam); noise-aware:
    DeviceModel(sigma_rel=args.na_sigma) on every layer and fresh cells every training forward."""
    ft = copy.deepcopy(model)
    set_device(ft, DeviceModel(sigma_rel=args.na_sigma, seed=10_000 + args.seed) if noise_aware else None)
    layers = xbar_layers(ft)
    for _, m in layers:
        m.noise_aware = noise_aware
    if noise_aware:
        program(ft)  # number the layers on the (training) chip
    torch.manual_seed(args.seed)
    loader = make_loader(src_train, ex.batch, args.seed)
    steps = max(1, round(args.ft_epochs * len(loader)))
    opt = torch.optim.Adam(ft.parameters(), lr=args.ft_lr)
    it = iter(())
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc=f"fine-tune ({'noise-aware' if noise_aware else 'ideal cells'})", leave=False)
    ft.train()
    with use_config(ft, weight_only):
        for _ in range(steps):
            try:
                x, y = next(it)
            except StopIteration:
                it = iter(loader)
                x, y = next(it)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(ft(x), y).backward()
            opt.step()
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    for _, m in layers:
        m.noise_aware = False
    set_device(ft, None)
    calibrate_inputs(ft, make_loader(src_train, ex.batch, args.seed), batches=8)  # input ranges, ideal cells
    return ft


def points(args) -> List[Tuple[str, float, DeviceModel]]:
    return ([("sigma_rel", s, DeviceModel(sigma_rel=s)) for s in args.sigmas] +
            [("saf", r, DeviceModel(saf_low=r, saf_high=r)) for r in args.rates] +
            [("preset", name, DeviceModel.preset(name)) for name in args.presets])


def _evaluate_job(st: dict, job: Tuple[str, int, int, str]) -> Tuple[str, int, int, str, float, float]:
    """One evaluation: model ``name`` on sweep point ``p`` (index into points()), chip ``chip``, periphery
    ``sensing``.  Deterministic in the job whatever process runs it (the chip's draws are seeded)."""
    name, p, chip, sensing = job
    model = st["models"][name]
    dev = st["points"][p][2]
    set_device(model, dev, sensing, st["clips"][name][sensing])
    program(model, seed=chip)
    t = time.perf_counter()
    acc = evaluate(model, st["test"], st["batch"], False, "")[0]
    set_device(model, None)
    return name, p, chip, sensing, acc, time.perf_counter() - t


def sweep(models: Dict[str, nn.Module], clips, test, args, progress: bool) -> Tuple[List[dict], Dict[str, float], float]:
    """Accuracy of every model on every point and chip (an ideal point too: every chip must give
    the ideal accuracy); returns rows, ideal accuracies and the mean seconds of one evaluation on a
    non-ideal device.  In --workers forked processes (runtime.run_forked)."""
    ideal = {}
    for name, model in models.items():
        for sensing in args.sensing:
            set_device(model, None, sensing, clips[name][sensing])
            ideal[(name, sensing)] = evaluate(model, test, args.eval_batch, False, "")[0]
        set_device(model, None)
    pts = points(args)
    state = dict(models=models, clips=clips, points=pts, test=test, batch=args.eval_batch)
    # the slow (non-ideal) jobs first, so the workers finish together
    jobs = sorted([(name, p, chip, sensing) for name in models for p in range(len(pts)) for chip in range(args.chips)
                   for sensing in args.sensing], key=lambda j: pts[j[1]][2].ideal)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(jobs), desc=f"sweep ({args.workers} worker{'s' * (args.workers > 1)})")
    results = {}
    try:
        for name, p, chip, sensing, acc, secs in run_forked(functools.partial(_evaluate_job, state), jobs,
                                                            args.workers):
            results[(name, p, chip, sensing)] = (acc, secs)
            if bar is not None:
                bar.set_postfix_str(f"{name} {pts[p][0]}={pts[p][1]} {sensing} chip {chip}: {acc:.1f}%")
                bar.update()
    finally:
        if bar is not None:
            bar.close()
    rows = []
    for name in models:
        for sensing in args.sensing:
            for p, (kind, value, dev) in enumerate(pts):
                accs = [results[(name, p, c, sensing)][0] for c in range(args.chips)]
                rows.append({"model": name, "sensing": sensing, "sweep": kind, "value": value, "chips": args.chips,
                             "acc_mean": round(statistics.fmean(accs), 3),
                             "acc_std": round(statistics.stdev(accs), 3) if len(accs) > 1 else 0.0,
                             "acc_min": min(accs), "acc_max": max(accs), "ideal_acc": ideal[(name, sensing)],
                             "n_eval": len(test[1]), "accs": " ".join(f"{a:.2f}" for a in accs)})
    noisy = [secs for (name, p, c, _), (_, secs) in results.items() if not pts[p][2].ideal]
    return rows, ideal, sum(noisy) / max(1, len(noisy))


def plot(rows: List[dict], ideal: Dict[str, float], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, kind, xlabel in ((axes[0], "sigma_rel", "programming variation sigma_rel"),
                             (axes[1], "saf", "stuck-at rate (saf_low = saf_high)")):
        for i, name in enumerate(dict.fromkeys(r["model"] for r in rows)):
            for sensing, fmt in (("per_polarity", "o-"), ("differential", "s--")):
                rs = sorted((r for r in rows if r["model"] == name and r["sweep"] == kind and r["sensing"] == sensing),
                            key=lambda r: r["value"])
                if not rs:
                    continue
                ax.errorbar([r["value"] for r in rs], [r["acc_mean"] for r in rs], yerr=[r["acc_std"] for r in rs],
                            fmt=fmt, capsize=3, label=f"{name}, {sensing}", color=f"C{i}")
                ax.axhline(ideal[(name, sensing)], color=f"C{i}", ls=":", lw=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy (%), mean +- std over chips")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None, prog: str = "python -m xma2_ops.mta device-sweep") -> List[dict]:
    """Run the sweep with the command line ``argv`` (default sys.argv[1:]); returns its rows."""
    args = parse_args(argv, prog)
    t0 = time.time()
    load0 = os.getloadavg()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    progress = not args.no_progress
    ex = example_args(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    src = source_task(ex)  # as the experiment
    t = time.time()
    backbone = load_backbone(ex, src, out, progress)
    t_backbone = time.time() - t
    test = (src[1][0][:args.n_eval], src[1][1][:args.n_eval])
    models = {}
    t = time.time()
    for name in args.variants:
        if name == "backbone":
            models[name] = backbone
        else:
            models[name] = fine_tune(backbone, src[0], ex, args, noise_aware=name == "noise-aware", progress=progress)
    t_ft = time.time() - t
    clips = {name: adc_clips_per_sensing(m, src[0], ex, args) for name, m in models.items()}
    t = time.time()
    rows, ideal, eval_s = sweep(models, clips, test, args, progress)
    t_sweep = time.time() - t
    wall = time.time() - t0
    load1 = os.getloadavg()

    with open(out / "device_sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    meta = {"args": vars(args), "adc_clips": clips, "ideal_acc": {f"{n}/{s_}": v for (n, s_), v in ideal.items()}, "wall_s": round(wall, 1), "backbone_s": round(t_backbone, 1),
            "fine_tune_s": round(t_ft, 1), "sweep_s": round(t_sweep, 1), "eval_s_noisy": round(eval_s, 2),
            "threads": torch.get_num_threads(), "workers": args.workers, "loadavg_start": load0, "loadavg_end": load1,
            "n_eval": len(test[1]), "pes": sum(m.tiles[0] * m.tiles[1] for _, m in xbar_layers(backbone))}
    (out / "device_sweep.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    plot(rows, ideal, out / "device_sweep.png",
         f"example backbone (MNIST), {len(test[1])} test images, {args.chips} chips per point; "
         f"noise-aware fine-tune at sigma_rel={args.na_sigma}")

    print(f"\naccuracy (%) on {len(test[1])} MNIST test images, mean +- std over {args.chips} chips "
          f"(ideal cells: " + ", ".join(f"{k}/{s_} {v:.2f}" for (k, s_), v in ideal.items()) + ")")
    cols = [(n, s_) for n in models for s_ in args.sensing]
    print(f"{'sweep':<10} {'value':>8} " + " ".join(f"{n + '/' + s_[:4]:>18}" for n, s_ in cols))
    for kind, value, _ in points(args):
        cells = []
        for n, s_ in cols:
            r = next(r for r in rows if r["model"] == n and r["sensing"] == s_ and r["sweep"] == kind
                     and r["value"] == value)
            cells.append(f"{r['acc_mean']:7.2f} +- {r['acc_std']:5.2f}")
        print(f"{kind:<10} {value!s:>8} " + " ".join(f"{c:>18}" for c in cells))
    print(f"one evaluation on a non-ideal device: {eval_s:.2f} s; backbone {t_backbone:.1f} s, fine-tunes "
          f"{t_ft:.1f} s, sweep {t_sweep:.1f} s; load average {load0[0]:.1f} -> {load1[0]:.1f}")
    print(f"wall time: {wall:.1f} s  (outputs in {out}/device_sweep.{{csv,json,png}})")
    return rows


