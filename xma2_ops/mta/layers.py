"""Model-level helpers: the crossbar and BatchNorm layers of a model, temporary configs, submodules."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator, List, Optional, Tuple

import torch.nn as nn

from ..config import XbarConfig
from ..modules import XbarConv2d, XbarLinear


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


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)
