"""``--quick``: a smoke run that stays quick whatever the model.

Every kind of run the full run has (each method, a tier-1 selection by sensitivity and by weight
change, the weight-only ablation) still runs, on less: 2 built-in tasks (sk_digits, letters) instead
of 4, 256 training / 100 test images per task, 1 epoch per stage, a narrow backbone (set in
cli.parse_args).  A large backbone (more than ``LARGE_WEIGHTS`` crossbar weights, e.g. resnet18:
11 M) also gets (``cap_large_model``): the first task only, 32 training and 32 test images, batches
of 32 (one step per epoch) and its ADC clips from 8 images (``adc_data``) -- its bit-exact quantised
forward, the ADC calibration (~4 s per image for resnet18 on 2 cores) and the cost model take
seconds per batch there, so image counts are what bounds a quick run."""
from __future__ import annotations

from typing import Dict

import torch.nn as nn

from .. import xbar_layers

TASKS = ["sk_digits", "letters"]
LARGE_WEIGHTS = 1_000_000
LARGE_IMAGES = 32
LARGE_ADC_IMAGES = 8


def crossbar_weights(model: nn.Module) -> int:
    return sum(m.weight.numel() for _, m in xbar_layers(model))


def is_large_quick(args, model: nn.Module) -> bool:
    return bool(args.quick) and crossbar_weights(model) > LARGE_WEIGHTS


def adc_data(args, model: nn.Module, data: tuple) -> tuple:
    """The images the backbone's ADC clips are calibrated on: ``data``, or its first 8 (large quick)."""
    if not is_large_quick(args, model):
        return data
    return tuple(t[:LARGE_ADC_IMAGES] for t in data)


def cap_large_model(args, model: nn.Module, tasks: Dict[str, tuple], log) -> Dict[str, tuple]:
    """--quick on a large backbone: fewer tasks, images and batches (module docstring); ``args`` is
    updated in place.  Returns the tasks to run."""
    if not is_large_quick(args, model):
        return tasks
    n = crossbar_weights(model)
    k = LARGE_IMAGES
    args.n_train, args.n_test = min(args.n_train, k), min(args.n_test, k)
    args.batch, args.eval_batch, args.adc_batches = min(args.batch, k), min(args.eval_batch, k), 1
    args.device_n_test = min(args.device_n_test, k)
    name, ((xtr, ytr), (xte, yte)) = next(iter(tasks.items()))
    log(f"--quick on a large backbone ({n / 1e6:.1f} M crossbar weights): task {name} only, {k} training and "
        f"{k} test images, batches of {args.batch}, ADC clips from {LARGE_ADC_IMAGES} images")
    return {name: ((xtr[:k], ytr[:k]), (xte[:k], yte[:k]))}
