"""Mask primitives: straight-through binarisation, shift-level (power-of-two) quantisation,
exact top-k budgets, and the PE <-> weight layout helpers.

Layout convention (docs/SPEC.md section 1): a layer's weight ``[N, ...]`` is the crossbar
matrix ``W [K, N] = weight.view(N, K).T``; PE ``(r, c)`` holds rows ``[r*R, (r+1)*R)`` and
columns ``[c*C, (c+1)*C)`` of ``W``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

from ..config import row_tile_sizes
from ..quant import RowLayout


# ------------------------------------------------------------------ straight-through estimators
class _BinarizeSTE(torch.autograd.Function):
    """1[s > threshold] forward; identity backward (Piggyback, Mallya et al. 2018)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, threshold: float) -> torch.Tensor:
        return (scores > threshold).to(scores.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g, None


def binarize(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Binary {0, 1} mask of ``scores > threshold`` whose gradient passes straight to ``scores``."""
    return _BinarizeSTE.apply(scores, threshold)


@dataclass(frozen=True)
class ShiftLevels:
    """The tier-2 multi-level column scale: {0} U {+-2^k : k_min <= k <= k_max}.

    A scale 2^k is a shift of the column's digital output and a sign is a subtraction, so no
    multiplier is needed.  Default k in {-2, -1, 0, 1}: levels 0, +-1/4, +-1/2, +-1, +-2
    (9 levels, 4 bits per column entry).  Quantisation of a real parameter ``a``: 0 when
    ``|a| < 2^(k_min-1)`` (closer to 0 than to half the smallest level), otherwise
    ``sign(a) * 2^clamp(round(log2|a|), k_min, k_max)`` (nearest level in the log domain).
    """

    k_min: int = -2
    k_max: int = 1

    def __post_init__(self) -> None:
        for name in ("k_min", "k_max"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"ShiftLevels.{name}: expected an int, got {type(v).__name__} ({v!r})")
        if self.k_min > self.k_max:
            raise ValueError(f"ShiftLevels: k_min ({self.k_min}) must be <= k_max ({self.k_max})")

    @property
    def levels(self) -> List[float]:
        pos = [2.0 ** k for k in range(self.k_min, self.k_max + 1)]
        return sorted([0.0] + pos + [-p for p in pos])

    @property
    def bits(self) -> int:
        """Bits per stored code (sign, zero and the exponent)."""
        return math.ceil(math.log2(len(self.levels)))

    def quantize(self, a: torch.Tensor) -> torch.Tensor:
        """Nearest level (no gradient)."""
        mag = a.abs()
        k = torch.round(torch.log2(mag.clamp_min(1e-30))).clamp(self.k_min, self.k_max)
        q = torch.sign(a) * torch.exp2(k)
        return torch.where(mag < 2.0 ** (self.k_min - 1), torch.zeros_like(a), q)

    def ste(self, a: torch.Tensor) -> torch.Tensor:
        """Quantised forward, identity backward."""
        return a + (self.quantize(a) - a).detach()

    def encode(self, q: torch.Tensor) -> torch.Tensor:
        """Levels -> int8 codes: 0 -> 0, +-2^k -> +-(k - k_min + 1)."""
        k = torch.log2(q.abs().clamp_min(2.0 ** self.k_min)).round()
        code = (k - self.k_min + 1) * torch.sign(q)
        return code.to(torch.int8)

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        c = code.to(torch.float32)
        if bool((c.abs() > self.k_max - self.k_min + 1).any()):
            raise ValueError(f"shift codes out of range for levels k in [{self.k_min}, {self.k_max}]")
        return torch.where(c == 0, torch.zeros_like(c), torch.sign(c) * torch.exp2(c.abs() - 1 + self.k_min))


# ------------------------------------------------------------------ budgets
def budget_count(rho: float, total: int) -> int:
    """Number of PEs a budget ``rho`` allows: floor(rho * total), so it is never exceeded."""
    if isinstance(rho, bool) or not isinstance(rho, (int, float)):
        raise TypeError(f"budget: expected a fraction in [0, 1], got {type(rho).__name__} ({rho!r})")
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"budget: expected a fraction in [0, 1], got {rho}")
    return int(math.floor(rho * total + 1e-9))


def topk_masks(scores: Sequence[torch.Tensor], rho: float, per_layer: bool = False) -> List[torch.Tensor]:
    """Binary masks (same shapes as ``scores``) keeping the highest scores: exactly
    ``budget_count(rho, total PEs)`` ones globally, or ``budget_count(rho, layer PEs)`` per layer.
    Ties go to the lower flat index (torch.topk on a stable order)."""
    if per_layer:
        return [topk_masks([s], rho)[0] for s in scores]
    flat = torch.cat([s.detach().reshape(-1).float() for s in scores])
    k = budget_count(rho, flat.numel())
    sel = torch.zeros_like(flat)
    if k > 0:
        # stable: sort descending by score, ascending by index
        order = torch.argsort(-flat, stable=True)[:k]
        sel[order] = 1.0
    out, i = [], 0
    for s in scores:
        out.append(sel[i:i + s.numel()].reshape(s.shape).to(s.dtype if s.is_floating_point() else torch.float32))
        i += s.numel()
    return out


def topk_masks_by_cost(scores: Sequence[torch.Tensor], costs: Sequence[torch.Tensor], rho: float,
                       per_layer: bool = False) -> List[torch.Tensor]:
    """Binary masks keeping the highest scores within a budget of cost (cells): in descending score order
    (ties to the lower flat index, as topk_masks), a PE is taken when its cost still fits in
    floor(rho * total cost); one that does not fit is skipped and the next ones are tried (so the budget
    is never exceeded, and cheap PEs can fill what is left).  ``costs``: one tensor per score, same shape."""
    if per_layer:
        return [topk_masks_by_cost([s], [c], rho)[0] for s, c in zip(scores, costs)]
    flat = torch.cat([s.detach().reshape(-1).float() for s in scores])
    cost = torch.cat([c.reshape(-1).long() for c in costs]).tolist()
    left = budget_count(rho, int(sum(cost)))
    sel = torch.zeros_like(flat)
    for i in torch.argsort(-flat, stable=True).tolist():
        if cost[i] <= left:
            sel[i] = 1.0
            left -= cost[i]
    out, i = [], 0
    for s in scores:
        out.append(sel[i:i + s.numel()].reshape(s.shape).to(s.dtype if s.is_floating_point() else torch.float32))
        i += s.numel()
    return out


# ------------------------------------------------------------------ layouts
def to_kn(weight: torch.Tensor) -> torch.Tensor:
    """Weight [N, ...] -> crossbar matrix [K, N]."""
    return weight.reshape(weight.shape[0], -1).T


def from_kn(w_kn: torch.Tensor, shape) -> torch.Tensor:
    """Crossbar matrix [K, N] -> weight layout ``shape``."""
    return w_kn.T.reshape(shape)


def _tile_rows(k: int, rows: RowLayout) -> Tuple[int, ...]:
    """Rows of each row tile: from R (fixed split) or as given (XbarConfig.row_layout)."""
    return row_tile_sizes(k, rows) if isinstance(rows, int) else tuple(rows)


def _pe_blocks(w_kn: torch.Tensor, rows: RowLayout, cols: int) -> torch.Tensor:
    """[K, N] -> [Tr, R, Tc, C], zero padded: each PE's block (``rows``: XbarConfig.row_layout(K))."""
    k, n = w_kn.shape
    tc = -(-n // cols)
    if isinstance(rows, int):
        tr = -(-k // rows)
        padded = w_kn.new_zeros(tr * rows, tc * cols)
        padded[:k, :n] = w_kn
        return padded.reshape(tr, rows, tc, cols)
    sizes = tuple(rows)
    starts = torch.tensor([0] + list(sizes[:-1])).cumsum(0)
    tile = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes), output_size=k)
    padded = w_kn.new_zeros(len(sizes), max(sizes), tc * cols)
    padded[tile.to(w_kn.device), (torch.arange(k) - starts[tile]).to(w_kn.device), :n] = w_kn
    return padded.reshape(len(sizes), max(sizes), tc, cols)


def pe_sum(w_kn: torch.Tensor, rows: RowLayout, cols: int) -> torch.Tensor:
    """Sum of a [K, N] per-weight quantity over each PE -> [Tr, Tc]; ``rows``: XbarConfig.row_layout(K)."""
    return _pe_blocks(w_kn, rows, cols).sum((1, 3))


def pe_max(w_kn: torch.Tensor, rows: RowLayout, cols: int) -> torch.Tensor:
    """Max of a [K, N] per-weight quantity (>= 0) over each PE -> [Tr, Tc]."""
    return _pe_blocks(w_kn, rows, cols).amax((1, 3))


def pe_cell_counts(layer) -> torch.Tensor:
    """[Tr, Tc] cells each PE of a crossbar layer holds: used rows x used columns x 2 polarities x weight
    slices (what re-programming the PE writes)."""
    k, n, cfg = layer.weight[0].numel(), layer.weight.shape[0], layer.config
    return pe_extent(k, n, cfg.row_layout(k), cfg.cols).prod(-1) * 2 * cfg.weight_slices


def pe_extent(k: int, n: int, rows: RowLayout, cols: int) -> torch.Tensor:
    """[Tr, Tc, 2] used rows and used columns of each PE (partial last tiles, or an even split)."""
    tc = -(-n // cols)
    r_used = torch.tensor(_tile_rows(k, rows), dtype=torch.long)
    c_used = torch.tensor([min(cols, n - c * cols) for c in range(tc)])
    return torch.stack(torch.broadcast_tensors(r_used[:, None], c_used[None, :]), -1)
