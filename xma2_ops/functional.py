"""xbar_conv2d / xbar_linear: the public, stateless crossbar layers (docs/SPEC.md sections 4-6).

Stateless: every call programs (quantises) the weights anew, decides the input sign from its own x
and uses a fresh chip position.  The body is forward.run, which the layers (crossbar.py) share.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from . import forward
from .checks import ScaleArg


def xbar_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: Union[int, Tuple[int, int]] = 1,
    padding: Union[int, Tuple[int, int], str] = 0,
    dilation: Union[int, Tuple[int, int]] = 1,
    groups: int = 1,
    *,
    config: XbarConfig,
    task_weight: Optional[torch.Tensor] = None,
    pe_mask: Optional[torch.Tensor] = None,
    col_scale: Optional[torch.Tensor] = None,
    input_scale: ScaleArg = None,
    weight_scale: ScaleArg = None,
    task_weight_scale: ScaleArg = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Conv2d computed on simulated crossbars (docs/SPEC.md).  Stateless: the weights are
    programmed (quantised) on every call.

    x [B, Cin, H, W] (or unbatched [Cin, H, W]); weight [Cout, Cin, kh, kw]; pe_mask [Tr, Tc];
    col_scale [Tr, Cout] with Tr = ceil(Cin*kh*kw / rows), Tc = ceil(Cout / cols).
    """
    return forward.conv2d(x, weight, bias, stride, padding, dilation, groups, config=config, task_weight=task_weight,
                          pe_mask=pe_mask, col_scale=col_scale, input_scale=input_scale, weight_scale=weight_scale,
                          task_weight_scale=task_weight_scale, backend=backend)


def xbar_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    config: XbarConfig,
    task_weight: Optional[torch.Tensor] = None,
    pe_mask: Optional[torch.Tensor] = None,
    col_scale: Optional[torch.Tensor] = None,
    input_scale: ScaleArg = None,
    weight_scale: ScaleArg = None,
    task_weight_scale: ScaleArg = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Linear layer on simulated crossbars: x [..., in] -> [..., out]; weight [out, in].
    Stateless: the weights are programmed (quantised) on every call."""
    return forward.linear(x, weight, bias, config=config, task_weight=task_weight, pe_mask=pe_mask,
                          col_scale=col_scale, input_scale=input_scale, weight_scale=weight_scale,
                          task_weight_scale=task_weight_scale, backend=backend)
