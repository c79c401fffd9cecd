"""Multi-task adaption methods: the user's :class:`MethodSpec` and one class per method.

A task = the frozen backbone (crossbar ``weight`` of every XbarConv2d/XbarLinear) plus what the
task adds: a digital classifier head, optionally its own BatchNorm parameters/statistics, and
per crossbar layer a :class:`~xma2_ops.mta.adapter.LayerAdapter` (installed as ``layer.adapter``)
that turns learned parameters into ``(task_weight, pe_mask, col_scale)`` at every forward.

Methods (``MethodSpec.method``; the class of each in ``METHOD_CLASSES``):
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
and the BN (if task-specific); see training.py.

Each :class:`Method` says, for its method only, what the adapter holds (``init_params``), what it
gives the layer (``forward``, ``col_scale``), what trains (``final_params``), what its mask memory
costs (``mask_bits``, ``adapter_bits``) and which tensors it writes to / reads from a task file
(``file_tensors``, ``expected_tensors``, ``load_tensors``; the format is in taskfile.py).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from .checks import check_choice, check_number
from .masks import ShiftLevels, binarize, pe_extent, pe_sum, to_kn

METHODS = ("finetune", "classifier", "piggyback", "xbm", "xma", "pe", "xma2")
TIER1 = ("pe", "xma2")
SELECTIONS = ("learned", "sensitivity")
CRITERIA = ("snip", "delta", "snip_per_cell", "delta_per_cell")
DENSE_CRITERIA = ("delta", "delta_per_cell")  # scored by the weight change of a dense stage-1 fine-tune
BUDGET_UNITS = ("pes", "cells")

# Piggyback's initialisation and threshold (Mallya et al. 2018: scores 1e-2, threshold 5e-3);
# used for every binary {0, 1} score here (piggyback weights, xbm columns, learned PE scores).
SCORE_INIT = 1e-2
SCORE_THRESHOLD = 5e-3


@dataclass(frozen=True)
class MethodSpec:
    """What a task adapts.  ``task_bn``: the task owns its BatchNorm affine parameters and
    running statistics (default True: they cost 4 digital values per channel, and a new input
    distribution shifts every BN statistic); False keeps the backbone's BN frozen.
    ``spec.impl`` is the :class:`Method` object that implements ``spec.method``."""

    method: str
    budget: float = 0.10
    budget_unit: str = "pes"  # "pes": a fraction of the PEs; "cells": of the cells the crossbar layers use
    selection: str = "learned"
    criterion: str = "snip"
    per_layer: bool = False
    task_bn: bool = True
    levels: ShiftLevels = ShiftLevels()

    def __post_init__(self) -> None:
        # Exactly what load_task accepts (taskfile._spec_from_meta), so every task saved is loadable.
        for name, allowed in (("method", METHODS), ("selection", SELECTIONS), ("criterion", CRITERIA)):
            check_choice("MethodSpec", name, getattr(self, name), allowed)
        check_number("MethodSpec", "budget", self.budget, "a fraction of PEs in [0, 1]", lambda v: 0.0 <= v <= 1.0)
        check_choice("MethodSpec", "budget_unit", self.budget_unit, BUDGET_UNITS)
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

    @property
    def impl(self) -> "Method":
        return METHOD_CLASSES[self.method]()

    @property
    def stage1(self) -> bool:
        """Whether fit trains ``Schedule.stage1_epochs`` before the tier-1 selection (learned PE scores,
        or a weight-change criterion); the snip criteria probe gradients instead."""
        return self.impl.selects_pes and (self.selection == "learned" or self.criterion in DENSE_CRITERIA)

    @property
    def probes(self) -> bool:
        """Whether fit's tier-1 selection probes gradients (the snip criteria: ``Schedule.sensitivity_batches``,
        after ``Schedule.probe_head_epochs`` of the head) instead of training a stage 1."""
        return self.impl.selects_pes and not self.stage1

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
        return self.impl.label(self) + ("" if self.task_bn else "/sharedBN")


class Expected(NamedTuple):
    """What one tensor of a task file must be: dtype, shape and a value check (None: any value)."""

    dtype: torch.dtype
    shape: tuple
    check: Optional[Callable[[torch.Tensor], bool]] = None
    what: str = ""


def finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def _binary(v: torch.Tensor) -> bool:
    return bool(((v == 0) | (v == 1)).all())


def selected_pe_slices(w_kn: torch.Tensor, mask: torch.Tensor, rows: int, cols: int) -> Iterator[tuple]:
    """(r, c, slice) of every selected PE in raster order."""
    k, n = w_kn.shape
    for r, c in mask.nonzero().tolist():
        yield r, c, (slice(r * rows, min((r + 1) * rows, k)), slice(c * cols, min((c + 1) * cols, n)))


Params = List[Tuple[Optional[nn.Parameter], float]]
Tensors = Dict[str, torch.Tensor]


class Method:
    """One adaption method.  Stateless: every hook gets the :class:`LayerAdapter` ``ad`` (and the
    layer or spec it needs).  The base class is the method that adapts nothing in the crossbars."""

    name = ""
    selects_pes = False  # tier 1: a PE selection under the budget (fit's selection stage)
    initial_phase = "final"  # LayerAdapter.phase after prepare

    def label(self, spec: MethodSpec) -> str:
        return self.name

    # --- the adapter
    def init_params(self, ad: nn.Module, w: torch.Tensor, tiles: Tuple[int, int]) -> None:
        """Register the method's parameters on ``ad`` (``w``: the backbone weight, detached)."""

    def col_scale(self, ad: nn.Module) -> Optional[torch.Tensor]:
        return None

    def forward(self, ad: nn.Module, layer: nn.Module):
        """(task_weight, pe_mask, col_scale) for ``layer`` (LayerAdapter.forward)."""
        return None, None, self.col_scale(ad)

    # --- training and cost
    def final_params(self, ad: nn.Module, sched) -> Params:
        """(parameter, learning rate) of the final stage, in the optimiser's order."""
        return []

    def mask_bits(self, pes: int, frozen_cols: int, weights: int, weight_bits: int, spec: MethodSpec) -> int:
        return 0

    def adapter_bits(self, mask_bits: int, reprog_weights: int, weight_bits: int) -> int:
        return mask_bits

    # --- the task file (taskfile.py): tensors named "<layer>.<key>"
    def file_tensors(self, ad: nn.Module, spec: MethodSpec) -> Tensors:
        return {}

    def expected_tensors(self, layer: nn.Module, spec: MethodSpec, get: Callable[[str], Optional[torch.Tensor]]
                         ) -> Dict[str, Expected]:
        """``get(key)``: the file's tensor of this layer (or None), for shapes that depend on it."""
        return {}

    def load_tensors(self, layer: nn.Module, ad: nn.Module, spec: MethodSpec, t: Tensors) -> None:
        """Copy this layer's validated tensors ``t`` (keys without the layer prefix) into ``ad``."""


class Classifier(Method):
    """Head (and BN) only: the adapter gives the layer nothing."""

    name = "classifier"


class _TaskWeights(Method):
    """Methods that re-program PEs with task weights: finetune (every PE), pe and xma2 (selected)."""

    def init_params(self, ad, w, tiles):
        ad.task_weight = nn.Parameter(w.clone())

    def forward(self, ad, layer):
        if ad.phase == "dense":
            return ad.task_weight, torch.ones_like(ad.pe_sel), None
        if ad.phase == "search":
            return ad.task_weight, binarize(ad.pe_scores, SCORE_THRESHOLD), None
        # final: frozen PEs keep exactly the backbone values, so the task weight scale (max |W_t|)
        # only depends on what is deployed
        w_b = layer.weight.detach()
        w_t = torch.where(ad._pe_to_weight(ad.pe_sel, w_b) > 0, ad.task_weight, w_b)
        return w_t, ad.pe_sel, self.col_scale(ad)

    def final_params(self, ad, sched):
        return [(ad.task_weight, sched.lr_weight)]

    def _file_mask(self, ad) -> torch.Tensor:
        return ad.pe_sel

    def file_tensors(self, ad, spec):
        mask = self._file_mask(ad)
        w_kn = to_kn(ad.task_weight.detach())
        blocks = [w_kn[sl].reshape(-1) for _, _, sl in selected_pe_slices(w_kn, mask, ad.rows, ad.cols)]
        return {"pe_mask": mask.to(torch.uint8).cpu(),
                "task_weight": (torch.cat(blocks) if blocks else w_kn.new_zeros(0)).cpu().contiguous()}

    def _mask_rule(self, tiles) -> Expected:
        return Expected(torch.uint8, tiles, _binary, "0 or 1")

    def expected_tensors(self, layer, spec, get):
        tr, tc = layer.tiles
        k, n = layer.weight[0].numel(), layer.weight.shape[0]
        mask = get("pe_mask")
        count = 0
        if mask is not None and mask.dtype == torch.uint8 and tuple(mask.shape) == (tr, tc):
            count = int((pe_extent(k, n, layer.config.row_layout(k), layer.config.cols).prod(-1) * (mask != 0)).sum())
        return {"pe_mask": self._mask_rule((tr, tc)),
                "task_weight": Expected(layer.weight.dtype, (count,), finite, "finite values")}

    def load_tensors(self, layer, ad, spec, t):
        dev = layer.weight.device
        mask = t["pe_mask"].to(dev)
        ad.pe_sel.copy_(mask)
        flat = t["task_weight"].to(dev)
        w_kn = to_kn(layer.weight.detach()).clone()
        i = 0
        for _, _, sl in selected_pe_slices(w_kn, mask, ad.rows, ad.cols):
            blk = w_kn[sl]
            w_kn[sl] = flat[i:i + blk.numel()].reshape(blk.shape)
            i += blk.numel()
        ad.task_weight.copy_(w_kn.T.reshape(layer.weight.shape))
        ad.phase = self.initial_phase


class Finetune(_TaskWeights):
    """Every PE re-programmed with trained task weights."""

    name = "finetune"
    initial_phase = "dense"

    def _file_mask(self, ad):
        return torch.ones_like(ad.pe_sel)

    def _mask_rule(self, tiles):
        return Expected(torch.uint8, tiles, lambda v: bool((v == 1).all()), "all 1 (fine-tuning re-programs every PE)")

    def mask_bits(self, pes, frozen_cols, weights, weight_bits, spec):
        return weights * weight_bits


class PE(_TaskWeights):
    """Tier 1: the selected PEs re-programmed, the others untouched."""

    name = "pe"
    selects_pes = True

    def label(self, spec):
        how = "learned" if spec.selection == "learned" else spec.criterion
        unit = "" if spec.budget_unit == "pes" else "cells"
        return self.name + f"@{round(spec.budget * 100)}%{unit}/{how}" + ("/layer" if spec.per_layer else "")

    def init_params(self, ad, w, tiles):
        super().init_params(ad, w, tiles)
        ad.pe_scores = nn.Parameter(torch.full(tiles, SCORE_INIT, dtype=w.dtype, device=w.device))

    def final_params(self, ad, sched):
        return [(ad.task_weight, sched.lr_reprogrammed)]  # (only the selected PEs' weights reach the forward)

    def mask_bits(self, pes, frozen_cols, weights, weight_bits, spec):
        return pes

    def adapter_bits(self, mask_bits, reprog_weights, weight_bits):
        return mask_bits + reprog_weights * weight_bits


class Piggyback(Method):
    """A binary mask per weight (real scores, threshold, straight-through)."""

    name = "piggyback"

    def init_params(self, ad, w, tiles):
        ad.scores = nn.Parameter(torch.full_like(w, SCORE_INIT))

    def forward(self, ad, layer):
        w_b = layer.weight.detach()
        keep = binarize(ad.scores, SCORE_THRESHOLD)
        if ad.training:
            return w_b * keep, torch.ones_like(ad.pe_sel), None
        changed = (pe_sum(to_kn(1 - keep.detach()), ad.rows, ad.cols) > 0).to(w_b.dtype)
        return w_b * keep, changed, None

    def final_params(self, ad, sched):
        return [(ad.scores, sched.lr_mask)]

    def mask_bits(self, pes, frozen_cols, weights, weight_bits, spec):
        return weights

    def file_tensors(self, ad, spec):
        keep = (ad.scores.detach() > SCORE_THRESHOLD).reshape(-1).cpu().numpy()
        return {"weight_mask": torch.from_numpy(np.packbits(keep.astype(np.uint8)))}

    def expected_tensors(self, layer, spec, get):
        numel = layer.weight.numel()
        return {"weight_mask": Expected(torch.uint8, (-(-numel // 8),),
                                        lambda v: not np.unpackbits(v.numpy())[numel:].any(),
                                        f"zero padding bits after the {numel} mask bits")}

    def load_tensors(self, layer, ad, spec, t):
        n = layer.weight.numel()
        bits = np.unpackbits(t["weight_mask"].numpy())[:n]
        ad.scores.copy_(torch.from_numpy(bits.astype(np.float32)).reshape(layer.weight.shape))


class XBM(Method):
    """Tier 2 only: a binary {0, 1} scale per column of every PE row tile."""

    name = "xbm"

    def init_params(self, ad, w, tiles):
        ad.col_param = nn.Parameter(torch.full((tiles[0], w.shape[0]), SCORE_INIT, dtype=w.dtype, device=w.device))

    def col_scale(self, ad):
        return binarize(ad.col_param, SCORE_THRESHOLD)

    def final_params(self, ad, sched):
        return [(ad.col_param, sched.lr_mask)]

    def mask_bits(self, pes, frozen_cols, weights, weight_bits, spec):
        return frozen_cols

    def file_tensors(self, ad, spec):
        return {"col_code": self.col_scale(ad).detach().to(torch.uint8).cpu()}

    def expected_tensors(self, layer, spec, get):
        return {"col_code": Expected(torch.uint8, (layer.tiles[0], layer.weight.shape[0]), _binary, "0 or 1")}

    def load_tensors(self, layer, ad, spec, t):
        ad.col_param.copy_(t["col_code"].float())


class _ShiftColumns:
    """Tier-2 shift column scales {0} U {+-2^k} (xma, xma2): the parts both methods share."""

    @staticmethod
    def label(spec) -> str:
        """The levels in the run's label when they are not the default, e.g. "/shift-4..2"."""
        lv = spec.levels
        return "" if lv == ShiftLevels() else f"/shift{lv.k_min}..{lv.k_max}"

    @staticmethod
    def label_part(label: str) -> str:
        """That part of a label ("" when it has none)."""
        m = re.search(r"/shift-?\d+\.\.-?\d+", label)
        return m.group(0) if m else ""

    @staticmethod
    def init(ad, w, tiles) -> None:
        ad.col_param = nn.Parameter(torch.ones(tiles[0], w.shape[0], dtype=w.dtype, device=w.device))

    @staticmethod
    def scale(ad) -> torch.Tensor:
        return ad.levels.ste(ad.col_param)

    @staticmethod
    def files(ad, spec) -> Tensors:
        return {"col_code": spec.levels.encode(_ShiftColumns.scale(ad).detach()).cpu()}

    @staticmethod
    def expected(layer, spec) -> Dict[str, Expected]:
        top = spec.levels.k_max - spec.levels.k_min + 1
        return {"col_code": Expected(torch.int8, (layer.tiles[0], layer.weight.shape[0]),
                                     lambda v: bool((v.abs() <= top).all()), f"shift codes in [-{top}, {top}]")}

    @staticmethod
    def load(ad, spec, t) -> None:
        ad.col_param.copy_(spec.levels.decode(t["col_code"]))


class XMA(Method):
    """Tier 2 only: shift column scales."""

    name = "xma"

    def label(self, spec):
        return self.name + _ShiftColumns.label(spec)

    def init_params(self, ad, w, tiles):
        _ShiftColumns.init(ad, w, tiles)

    def col_scale(self, ad):
        return _ShiftColumns.scale(ad)

    def final_params(self, ad, sched):
        return [(ad.col_param, sched.lr_scale)]

    def mask_bits(self, pes, frozen_cols, weights, weight_bits, spec):
        return frozen_cols * spec.levels.bits

    def file_tensors(self, ad, spec):
        return _ShiftColumns.files(ad, spec)

    def expected_tensors(self, layer, spec, get):
        return _ShiftColumns.expected(layer, spec)

    def load_tensors(self, layer, ad, spec, t):
        _ShiftColumns.load(ad, spec, t)


class XMA2(PE):
    """Tier 1 (selected PEs re-programmed), then tier 2 (shift column scales) on the frozen PEs."""

    name = "xma2"

    def label(self, spec):
        return super().label(spec) + _ShiftColumns.label(spec)

    def init_params(self, ad, w, tiles):
        super().init_params(ad, w, tiles)
        _ShiftColumns.init(ad, w, tiles)

    def col_scale(self, ad):
        return _ShiftColumns.scale(ad)

    def final_params(self, ad, sched):
        return super().final_params(ad, sched) + [(ad.col_param, sched.lr_scale)]

    def mask_bits(self, pes, frozen_cols, weights, weight_bits, spec):
        return pes + frozen_cols * spec.levels.bits

    def file_tensors(self, ad, spec):
        return {**super().file_tensors(ad, spec), **_ShiftColumns.files(ad, spec)}

    def expected_tensors(self, layer, spec, get):
        return {**super().expected_tensors(layer, spec, get), **_ShiftColumns.expected(layer, spec)}

    def load_tensors(self, layer, ad, spec, t):
        super().load_tensors(layer, ad, spec, t)
        _ShiftColumns.load(ad, spec, t)


shift_label_part = _ShiftColumns.label_part

METHOD_CLASSES: Dict[str, type] = {c.name: c for c in (Finetune, Classifier, Piggyback, XBM, XMA, PE, XMA2)}
assert tuple(METHOD_CLASSES) == METHODS and tuple(m for m in METHODS if METHOD_CLASSES[m].selects_pes) == TIER1
