"""What the full run will cost, printed by a --quick run before its runs.

A training step and an evaluation of PROBE_IMAGES images are timed on a copy of the full run's backbone
(torch's RNG state is restored afterwards, the experiment's model is not touched), then

    per run  ~ weight-only epochs x training images x weight-only step per image
               + ADC-aware epochs x training images x quantised step per image + test images x evaluation per image

with the run's own epochs: stage 2, plus stage 1 where its selection trains one (MethodSpec.stage1),
plus the head-only probe epochs where it probes snip (timed as full steps: an upper bound), plus
the ADC-aware epochs unless it is a weight-only run;

    full run ~ the sum over its runs (+ the backbone's training when it is not cached)

an order of magnitude (selection and calibration batches, the cost report and the device
evaluation are left out), measured on this machine with the current threads."""
from __future__ import annotations

import copy
import math
import time
from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import MethodSpec, prepare, use_config, weight_only
from .backbone import build_model
from .runs import method_list


PROBE_IMAGES = 8  # images of each timed call (times are scaled per image: the probe stays cheap on any model)


def _time_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Seconds per image of one forward + backward (train mode), after one warm-up call."""
    model.train()
    F.cross_entropy(model(x[:1]), y[:1]).backward()
    t = time.perf_counter()
    F.cross_entropy(model(x), y).backward()
    return (time.perf_counter() - t) / len(x)


@torch.no_grad()
def _time_eval(model: nn.Module, x: torch.Tensor) -> float:
    """Seconds per image of the quantised evaluation forward (eval mode), after one warm-up call."""
    model.eval()
    model(x[:1])
    t = time.perf_counter()
    model(x)
    return (time.perf_counter() - t) / len(x)


def measure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor) -> Dict[str, float]:
    """Seconds per image: training step (weight-only, quantised) and evaluation, on a copy of ``model``."""
    x, y, x_test = x[:PROBE_IMAGES], y[:PROBE_IMAGES], x_test[:PROBE_IMAGES]
    with torch.random.fork_rng(devices=[]):
        m = copy.deepcopy(model)
        prepare(m, MethodSpec("finetune"), int(y.max()) + 1)
        with use_config(m, weight_only):
            wo = _time_step(m, x, y)
        hw = _time_step(m, x, y)
        ev = _time_eval(m, x_test)
    return {"step_weight_only_s": wo, "step_quantised_s": hw, "eval_per_image_s": ev}


def full_run_estimate(model: nn.Module, tasks: dict, args, full, n_tasks: int) -> dict:
    """The full run's runs and estimated seconds (see the module docstring)."""
    if full.arch == "small" and full.width != args.width:  # the quick backbone is narrower: time the real one
        with torch.random.fork_rng(devices=[]):
            model = build_model(full, 10)
    (x, y), (x_test, _) = next(iter(tasks.values()))
    t = measure(model, x, y, x_test)
    n_tasks = n_tasks if full.data_root else (len(full.tasks) if full.tasks else 4)
    runs = len(method_list(full)) * n_tasks * full.seeds
    images = math.ceil(full.n_train / full.batch) * full.batch  # per epoch (at most: a smaller data set has fewer)

    def seconds(run) -> float:
        spec = run.spec
        weight_only = (full.stage2_epochs + (full.stage1_epochs if spec.stage1 else 0)
                       + (full.probe_head_epochs if spec.probes else 0))
        return (weight_only * images * t["step_weight_only_s"] + (full.hw_epochs if run.hw else 0) * images
                * t["step_quantised_s"] + full.n_test * t["eval_per_image_s"])

    total = sum(seconds(r) for r in method_list(full)) * n_tasks * full.seeds
    backbone = 0.0
    if full.arch == "small" or not full.data_root:
        backbone = full.backbone_epochs * full.n_source * t["step_weight_only_s"]
    return {"runs": runs, "methods": len(method_list(full)), "tasks": n_tasks, "seeds": full.seeds,
            "per_run_s": total / runs, "total_s": total, "backbone_s": backbone, **t}


def print_full_run_estimate(model: nn.Module, tasks: dict, args, full, log, n_tasks: int) -> dict:
    """Log (and return) the full run's estimate; ``n_tasks``: the tasks found (before quick's caps)."""
    e = full_run_estimate(model, tasks, args, full, n_tasks)
    log(f"the full run (this command without --quick): {e['runs']} runs ({e['methods']} methods x {e['tasks']} tasks x "
        f"{e['seeds']} seed(s)) x ~{e['per_run_s']:.0f} s = ~{e['total_s'] / 60:.0f} min"
        + (f" + ~{e['backbone_s'] / 60:.0f} min of backbone training unless cached" if e["backbone_s"] else "")
        + f" on {torch.get_num_threads()} threads (measured here per image: training step {1e3 * e['step_weight_only_s']:.1f} ms "
          f"weight-only, {1e3 * e['step_quantised_s']:.1f} ms quantised; evaluation {1e3 * e['eval_per_image_s']:.1f} "
          f"ms; an order of magnitude, see xma2_ops/mta/experiment/estimate.py)")
    return e
