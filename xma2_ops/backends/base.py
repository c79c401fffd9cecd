"""The backend contract: what every backend (reference, cpu, cuda, triton, periphery) provides.

Every backend implements the same crossbar GEMM:

    tile_sums(x_codes [M,K] int32, w_codes [K,N] int32, params) -> int64 [Tr, M, N]
    mvm(x_codes, wb_codes, wt_codes|None, coef_b [Tr,N], coef_t|None, params) -> [M, N] (coef dtype)
    coef_grad(x_codes, w_codes, gy [M,N], params) -> float64 [Tr, N],  G[r,n] = sum_m gy[m,n] T_int[r,m,n]

A backend may also take x_codes in a smaller integer dtype (``small_codes``: uint8/int8/int16)
and lower a conv without a float copy of the unfolded input (``unfold_codes``: im2col of the
integer codes, same arguments as ``F.unfold`` plus the codes).  ``params`` is
:class:`xma2_ops.config.GemmParams`.

The row-block helpers below build mvm and the coefficient gradients from tile sums in the one
order of every backend (so every backend gives the same bits).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from ..config import GemmParams


@dataclass(frozen=True)
class BackendBase:
    """One backend: its name, the device types it runs on, and its kernels (contract above)."""

    name: str
    tile_sums: Callable[..., torch.Tensor]
    mvm: Callable[..., torch.Tensor]
    supported_devices: tuple  # device types it runs on
    coef_grad: Optional[Callable[..., torch.Tensor]] = None  # None: from tile_sums, in row blocks
    small_codes: bool = False  # takes uint8/int8/int16 x_codes as well as int32
    unfold_codes: Optional[Callable[..., torch.Tensor]] = None  # im2col of integer codes; None: F.unfold
    # The device model (SPEC 7.2): cell_tile_sums(x_codes, gq [2, S, K, N] int32, params, frac_bits)
    # -> int64 [Tr, M, N]; None: this backend refuses device models.  Optional fused forms, same
    # contracts as mvm / coef_grad over the cells (None: built from cell_tile_sums in row blocks):
    # cell_mvm_kernel(x_codes, gb, gt, coef_b, coef_t, params, frac_bits),
    # cell_coef_grad(x_codes, gq, gy, params, frac_bits).
    cell_tile_sums: Optional[Callable[..., torch.Tensor]] = None
    cell_mvm_kernel: Optional[Callable[..., torch.Tensor]] = None
    cell_coef_grad: Optional[Callable[..., torch.Tensor]] = None
    # The kernel's form of a weight's codes, made once per programmed weight (programmed.py):
    # pack_weights(w_codes, params) -> Tensor; mvm_packed(x_codes, wb, wb_packed, wt, wt_packed, coef_b,
    # coef_t, params) and coef_grad_packed(x_codes, w, w_packed, gy, params) read it instead of packing
    # the codes on every call.  None: this backend packs per call (or needs no packing).
    pack_weights: Optional[Callable[..., torch.Tensor]] = None
    mvm_packed: Optional[Callable[..., torch.Tensor]] = None
    coef_grad_packed: Optional[Callable[..., torch.Tensor]] = None
    # The periphery bits (SPEC 8, config.PERIPHERY_BIT) that tile_sums / mvm / coef_grad and the packed ops
    # compute themselves (in GemmParams.kernel_form's form), and those that the device-model ops compute
    # (``cell_periphery``; the cell ops get them as their last argument).  Any other bit runs the periphery
    # backend (dispatch.backend_for).
    periphery: int = 0
    cell_periphery: int = 0

    def not_supported_reasons(self, device: torch.device, params: Optional[GemmParams] = None,
                              cells: bool = False) -> List[str]:
        """Why a call on ``device`` (with the device model's cells when ``cells``) cannot run here;
        empty when it can.  (A periphery the kernels do not compute is no reason: it runs the
        periphery backend, see dispatch.backend_for.)"""
        reasons = []
        if device.type not in self.supported_devices:
            reasons.append(f"backend: {self.name!r} runs on {list(self.supported_devices)} tensors, got tensors "
                           f"on {device}")
        if cells and self.cell_tile_sums is None:
            reasons.append(self._no_cells_reason())
        return reasons

    def _no_cells_reason(self) -> str:
        return (f"backend: {self.name!r} does not implement the device model (config.device, SPEC 7) "
                f"yet; use backend='cpu' or 'reference' (on CUDA tensors: 'reference')")

    def mvm_with(self, x_codes, wb_codes, wb_packed, wt_codes, wt_packed, coef_b, coef_t, p: GemmParams):
        """mvm, reading the packed weights when given (and this backend packs)."""
        if self.mvm_packed is not None and (wb_packed is not None or wt_packed is not None):
            return self.mvm_packed(x_codes, wb_codes, wb_packed, wt_codes, wt_packed, coef_b, coef_t, p)
        return self.mvm(x_codes, wb_codes, wt_codes, coef_b, coef_t, p)

    def coef_gradient(self, x_codes, w_codes, gy, p: GemmParams, w_packed=None) -> torch.Tensor:
        """G[r, n] = sum_m gy[m, n] T_int[r, m, n] in float64."""
        if w_packed is not None and self.coef_grad_packed is not None:
            return self.coef_grad_packed(x_codes, w_codes, w_packed, gy, p)
        if self.coef_grad is not None:
            return self.coef_grad(x_codes, w_codes, gy, p)
        return coef_grad_from_tile_sums(self.tile_sums, x_codes, w_codes, gy, p)

    def cells(self) -> Callable[..., torch.Tensor]:
        if self.cell_tile_sums is None:
            raise ValueError(self._no_cells_reason())
        return self.cell_tile_sums

    def cell_mvm(self, x_codes, gb, gt, coef_b, coef_t, p: GemmParams, frac_bits: int) -> torch.Tensor:
        """y [M, N] = sum_r coef_b T_b_int + coef_t T_t_int over the cells (row tile outer, then base,
        then task, in float64; in row blocks so no [Tr, M, N] tensor of all rows is held)."""
        fn = self.cells()
        if self.cell_mvm_kernel is not None:
            return self.cell_mvm_kernel(x_codes, gb, gt, coef_b, coef_t, p, frac_bits)
        return mvm_from_tile_sums(lambda x, g: fn(x, g, p, frac_bits), x_codes, gb, gt, coef_b, coef_t, gb.shape[3])

    def cell_coef_gradient(self, x_codes, gq, gy, p: GemmParams, frac_bits: int) -> torch.Tensor:
        fn = self.cells()
        if self.cell_coef_grad is not None:
            return self.cell_coef_grad(x_codes, gq, gy, p, frac_bits)
        return coef_grad_from_tile_sums(lambda x, w, p_: fn(x, w, p_, frac_bits), x_codes, gq, gy, p)


# The [Tr, M, N] int64 tile sums of the generic mvm / coefficient gradient are made in row blocks of this size.
_GRAD_BLOCK_ELEMS = 1 << 24
# Input rows per block of the coefficient gradients' sum (kGradRows, csrc/cpu/coef_grad.h).
_GRAD_ROWS = 128


def mvm_from_tile_sums(tile_sums_of, x_codes, wb, wt, coef_b, coef_t, n_total: int) -> torch.Tensor:
    """y [M, N] from ``tile_sums_of(x_rows, w)`` (int64 [Tr, m, N]) in the kernels' order (ordered_sum),
    in row blocks so that no [Tr, M, N] tensor of all rows is held."""
    m_total, tr = x_codes.shape[0], coef_b.shape[0]
    block = max(1, _GRAD_BLOCK_ELEMS // max(1, tr * n_total))
    y = torch.empty(m_total, n_total, dtype=coef_b.dtype, device=x_codes.device)
    for m0 in range(0, m_total, block):
        xb = x_codes[m0:m0 + block]
        tb = tile_sums_of(xb, wb).double()
        tt = tile_sums_of(xb, wt).double() if wt is not None else None
        y[m0:m0 + block] = ordered_sum(tb, tt, coef_b, coef_t)
    return y


def ordered_sum(tb, tt, coef_b, coef_t) -> torch.Tensor:
    """y [M, N] = sum_r coef_b[r] T_b[r] + coef_t[r] T_t[r] in the one order of every backend: row
    tile outer, then the base set, then the task set, each term rounded to float64 and added in
    float64; one rounding to the coefficient dtype at the end."""
    acc = torch.zeros(tb.shape[1:], dtype=torch.float64, device=tb.device)
    for r in range(tb.shape[0]):
        acc += coef_b[r].double() * tb[r]
        if tt is not None:
            acc += coef_t[r].double() * tt[r]
    return acc.to(coef_b.dtype)


def coef_grad_from_tile_sums(tile_sums, x_codes, w_codes, gy, p: GemmParams) -> torch.Tensor:
    m_total, n_total = gy.shape
    tr = -(-x_codes.shape[1] // p.rows)
    block = max(1, _GRAD_BLOCK_ELEMS // max(1, _GRAD_ROWS * tr * n_total)) * _GRAD_ROWS  # whole gradient blocks
    g = torch.zeros(tr, n_total, dtype=torch.float64, device=gy.device)
    for m0 in range(0, m_total, block):
        t = tile_sums(x_codes[m0:m0 + block], w_codes, p)
        _add_ordered_coef_grad(g, t.double(), gy[m0:m0 + block].double())
    return g


def _add_ordered_coef_grad(g, t, gy) -> None:
    """g += the coefficient gradient of T_int rows t [Tr, m, N] (from a block boundary) and gy [m, N], in
    the order of the CPU kernels (csrc/cpu/coef_grad.h), so every backend gives their bits: per block of
    _GRAD_ROWS rows the products summed in ascending row order, then the block sums in block order."""
    tr, m, n = t.shape
    nb = -(-m // _GRAD_ROWS)
    pad = nb * _GRAD_ROWS - m  # zero rows add +0.0: no change
    t = torch.nn.functional.pad(t, (0, 0, 0, pad)).view(tr, nb, _GRAD_ROWS, n)
    gy = torch.nn.functional.pad(gy, (0, 0, 0, pad)).view(nb, _GRAD_ROWS, n)
    s = torch.zeros(tr, nb, n, dtype=torch.float64, device=g.device)
    for i in range(_GRAD_ROWS):  # all blocks at once, row i of each
        s += gy[:, i] * t[:, :, i]
    for b in range(nb):
        g += s[:, b]
