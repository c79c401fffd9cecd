"""The per-layer adapter module (``layer.adapter``): a task's learned parameters of one crossbar layer.

What it holds and computes is its method's (methods.py); this module is the nn.Module that owns
the parameters and the phase."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn

from ..quant import expand_tiles
from .masks import from_kn
from .methods import MethodSpec


class LayerAdapter(nn.Module):
    """``layer.adapter``: maps the task's learned parameters to (task_weight, pe_mask, col_scale).

    ``phase``: "dense" (all PEs on task weights: finetune, sensitivity probes), "search"
    (PE mask = binarised PE scores), "final" (frozen PE selection ``pe_sel``).
    In eval mode Piggyback's PE mask is exactly the PEs holding a changed weight (its deployed
    form); in training every PE passes the task weight so all scores get gradients."""

    def __init__(self, layer: nn.Module, spec: MethodSpec) -> None:
        super().__init__()
        self.method = spec.method
        self.impl = spec.impl
        self.levels = spec.levels
        # rows: R, or each row tile's rows under an even split (XbarConfig.row_layout)
        self.rows, self.cols = layer.config.row_layout(layer.weight[0].numel()), layer.config.cols
        self.phase = self.impl.initial_phase
        w = layer.weight.detach()
        tr, tc = layer.tiles
        self.register_buffer("pe_sel", torch.zeros(tr, tc, dtype=w.dtype, device=w.device))
        self.impl.init_params(self, w, (tr, tc))

    def _pe_to_weight(self, m: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        k = w[0].numel()
        return from_kn(expand_tiles(m, k, w.shape[0], self.rows, self.cols), w.shape)

    def col_scale(self) -> Optional[torch.Tensor]:
        return self.impl.col_scale(self)

    def forward(self, layer: nn.Module) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
        return self.impl.forward(self, layer)
