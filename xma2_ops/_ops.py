"""Bindings of the torch.ops.xma2_ops operators, their fake (meta) implementations, and the
backend table.  Every backend implements the same crossbar-GEMM contract:

    tile_sums(x_codes [M,K] int32, w_codes [K,N] int32, params) -> int64 [Tr, M, N]
    mvm(x_codes, wb_codes, wt_codes|None, coef_b [Tr,N], coef_t|None, params) -> [M, N] (coef dtype)
    coef_grad(x_codes, w_codes, gy [M,N], params) -> float64 [Tr, N],  G[r,n] = sum_m gy[m,n] T_int[r,m,n]

A backend may also take x_codes in a smaller integer dtype (``small_codes``: uint8/int8/int16)
and lower a conv without a float copy of the unfolded input (``unfold_codes``: im2col of the
integer codes, same arguments as ``F.unfold`` plus the codes).

``params`` is :class:`config.GemmParams`; the conv lowering, checks and autograd live in functional.py.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from . import reference
from .config import GemmParams

try:
    from . import _C  # noqa: F401  (registers TORCH_LIBRARY(xma2_ops) and its CPU/CUDA kernels)
    _HAS_C = True
except ImportError as _err:  # a source checkout without a build: only the reference backend
    _HAS_C = False
    _C_ERROR = _err


# ------------------------------------------------------------------ fake impls (torch.compile / opcheck)
if _HAS_C:
    @torch.library.register_fake("xma2_ops::xbar_tile_sums")
    def _tile_sums_fake(x_codes, w_codes, rows, cols, input_bits, input_signed, dac_bits, weight_bits,
                        cell_bits, adc_levels, adc_clip):
        torch._check(x_codes.dim() == 2 and w_codes.dim() == 2)
        torch._check(x_codes.shape[1] == w_codes.shape[0])
        tr = (x_codes.shape[1] + rows - 1) // rows
        return x_codes.new_empty((tr, x_codes.shape[0], w_codes.shape[1]), dtype=torch.int64)

    @torch.library.register_fake("xma2_ops::xbar_mvm")
    def _mvm_fake(x_codes, wb_codes, wt_codes, coef_b, coef_t, rows, cols, input_bits, input_signed, dac_bits,
                  weight_bits, cell_bits, adc_levels, adc_clip):
        torch._check(x_codes.dim() == 2 and wb_codes.dim() == 2)
        torch._check(x_codes.shape[1] == wb_codes.shape[0])
        return coef_b.new_empty((x_codes.shape[0], wb_codes.shape[1]))

    @torch.library.register_fake("xma2_ops::xbar_coef_grad")
    def _coef_grad_fake(x_codes, w_codes, gy, rows, cols, input_bits, input_signed, dac_bits, weight_bits,
                        cell_bits, adc_levels, adc_clip):
        torch._check(x_codes.dim() == 2 and w_codes.dim() == 2)
        torch._check(x_codes.shape[1] == w_codes.shape[0])
        tr = (x_codes.shape[1] + rows - 1) // rows
        return gy.new_empty((tr, w_codes.shape[1]), dtype=torch.float64)

    @torch.library.register_fake("xma2_ops::xbar_unfold_codes")
    def _unfold_codes_fake(x, kernel_size, dilation, padding, stride):
        torch._check(x.dim() == 4)
        b, c, h, w = x.shape
        ho, wo = ((size + 2 * p - d * (k - 1) - 1) // s + 1
                  for size, k, d, p, s in zip((h, w), kernel_size, dilation, padding, stride))
        return x.new_empty((b * ho * wo, c * kernel_size[0] * kernel_size[1]))


# ------------------------------------------------------------------ backends
@dataclass(frozen=True)
class Backend:
    name: str
    tile_sums: Callable[..., torch.Tensor]
    mvm: Callable[..., torch.Tensor]
    devices: tuple  # device types it runs on
    coef_grad: Optional[Callable[..., torch.Tensor]] = None  # None: from tile_sums, in row blocks
    small_codes: bool = False  # takes uint8/int8/int16 x_codes as well as int32
    unfold_codes: Optional[Callable[..., torch.Tensor]] = None  # im2col of integer codes; None: F.unfold

    def coef_gradient(self, x_codes, w_codes, gy, p: GemmParams) -> torch.Tensor:
        """G[r, n] = sum_m gy[m, n] T_int[r, m, n] in float64."""
        if self.coef_grad is not None:
            return self.coef_grad(x_codes, w_codes, gy, p)
        return _coef_grad_from_tile_sums(self.tile_sums, x_codes, w_codes, gy, p)


def _reference_tile_sums(x_codes, w_codes, p: GemmParams) -> torch.Tensor:
    return reference.tile_sums(x_codes, w_codes, p).to(x_codes.device)


def _reference_mvm(x_codes, wb_codes, wt_codes, coef_b, coef_t, p: GemmParams) -> torch.Tensor:
    y = (coef_b.double().unsqueeze(1) * reference.tile_sums(x_codes, wb_codes, p).double()).sum(0)
    if wt_codes is not None:
        y = y + (coef_t.double().unsqueeze(1) * reference.tile_sums(x_codes, wt_codes, p).double()).sum(0)
    return y.to(coef_b.dtype).to(x_codes.device)


# The [Tr, M, N] int64 tile sums of the generic coefficient gradient are made in row blocks of this size.
_GRAD_BLOCK_ELEMS = 1 << 24


def _coef_grad_from_tile_sums(tile_sums, x_codes, w_codes, gy, p: GemmParams) -> torch.Tensor:
    m_total, n_total = gy.shape
    tr = -(-x_codes.shape[1] // p.rows)
    block = max(1, _GRAD_BLOCK_ELEMS // max(1, tr * n_total))
    g = torch.zeros(tr, n_total, dtype=torch.float64, device=gy.device)
    for m0 in range(0, m_total, block):
        t = tile_sums(x_codes[m0:m0 + block], w_codes, p)
        g += torch.einsum("rmn,mn->rn", t.double(), gy[m0:m0 + block].double())
    return g


def _torch_op_backend(name: str, devices: tuple) -> Backend:
    def tile_sums(x_codes, w_codes, p: GemmParams):
        return torch.ops.xma2_ops.xbar_tile_sums(x_codes, w_codes, *p.as_args())

    def mvm(x_codes, wb_codes, wt_codes, coef_b, coef_t, p: GemmParams):
        return torch.ops.xma2_ops.xbar_mvm(x_codes, wb_codes, wt_codes, coef_b, coef_t, *p.as_args())

    key = "CUDA" if "cuda" in devices else "CPU"
    coef_grad = unfold_codes = None
    if torch._C._dispatch_has_kernel_for_dispatch_key("xma2_ops::xbar_coef_grad", key):
        def coef_grad(x_codes, w_codes, gy, p: GemmParams):
            return torch.ops.xma2_ops.xbar_coef_grad(x_codes, w_codes, gy, *p.as_args())
    if torch._C._dispatch_has_kernel_for_dispatch_key("xma2_ops::xbar_unfold_codes", key):
        def unfold_codes(x_codes, kernel_size, dilation, padding, stride):
            return torch.ops.xma2_ops.xbar_unfold_codes(x_codes, kernel_size, dilation, padding, stride)
    return Backend(name, tile_sums, mvm, devices, coef_grad, small_codes=(key == "CPU"), unfold_codes=unfold_codes)


_BACKENDS: Dict[str, Backend] = {"reference": Backend("reference", _reference_tile_sums, _reference_mvm, ("cpu", "cuda"))}
if _HAS_C:
    _BACKENDS["cpu"] = _torch_op_backend("cpu", ("cpu",))
    if torch._C._dispatch_has_kernel_for_dispatch_key("xma2_ops::xbar_mvm", "CUDA"):
        _BACKENDS["cuda"] = _torch_op_backend("cuda", ("cuda",))


def _load_triton() -> Optional[Backend]:
    try:
        mod = importlib.import_module("xma2_ops.triton_kernels")
    except ImportError:
        return None
    return Backend("triton", mod.tile_sums, mod.mvm, mod.DEVICES)


_TRITON = _load_triton()
if _TRITON is not None:
    _BACKENDS["triton"] = _TRITON


def available_backends() -> List[str]:
    """Names of the backends this install can run (on some device)."""
    return list(_BACKENDS)


def get_backend(name: Optional[str], device: torch.device) -> Backend:
    """The named backend, or the best one for ``device`` when name is None.

    On CUDA tensors the default is "cuda" when the extension was built with its CUDA kernels
    (compiled ahead of time: no JIT latency, no Triton needed at run time), else "triton" (needs
    only Triton, so it also serves installs built without nvcc), else the slow "reference".
    On CPU tensors it is the C++ "cpu" kernel; "triton" on CPU (TRITON_INTERPRET=1) is only
    for tests and must be asked for by name.
    """
    if name is None:
        order = ["cuda", "triton", "reference"] if device.type == "cuda" else ["cpu", "reference"]
        name = next(n for n in order if n in _BACKENDS)
    if not isinstance(name, str) or name not in _BACKENDS:
        hint = "" if _HAS_C or name != "cpu" else f" (the C++ extension did not load: {_C_ERROR})"
        raise ValueError(f"backend: expected one of {available_backends()} or None, got {name!r}{hint}")
    be = _BACKENDS[name]
    if device.type not in be.devices:
        raise ValueError(f"backend: {name!r} runs on {list(be.devices)} tensors, got tensors on {device}")
    return be
