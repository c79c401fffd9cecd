"""Accuracy of the current task: the quantised crossbar forward, and on simulated chips (--device,
--deploy); noise-aware training (--noise-aware)."""
from __future__ import annotations

import copy
import dataclasses
from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from ... import DeviceModel, program
from .. import bn_layers, deploy, use_config, xbar_layers
from .runtime import is_dist
from .stats import mean_std

@torch.no_grad()
def evaluate(model: nn.Module, data, batch: int, progress: bool, desc: str,
             max_batches: Optional[int] = None) -> Tuple[float, torch.Tensor]:
    """Accuracy with the quantised crossbar forward (the layers' own config); test batches are
    sharded over ranks and the counts summed.  Also returns the logits of the first batch."""
    model.eval()
    x, y = data
    rank, world = (dist.get_rank(), dist.get_world_size()) if is_dist() else (0, 1)
    starts = list(range(0, len(y), batch))[rank::world][:max_batches]
    correct = torch.zeros(2, dtype=torch.float64)
    first = None
    it = starts
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(starts, desc=f"eval {desc}", leave=False)
    for s in it:
        out = model(x[s:s + batch])
        first = out if first is None else first
        correct += torch.tensor([(out.argmax(1) == y[s:s + batch]).sum().item(), len(y[s:s + batch])],
                                dtype=torch.float64)
    if is_dist():
        dist.all_reduce(correct)
    return float(correct[0] / correct[1]) * 100, first

def with_device(device: Optional[DeviceModel]):
    """A config transform for mta.use_config: the layers' config with ``device`` (None: ideal cells)."""
    return lambda c: dataclasses.replace(c, device=device)

def evaluate_device(model: nn.Module, data, args, progress: bool, desc: str,
                    calib: Optional[torch.Tensor] = None) -> Tuple[float, float, float]:
    """(ideal-cell accuracy, mean and std over chips of the accuracy) with the layers' config carrying
    DeviceModel.preset(args.device), on the first --device-n-test test images, on --device-chips chips
    (device seeds seed+0, seed+1, ...: the same chips for every method and task).  The layers' own
    config is restored afterwards (the adapters and the ideal-cell accuracy do not depend on it).
    --deploy: each chip is first calibrated with mta.deploy on the unlabelled images ``calib``; the
    BN state and the correction are put back after each chip."""
    dev = DeviceModel.preset(args.device)
    data = (data[0][:args.device_n_test], data[1][:args.device_n_test])
    accs = []
    ideal = evaluate(model, data, args.eval_batch, False, "")[0]  # the same images on ideal cells (paired drop)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the device path is many small int64 ops: more threads only add overhead (docs/DEVICE.md)
    try:
        with use_config(model, with_device(dev)):
            for chip in range(args.device_chips):
                program(model, seed=args.seed + chip)  # numbers the layers on the chip, draws its cells
                if not args.deploy:
                    accs.append(evaluate(model, data, args.eval_batch, progress, f"{desc} {args.device} chip {chip}")[0])
                    continue
                bns = {n: copy.deepcopy(m.state_dict()) for n, m in bn_layers(model)}
                try:
                    deploy(model, [calib[i:i + args.batch] for i in range(0, len(calib), args.batch)])
                    accs.append(evaluate(model, data, args.eval_batch, progress,
                                         f"{desc} {args.device} chip {chip} deployed")[0])
                finally:
                    for n, m in bn_layers(model):
                        m.load_state_dict(bns[n])
                    for _, m in xbar_layers(model):
                        m.set_output_correction(None, None)
    finally:
        torch.set_num_threads(threads)
    return (ideal,) + mean_std(accs)

class noise_aware_training:
    """--noise-aware: during mta.fit the layers' config carries the device model (a training chip,
    seed 10000 + --seed, not one of the evaluation chips) and every layer programs its cells anew on
    every training forward (``layer.noise_aware = True``); restored on exit."""

    def __init__(self, model: nn.Module, args) -> None:
        self.model, self.args = model, args

    def __enter__(self):
        if not self.args.noise_aware:
            return self
        self.ctx = use_config(self.model, with_device(DeviceModel.preset(self.args.device)))
        self.ctx.__enter__()
        program(self.model, seed=10_000 + self.args.seed)
        for _, m in xbar_layers(self.model):
            m.noise_aware = True
        return self

    def __exit__(self, *exc):
        if not self.args.noise_aware:
            return False
        for _, m in xbar_layers(self.model):
            m.noise_aware = False
        self.ctx.__exit__(*exc)
        return False
