"""Whole-network speed: converted models against the same float model, measured in one run.

    python benchmarks/bench_models.py                     # all cases, 2 threads
    python benchmarks/bench_models.py --quick             # tiny model, 1 round, no RSS probes (a smoke test)
    python benchmarks/bench_models.py --cases small-x32 --busy 1   # the example's evaluation with a busy process
    python benchmarks/bench_models.py --profile resnet18-b64       # + where the time goes (torch.profiler)
    python benchmarks/bench_models.py --device cuda --no-rss       # on a GPU (scripts/gpu_check.sh)

Cases (``--cases``):
- ``resnet18-b64`` / ``resnet18-b1``: ``models.resnet18(num_classes=10, cifar=True)`` on
  3x32x32 images, batch 64 / 1; every conv and the fc on 128x128 crossbars (21 crossbar layers).
- ``small-x32`` / ``small-x128``: the backbone of the mta experiment (``xma2_ops.models.SmallResNet``,
  width 24) on its evaluation batch (100 images of 1x28x28), convs on 32x32 or
  128x128 crossbars, the fc head digital (as in the example).
- ``layer``: one 3x3 convolution, 64 -> 64 channels, batch 32 of 32x32 (the first shape of
  BENCHMARKS.md), 128x128 crossbars: the single-layer ratios to ``nn.Conv2d``.
- ``tiny`` (``--quick``): a 2-conv net on 8 images of 1x8x8 (a smoke test of the script).

Configs (``--configs``; ``XbarConfig(rows, cols, ...)``): ``default`` (8-bit weights on 2-bit cells,
8-bit inputs on a 1-bit DAC, 8-bit ADC), ``lossless`` (``adc_bits=None``: ideal ADC),
``weight-only`` (``input_bits=None, adc_bits=None``: fake-quantised weights, float inputs) and
``ideal`` (no quantisation).

Per case: inference (eval mode, ``torch.no_grad``; layers programmed once, the first call also
calibrates) in images/s, and one training step (train mode: forward, cross-entropy, backward, SGD
step; the layers re-program every step) for ``weight-only`` and ``default``, each as a ratio to the
float model (the same weights, before ``convert``); calls taken in turns, medians of ``--repeats``
rounds.  Peak RSS: each (model, config, mode) runs once in a fresh subprocess; "peak MB" is the
growth of the peak resident set over the process after building the model, and "x float" its
ratio to the float model's growth (skipped by ``--quick`` and ``--no-rss``).

``--busy N`` starts N busy-looping processes (``while True: pass``, same nice level as this
script: an equal competitor) for the timed rounds, and also times the quiet case first, to report
the slowdown under load.  The machine's load average is printed with every table.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timing import busy as busy_processes, cpu_name, load, row, time_in_turns

import xma2_ops
from xma2_ops import XbarConfig, models

ROOT = Path(__file__).resolve().parents[1]


def _small_resnet_class():
    """SmallResNet of the mta experiment (xma2_ops.models)."""
    return models.SmallResNet


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.c2(F.relu(self.c1(x)))).mean((2, 3)))


class _Layer(nn.Module):
    """One 3x3 convolution (the BENCHMARKS.md layer shape), averaged so that a loss can be taken."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(64, 64, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean((2, 3))


# name -> (model factory, input shape, crossbar size, convert the fc too)
CASES: Dict[str, Tuple[Callable[[], nn.Module], Tuple[int, ...], int, bool]] = {
    "resnet18-b64": (lambda: models.resnet18(num_classes=10, cifar=True), (64, 3, 32, 32), 128, True),
    "resnet18-b1": (lambda: models.resnet18(num_classes=10, cifar=True), (1, 3, 32, 32), 128, True),
    "small-x32": (lambda: _small_resnet_class()(24, 10), (100, 1, 28, 28), 32, False),
    "small-x128": (lambda: _small_resnet_class()(24, 10), (100, 1, 28, 28), 128, False),
    "layer": (_Layer, (32, 64, 32, 32), 128, True),
    "tiny": (_Tiny, (8, 1, 8, 8), 32, True),
}
CONFIGS = {
    "default": {},
    "lossless": {"adc_bits": None},
    "weight-only": {"input_bits": None, "adc_bits": None},
    "ideal": {"weight_bits": None, "input_bits": None, "adc_bits": None},
}
TRAIN_CONFIGS = ("weight-only", "default")


def float_model(case: str) -> Tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The case's float model (BatchNorm statistics set by a few train-mode batches), an input batch
    and labels, all from fixed seeds."""
    factory, shape, _, _ = CASES[case]
    torch.manual_seed(0)
    model = factory()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen)
    if case == "layer":
        x = x.relu()  # post-ReLU activations, as in bench_ops.py
    y = torch.randint(0, 10, (shape[0],), generator=gen)
    if shape[0] > 1:
        with torch.no_grad():
            model.train()
            for _ in range(3):
                model(torch.randn(shape, generator=gen))
    return model.eval(), x, y


def converted(model: nn.Module, case: str, config: str) -> nn.Module:
    _, _, size, linear = CASES[case]
    cfg = XbarConfig(rows=size, cols=size, **CONFIGS[config])
    skip = None if linear else (lambda name, m: name == "fc")
    return xma2_ops.convert(copy.deepcopy(model), cfg, skip=skip)


def _sync(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def inference_fn(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    model.eval()

    def run():
        with torch.no_grad():
            y = model(x)
        _sync(x)
        return y

    return run


def train_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    """One SGD step; BatchNorm statistics are restored afterwards so every step sees the same model."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    bn_state = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}

    def run():
        model.train()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        model.load_state_dict(bn_state, strict=False)
        _sync(x)

    return run


# ------------------------------------------------------------------ peak RSS, one subprocess per measurement
def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(float(ln.split()[1]) for ln in f if ln.startswith(field + ":")) / 1024


def rss_probe(case: str, config: str, mode: str, threads: int) -> None:
    """Runs in a fresh process: prints {"base": MB resident after building, "peak": MB peak of the
    calls} as JSON (Linux: the peak is reset through /proc/self/clear_refs after building)."""
    torch.set_num_threads(threads)
    model, x, y = float_model(case)
    if config != "float":
        model = converted(model, case, config)
    fn = inference_fn(model, x) if mode == "infer" else train_fn(model, x, y)
    base = _status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (the peak) to the current resident set
    for _ in range(2):
        fn()
    print(json.dumps({"base": base, "peak": _status_mb("VmHWM")}))


def measure_rss(case: str, config: str, mode: str, threads: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--rss-probe", case, config, mode, "--threads", str(threads)],
                         check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    return r["peak"] - r["base"]


# ------------------------------------------------------------------ the table
def bench_case(case: str, configs: List[str], repeats: int, threads: int, rss: bool,
               busy: int = 0, device: str = "cpu") -> Dict[str, float]:
    model, x, y = float_model(case)
    model, x, y = model.to(device), x.to(device), y.to(device)
    batch = x.shape[0]
    infer = {"float": inference_fn(model, x)}
    train = {"float": train_fn(copy.deepcopy(model), x, y)}
    for c in configs:
        infer[c] = inference_fn(converted(model, case, c), x)
        if c in TRAIN_CONFIGS:
            train[c] = train_fn(converted(model, case, c), x, y)
    fns = {f"infer/{k}": v for k, v in infer.items()}
    fns.update({f"train/{k}": v for k, v in train.items()})
    with busy_processes(busy):
        t = time_in_turns(fns, repeats)
    _, shape, size, _ = CASES[case]
    where = f"{threads} threads" if device == "cpu" else torch.cuda.get_device_name(device)
    print(f"\n{case}: input {tuple(shape)}, {size}x{size} crossbars, {where}, {repeats} rounds"
          f"{f', {busy} busy process(es)' if busy else ''}; {load()} (after)")
    head = ["config", "infer ms", "img/s", "x float", "train ms", "x float", "peak MB", "x float", "train MB",
            "x float"]
    widths = [12, 10, 8, 8, 10, 8, 8, 8, 9, 8]
    print(row(head, widths))
    mem: Dict[str, Tuple[float, float]] = {}
    for k in infer:
        ti, tt = t[f"infer/{k}"], t.get(f"train/{k}")
        mi = measure_rss(case, k, "infer", threads) if rss else None
        mt = measure_rss(case, k, "train", threads) if (rss and k in train) else None
        mem[k] = (mi, mt)
        fi, ft = mem["float"]
        cells = [k, f"{ti * 1e3:.1f}", f"{batch / ti:.1f}", f"{ti / t['infer/float']:.2f}",
                 f"{tt * 1e3:.1f}" if tt else "-", f"{tt / t['train/float']:.2f}" if tt else "-",
                 f"{mi:.0f}" if mi is not None else "-", f"{mi / fi:.2f}" if mi is not None and fi else "-",
                 f"{mt:.0f}" if mt is not None else "-", f"{mt / ft:.2f}" if mt is not None and ft else "-"]
        print(row(cells, widths))
    return t


# ------------------------------------------------------------------ where the time goes
# Phases of a crossbar layer's forward, as functional.py labels them for the profiler.
PHASES = ("xbar.checks", "xbar.program", "xbar.quantize_input", "xbar.unfold_codes", "xbar.kernel",
          "xbar.fold_output", "xbar.straight_through", "xbar.float_forward")


def profile_case(case: str, config: str, mode: str, rows: int) -> None:
    model, x, y = float_model(case)
    xm = converted(model, case, config)
    fn = inference_fn(xm, x) if mode == "infer" else train_fn(xm, x, y)
    fn()  # calibrate, program
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    ev = {e.key: e for e in prof.key_averages()}
    print(f"\nwhere the time goes: {case}, {config}, {mode}, one call {wall * 1e3:.1f} ms wall under the profiler; "
          f"{load()}")
    print(row(["phase (all crossbar layers)", "ms", "% of call"], [34, 10, 9]))
    total = 0.0
    for name in PHASES:
        if name in ev:
            ms = ev[name].cpu_time_total / 1e3
            total += ms
            print(row([name, f"{ms:.1f}", f"{100 * ms / (wall * 1e3):.1f}"], [34, 10, 9]))
    rest = wall * 1e3 - total
    print(row(["rest (float layers, Python, autograd)", f"{rest:.1f}", f"{100 * rest / (wall * 1e3):.1f}"],
               [34, 10, 9]))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the tiny case, 1 round, no RSS probes (a smoke test)")
    ap.add_argument("--cases", nargs="+", choices=list(CASES), default=None)
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda: the models and inputs on that device "
                                                    "(no RSS probes on cuda; the layers use their default backend)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3, --quick 1)")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    ap.add_argument("--busy", type=int, default=0, help="also time with N busy-looping processes running")
    ap.add_argument("--profile", nargs="*", default=None, metavar="CASE",
                    help="profile one inference of CASE (default config; none given: the first case)")
    ap.add_argument("--profile-rows", type=int, default=12)
    ap.add_argument("--rss-probe", nargs=3, metavar=("CASE", "CONFIG", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.rss_probe:
        return rss_probe(*args.rss_probe, args.threads)
    cases = args.cases or (["tiny"] if args.quick else ["resnet18-b64", "resnet18-b1", "small-x32", "small-x128"])
    configs = args.configs or list(CONFIGS)
    repeats = args.repeats or (1 if args.quick else 3)
    rss = not (args.quick or args.no_rss or args.device != "cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU {cpu_name()}, {os.cpu_count()} cores, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, {load()}")
    for case in cases:
        quiet = bench_case(case, configs, repeats, args.threads, rss, device=args.device)
        if args.busy:
            loaded = bench_case(case, configs, repeats, args.threads, False, args.busy, args.device)
            print(f"{case}: slowdown with {args.busy} busy process(es): " + ", ".join(
                f"{k} {loaded[k] / quiet[k]:.2f}x" for k in quiet))
    if args.profile is not None:
        for case in (args.profile or cases[:1]):
            profile_case(case, "default", "infer", args.profile_rows)


if __name__ == "__main__":
    main()
