"""Multi-task adaption methods on crossbar layers, all through the layers' ``adapter`` hook.

A task = the frozen backbone (crossbar ``weight`` of every XbarConv2d/XbarLinear) plus what the
task adds: a digital classifier head, optionally its own BatchNorm parameters/statistics, and
per crossbar layer a :class:`LayerAdapter` (installed as ``layer.adapter``) that turns learned
parameters into ``(task_weight, pe_mask, col_scale)`` at every forward.

Methods (``MethodSpec.method``):
  finetune    every PE re-programmed: all task weights trained (accuracy and cost upper bound)
  classifier  nothing re-programmed: head (and BN) only
  piggyback   element-wise binary mask on the frozen weights (real scores, threshold, STE);
              on crossbars every PE holding a masked weight is re-written with W_b * mask
  xbm         tier 2 only: binary column scale {0, 1}
  xma         tier 2 only: shift column scale {0} U {+-2^k} (masks.ShiftLevels)
  pe          tier 1 only: re-program the selected PEs (budget rho), scale 1 elsewhere
  xma2        tier 1, then tier 2 (shift) on the frozen PEs

Tier-1 selection (pe, xma2) under a budget rho (fraction of PEs, floor(rho * total), global by
default, per layer with ``per_layer=True``):
  learned      stage 1 trains real PE scores (binarised with a straight-through threshold) together
               with the task weights; the top-rho scores become the frozen PE mask
  sensitivity  per-PE sum of |dL/dW * W| ("snip") over a few batches, or of the weight change
               |W_t - W_b| after stage 1 dense fine-tuning ("delta"); normalised by the layer's
               mean so layers of different gradient scale compete fairly; top-rho PEs kept
Stage 2 trains the task weights of the selected PEs, the column scales of the others, the head
and the BN (if task-specific).

Training runs under ``train_config`` (default: the layer config with float inputs and no ADC,
i.e. weight-only fake quantisation with straight-through gradients), which is several times
cheaper than the bit-exact quantised forward; then the last ``Schedule.hw_epochs`` epochs
(ADC-aware stage, default 1) train through the layers' own config -- input quantiser, bit
slices, ADC with its clip, straight-through gradients (SPEC 5) -- so that training ends on the
hardware the accuracy is measured on.  Input ranges are calibrated before that stage and again
at the end.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..config import XbarConfig
from ..modules import XbarConv2d, XbarLinear
from ..quant import expand_tiles
from .masks import ShiftLevels, binarize, from_kn, pe_extent, pe_sum, to_kn, topk_masks, topk_masks_by_cost

METHODS = ("finetune", "classifier", "piggyback", "xbm", "xma", "pe", "xma2")
TIER1 = ("pe", "xma2")
SELECTIONS = ("learned", "sensitivity")
CRITERIA = ("snip", "delta")
BUDGET_UNITS = ("pes", "cells")

# Piggyback's initialisation and threshold (Mallya et al. 2018: scores 1e-2, threshold 5e-3);
# used for every binary {0, 1} score here (piggyback weights, xbm columns, learned PE scores).
SCORE_INIT = 1e-2
SCORE_THRESHOLD = 5e-3


@dataclass(frozen=True)
class MethodSpec:
    """What a task adapts.  ``task_bn``: the task owns its BatchNorm affine parameters and
    running statistics (default True: they cost 4 digital values per channel, and a new input
    distribution shifts every BN statistic); False keeps the backbone's BN frozen."""

    method: str
    budget: float = 0.10
    budget_unit: str = "pes"  # "pes": a fraction of the PEs; "cells": of the cells the crossbar layers use
    selection: str = "learned"
    criterion: str = "snip"
    per_layer: bool = False
    task_bn: bool = True
    levels: ShiftLevels = ShiftLevels()

    def __post_init__(self) -> None:
        # Exactly what load_task accepts (adapters._spec_from_meta), so every task saved is loadable.
        for name, allowed in (("method", METHODS), ("selection", SELECTIONS), ("criterion", CRITERIA)):
            _check_choice("MethodSpec", name, getattr(self, name), allowed)
        _check_number("MethodSpec", "budget", self.budget, "a fraction of PEs in [0, 1]", lambda v: 0.0 <= v <= 1.0)
        _check_choice("MethodSpec", "budget_unit", self.budget_unit, BUDGET_UNITS)
        for name in ("per_layer", "task_bn"):
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise TypeError(f"MethodSpec.{name}: expected True or False, got {type(v).__name__} ({v!r})")
        lv = self.levels
        if not isinstance(lv, ShiftLevels):
            raise TypeError(f"MethodSpec.levels: expected a ShiftLevels, got {type(lv).__name__} ({lv!r})")
        if not (-126 <= lv.k_min and lv.k_max <= 127 and lv.k_max - lv.k_min + 1 <= 127):
            raise ValueError(f"MethodSpec.levels: expected exponents in [-126, 127], at most 127 of them (int8 "
                             f"codes, float32 scales), got [{lv.k_min}, {lv.k_max}]")

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["levels"] = [self.levels.k_min, self.levels.k_max]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MethodSpec":
        d = dict(d)
        d["levels"] = ShiftLevels(*d["levels"])
        return cls(**d)

    @property
    def label(self) -> str:
        """e.g. "xma2@10%/snip", "pe@5%/learned", "xma/sharedBN"."""
        name = self.method
        if self.method in TIER1:
            how = "learned" if self.selection == "learned" else self.criterion
            unit = "" if self.budget_unit == "pes" else "cells"
            name += f"@{round(self.budget * 100)}%{unit}/{how}" + ("/layer" if self.per_layer else "")
        return name if self.task_bn else name + "/sharedBN"


@dataclass(frozen=True)
class Schedule:
    """Training schedule.  Every method trains ``stage2_epochs`` epochs with its final trainable
    set; tier-1 ``learned`` (and ``sensitivity`` with criterion ``delta``) first spends
    ``stage1_epochs`` on the dense search stage; ``snip`` uses ``sensitivity_batches`` batches.
    Optimiser: Adam (default) or SGD with momentum 0.9, one learning rate per parameter kind.
    The defaults were picked on the example's animals/letters tasks (1500 images, batch 64,
    144 steps): higher rates for the few adapted weights than usual fine-tuning, and small rates
    for the discrete masks and shift scales, whose straight-through updates otherwise flip levels
    too often (piggyback/xbm at 1e-3 and xma at 3e-2 fell below the classifier baseline; xma2 at
    lr_scale 3e-3 never left the level 1).  ``hw_epochs`` more epochs follow stage 2 with the same
trainable set through the layers' own config (see the module docstring); 0 trains weight-only."""

    stage1_epochs: int = 1
    stage2_epochs: int = 6
    hw_epochs: int = 1        # ADC-aware final stage: epochs through the layers' own (quantised) config
    hw_lr_factor: float = 0.3  # its learning rates, relative to stage 2 (a short fine-tune from there)
    sensitivity_batches: int = 4
    calib_batches: int = 4
    bn_batches: int = 16      # task BN statistics re-estimated with the final masks (0: keep running stats)
    optimizer: str = "adam"
    lr_weight: float = 3e-3   # task weights (finetune, pe, xma2)
    lr_head: float = 1e-2     # classifier head and BN
    lr_mask: float = 1e-4     # binary scores (piggyback, xbm, PE scores; init 1e-2, threshold 5e-3): Piggyback's lr
    lr_scale: float = 1e-2    # real parameters of the shift column scales (xma, xma2), init 1

    def __post_init__(self) -> None:
        _check_choice("Schedule", "optimizer", self.optimizer, ("adam", "sgd"))
        for name in ("stage1_epochs", "stage2_epochs", "hw_epochs", "sensitivity_batches", "calib_batches",
                     "bn_batches"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"Schedule.{name}: expected an int >= 0, got {type(v).__name__} ({v!r})")
            if v < 0:
                raise ValueError(f"Schedule.{name}: expected an int >= 0, got {v}")
        _check_number("Schedule", "hw_lr_factor", self.hw_lr_factor, "a finite value > 0",
                      lambda v: 0.0 < v < math.inf)
        for name in ("lr_weight", "lr_head", "lr_mask", "lr_scale"):
            _check_number("Schedule", name, getattr(self, name), "a finite learning rate >= 0",
                          lambda v: 0.0 <= v < math.inf)


def _check_choice(cls: str, name: str, v, allowed: tuple) -> None:
    if not isinstance(v, str):
        raise TypeError(f"{cls}.{name}: expected one of {allowed}, got {type(v).__name__} ({v!r})")
    if v not in allowed:
        raise ValueError(f"{cls}.{name}: expected one of {allowed}, got {v!r}")


def _check_number(cls: str, name: str, v, expected: str, ok: Callable[[float], bool]) -> None:
    """An int or float (not a bool) for which ``ok`` holds (NaN never does)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{cls}.{name}: expected {expected}, got {type(v).__name__} ({v!r})")
    if not ok(float(v)):
        raise ValueError(f"{cls}.{name}: expected {expected}, got {v}")


# ------------------------------------------------------------------ the per-layer adapter
class LayerAdapter(nn.Module):
    """``layer.adapter``: maps the task's learned parameters to (task_weight, pe_mask, col_scale).

    ``phase``: "dense" (all PEs on task weights: finetune, sensitivity probes), "search"
    (PE mask = binarised PE scores), "final" (frozen PE selection ``pe_sel``).
    In eval mode Piggyback's PE mask is exactly the PEs holding a changed weight (its deployed
    form); in training every PE passes the task weight so all scores get gradients."""

    def __init__(self, layer: nn.Module, spec: MethodSpec) -> None:
        super().__init__()
        self.method = spec.method
        self.levels = spec.levels
        # rows: R, or each row tile's rows under an even split (XbarConfig.row_layout)
        self.rows, self.cols = layer.config.row_layout(layer.weight[0].numel()), layer.config.cols
        self.phase = "dense" if spec.method == "finetune" else "final"
        w = layer.weight.detach()
        tr, tc = layer.tiles
        n = w.shape[0]
        self.register_buffer("pe_sel", torch.zeros(tr, tc, dtype=w.dtype, device=w.device))
        if spec.method in ("finetune",) + TIER1:
            self.task_weight = nn.Parameter(w.clone())
        if spec.method in TIER1:
            self.pe_scores = nn.Parameter(torch.full((tr, tc), SCORE_INIT, dtype=w.dtype, device=w.device))
        if spec.method == "piggyback":
            self.scores = nn.Parameter(torch.full_like(w, SCORE_INIT))
        if spec.method == "xbm":
            self.col_param = nn.Parameter(torch.full((tr, n), SCORE_INIT, dtype=w.dtype, device=w.device))
        if spec.method in ("xma", "xma2"):
            self.col_param = nn.Parameter(torch.ones(tr, n, dtype=w.dtype, device=w.device))

    def _pe_to_weight(self, m: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        k = w[0].numel()
        return from_kn(expand_tiles(m, k, w.shape[0], self.rows, self.cols), w.shape)

    def col_scale(self) -> Optional[torch.Tensor]:
        if self.method == "xbm":
            return binarize(self.col_param, SCORE_THRESHOLD)
        if self.method in ("xma", "xma2"):
            return self.levels.ste(self.col_param)
        return None

    def forward(self, layer: nn.Module) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
        w_b = layer.weight.detach()
        ones = torch.ones_like(self.pe_sel)
        if self.method == "classifier":
            return None, None, None
        if self.method in ("xbm", "xma"):
            return None, None, self.col_scale()
        if self.method == "piggyback":
            keep = binarize(self.scores, SCORE_THRESHOLD)
            if self.training:
                return w_b * keep, ones, None
            changed = (pe_sum(to_kn(1 - keep.detach()), self.rows, self.cols) > 0).to(w_b.dtype)
            return w_b * keep, changed, None
        if self.phase == "dense":
            return self.task_weight, ones, None
        if self.phase == "search":
            return self.task_weight, binarize(self.pe_scores, SCORE_THRESHOLD), None
        # final: frozen PEs keep exactly the backbone values, so the task weight scale (max |W_t|)
        # only depends on what is deployed
        w_t = torch.where(self._pe_to_weight(self.pe_sel, w_b) > 0, self.task_weight, w_b)
        return w_t, self.pe_sel, self.col_scale() if self.method == "xma2" else None


# ------------------------------------------------------------------ model-level helpers
def xbar_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (XbarConv2d, XbarLinear))]


def bn_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def weight_only(config: XbarConfig) -> XbarConfig:
    """The training config: same crossbar and weight quantiser, float inputs, no ADC."""
    return dataclasses.replace(config, input_bits=None, adc_bits=None)


@contextlib.contextmanager
def use_config(model: nn.Module, transform: Optional[Callable[[XbarConfig], XbarConfig]]) -> Iterator[None]:
    """Temporarily run every crossbar layer with ``transform(layer.config)`` (None: unchanged)."""
    layers = xbar_layers(model)
    saved = [m.config for _, m in layers]
    try:
        if transform is not None:
            for _, m in layers:
                m.config = transform(m.config)
        yield
    finally:
        for (_, m), cfg in zip(layers, saved):
            m.config = cfg


def _get(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


@dataclass
class TaskInfo:
    """What the model currently runs (kept as ``model.mta_task``)."""

    spec: MethodSpec
    head: str
    num_classes: int


def _backbone_snapshot(model: nn.Module) -> dict:
    """BN state and input calibration of the backbone, recorded on the first mta call so that a
    later task (or one with shared BN) starts from the backbone and not from the previous task."""
    snap = getattr(model, "_mta_backbone", None)
    if snap is None:
        snap = {"bn": {n: {k: v.detach().clone() for k, v in m.state_dict().items()} for n, m in bn_layers(model)},
                "ranges": {n: (m.input_range.clone(), m.input_signed.clone()) for n, m in xbar_layers(model)}}
        model._mta_backbone = snap
    return snap


def prepare(model: nn.Module, spec: MethodSpec, num_classes: int, head: str = "fc") -> TaskInfo:
    """Start a new task on ``model`` (in place): restore the backbone BN and input ranges, install a
    fresh :class:`LayerAdapter` on every crossbar layer (without ``mta.deploy``'s correction) and a
    fresh digital ``nn.Linear`` head at ``head`` (an existing nn.Linear, whose in_features is kept)."""
    # every argument checked before the model is touched (a bad task must not be trainable or saved)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(spec, MethodSpec):
        raise TypeError(f"spec: expected a MethodSpec, got {type(spec).__name__} ({spec!r})")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(f"num_classes: expected an int >= 1, got {type(num_classes).__name__} ({num_classes!r})")
    if num_classes < 1:
        raise ValueError(f"num_classes: expected an int >= 1, got {num_classes}")
    if not isinstance(head, str) or not head:
        raise TypeError(f"head: expected the name of a module of model, got {head!r}")
    if not xbar_layers(model):
        raise ValueError("model: has no XbarConv2d/XbarLinear layer (use xma2_ops.convert first)")
    try:
        old = _get(model, head)
    except AttributeError:
        raise ValueError(f"head: model has no module {head!r}") from None
    if not isinstance(old, nn.Linear) or isinstance(old, XbarLinear):
        raise TypeError(f"head: {head!r} must be a digital nn.Linear, got {type(old).__name__}")
    snap = _backbone_snapshot(model)
    with torch.no_grad():
        for n, m in bn_layers(model):
            m.load_state_dict(snap["bn"][n])
        for n, m in xbar_layers(model):
            m.input_range.copy_(snap["ranges"][n][0])
            m.input_signed.copy_(snap["ranges"][n][1])
            m.adapter = LayerAdapter(m, spec)
            m.set_output_correction(None, None)  # a deployed correction belongs to the previous task
    _set(model, head, nn.Linear(old.in_features, num_classes, device=old.weight.device, dtype=old.weight.dtype))
    info = TaskInfo(spec, head, num_classes)
    model.mta_task = info
    return info


def task_info(model: nn.Module) -> TaskInfo:
    info = getattr(model, "mta_task", None)
    if info is None:
        raise RuntimeError("model: no task prepared (call xma2_ops.mta.prepare or load_task first)")
    return info


def adapters(model: nn.Module) -> List[Tuple[str, LayerAdapter]]:
    return [(n, m.adapter) for n, m in xbar_layers(model) if isinstance(m.adapter, LayerAdapter)]


def set_train(model: nn.Module, train: bool = True) -> None:
    """model.train(train), but shared (non task-specific) BN stays in eval mode."""
    model.train(train)
    if train and not task_info(model).spec.task_bn:
        for _, m in bn_layers(model):
            m.eval()


# ------------------------------------------------------------------ training
def _param_groups(model: nn.Module, stage: str, sched: Schedule) -> List[dict]:
    """Trainable parameters of a stage ("search" or "final"), with their learning rates."""
    info = task_info(model)
    method = info.spec.method
    groups: Dict[float, List[nn.Parameter]] = {}

    def add(p: Optional[nn.Parameter], lr: float) -> None:
        if p is not None:
            groups.setdefault(lr, []).append(p)

    for p in _get(model, info.head).parameters():
        add(p, sched.lr_head)
    if info.spec.task_bn:
        for _, m in bn_layers(model):
            for p in m.parameters():
                add(p, sched.lr_head)
    for _, ad in adapters(model):
        if stage == "search":
            add(ad.task_weight, sched.lr_weight)
            if info.spec.selection == "learned":
                add(ad.pe_scores, sched.lr_mask)
            continue
        if method in ("finetune",) + TIER1:
            add(ad.task_weight, sched.lr_weight)
        if method == "piggyback":
            add(ad.scores, sched.lr_mask)
        if method == "xbm":
            add(ad.col_param, sched.lr_mask)
        if method in ("xma", "xma2"):
            add(ad.col_param, sched.lr_scale)
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


def _sensitivity(model, loader, batches: int, loss_fn) -> List[torch.Tensor]:
    """Per-PE sum of |dL/dW * W| (at the dense task weights) over ``batches`` batches."""
    ads = adapters(model)
    acc = [torch.zeros_like(ad.pe_sel) for _, ad in ads]
    set_train(model, False)  # statistics of the backbone/task, no BN update while probing
    for i, (x, y) in enumerate(loader):
        if i >= batches:
            break
        grads = torch.autograd.grad(loss_fn(model(x), y), [ad.task_weight for _, ad in ads])
        for a, (_, ad), g in zip(acc, ads, grads):
            a += pe_sum(to_kn((g * ad.task_weight).abs().detach()), ad.rows, ad.cols)
    return acc


def _normalise(scores: List[torch.Tensor]) -> List[torch.Tensor]:
    return [s / s.mean().clamp_min(1e-30) for s in scores]


def select_pes(model: nn.Module, scores: List[torch.Tensor]) -> None:
    """Freeze the top-rho PEs of ``scores`` (one [Tr, Tc] per crossbar layer) as the tier-1 mask."""
    spec = task_info(model).spec
    if spec.budget_unit == "cells":  # each PE costs the cells it holds: used rows x columns x 2 x slices
        layers = [m for _, m in xbar_layers(model) if isinstance(m.adapter, LayerAdapter)]
        costs = [pe_extent(m.weight[0].numel(), m.weight.shape[0], m.adapter.rows, m.adapter.cols).prod(-1)
                 * 2 * m.config.weight_slices for m in layers]
        masks = topk_masks_by_cost(scores, costs, spec.budget, spec.per_layer)
    else:
        masks = topk_masks(scores, spec.budget, spec.per_layer)
    with torch.no_grad():
        for (_, ad), m in zip(adapters(model), masks):
            ad.pe_sel.copy_(m)
            ad.phase = "final"


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
        if spec.method in TIER1:
            ads = adapters(model)
            if spec.selection == "learned" or spec.criterion == "delta":
                for _, ad in ads:
                    ad.phase = "search" if spec.selection == "learned" else "dense"
                groups = _param_groups(model, "search", schedule)
                _only_trainable(model, groups)
                _epochs(model, wrap(model), loader, groups, schedule.stage1_epochs, schedule, progress,
                        desc + " stage1", loss_fn)
                if spec.selection == "learned":
                    scores = [ad.pe_scores.detach().clone() for _, ad in ads]
                else:
                    scores = _normalise([pe_sum(to_kn((ad.task_weight - m.weight).abs().detach()), ad.rows, ad.cols)
                                         for (_, ad), (_, m) in zip(ads, xbar_layers(model))])
            else:
                for _, ad in ads:
                    ad.phase = "dense"
                for p in model.parameters():
                    p.requires_grad_(False)
                for _, ad in ads:
                    ad.task_weight.requires_grad_(True)
                # unwrapped: autograd.grad bypasses DDP's reducer; ranks are combined below
                scores = _normalise(_sensitivity(model, loader, schedule.sensitivity_batches, loss_fn))
            if dist.is_available() and dist.is_initialized():
                for s in scores:  # every rank must select the same PEs
                    dist.all_reduce(s)
            select_pes(model, scores)
            with torch.no_grad():  # selected PEs continue from their stage-1 weights, the others hold W_b
                for (_, ad), (_, m) in zip(ads, xbar_layers(model)):
                    ad.task_weight.copy_(torch.where(ad._pe_to_weight(ad.pe_sel, m.weight) > 0,
                                                     ad.task_weight, m.weight))
        groups = _param_groups(model, "final", schedule)
        _only_trainable(model, groups)
        _epochs(model, wrap(model), loader, groups, schedule.stage2_epochs, schedule, progress, desc, loss_fn)
    calib = calib_loader if calib_loader is not None else loader
    hw_stage = schedule.hw_epochs > 0 and train_config is not None and _has_quantiser(model)
    if hw_stage:
        # ADC-aware stage: the input quantiser needs ranges for the task's data first
        _sync_distributed(model)
        calibrate(model, calib, schedule.calib_batches)
        groups = [dict(g, lr=g["lr"] * schedule.hw_lr_factor) for g in groups]
        _epochs(model, wrap(model), loader, groups, schedule.hw_epochs, schedule, progress, desc + " adc-aware",
                loss_fn)
    for p in model.parameters():
        p.requires_grad_(False)
    if spec.task_bn and schedule.bn_batches > 0:
        # statistics of the forward that will be evaluated: the ADC-aware one after that stage
        with use_config(model, None if hw_stage else train_config):
            recalibrate_bn(model, calib, schedule.bn_batches)
    _sync_distributed(model)
    calibrate(model, calib, schedule.calib_batches)


def _has_quantiser(model: nn.Module) -> bool:
    return any(m.config.quantized for _, m in xbar_layers(model))


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Iterable, batches: int = 16) -> None:
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
def calibrate(model: nn.Module, loader: Iterable, batches: int = 4) -> None:
    """Set every crossbar layer's input range (max |x|) and sign flag from ``batches`` batches in
    eval mode, with the float training forward (the quantised one is not needed to observe
    inputs).  Under torch.distributed the ranges are reduced with MAX (the signs with OR) over
    ranks, on each layer's device (NCCL refuses CPU tensors)."""
    from ..crossbar import observe_range_and_sign  # the one rule the layers observe inputs by
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
