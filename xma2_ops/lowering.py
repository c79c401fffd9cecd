"""Lowering of a layer to the crossbar GEMM of docs/SPEC.md section 1, and the two-tier masks
written as effective weights (ideal mode, straight-through gradients) or as coefficients of the
integer tile sums (quantised mode, section 4).

Conv2d is X [M, K] @ W [K, N] with M = B*Ho*Wo, K = Cin*kh*kw in PyTorch's (c, i, j) order;
Linear is the same with M = the batch rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .quant import RowLayout, column_tiles, expand_rows, expand_tiles


@dataclass(frozen=True)
class ConvLowering:
    x_shape: Tuple[int, ...]
    w_shape: Tuple[int, ...]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]

    @property
    def out_hw(self) -> Tuple[int, int]:
        h, w = self.x_shape[2:]
        kh, kw = self.w_shape[2:]
        return tuple((size + 2 * p - d * (k - 1) - 1) // s + 1 for size, k, s, p, d in
                     zip((h, w), (kh, kw), self.stride, self.padding, self.dilation))

    @property
    def out_shape(self) -> Tuple[int, ...]:
        return (self.x_shape[0], self.w_shape[0], *self.out_hw)

    @property
    def gemm_mkn(self) -> Tuple[int, int, int]:
        ho, wo = self.out_hw
        return self.x_shape[0] * ho * wo, math.prod(self.w_shape[1:]), self.w_shape[0]

    def unfold(self, t: torch.Tensor) -> torch.Tensor:
        cols = F.unfold(t, self.w_shape[2:], dilation=self.dilation, padding=self.padding, stride=self.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])

    def unfold_codes(self, codes: torch.Tensor, backend) -> torch.Tensor:
        """Integer codes [B, Cin, H, W] -> [M, K], without a float copy when the backend can."""
        if backend.unfold_codes is None:
            return self.unfold(codes.to(torch.float32)).to(codes.dtype)  # codes of <= 16 bits: exact
        return backend.unfold_codes(codes, self.w_shape[2:], self.dilation, self.padding, self.stride)

    def fold_output(self, y: torch.Tensor) -> torch.Tensor:
        ho, wo = self.out_hw
        return y.reshape(self.x_shape[0], ho, wo, self.w_shape[0]).permute(0, 3, 1, 2).contiguous()

    def float_forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, w, None, self.stride, self.padding, self.dilation)

    def ste_grads(self, gy: torch.Tensor, x: torch.Tensor, w: torch.Tensor):
        """(dL/dx, dL/dw) of float_forward at (x, w) for the output gradient gy (layer layout)."""
        gx = torch.nn.grad.conv2d_input(self.x_shape, w, gy, self.stride, self.padding, self.dilation)
        gw = torch.nn.grad.conv2d_weight(x, self.w_shape, gy, self.stride, self.padding, self.dilation)
        return gx, gw

    def add_bias(self, y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return y + bias.view(-1, 1, 1)


@dataclass(frozen=True)
class LinearLowering:
    x_shape: Tuple[int, ...]
    w_shape: Tuple[int, ...]

    @property
    def out_shape(self) -> Tuple[int, ...]:
        return (*self.x_shape[:-1], self.w_shape[0])

    @property
    def gemm_mkn(self) -> Tuple[int, int, int]:
        return math.prod(self.x_shape[:-1]), self.w_shape[1], self.w_shape[0]

    def unfold(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, self.x_shape[-1])

    def unfold_codes(self, codes: torch.Tensor, backend) -> torch.Tensor:
        return self.unfold(codes)

    def fold_output(self, y: torch.Tensor) -> torch.Tensor:
        return y.reshape(self.out_shape)

    def float_forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w)

    def ste_grads(self, gy: torch.Tensor, x: torch.Tensor, w: torch.Tensor):
        g = gy.reshape(-1, self.w_shape[0])
        gx = (g @ w).reshape(self.x_shape)
        gw = g.T @ x.reshape(-1, self.x_shape[-1])
        return gx, gw

    def add_bias(self, y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return y + bias


# ------------------------------------------------------------------ the two-tier masks
def effective_weight(w_b: torch.Tensor, w_t: Optional[torch.Tensor], pe_mask: torch.Tensor, col_scale: torch.Tensor,
                     rows: RowLayout, cols: int) -> torch.Tensor:
    """W_eff = m W_t + (1 - m) alpha W_b per PE (SPEC 4), in the weight's own layout [N, ...];
    ``rows``: XbarConfig.row_layout(K)."""
    n, k = w_b.shape[0], w_b[0].numel()
    m_kn = expand_tiles(pe_mask, k, n, rows, cols)
    a_kn = expand_rows(col_scale, k, rows)
    w_eff = ((1 - m_kn) * a_kn).T.reshape(w_b.shape) * w_b
    if w_t is not None:
        w_eff = w_eff + m_kn.T.reshape(w_b.shape) * w_t
    return w_eff


def coefficients(pe_mask, col_scale, s_x, s_w, s_t, cols: int, steps: list, dtype, with_task: bool):
    """coef_b, coef_t [Tr, N] such that y = sum_r coef_b T_b_int + coef_t T_t_int (SPEC 4).
    ``s_w``/``s_t``: scalar or per-column [N] weight scales; ``steps``: the value of one unit of T_int
    per row tile (GemmParams.tile_steps)."""
    m_col = column_tiles(pe_mask, col_scale.shape[1], cols).to(dtype)
    if len(set(steps)) <= 1:  # one step for every tile (a Python float: the bits of a scalar multiply)
        base = s_x.to(dtype) * (steps[0] if steps else 1.0)
    else:
        base = s_x.to(dtype) * torch.tensor(steps, dtype=dtype, device=pe_mask.device).reshape(-1, 1)
    coef_b = base * (1 - m_col) * col_scale.to(dtype) * s_w.to(dtype)
    coef_t = base * m_col * s_t.to(dtype) if with_task else None
    return coef_b, coef_t
