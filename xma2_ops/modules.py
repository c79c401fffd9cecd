"""Drop-in crossbar layers: XbarConv2d / XbarLinear, and convert() for whole models.

Input range rule (the modules own the input quantiser):
- ``input_range`` (buffer) is the running max of |x| seen in training mode; in eval mode it is
  frozen.  A module that has never seen data (range 0) calibrates on its first batch, in any mode.
- with ``config.input_signed=None`` the sign is decided during calibration too: ``input_signed``
  (buffer) becomes True once a negative input has been seen and stays True.
- the input scale is ``input_range / Qx`` (1 when the range is 0, as for an all-zero tensor).

Tier-1/tier-2 state of the current task lives on the layer: ``task_weight`` (parameter, same
shape as ``weight``), ``pe_mask`` [Tr, Tc] and ``col_scale`` [Tr, out]; all None by default
(backbone only).  A multi-task method may instead set ``adapter``: a callable returning
``(task_weight, pe_mask, col_scale)`` for the layer, evaluated at every forward.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import XbarConfig
from .functional import xbar_conv2d, xbar_linear

AdapterFn = Callable[[nn.Module], Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]]


class _XbarMixin:
    """Config, input calibration and task state shared by the crossbar layers."""

    config: XbarConfig

    def _init_xbar(self, config: XbarConfig) -> None:
        if not isinstance(config, XbarConfig):
            raise TypeError(f"config: expected an XbarConfig, got {type(config).__name__}")
        self.config = config
        self.backend: Optional[str] = None
        self.adapter: Optional[AdapterFn] = None
        self.register_buffer("input_range", torch.zeros((), device=self.weight.device, dtype=torch.float32))
        self.register_buffer("input_signed", torch.zeros((), device=self.weight.device, dtype=torch.bool))
        self.register_parameter("task_weight", None)
        self.register_buffer("pe_mask", None)
        self.register_buffer("col_scale", None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A plain nn.Conv2d/nn.Linear state dict has no calibration: keep ours (uncalibrated = 0).
        for name in ("input_range", "input_signed"):
            if prefix + name not in state_dict:
                state_dict[prefix + name] = getattr(self, name)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @property
    def tiles(self) -> Tuple[int, int]:
        """(Tr, Tc): the PE grid of this layer."""
        return self.config.tiles(self.weight[0].numel(), self.weight.shape[0])

    def _calibrate(self, x: torch.Tensor) -> None:
        if not self.config.quantized:
            return
        if self.training or float(self.input_range) == 0.0:
            with torch.no_grad():
                self.input_range.copy_(torch.maximum(self.input_range, x.detach().abs().amax().float()))
                if self.config.input_signed is None:
                    self.input_signed.logical_or_((x < 0).any())

    def _call_kwargs(self, x: torch.Tensor) -> dict:
        """Everything the functional op needs besides x, weight and bias."""
        self._calibrate(x)
        cfg = self.config
        kwargs = {"backend": self.backend}
        if cfg.quantized:
            signed = bool(self.input_signed) if cfg.input_signed is None else cfg.input_signed
            if cfg.input_signed is None:
                cfg = dataclasses.replace(cfg, input_signed=signed)
            rng = float(self.input_range)
            kwargs["input_scale"] = rng / cfg.input_qmax(signed) if rng > 0 else 1.0
        kwargs["config"] = cfg
        if self.adapter is not None:
            tw, pm, cs = self.adapter(self)
        else:
            tw, pm, cs = self.task_weight, self.pe_mask, self.col_scale
        kwargs.update(task_weight=tw, pe_mask=pm, col_scale=cs)
        return kwargs


class XbarConv2d(_XbarMixin, nn.Conv2d):
    """nn.Conv2d computed on simulated ReRAM crossbars (same weight/bias names and shapes)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 config: XbarConfig = XbarConfig()) -> None:
        if groups != 1:
            raise ValueError(f"groups: XbarConv2d supports groups=1 only, got {groups}")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self._init_xbar(config)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, config: XbarConfig) -> "XbarConv2d":
        """A crossbar copy of ``conv`` with the same weight and bias."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv: expected an nn.Conv2d, got {type(conv).__name__}")
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.groups, conv.bias is not None, conv.padding_mode, conv.weight.device, conv.weight.dtype,
                  config=config)
        with torch.no_grad():
            new.weight.copy_(conv.weight)
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
        new.train(conv.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return xbar_conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, 1, **self._call_kwargs(x))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", config={self.config}"


class XbarLinear(_XbarMixin, nn.Linear):
    """nn.Linear computed on simulated ReRAM crossbars (same weight/bias names and shapes)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 config: XbarConfig = XbarConfig()) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_xbar(config)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: XbarConfig) -> "XbarLinear":
        """A crossbar copy of ``linear`` with the same weight and bias."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.device,
                  linear.weight.dtype, config=config)
        with torch.no_grad():
            new.weight.copy_(linear.weight)
            if linear.bias is not None:
                new.bias.copy_(linear.bias)
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return xbar_linear(x, self.weight, self.bias, **self._call_kwargs(x))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", config={self.config}"


def convert(model: nn.Module, config: XbarConfig, *, linear: bool = True,
            skip: Optional[Callable[[str, nn.Module], bool]] = None) -> nn.Module:
    """Replace every nn.Conv2d (and nn.Linear when ``linear``) in ``model`` by its crossbar twin,
    in place, keeping weights; returns ``model``.  ``skip(name, module)`` -> True keeps a layer
    digital.  Grouped convolutions stay digital, with a warning (no PE mapping is defined for them)."""
    if not isinstance(config, XbarConfig):
        raise TypeError(f"config: expected an XbarConfig, got {type(config).__name__}")
    if isinstance(model, (XbarConv2d, XbarLinear)):
        return model
    for name, child in list(model.named_children()):
        if isinstance(child, (XbarConv2d, XbarLinear)) or (skip is not None and skip(name, child)):
            continue
        if type(child) is nn.Conv2d:
            if child.groups != 1:
                warnings.warn(f"convert: {name} has groups={child.groups}; it stays a digital nn.Conv2d")
                continue
            setattr(model, name, XbarConv2d.from_conv(child, config))
        elif type(child) is nn.Linear and linear:
            setattr(model, name, XbarLinear.from_linear(child, config))
        else:
            convert(child, config, linear=linear, skip=skip)
    return model
