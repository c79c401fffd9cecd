"""What a task observes from its data: the crossbar layers' input ranges (``calibrate_inputs``) and
the BatchNorm statistics (``refresh_bn_stats``).

Not to be confused with ``xma2_ops.calibrate_adc`` (the ADC clips, from partial sums) nor with
``mta.deploy`` (calibration on a programmed chip).  The former names ``calibrate`` and
``recalibrate_bn`` remain as aliases in ``xma2_ops.mta``.
"""
from __future__ import annotations

from typing import Dict, Iterable, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from ..crossbar import observe_range_and_sign  # the one rule layers observe inputs by
from .layers import bn_layers, use_config, weight_only, xbar_layers


@torch.no_grad()
def refresh_bn_stats(model: nn.Module, loader: Iterable, batches: int = 16) -> None:
    """Re-estimate every BN's running statistics as a plain average over ``batches`` batches with
    the final task state and the layers' current config (``fit`` calls it under its training
    config).  Why: discrete mask/level flips late in training change a channel's distribution
    abruptly and the exponential running average (momentum 0.1) lags behind."""
    bns = [m for _, m in bn_layers(model)]
    saved = [m.momentum for m in bns]
    was_training = model.training
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
            m.train()
        for i, (x, _) in enumerate(loader):
            if i >= batches:
                break
            model(x)
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.train(was_training)


@torch.no_grad()
def calibrate_inputs(model: nn.Module, loader: Iterable, batches: int = 4) -> None:
    """Set every crossbar layer's input range (max |x|) and sign flag from ``batches`` batches in
    eval mode, with the float training forward (the quantised one is not needed to observe
    inputs).  Under torch.distributed the ranges are reduced with MAX (the signs with OR) over
    ranks, on each layer's device (NCCL refuses CPU tensors)."""
    layers = xbar_layers(model)
    seen: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(mod, args):
        # device-side running (max |x|, any x < 0): no host copy or sync per batch
        x = args[0].detach()
        if x.numel() == 0:
            return
        rng, neg = observe_range_and_sign(x)
        s = seen.get(id(mod))
        seen[id(mod)] = (rng, neg) if s is None else (torch.maximum(s[0], rng), s[1] | neg)

    handles = [m.register_forward_pre_hook(hook) for _, m in layers]
    was_training = model.training
    try:
        model.eval()
        with use_config(model, weight_only):
            for i, (x, _) in enumerate(loader):
                if i >= max(1, batches):
                    break
                model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    distributed = dist.is_available() and dist.is_initialized()
    for _, m in layers:
        dev = m.input_range.device  # the layer's device: NCCL only reduces tensors on the rank's GPU
        rng, neg = seen.get(id(m), (torch.zeros((), device=dev), torch.zeros((), dtype=torch.bool, device=dev)))
        rng, neg = rng.to(dev), neg.to(dev)
        if distributed:
            t = torch.stack([rng, neg.float()])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            rng, neg = t[0], t[1] > 0
        m.input_range.copy_(rng)
        if m.config.input_signed is None:
            m.input_signed.copy_(neg)
