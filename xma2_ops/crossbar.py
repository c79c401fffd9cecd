"""Crossbar: what a crossbar layer (modules.py) owns besides its parameters and buffers.

- the programmed state of its weights: one ``ProgrammingCache`` per weight slot (backbone, task),
  sharing one lock (programmed.py explains reuse and threads);
- its ``ChipPosition``: the layer's place on the chip and its write/read counters (SPEC 7 draws);
- its input calibration: ``observe_input`` updates the layer's ``input_range`` / ``input_signed``
  buffers (they stay on the layer: they are state_dict keys), ``input_scale`` and ``input_sign``
  read them for a call.

``observe_range_and_sign`` is the one rule for "what does this batch say about the input range and
sign"; the layers, ``calibrate_adc`` (through the layers) and ``mta.calibrate`` use it.

A call (``Crossbar.__call__``) observes the input, then runs the one body of every crossbar call
(forward.py) with the layer's state.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from . import forward
from .config import XbarConfig
from .programmed import ChipPosition, ProgrammedWeight, ProgrammingCache, _Lock

TaskState = Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]


def observe_range_and_sign(x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(max |x| as a float32 0-dim tensor, whether some x < 0 as a 0-dim bool tensor) on x's device,
    without a host synchronisation (one pass over x); (0, None) for an empty x."""
    if not x.numel():
        return x.new_zeros((), dtype=torch.float32), None
    lo, hi = torch.aminmax(x.detach())  # one pass gives the range and the sign
    return torch.maximum(-lo, hi).float(), lo < 0


class Crossbar:
    """The programmed state, chip position and input calibration of one crossbar layer."""

    def __init__(self) -> None:
        self.lock = _Lock()  # one per layer: its programming happens once, whatever the threads (programmed.py)
        self.caches = (ProgrammingCache(self.lock), ProgrammingCache(self.lock))  # backbone weight, task weight
        self.chip = ChipPosition()  # layer index on the chip, write/read counters (device model draws)
        self.signed_hint: Optional[bool] = None  # input_signed as last read (for torch.compile)

    # ---- programmed state
    @property
    def programmed(self) -> Optional[ProgrammedWeight]:
        return self.caches[0].state

    @property
    def programmed_task(self) -> Optional[ProgrammedWeight]:
        return self.caches[1].state

    def program(self, weight: torch.Tensor, task_weight: Optional[torch.Tensor], config: XbarConfig,
                input_signed: torch.Tensor) -> None:
        """Program the weights (derived scales) into the caches now, unless they are current."""
        forward.program_layer(weight, task_weight, config, self.caches, self.chip)
        self.signed_hint = bool(input_signed)

    def reset(self, chip: ChipPosition) -> None:
        """A new place on the chip, nothing programmed (the caller holds ``lock``)."""
        self.chip = chip
        for cache in self.caches:
            cache.clear()

    # ---- input calibration
    @staticmethod
    def observe_input(x: torch.Tensor, config: XbarConfig, input_range: torch.Tensor, input_signed: torch.Tensor,
                      training: bool) -> None:
        """Update the running input range (max |x|) and sign in place: in training mode always, in eval
        mode only while uncalibrated (range 0).  Tensor ops only (no host synchronisation): the range and
        sign are read by the op."""
        if not config.quantized:
            return
        with torch.no_grad():
            amax, negative = observe_range_and_sign(x)
            learn = torch.ones((), dtype=torch.bool, device=x.device) if training else input_range == 0
            input_range.copy_(torch.where(learn, torch.maximum(input_range, amax), input_range))
            if config.input_signed is None and negative is not None:
                input_signed.logical_or_(learn & negative)

    def input_sign(self, input_signed: torch.Tensor, training: bool):
        """The calibrated sign: eagerly, the buffer itself (read in the op's one synchronisation, which
        reports it back); under torch.compile in eval mode, the value last read, checked against the
        buffer on the device (a stale value fails loudly, it is never used silently)."""
        if not torch.compiler.is_compiling():
            return input_signed
        if training or self.signed_hint is None:
            return bool(input_signed)  # a graph break, but right
        torch._assert_async(input_signed == self.signed_hint,
                            "XbarConv2d/XbarLinear: input_signed changed since this layer last ran eagerly; "
                            "run one eager forward (or layer.program()) before the compiled model")
        return self.signed_hint

    @staticmethod
    def input_scale(config: XbarConfig, input_range: torch.Tensor, input_signed: torch.Tensor) -> torch.Tensor:
        """input_range / Qx (Qx of the calibrated sign), 1 while the range is 0."""
        q_signed, q_unsigned = config.input_qmax(True) if config.input_bits >= 2 else 1, config.input_qmax(False)
        qx = torch.where(input_signed, q_signed, q_unsigned) if config.input_signed is None else (
            config.input_qmax(config.input_signed))
        return torch.where(input_range > 0, input_range / qx, torch.ones_like(input_range))

    def _remember_sign(self, signed: bool) -> None:
        self.signed_hint = signed

    # ---- a call
    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 conv: Optional[Tuple[tuple, tuple, tuple]], *, config: XbarConfig, backend: Optional[str],
                 task_state: Callable[[], TaskState], input_range: torch.Tensor, input_signed: torch.Tensor,
                 training: bool, cells: bool, reuse: bool, ideal_cells: bool = False) -> torch.Tensor:
        """The layer's output for x: observe the input, then forward.run with this crossbar's state.
        ``conv``: (stride, padding, dilation) of a conv2d, None for a linear layer; ``task_state()``:
        (task_weight, pe_mask, col_scale) now; ``cells``: use the device model's cells (eval mode or
        noise-aware training); ``reuse``: a cached programmed state may be reused (eval mode);
        ``ideal_cells``: the same call on ideal cells, programmed into a throw-away cache (the chip's
        state and counters untouched)."""
        self.observe_input(x, config, input_range, input_signed, training)
        if ideal_cells:
            state = forward.CallState((ProgrammingCache(), ProgrammingCache()), ChipPosition(), reuse, False)
        else:
            state = forward.CallState(self.caches, self.chip, reuse, cells)
        input_scale = None
        if config.quantized:
            state.signed = self.input_sign(input_signed, training) if config.input_signed is None else (
                config.input_signed)
            input_scale = self.input_scale(config, input_range, input_signed).to(weight.dtype)
            state.on_sign = self._remember_sign
        task_weight, pe_mask, col_scale = task_state()
        kwargs = dict(config=config, task_weight=task_weight, pe_mask=pe_mask, col_scale=col_scale,
                      input_scale=input_scale, backend=backend, state=state)
        if conv is None:
            return forward.linear(x, weight, bias, **kwargs)
        stride, padding, dilation = conv
        return forward.conv2d(x, weight, bias, stride, padding, dilation, 1, **kwargs)
