"""Drop-in crossbar layers: XbarConv2d / XbarLinear, convert() for whole models, program().

Input range rule (the modules own the input quantiser):
- ``input_range`` (buffer) is the running max of |x| seen in training mode; in eval mode it is
  frozen.  A module that has never seen data (range 0) calibrates on its first batch, in any mode.
- with ``config.input_signed=None`` the sign is decided during calibration too: ``input_signed``
  (buffer) becomes True once a negative input has been seen and stays True.
- the input scale is ``input_range / Qx`` (1 when the range is 0, as for an all-zero tensor).

Programmed state (see programmed.py; the layer's ``crossbar``, crossbar.py, holds it): a layer programs its weights onto its crossbars
(``layer.program()``, ``xma2_ops.program(model)``, or automatically on the first forward).  In
training mode it re-programs on every forward; in eval mode it keeps the programmed state while
the weight's content is unchanged (compared exactly at every forward, inside the call's one host
synchronisation), so optimizer steps, ``load_state_dict``, ``.to()`` and any in-place or ``.data``
write are all seen.  ``layer.programmed`` is what the backbone PEs hold now.

Tier-1/tier-2 state of the current task lives on the layer: ``task_weight`` (parameter, same
shape as ``weight``), ``pe_mask`` [Tr, Tc] and ``col_scale`` [Tr, out]; all None by default
(backbone only).  A multi-task method may instead set ``adapter``: a callable returning
``(task_weight, pe_mask, col_scale)`` for the layer, evaluated at every forward.

Digital output correction (``mta.deploy``'s "gain"/"drift" steps): ``out_gain`` and ``out_offset``
[out] (non-persistent buffers, None by default; they travel in the task file, not the state dict,
since they belong to one chip and one task).  When set, the crossbar output y (before the bias) of
every output column n becomes ``out_gain[n] * y + out_offset[n]``; without them the forward is
exactly today's.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import XbarConfig
from .crossbar import Crossbar, TaskState
from .programmed import ChipPosition, ProgrammedWeight
from .quant import expand_tiles

AdapterFn = Callable[[nn.Module], TaskState]


class _XbarMixin:
    """Config, input range and sign, task state and the Crossbar shared by the crossbar layers."""

    def _init_xbar(self, config: XbarConfig) -> None:
        self.crossbar = Crossbar()  # programmed state, chip position, input sign as last read
        self.config = config
        self.backend: Optional[str] = None
        self.adapter: Optional[AdapterFn] = None
        # Noise-aware training (device model): in training mode, program the cells anew on every
        # forward (fresh programming variation per batch, the chip's faults kept); False: train on
        # ideal cells.  Eval mode always uses the device model of the config.
        self.noise_aware: bool = False
        # The forward on ideal cells (the weight codes through the same periphery, programmed into a
        # throw-away cache: the chip's cells and counters untouched): mta.deploy's reference passes.
        self.ideal_cells: bool = False
        self.register_buffer("input_range", torch.zeros((), device=self.weight.device, dtype=torch.float32))
        self.register_buffer("input_signed", torch.zeros((), device=self.weight.device, dtype=torch.bool))
        self.register_parameter("task_weight", None)
        self.register_buffer("pe_mask", None)
        self.register_buffer("col_scale", None)
        self.register_buffer("out_gain", None, persistent=False)
        self.register_buffer("out_offset", None, persistent=False)

    @property
    def config(self) -> XbarConfig:
        return self._xbar_config

    @config.setter
    def config(self, value: XbarConfig) -> None:
        if not isinstance(value, XbarConfig):
            raise TypeError(f"config: expected an XbarConfig, got {type(value).__name__}")
        self.__dict__["_xbar_config"] = value

    @property
    def chip(self) -> ChipPosition:
        """The layer's place on the chip and its write/read counters (SPEC 7 draws)."""
        return self.crossbar.chip

    @chip.setter
    def chip(self, value: ChipPosition) -> None:
        self.crossbar.chip = value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A plain nn.Conv2d/nn.Linear state dict has no calibration: keep ours (uncalibrated = 0).
        for name in ("input_range", "input_signed"):
            if prefix + name not in state_dict:
                state_dict[prefix + name] = getattr(self, name)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self.crossbar.signed_hint = None

    @property
    def tiles(self) -> Tuple[int, int]:
        """(Tr, Tc): the PE grid of this layer."""
        return self.config.tiles(self.weight[0].numel(), self.weight.shape[0])

    @property
    def programmed(self) -> Optional[ProgrammedWeight]:
        """What the backbone PEs hold (weight codes and scale), None before the first programming."""
        return self.crossbar.programmed

    @property
    def programmed_task(self) -> Optional[ProgrammedWeight]:
        """What the re-programmed (tier-1) PEs hold for the current task, if any."""
        return self.crossbar.programmed_task

    @torch.no_grad()
    def program(self) -> "_XbarMixin":
        """Program the weights onto the crossbars now (otherwise done by the first forward); the
        state is kept until the weight's content changes.  Returns the layer."""
        if self.config.weight_bits is None:  # the ideal crossbar holds the float weights themselves
            return self
        task_weight = self.adapter(self)[0] if self.adapter is not None else self.task_weight
        self.crossbar.program(self.weight, task_weight, self.config, self.input_signed)
        return self

    @torch.no_grad()
    def known_faults(self) -> torch.Tensor:
        """The cells this layer's chip knows to be faulty (write-verify, SPEC 7.4): bool [2, S, K, N]
        -- polarity (+, -), weight slice, GEMM row k and column n of the weight's [K, N] layout, the
        layout of ``programmed.cells`` -- True where the write a cell holds now used every
        ``verify_max_pulses`` pulse and still failed verify.  Cells of re-programmed PEs (``pe_mask``
        > 0, as the forward gets it now) hold the task write, the others the backbone write.  All
        False without verify (or without non-ideal cells).  Programs the layer first if needed
        (``program()``)."""
        cfg = self.config
        if cfg.weight_bits is None:
            raise ValueError("known_faults: the layer holds no programmed cells (config.weight_bits is None)")
        self.program()
        k, n = self.weight[0].numel(), self.weight.shape[0]
        shape = (2, cfg.weight_slices, k, n)
        backbone, task = self.programmed, self.programmed_task
        if backbone is None or backbone.cells is None:  # ideal cells: nothing to know
            return torch.zeros(shape, dtype=torch.bool, device=self.weight.device)
        faults = backbone.cells.known_faults()
        task_weight, pe_mask = self.adapter(self)[:2] if self.adapter is not None else (self.task_weight, self.pe_mask)
        if task_weight is not None and pe_mask is not None and task is not None and task.cells is not None:
            sel = expand_tiles(pe_mask.detach() > 0, k, n, cfg.row_layout(k), cfg.cols).to(faults.device)
            faults = torch.where(sel, task.cells.known_faults(), faults)
        return faults

    def observe_input(self, x: torch.Tensor) -> None:
        """Update ``input_range`` / ``input_signed`` from x as a forward does (module docstring), without
        running the layer; tensor ops only (no host synchronisation)."""
        self.crossbar.observe_input(x, self.config, self.input_range, self.input_signed, self.training)

    def _task_state(self) -> TaskState:
        """(task_weight, pe_mask, col_scale) now: the adapter's, or the layer's own."""
        if self.adapter is not None:
            return self.adapter(self)
        return self.task_weight, self.pe_mask, self.col_scale

    def _crossbar_call(self, x: torch.Tensor, bias: Optional[torch.Tensor], reuse: bool,
                       ideal_cells: bool = False) -> torch.Tensor:
        """This layer on its crossbar (x already padded for a non-zero padding mode)."""
        return self.crossbar(x, self.weight, bias, self._conv_geometry(), config=self.config, backend=self.backend,
                             task_state=self._task_state, input_range=self.input_range,
                             input_signed=self.input_signed, training=self.training,
                             cells=not self.training or self.noise_aware, reuse=reuse, ideal_cells=ideal_cells)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._padded(x)
        if self.out_gain is None:  # no correction: exactly the plain op
            return self._crossbar_call(x, self.bias, reuse=not self.training, ideal_cells=self.ideal_cells)
        return self._corrected(self._crossbar_call(x, None, reuse=not self.training, ideal_cells=self.ideal_cells))

    def set_output_correction(self, gain: Optional[torch.Tensor], offset: Optional[torch.Tensor]) -> None:
        """Set (or, with two Nones, remove) the digital per-column correction y <- gain * y + offset
        applied to the crossbar output before the bias; both [out], finite."""
        if (gain is None) != (offset is None):
            raise ValueError("gain, offset: expected both tensors or both None")
        if gain is None:
            self.out_gain = self.out_offset = None
            return
        n = self.weight.shape[0]
        for name, t in (("gain", gain), ("offset", offset)):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (n,):
                raise ValueError(f"{name}: expected a tensor of shape ({n},), got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name}: expected finite values, got NaN or inf")
        self.out_gain = gain.detach().to(device=self.weight.device, dtype=torch.float32).clone()
        self.out_offset = offset.detach().to(device=self.weight.device, dtype=torch.float32).clone()

    @torch.no_grad()
    def crossbar_output(self, x: torch.Tensor, cells: bool = True) -> torch.Tensor:
        """The crossbar output before the correction and the bias, in eval semantics (the layer's
        input calibration and programmed state).  ``cells=True``: the chip (one read of the cells, as
        the forward does); ``cells=False``: the same layer on ideal cells (its weight codes through
        the same periphery), programmed into a throw-away cache so that the chip's state and its
        write/read counters are untouched."""
        return self._crossbar_call(self._padded(x), None, reuse=True, ideal_cells=not cells)

    def _corrected(self, y: torch.Tensor) -> torch.Tensor:
        """gain * y + offset (per output column), then the bias."""
        shape = (-1, 1, 1) if self._conv_geometry() is not None else (-1,)
        y = y * self.out_gain.view(shape).to(y.dtype) + self.out_offset.view(shape).to(y.dtype)
        return y if self.bias is None else y + self.bias.view(shape)


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

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        """x after a non-zero padding mode (the crossbar call then pads nothing)."""
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
        return x

    def _conv_geometry(self) -> Tuple[tuple, tuple, tuple]:
        padding = self.padding if self.padding_mode == "zeros" else 0
        return self.stride, padding, self.dilation

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

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _conv_geometry(self) -> None:
        return None

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


def program(model: nn.Module, seed: Optional[int] = None) -> nn.Module:
    """Program every crossbar layer of ``model`` now (``layer.program()``); returns ``model``.

    With a device model (``XbarConfig.device``), layers are numbered in ``model.modules()`` order
    (their place on the chip) and their write/read counters restart, so the same seed gives the
    same chip; ``seed`` replaces the device models' seeds (a new chip)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63):
        raise ValueError(f"seed: expected an int in [0, 2**63) or None, got {seed!r}")
    layers = [m for m in model.modules() if isinstance(m, (XbarConv2d, XbarLinear))]
    for index, m in enumerate(layers):
        with m.crossbar.lock:  # no thread's forward programs the layer in between
            if seed is not None and m.config.device is not None:
                m.config = dataclasses.replace(m.config, device=dataclasses.replace(m.config.device, seed=seed))
            m.crossbar.reset(ChipPosition(layer=index))
            m.program()
    return model
