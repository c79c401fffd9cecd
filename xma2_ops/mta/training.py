"""Training a prepared task: ``fit`` (stages, PE selection, ADC-aware stage), its parameter groups.

Training runs under ``train_config`` (default: the layer config with float inputs and no ADC,
i.e. weight-only fake quantisation with straight-through gradients), which is several times
cheaper than the bit-exact quantised forward; then the last ``Schedule.hw_epochs`` epochs
(ADC-aware stage, default 1) train through the layers' own config -- input quantiser, bit
slices, ADC with its clip, straight-through gradients (SPEC 5) -- so that training ends on the
hardware the accuracy is measured on.  Input ranges are calibrated before that stage and again
at the end.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..config import XbarConfig
from .adapter import LayerAdapter
from .calibration import calibrate_inputs, refresh_bn_stats
from .layers import bn_layers, get_module, use_config, weight_only, xbar_layers
from .masks import pe_cell_counts, pe_sum, to_kn, topk_masks, topk_masks_by_cost
from .schedule import Schedule
from .task import layer_adapters, set_train, task_info


# ------------------------------------------------------------------ training
def _param_groups(model: nn.Module, stage: str, sched: Schedule) -> List[dict]:
    """Trainable parameters of a stage ("head": head and task BN only, "search" or "final"), with their
    learning rates."""
    info = task_info(model)
    impl = info.spec.impl
    groups: Dict[float, List[nn.Parameter]] = {}

    def add(p: Optional[nn.Parameter], lr: float) -> None:
        if p is not None:
            groups.setdefault(lr, []).append(p)

    for p in get_module(model, info.head).parameters():
        add(p, sched.lr_head)
    if info.spec.task_bn:
        for _, m in bn_layers(model):
            for p in m.parameters():
                add(p, sched.lr_head)
    for _, ad in layer_adapters(model):
        if stage == "head":
            break
        if stage == "search":
            add(ad.task_weight, sched.lr_weight)
            if info.spec.selection == "learned":
                add(ad.pe_scores, sched.lr_mask)
            continue
        for p, lr in impl.final_params(ad, sched):
            add(p, lr)
    return [{"params": ps, "lr": lr} for lr, ps in groups.items()]


def _only_trainable(model: nn.Module, groups: List[dict]) -> None:
    keep = {id(p) for g in groups for p in g["params"]}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def _optimizer(groups: List[dict], sched: Schedule) -> torch.optim.Optimizer:
    if sched.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=0.9)
    return torch.optim.Adam(groups, lr=groups[0]["lr"])


def _epochs(model, net, loader, groups, epochs: int, sched: Schedule, progress: bool, desc: str,
            loss_fn) -> None:
    if not groups or epochs == 0:
        return
    opt = _optimizer(groups, sched)
    for epoch in range(epochs):
        if hasattr(getattr(loader, "sampler", None), "set_epoch"):
            loader.sampler.set_epoch(epoch)
        set_train(model, True)
        it = loader
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(loader, desc=f"{desc} ep{epoch + 1}/{epochs}", leave=False)
        for x, y in it:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(x), y)
            loss.backward()
            opt.step()


def grad_products(model, loader, batches: int, loss_fn, *factors: List[torch.Tensor]) -> List[List[torch.Tensor]]:
    """For each of ``factors`` (one tensor per crossbar layer, in its weight's shape), per layer the
    per-PE sum of |dL/dW * factor| over ``batches`` batches, dL/dW taken at the dense task weights
    (the caller sets the phase and ``requires_grad``); the snip score is ``factor = W``."""
    ads = layer_adapters(model)
    acc = [[torch.zeros_like(ad.pe_sel) for _, ad in ads] for _ in factors]
    set_train(model, False)  # statistics of the backbone/task, no BN update while probing
    for i, (x, y) in enumerate(loader):
        if i >= batches:
            break
        grads = torch.autograd.grad(loss_fn(model(x), y), [ad.task_weight for _, ad in ads])
        for sums, fac in zip(acc, factors):
            for a, (_, ad), g, f in zip(sums, ads, grads, fac):
                a += pe_sum(to_kn((g * f).abs().detach()), ad.rows, ad.cols)
    return acc


def _sensitivity(model, loader, batches: int, loss_fn) -> List[torch.Tensor]:
    """Per-PE sum of |dL/dW * W| (at the dense task weights) over ``batches`` batches."""
    return grad_products(model, loader, batches, loss_fn, [ad.task_weight.detach() for _, ad in layer_adapters(model)])[0]


def _normalise(scores: List[torch.Tensor], by: Optional[List[torch.Tensor]] = None) -> List[torch.Tensor]:
    """``scores`` in units of their layer's mean of ``by`` (default: of themselves)."""
    return [s / b.mean().clamp_min(1e-30) for s, b in zip(scores, scores if by is None else by)]


def sensitivity_scores(model: nn.Module, sums: List[torch.Tensor],
                       snip: Optional[List[torch.Tensor]] = None) -> List[torch.Tensor]:
    """Per-PE selection scores from per-PE sums (snip, or the weight change for the delta criteria) by the
    task's criterion: ``*_per_cell`` divides each by the cells the PE holds (per cell written, comparable
    across layers: the greedy order of a knapsack over cells); otherwise each is in units of its layer's
    mean ``snip`` score (default: ``sums`` itself), so layers of different gradient scale compete fairly."""
    if task_info(model).spec.criterion.endswith("_per_cell"):
        return [s / c.to(s) for s, c in zip(sums, pe_cells(model))]
    return _normalise(sums, snip)


def pe_cells(model: nn.Module) -> List[torch.Tensor]:
    """[Tr, Tc] cells each PE holds (masks.pe_cell_counts), per adapted crossbar layer."""
    return [pe_cell_counts(m) for _, m in xbar_layers(model) if isinstance(m.adapter, LayerAdapter)]


def select_pes(model: nn.Module, scores: List[torch.Tensor]) -> None:
    """Freeze the top-rho PEs of ``scores`` (one [Tr, Tc] per crossbar layer) as the tier-1 mask."""
    spec = task_info(model).spec
    if spec.budget_unit == "cells":
        masks = topk_masks_by_cost(scores, pe_cells(model), spec.budget, spec.per_layer)
    else:
        masks = topk_masks(scores, spec.budget, spec.per_layer)
    with torch.no_grad():
        for (_, ad), m in zip(layer_adapters(model), masks):
            ad.pe_sel.copy_(m)
            ad.phase = "final"


def probe_dense(model: nn.Module) -> None:
    """Every PE on its task weight ("dense" phase) and only the task weights trainable: the state the
    sensitivity scores are taken in."""
    for p in model.parameters():
        p.requires_grad_(False)
    for _, ad in layer_adapters(model):
        ad.phase = "dense"
        ad.task_weight.requires_grad_(True)


@torch.no_grad()
def backbone_outside_selection(model: nn.Module) -> None:
    """Every PE outside the tier-1 selection holds the backbone's weights again (a selected PE keeps its
    task weights)."""
    for (_, ad), (_, m) in zip(layer_adapters(model), xbar_layers(model)):
        ad.task_weight.copy_(torch.where(ad._pe_to_weight(ad.pe_sel, m.weight) > 0, ad.task_weight, m.weight))


def _sync_distributed(model: nn.Module) -> None:
    """Make every rank hold rank 0's parameters and buffers (BN statistics drift per rank)."""
    if dist.is_available() and dist.is_initialized():
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(t.data, 0)


def fit(model: nn.Module, loader: Iterable, schedule: Schedule = Schedule(), *,
        train_config: Optional[Callable[[XbarConfig], XbarConfig]] = weight_only,
        wrap: Optional[Callable[[nn.Module], nn.Module]] = None, progress: bool = True,
        loss_fn: Callable = F.cross_entropy, calib_loader: Optional[Iterable] = None) -> None:
    """Train the prepared task on ``loader`` (batches of (x, y)), then calibrate input ranges.

    ``wrap(model)`` may return e.g. a DistributedDataParallel wrapper; it is re-applied for every
    stage because the trainable set changes.  ``train_config`` maps each layer's config to the one
    used for training (None: train with the layers' own config, e.g. bit-exact quantised)."""
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule: expected a Schedule, got {type(schedule).__name__}")
    info = task_info(model)
    spec = info.spec
    wrap = wrap or (lambda m: m)
    desc = spec.label
    with use_config(model, train_config):
        if spec.impl.selects_pes:
            ads = layer_adapters(model)
            if spec.stage1:
                for _, ad in ads:
                    ad.phase = "search" if spec.selection == "learned" else "dense"
                groups = _param_groups(model, "search", schedule)
                _only_trainable(model, groups)
                _epochs(model, wrap(model), loader, groups, schedule.stage1_epochs, schedule, progress,
                        desc + " stage1", loss_fn)
                if spec.selection == "learned":
                    scores = [ad.pe_scores.detach().clone() for _, ad in ads]
                else:
                    scores = sensitivity_scores(model, [pe_sum(to_kn((ad.task_weight - m.weight).abs().detach()),
                                                               ad.rows, ad.cols)
                                                        for (_, ad), (_, m) in zip(ads, xbar_layers(model))])
            else:  # spec.probes
                if schedule.sensitivity_batches < 1:  # all-zero scores would select arbitrary PEs
                    raise ValueError(f"Schedule.sensitivity_batches: criterion {spec.criterion!r} needs >= 1 batch, "
                                     f"got {schedule.sensitivity_batches}")
                probe_dense(model)
                if schedule.probe_head_epochs:
                    # the probe's gradients through a fitted head; the dense task weights are the backbone's
                    groups = _param_groups(model, "head", schedule)
                    _only_trainable(model, groups)
                    _epochs(model, wrap(model), loader, groups, schedule.probe_head_epochs, schedule, progress,
                            desc + " probe head", loss_fn)
                    probe_dense(model)
                # unwrapped: autograd.grad bypasses DDP's reducer; ranks are combined below
                scores = sensitivity_scores(model, _sensitivity(model, loader, schedule.sensitivity_batches, loss_fn))
            if dist.is_available() and dist.is_initialized():
                for s in scores:  # every rank must select the same PEs
                    dist.all_reduce(s)
            select_pes(model, scores)
            backbone_outside_selection(model)  # selected PEs continue from their stage-1 weights
        groups = _param_groups(model, "final", schedule)
        _only_trainable(model, groups)
        _epochs(model, wrap(model), loader, groups, schedule.stage2_epochs, schedule, progress, desc, loss_fn)
    calib = calib_loader if calib_loader is not None else loader
    hw_stage = schedule.hw_epochs > 0 and train_config is not None and _has_quantiser(model)
    if hw_stage:
        # ADC-aware stage: the input quantiser needs ranges for the task's data first
        _sync_distributed(model)
        calibrate_inputs(model, calib, schedule.calib_batches)
        groups = [dict(g, lr=g["lr"] * schedule.hw_lr_factor) for g in groups]
        _epochs(model, wrap(model), loader, groups, schedule.hw_epochs, schedule, progress, desc + " adc-aware",
                loss_fn)
    for p in model.parameters():
        p.requires_grad_(False)
    if spec.task_bn and schedule.bn_batches > 0:
        # statistics of the forward that will be evaluated: the ADC-aware one after that stage
        with use_config(model, None if hw_stage else train_config):
            refresh_bn_stats(model, calib, schedule.bn_batches)
    _sync_distributed(model)
    calibrate_inputs(model, calib, schedule.calib_batches)


def _has_quantiser(model: nn.Module) -> bool:
    return any(m.config.quantized for _, m in xbar_layers(model))
