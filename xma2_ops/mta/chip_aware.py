"""Chip-aware (fault-aware) adaption of the current task to one programmed chip (docs/DEVICE.md,
"Chip-aware adaption").

A chip's stuck cells are known after its test (a march test, or the cells that fail write-verify,
SPEC 7.4); its programming variation, drift and read noise are not (they are drawn anew by every
write and read).  ``adapt_on_chip`` uses exactly that knowledge, on the chip the layers hold
(``xma2_ops.program(model, seed)``):

1. tier 1 (methods that select PEs, ``reselect=True``): every PE is scored by its share of the
   task's loss sensitivity |dL/dW * W| (the ``snip`` score) plus ``fault_weight`` times the
   first-order loss change its stuck cells cause, |dL/dW * dW_fault| (dW_fault: the weight the
   stuck cells hold minus the weight they should hold), both in units of the layer's mean snip
   score (so layers of different gradient scale compete fairly, as in the selection, and a layer
   whose faults barely matter -- few stuck cells, or stuck-aware programming -- gets a fault term
   near 0 rather than one blown up to mean 1), or per cell the PE holds under the criterion
   ``snip_per_cell``; the budget is then re-spent on the top PEs.  A PE
   whose frozen backbone cells are stuck where the task is sensitive is worth re-programming with
   weights trained around its faults; a newly selected PE starts from the backbone's weights, a
   dropped one returns to them;
2. the method's final trainable set (task weights, tier-2 scales, head, BN) is trained for
   ``Schedule.hw_epochs`` epochs through the layers' own quantised config with the chip's cells in
   the forward (``layer.noise_aware``): the chip's fault map is fixed (it depends on the device
   seed and the layer only, device.py), the programming variation and read noise are drawn anew on
   every forward from write/read counters far from those the chip's evaluation uses, so the
   training never sees the evaluation's own draws;
3. the chip is programmed again (``xma2_ops.program``): the backbone's cells are the same write as
   before, the task's re-programmed PEs get the adapted weights.

With ``deploy_loader`` (unlabelled inputs) the adaption runs on the calibrated chip: ``mta.deploy``
with CALIBRATE_BEFORE first (ADC clips from the cells, column gains fitted to the ideal-cell outputs,
BN shifted by the chip; the corrections stay on the layers), the training then sees the corrected
chip and learns what calibration leaves, with the BN statistics held; afterwards each BN moves by what
the training changed on this chip (``deploy.shift_bn``: chip estimate after minus before, on the same
inputs, so their sampling error cancels; a BN shared by every task, ``task_bn=False``, is left alone
as ``mta.deploy`` leaves it) and the corrections are folded.  The gain is not re-fitted
after the training: it would pull the chip's outputs towards the ideal-cell outputs of the *adapted*
weights and so undo what the adaption learned about this chip.  Without ``deploy_loader`` the
adaption trains on the uncalibrated chip (then run ``mta.deploy`` yourself).

The result is **chip-specific**: the adapter is for this chip (its fault map) and is not a
noise-aware adapter for any chip (``--noise-aware`` trains on a chip that is never evaluated).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..device import cell_levels, cell_weight_codes
from ..modules import program
from .layers import bn_layers, xbar_layers
from .calibration import calibrate_inputs
from .deploy import BNStats, Deployment, bn_stats, calibration_inputs, deploy, shift_bn
from .masks import from_kn
from .schedule import Schedule
from .task import layer_adapters, set_train, task_info
from .training import (_epochs, _only_trainable, _param_groups, backbone_outside_selection, grad_products,
                       probe_dense, select_pes, sensitivity_scores)

# The write and read counters the chip-aware training uses start here: far above any number the
# chip's own programming and evaluation reach, so no training draw repeats an evaluation draw.
TRAINING_COUNTER_OFFSET = 1 << 40

# The default chip-aware schedule: one epoch through the chip (the ADC-aware stage's learning rates).
CHIP_SCHEDULE = Schedule(stage1_epochs=0, stage2_epochs=0, hw_epochs=1)

# mta.deploy's steps before the adaption (``deploy_loader``), keeping the corrections on the layers for
# the training to see; afterwards the BN shift and "fold" only (module docstring: why no second gain fit)
CALIBRATE_BEFORE = ("adc", "gain", "bn_shift")


@dataclasses.dataclass
class ChipAdaption:
    """What ``adapt_on_chip`` did: the chip (device seed), the stuck cells of the backbone's
    cells it knew, the tier-1 PEs it swapped (dropped = added), the epochs trained; with
    ``deploy_loader``, the calibration before the training and the fold after it."""

    seed: int
    stuck_cells: int
    pes_swapped: int
    epochs: int
    calibrated_before: Optional[Deployment] = None
    calibrated_after: Optional[Deployment] = None


def fault_weight_error(layer: nn.Module) -> torch.Tensor:
    """The weight the stuck cells of the layer's backbone cells add to its programmed weight, in the
    weight's shape, dtype and units: per weight, the sum over polarity and slice of 2^(j cb) (L_held -
    L) (level steps; L_held = the stuck value of a stuck cell, else the level written, which differs from
    SPEC 2's L only under ``remap_stuck``), times the weight scale.  Zero without cells."""
    state = layer.programmed
    w = layer.weight
    if state is None or state.cells is None:
        return torch.zeros_like(w)
    cells = state.cells
    cb = cells.cell_bits
    ideal = cell_levels(state.codes, state.weight_bits, cb).to(device=cells.g.device, dtype=torch.float64)
    # the levels the cells hold without variation: stuck ones at their stuck value, the others at the
    # level written (SPEC 2's, or remap_stuck's compensating levels)
    held = torch.where(cells.stuck, cells.g - cells.device.g0(cb), cells.levels.to(torch.float64))
    err = held - ideal  # [2, S, K, N]
    kn = cell_weight_codes(err, cb, 0) * state.scale.to(torch.float64)  # (the shift-and-add of the cells' codes)
    return from_kn(kn, w.shape).to(device=w.device, dtype=w.dtype)


def _stuck_cells(model: nn.Module) -> int:
    return sum(int(m.programmed.cells.stuck.sum()) for _, m in xbar_layers(model)
               if m.programmed is not None and m.programmed.cells is not None)


def _check(model: nn.Module) -> int:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    task_info(model)  # a prepared task (raises otherwise)
    layers = xbar_layers(model)
    no_chip = [n for n, m in layers if m.config.device is None or m.config.weight_bits is None]
    if no_chip:
        raise ValueError(f"model: crossbar layer(s) {no_chip} have no programmed chip (config.device and "
                         "config.weight_bits are needed): program the model on its chip first")
    seeds = {m.config.device.seed for _, m in layers}
    if len(seeds) != 1:
        raise ValueError(f"model: the crossbar layers' device seeds differ ({sorted(seeds)}): one chip expected "
                         "(xma2_ops.program(model, seed))")
    return seeds.pop()


def adapt_on_chip(model: nn.Module, loader: Iterable, schedule: Schedule = CHIP_SCHEDULE, *,
                  reselect: bool = True, fault_weight: float = 1.0, score_batches: Optional[int] = None,
                  loss_fn: Callable = F.cross_entropy, calib_loader: Optional[Iterable] = None,
                  deploy_loader: Optional[Iterable] = None, bn_base: Optional[BNStats] = None,
                  progress: bool = False) -> ChipAdaption:
    """Adapt the current task of ``model`` to the chip its layers hold (module docstring) on the
    labelled batches of ``loader``; ``schedule.hw_epochs`` epochs at the ADC-aware stage's rates
    (``lr_* x hw_lr_factor``).  ``reselect``/``fault_weight``: the fault-aware tier-1 re-selection
    (methods that select PEs), scored on ``score_batches`` batches (default
    ``schedule.sensitivity_batches``).  Input ranges are re-calibrated on ``calib_loader`` (default
    ``loader``) at the end.  ``deploy_loader``: unlabelled inputs (``mta.deploy``'s loader) to
    calibrate on before the training and after it (module docstring), ``bn_base`` going to its
    ``mta.deploy``; None: no calibration.  Leaves the model in eval mode, programmed on the chip."""
    seed = _check(model)
    if isinstance(fault_weight, bool) or not isinstance(fault_weight, (int, float)) or not 0 <= fault_weight < 1e9:
        raise ValueError(f"fault_weight: expected a number >= 0, got {fault_weight!r}")
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule: expected a Schedule, got {type(schedule).__name__}")
    spec = task_info(model).spec
    batches = schedule.sensitivity_batches if score_batches is None else score_batches
    if ((score_batches is not None or (reselect and spec.impl.selects_pes))
            and (isinstance(batches, bool) or not isinstance(batches, int) or batches < 1)):
        raise ValueError(f"score_batches: expected an int >= 1 (default schedule.sensitivity_batches), got {batches!r}")
    layers = xbar_layers(model)
    program(model)  # the chip's cells as evaluated (write 0 of every layer), for the fault map
    stuck = _stuck_cells(model)
    before = chip_bn = None
    if deploy_loader is not None:
        xs = calibration_inputs(deploy_loader)  # read once: the same inputs before and after the training
        before = deploy(model, xs, CALIBRATE_BEFORE, bn_base=bn_base)
        chip_bn = before.bn_chip  # None: the BNs are the backbone's (task_bn=False), left alone
    swapped = 0
    if reselect and spec.impl.selects_pes:
        swapped = _reselect(model, loader, batches, fault_weight, loss_fn)
    saved = [(m.crossbar.chip.writes, m.crossbar.chip.reads) for _, m in layers]
    bns = [m for _, m in bn_layers(model)] if chip_bn is not None else []
    momenta = [m.momentum for m in bns]
    try:
        for m in bns:  # the calibrated statistics are held (shifted by what the training changed, below)
            m.momentum = 0.0
        for _, m in layers:
            m.noise_aware = True
            m.crossbar.chip.writes += TRAINING_COUNTER_OFFSET
            m.crossbar.chip.reads += TRAINING_COUNTER_OFFSET
        groups = [dict(g, lr=g["lr"] * schedule.hw_lr_factor) for g in _param_groups(model, "final", schedule)]
        _only_trainable(model, groups)
        _epochs(model, model, loader, groups, schedule.hw_epochs, schedule, progress, spec.label + " on chip",
                loss_fn)
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        for (_, m), (w, r) in zip(layers, saved):
            m.noise_aware = False
            m.crossbar.chip.writes, m.crossbar.chip.reads = w, r
        for p in model.parameters():
            p.requires_grad_(False)
        set_train(model, False)
    calibrate_inputs(model, calib_loader if calib_loader is not None else loader, schedule.calib_batches)
    program(model)  # the backbone's write 0 again, the task's PEs with the adapted weights
    after = None
    if deploy_loader is not None:
        if chip_bn is not None:
            shift_bn(model, chip_bn, bn_stats(model, xs))
        after = deploy(model, xs, ("fold",))
    model.eval()
    return ChipAdaption(seed, stuck, swapped, schedule.hw_epochs, before, after)


def _reselect(model: nn.Module, loader: Iterable, batches: int, fault_weight: float, loss_fn: Callable) -> int:
    """Fault-aware tier-1 selection (module docstring, 1.); returns the PEs swapped."""
    ads = layer_adapters(model)
    layers = xbar_layers(model)
    old = [ad.pe_sel.clone() for _, ad in ads]
    phases = [ad.phase for _, ad in ads]
    probe_dense(model)
    try:
        weights = [ad.task_weight.detach() for _, ad in ads]
        errors = [fault_weight_error(m) for _, m in layers]
        sens, fault = grad_products(model, loader, batches, loss_fn, weights, errors)
    finally:
        for (_, ad), ph in zip(ads, phases):
            ad.phase = ph
            ad.task_weight.requires_grad_(False)
    scores = sensitivity_scores(model, [s + fault_weight * f for s, f in zip(sens, fault)], sens)
    select_pes(model, scores)
    backbone_outside_selection(model)  # a dropped PE returns to the backbone's weights
    return int(sum(((o > 0) & (ad.pe_sel == 0)).sum() for o, (_, ad) in zip(old, ads)))
