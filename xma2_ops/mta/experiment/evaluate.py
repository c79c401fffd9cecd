"""Accuracy of the current task: the quantised crossbar forward, and on simulated chips (--device) in
the --deploy modes naive / calibrated / chip-aware; noise-aware training (--noise-aware)."""
from __future__ import annotations

import copy
import dataclasses
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from ... import DeviceModel, program
from .. import Schedule, adapt_on_chip, deploy, layer_adapters, use_config, xbar_layers
from ..deploy import DEFAULT_INPUTS as DEPLOY_INPUTS
from ..deploy import BNStats, ideal_bn_stats
from .runs import training_schedule
from .runtime import is_dist, make_loader, run_forked
from .stats import mean_std

def count_correct(model: nn.Module, data, batch: int, batches, progress: bool = False,
                  desc: str = "") -> Tuple[int, int, Optional[torch.Tensor]]:
    """(correct predictions, images, logits of the first batch) of the test batches numbered ``batches``
    (batch b holds images [b * batch, (b + 1) * batch)), with the model as it is (call eval() first)."""
    x, y = data
    correct = images = 0
    first = None
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc=f"eval {desc}", leave=False)
    with torch.no_grad():
        for b in batches:
            xb, yb = x[b * batch:(b + 1) * batch], y[b * batch:(b + 1) * batch]
            out = model(xb)
            first = out if first is None else first
            correct += int((out.argmax(1) == yb).sum())
            images += len(yb)
    return correct, images, first

def evaluate(model: nn.Module, data, batch: int, progress: bool, desc: str,
             max_batches: Optional[int] = None) -> Tuple[float, torch.Tensor]:
    """Accuracy with the quantised crossbar forward (the layers' own config); test batches are
    sharded over ranks and the counts summed.  Also returns the logits of the first batch."""
    model.eval()
    rank, world = (dist.get_rank(), dist.get_world_size()) if is_dist() else (0, 1)
    batches = list(range(-(-len(data[1]) // batch)))[rank::world][:max_batches]
    correct, images, first = count_correct(model, data, batch, batches, progress, desc)
    counts = torch.tensor([correct, images], dtype=torch.float64)
    if is_dist():
        dist.all_reduce(counts)
    return float(counts[0] / counts[1]) * 100, first

def with_device(device: Optional[DeviceModel]):
    """A config transform for mta.use_config: the layers' config with ``device`` (None: ideal cells)."""
    return lambda c: dataclasses.replace(c, device=device)

def device_model(args) -> DeviceModel:
    """The chips' device model: DeviceModel.preset(--device), with --verify-tolerance/--verify-max-pulses
    and --remap-stuck."""
    dev = DeviceModel.preset(args.device, remap_stuck=args.remap_stuck)
    if args.verify_tolerance is not None:
        dev = dataclasses.replace(dev, verify_tolerance=args.verify_tolerance)
    if args.verify_max_pulses is not None:
        dev = dataclasses.replace(dev, verify_max_pulses=args.verify_max_pulses)
    return dev

DEPLOY_MODES = ("naive", "calibrated", "chip-aware")

@dataclasses.dataclass
class DeviceResult:
    """One adapter on --device-chips chips: the ideal-cell accuracy of the same test images and,
    per --deploy mode, the accuracy on each chip (chip c = device seed --seed + c) and the seconds
    that chip's mode took in its worker (programming, deployment or adaption, evaluation); ``wall_s``:
    the whole evaluation, workers side by side."""

    ideal: float
    n_test: int
    accs: Dict[str, List[float]]
    pes_swapped: List[Optional[int]]  # per chip: PEs the chip-aware re-selection swapped (None: no chip-aware)
    seconds: Dict[str, List[float]] = dataclasses.field(compare=False)  # (results compare equal whatever they cost)
    wall_s: float = dataclasses.field(compare=False)

    def mean_std(self, mode: str) -> Tuple[float, float]:
        return mean_std(self.accs[mode])

class _TaskSnapshot:
    """The model's current task as it is before a chip's deployment (parameters, buffers, layer
    configs, adapter phases), put back after it: every chip and mode starts from the trained adapter."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.state = copy.deepcopy(model.state_dict())
        self.configs = [m.config for _, m in xbar_layers(model)]
        self.phases = [ad.phase for _, ad in layer_adapters(model)]

    def restore(self) -> None:
        self.model.load_state_dict(self.state)
        for (_, m), cfg in zip(xbar_layers(self.model), self.configs):
            m.config = cfg
            m.set_output_correction(None, None)
        for (_, ad), phase in zip(layer_adapters(self.model), self.phases):
            ad.phase = phase

def chip_schedule(args) -> Schedule:
    """The chip-aware adaption's schedule: the training flags' (its fault-aware re-selection probed on
    --sensitivity-batches batches), with --chip-aware-epochs at the ADC-aware stage's rates only."""
    return dataclasses.replace(training_schedule(args), stage1_epochs=0, stage2_epochs=0,
                               hw_epochs=args.chip_aware_epochs)

def evaluate_device(model: nn.Module, data, args, progress: bool, desc: str, train=None,
                    ideal_all: Optional[float] = None) -> DeviceResult:
    """The current task on --device-chips chips of ``device_model(args)`` (device seeds --seed + 0,
    1, ...: the same chips for every method and task), on the first --device-n-test test images (0: all),
    in each --deploy mode: ``naive`` (programmed and read as is), ``calibrated`` (mta.deploy on the first
    DEPLOY_INPUTS unlabelled training images of ``train``, the BN base from all of them), ``chip-aware``
    (mta.adapt_on_chip on the labelled ``train``, calibrated before and after the same way).  The task
    is put back after every chip and mode, and the layers' own config restored at the end (the adapters and the ideal-cell accuracy do not depend on it).
    Every (chip, mode) is its own job: it programs the chip anew and seeds torch's RNG with the chip, so
    it gives the same result whichever process runs it and in whatever order.  The jobs run in
    --device-workers forked processes of one torch thread each (runtime.run_forked), longest first; the
    naive evaluations of the chips that would leave workers idle in the last round (chips mod workers)
    are split into one part per worker, each part reading its test batches with the read numbers a
    whole pass gives them (chip_batches); under torchrun each rank evaluates its share of every job's
    batches and the counts are summed.  ``ideal_all``: the ideal-cell accuracy on all of ``data`` when
    the caller has it (reused when every image is evaluated, instead of a second ideal-cell pass)."""
    dev = device_model(args)
    n = args.device_n_test or len(data[1])
    whole = n >= len(data[1])
    data = (data[0][:n], data[1][:n])
    modes = list(args.deploy)
    if "chip-aware" in modes and is_dist():  # each rank would train its own chip-aware adapter on its shard
        raise SystemExit("--deploy chip-aware: not supported under torchrun (one process per chip-aware adaption)")
    deploys = any(m != "naive" for m in modes)  # (naive reads the chip as programmed: no calibration inputs)
    if deploys and train is None:
        raise ValueError(f"train: --deploy {' '.join(modes)} needs the task's training images")
    t0 = time.perf_counter()
    ideal = (ideal_all if ideal_all is not None and whole else
             evaluate(model, data, args.eval_batch, False, "")[0])  # the same images on ideal cells (paired drop)
    calib = None if train is None or not deploys else [train[0][i:i + args.batch]
                                                       for i in range(0, min(len(train[0]), DEPLOY_INPUTS), args.batch)]
    workers = 1 if is_dist() else min(args.device_workers, args.device_chips)  # (ranks already share the chips' work)
    batches = -(-len(data[1]) // args.eval_batch)
    jobs = chip_jobs(modes, args.device_chips, batches, workers)
    if is_dist():  # each rank evaluates its own consecutive test batches of every (chip, mode)
        rank, world = dist.get_rank(), dist.get_world_size()
        jobs = [(c, m, batches * rank // world, batches * (rank + 1) // world) for c, m, _, _ in jobs]
    with use_config(model, with_device(dev)):
        bn_base = None if calib is None else ideal_bn_stats(model, [train[0][i:i + args.batch]
                                                                    for i in range(0, len(train[0]), args.batch)])
        job = _ChipJob(model, _TaskSnapshot(model), data, args, train, calib, bn_base, progress and workers == 1, desc)
        done = list(run_forked(job, jobs, workers))
    counts = {m: [[0, 0] for _ in range(args.device_chips)] for m in modes}
    secs = {m: [0.0] * args.device_chips for m in modes}
    swapped: List[Optional[int]] = [None] * args.device_chips
    for (chip, mode, _, _), (correct, images, pes, seconds) in zip(jobs, done):
        counts[mode][chip][0] += correct
        counts[mode][chip][1] += images
        secs[mode][chip] += seconds
        swapped[chip] = pes if pes is not None else swapped[chip]
    if is_dist():
        summed = torch.tensor([counts[m] for m in modes], dtype=torch.int64)
        dist.all_reduce(summed)
        counts = {m: summed[i].tolist() for i, m in enumerate(modes)}
    accs = {m: [float(c / k) * 100 for c, k in counts[m]] for m in modes}
    return DeviceResult(ideal, len(data[1]), accs, swapped, secs, time.perf_counter() - t0)

# (chip, mode, first test batch, end test batch): one job of evaluate_device
ChipJobSpec = Tuple[int, str, int, int]

def chip_jobs(modes: List[str], chips: int, batches: int, workers: int) -> List[ChipJobSpec]:
    """evaluate_device's jobs, longest first (chip-aware adaption, calibration, then evaluation alone);
    the naive evaluations of the last ``chips % workers`` chips split into ``workers`` parts of test
    batches, so that the last round keeps every worker busy."""
    order = sorted(modes, key=lambda m: DEPLOY_MODES.index(m), reverse=True)
    whole = chips - chips % workers if workers > 1 else chips
    jobs: List[ChipJobSpec] = [(c, m, 0, batches) for m in order for c in range(chips) if m != "naive" or c < whole]
    if "naive" in modes:
        parts = min(workers, batches)
        bounds = [batches * p // parts for p in range(parts + 1)]
        jobs += [(c, "naive", bounds[p], bounds[p + 1]) for c in range(whole, chips) for p in range(parts)]
    return jobs

def chip_batches(model: nn.Module, data, batch: int, start: int, stop: int, progress: bool = False,
                 desc: str = "") -> Tuple[int, int]:
    """(correct predictions, images) of test batches [start, stop) on the chip the layers hold now, each
    batch read with the read number it has in a whole pass from batch 0: every layer reads its cells
    once per forward, so batch b is read b after the layer's current count (the layers' counters are
    advanced by ``start`` first; a layer that reads more or less often is an error, not a different chip)."""
    model.eval()
    layers = xbar_layers(model)
    base = [m.chip.reads for _, m in layers]
    for _, m in layers:
        m.chip.reads += start
    correct, images, _ = count_correct(model, data, batch, range(start, stop), progress, desc)
    for (name, m), r0 in zip(layers, base):
        reads = m.chip.reads - r0 - start
        if start and reads not in (0, stop - start):  # (0: a layer without device cells reads nothing)
            raise RuntimeError(f"{name}: read its cells {reads} times in {stop - start} forwards; evaluating a "
                               f"chip's test batches in parts needs one read per layer and forward "
                               f"(use --device-workers 1)")
    return correct, images

@dataclasses.dataclass
class _ChipJob:
    """What evaluate_device's jobs share; called with a job (chip, mode, start, stop), it programs that
    chip, deploys it in that mode, evaluates test batches [start, stop) and returns (correct predictions,
    images, PEs the chip-aware re-selection swapped or None, seconds).  The task is put back after it."""

    model: nn.Module
    snap: _TaskSnapshot
    data: Tuple[torch.Tensor, torch.Tensor]
    args: object
    train: Optional[Tuple[torch.Tensor, torch.Tensor]]
    calib: Optional[List[torch.Tensor]]
    bn_base: Optional[BNStats]  # the adapter's ideal-cell BN statistics over all of train (mta.deploy's bn_base)
    progress: bool
    desc: str

    def __call__(self, job: ChipJobSpec) -> Tuple[int, int, Optional[int], float]:
        chip, mode, start, stop = job
        model, args = self.model, self.args
        swapped = None
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):  # (the caller's RNG stream is not consumed)
            torch.manual_seed(args.seed + chip)
            program(model, seed=args.seed + chip)  # numbers the layers on the chip, draws its cells
            try:
                if mode == "chip-aware":  # (calibrated before and after the adaption)
                    swapped = adapt_on_chip(model, make_loader(self.train, args.batch, args.seed + chip),
                                            chip_schedule(args), deploy_loader=self.calib, bn_base=self.bn_base,
                                            progress=self.progress).pes_swapped
                elif mode == "calibrated":
                    deploy(model, self.calib, bn_base=self.bn_base)
                correct, images = chip_batches(model, self.data, args.eval_batch, start, stop, self.progress,
                                               f"{self.desc} {args.device} chip {chip} {mode}")
            finally:
                self.snap.restore()
        return correct, images, swapped, time.perf_counter() - t0

class noise_aware_training:
    """--noise-aware: during mta.fit the layers' config carries the device model (a training chip,
    seed 10000 + --seed, not one of the evaluation chips) and every layer programs its cells anew on
    every training forward (``layer.noise_aware = True``); restored on exit."""

    def __init__(self, model: nn.Module, args) -> None:
        self.model, self.args = model, args

    def __enter__(self):
        if not self.args.noise_aware:
            return self
        self.ctx = use_config(self.model, with_device(device_model(self.args)))
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
