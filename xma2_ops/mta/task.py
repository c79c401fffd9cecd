"""The task a model runs: ``prepare`` (start a task), ``task_info``, the layers' adapters, train mode."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import torch
import torch.nn as nn

from ..modules import XbarLinear
from .adapter import LayerAdapter
from .layers import bn_layers, get_module, set_module, xbar_layers
from .methods import MethodSpec


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
        old = get_module(model, head)
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
    set_module(model, head, nn.Linear(old.in_features, num_classes, device=old.weight.device, dtype=old.weight.dtype))
    info = TaskInfo(spec, head, num_classes)
    model.mta_task = info
    return info


def task_info(model: nn.Module) -> TaskInfo:
    info = getattr(model, "mta_task", None)
    if info is None:
        raise RuntimeError("model: no task prepared (call xma2_ops.mta.prepare or load_task first)")
    return info


def layer_adapters(model: nn.Module) -> List[Tuple[str, LayerAdapter]]:
    """(name, adapter) of every crossbar layer that holds a task's LayerAdapter (``mta.adapters``)."""
    return [(n, m.adapter) for n, m in xbar_layers(model) if isinstance(m.adapter, LayerAdapter)]


def set_train(model: nn.Module, train: bool = True) -> None:
    """model.train(train), but shared (non task-specific) BN stays in eval mode."""
    model.train(train)
    if train and not task_info(model).spec.task_bn:
        for _, m in bn_layers(model):
            m.eval()
