"""Bindings of the torch.ops.xma2_ops operators, their fake (meta) implementations, their
autograd, and the backend table.

Ops (all callable as ``torch.ops.xma2_ops.<name>``):
- C++ (csrc/ops.cpp; CPU kernels, CUDA kernels when built with CUDA): ``xbar_tile_sums``,
  ``xbar_mvm``, ``xbar_coef_grad``, ``xbar_unfold_codes`` -- the integer crossbar GEMM per backend;
- Python (below, ``torch.library.custom_op``): ``crossbar_mvm`` -- the op the layers call: the
  backend's mvm with its autograd registered at the op level (exact gradients for the coefficients,
  SPEC 5), and ``straight_through_conv2d`` / ``straight_through_linear`` -- zero-valued ops whose
  gradient is the straight-through estimator for x and the weights.  With these, the layers trace
  into one graph under torch.compile (no Python autograd.Function with object arguments).

Every backend implements the same crossbar-GEMM contract:

    tile_sums(x_codes [M,K] int32, w_codes [K,N] int32, params) -> int64 [Tr, M, N]
    mvm(x_codes, wb_codes, wt_codes|None, coef_b [Tr,N], coef_t|None, params) -> [M, N] (coef dtype)
    coef_grad(x_codes, w_codes, gy [M,N], params) -> float64 [Tr, N],  G[r,n] = sum_m gy[m,n] T_int[r,m,n]

A backend may also take x_codes in a smaller integer dtype (``small_codes``: uint8/int8/int16)
and lower a conv without a float copy of the unfolded input (``unfold_codes``: im2col of the
integer codes, same arguments as ``F.unfold`` plus the codes).

``params`` is :class:`config.GemmParams`; the checks and the conv lowering live in functional.py
and lowering.py.
"""
from __future__ import annotations

import dataclasses
import importlib
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

from . import periphery, reference
from .config import KERNEL_PERIPHERY, GemmParams
from .lowering import ConvLowering, LinearLowering

try:
    from . import _C  # noqa: F401  (registers TORCH_LIBRARY(xma2_ops) and its CPU/CUDA kernels)
    _HAS_C = True
    _C_ERROR: Optional[BaseException] = None
except ImportError as _err:  # a source checkout without a build, or a build for another torch
    _HAS_C = False
    _C_ERROR = _err

_C_HINT = ("the C++ extension xma2_ops._C did not load ({err}); only the slow 'reference' backend runs on the "
           "CPU.  Rebuild it against the installed torch: `pip install --no-build-isolation -e .` (or "
           "`pip install --no-build-isolation .`) in the xma2_ops source folder, after installing torch")
_WARNED_NO_C = False


def _warn_no_c() -> None:
    """Warn once per process that CPU calls fall back to the reference (45-590x slower)."""
    global _WARNED_NO_C
    if not _WARNED_NO_C:
        _WARNED_NO_C = True
        warnings.warn(_C_HINT.format(err=_C_ERROR), RuntimeWarning, stacklevel=3)


if not _HAS_C:
    _warn_no_c()


# ------------------------------------------------------------------ fake impls (torch.compile / opcheck)
if _HAS_C:
    @torch.library.register_fake("xma2_ops::xbar_tile_sums")
    def _tile_sums_fake(x_codes, w_codes, rows, cols, input_bits, input_signed, dac_bits, weight_bits,
                        cell_bits, adc_levels, adc_clip, periphery=0):
        torch._check(x_codes.dim() == 2 and w_codes.dim() == 2)
        torch._check(x_codes.shape[1] == w_codes.shape[0])
        tr = (x_codes.shape[1] + rows - 1) // rows
        return x_codes.new_empty((tr, x_codes.shape[0], w_codes.shape[1]), dtype=torch.int64)

    @torch.library.register_fake("xma2_ops::xbar_mvm")
    def _mvm_fake(x_codes, wb_codes, wt_codes, coef_b, coef_t, rows, cols, input_bits, input_signed, dac_bits,
                  weight_bits, cell_bits, adc_levels, adc_clip, periphery=0):
        torch._check(x_codes.dim() == 2 and wb_codes.dim() == 2)
        torch._check(x_codes.shape[1] == wb_codes.shape[0])
        return coef_b.new_empty((x_codes.shape[0], wb_codes.shape[1]))

    @torch.library.register_fake("xma2_ops::xbar_coef_grad")
    def _coef_grad_fake(x_codes, w_codes, gy, rows, cols, input_bits, input_signed, dac_bits, weight_bits,
                        cell_bits, adc_levels, adc_clip, periphery=0):
        torch._check(x_codes.dim() == 2 and w_codes.dim() == 2)
        torch._check(x_codes.shape[1] == w_codes.shape[0])
        tr = (x_codes.shape[1] + rows - 1) // rows
        return gy.new_empty((tr, w_codes.shape[1]), dtype=torch.float64)

    @torch.library.register_fake("xma2_ops::xbar_pack_weights")
    def _pack_weights_fake(w_codes, *args):
        torch._check(w_codes.dim() == 2)
        return w_codes.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.int32)

    @torch.library.register_fake("xma2_ops::xbar_mvm_packed")
    def _mvm_packed_fake(x_codes, wb_codes, wb_packed, wt_codes, wt_packed, coef_b, coef_t, *args):
        return _mvm_fake(x_codes, wb_codes, wt_codes, coef_b, coef_t, *args)

    @torch.library.register_fake("xma2_ops::xbar_coef_grad_packed")
    def _coef_grad_packed_fake(x_codes, w_codes, w_packed, gy, *args):
        return _coef_grad_fake(x_codes, w_codes, gy, *args)

    @torch.library.register_fake("xma2_ops::xbar_unfold_codes")
    def _unfold_codes_fake(x, kernel_size, dilation, padding, stride):
        torch._check(x.dim() == 4)
        b, c, h, w = x.shape
        ho, wo = ((size + 2 * p - d * (k - 1) - 1) // s + 1
                  for size, k, d, p, s in zip((h, w), kernel_size, dilation, padding, stride))
        return x.new_empty((b * ho * wo, c * kernel_size[0] * kernel_size[1]))


if _HAS_C and hasattr(torch.ops.xma2_ops, "xbar_cell_tile_sums"):
    @torch.library.register_fake("xma2_ops::xbar_cell_tile_sums")
    def _cell_tile_sums_fake(x_codes, g, rows, *args):
        torch._check(x_codes.dim() == 2 and g.dim() == 4)
        torch._check(x_codes.shape[1] == g.shape[2])
        tr = (x_codes.shape[1] + rows - 1) // rows
        return x_codes.new_empty((tr, x_codes.shape[0], g.shape[3]), dtype=torch.int64)

    @torch.library.register_fake("xma2_ops::xbar_cell_mvm")
    def _cell_mvm_fake(x_codes, gb, gt, coef_b, coef_t, *args):
        torch._check(x_codes.dim() == 2 and gb.dim() == 4)
        torch._check(x_codes.shape[1] == gb.shape[2])
        return coef_b.new_empty((x_codes.shape[0], gb.shape[3]))

    @torch.library.register_fake("xma2_ops::xbar_cell_coef_grad")
    def _cell_coef_grad_fake(x_codes, g, gy, rows, *args):
        torch._check(x_codes.dim() == 2 and g.dim() == 4)
        tr = (x_codes.shape[1] + rows - 1) // rows
        return gy.new_empty((tr, g.shape[3]), dtype=torch.float64)


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
    # compute themselves (in GemmParams.kernel_form's form); the device-model ops compute none.  Any other
    # bit runs periphery.py (backend_for).
    periphery: int = 0

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
        return _coef_grad_from_tile_sums(self.tile_sums, x_codes, w_codes, gy, p)

    def cells(self) -> Callable[..., torch.Tensor]:
        if self.cell_tile_sums is None:
            raise ValueError(f"backend: {self.name!r} does not implement the device model (config.device, SPEC 7) "
                             f"yet; use backend='cpu' or 'reference' (on CUDA tensors: 'reference')")
        return self.cell_tile_sums

    def cell_mvm(self, x_codes, gb, gt, coef_b, coef_t, p: GemmParams, frac_bits: int) -> torch.Tensor:
        """y [M, N] = sum_r coef_b T_b_int + coef_t T_t_int over the cells (row tile outer, then base,
        then task, in float64; in row blocks so no [Tr, M, N] tensor of all rows is held)."""
        fn = self.cells()
        if self.cell_mvm_kernel is not None:
            return self.cell_mvm_kernel(x_codes, gb, gt, coef_b, coef_t, p, frac_bits)
        return _mvm_from_tile_sums(lambda x, g: fn(x, g, p, frac_bits), x_codes, gb, gt, coef_b, coef_t, gb.shape[3])

    def cell_coef_gradient(self, x_codes, gq, gy, p: GemmParams, frac_bits: int) -> torch.Tensor:
        fn = self.cells()
        if self.cell_coef_grad is not None:
            return self.cell_coef_grad(x_codes, gq, gy, p, frac_bits)
        return _coef_grad_from_tile_sums(lambda x, w, p_: fn(x, w, p_, frac_bits), x_codes, gq, gy, p)


def _reference_tile_sums(x_codes, w_codes, p: GemmParams) -> torch.Tensor:
    return reference.tile_sums(x_codes, w_codes, p).to(x_codes.device)


def _reference_mvm(x_codes, wb_codes, wt_codes, coef_b, coef_t, p: GemmParams) -> torch.Tensor:
    return _mvm_from_tile_sums(lambda x, w: _reference_tile_sums(x, w, p), x_codes, wb_codes, wt_codes, coef_b,
                               coef_t, wb_codes.shape[1])


def _mvm_from_tile_sums(tile_sums_of, x_codes, wb, wt, coef_b, coef_t, n_total: int) -> torch.Tensor:
    """y [M, N] from ``tile_sums_of(x_rows, w)`` (int64 [Tr, m, N]) in the kernels' order (_ordered_sum),
    in row blocks so that no [Tr, M, N] tensor of all rows is held."""
    m_total, tr = x_codes.shape[0], coef_b.shape[0]
    block = max(1, _GRAD_BLOCK_ELEMS // max(1, tr * n_total))
    y = torch.empty(m_total, n_total, dtype=coef_b.dtype, device=x_codes.device)
    for m0 in range(0, m_total, block):
        xb = x_codes[m0:m0 + block]
        tb = tile_sums_of(xb, wb).double()
        tt = tile_sums_of(xb, wt).double() if wt is not None else None
        y[m0:m0 + block] = _ordered_sum(tb, tt, coef_b, coef_t)
    return y


def _ordered_sum(tb, tt, coef_b, coef_t) -> torch.Tensor:
    """y [M, N] = sum_r coef_b[r] T_b[r] + coef_t[r] T_t[r] in the one order of every backend: row
    tile outer, then the base set, then the task set, each term rounded to float64 and added in
    float64; one rounding to the coefficient dtype at the end."""
    acc = torch.zeros(tb.shape[1:], dtype=torch.float64, device=tb.device)
    for r in range(tb.shape[0]):
        acc += coef_b[r].double() * tb[r]
        if tt is not None:
            acc += coef_t[r].double() * tt[r]
    return acc.to(coef_b.dtype)


# The [Tr, M, N] int64 tile sums of the generic coefficient gradient are made in row blocks of this size.
_GRAD_BLOCK_ELEMS = 1 << 24
# Input rows per block of the coefficient gradients' sum (kGradRows, csrc/cpu/coef_grad.h).
_GRAD_ROWS = 128


def _coef_grad_from_tile_sums(tile_sums, x_codes, w_codes, gy, p: GemmParams) -> torch.Tensor:
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


def _torch_op_backend(name: str, devices: tuple, periphery: int = 0) -> Backend:
    """The C++ ops of one dispatch key as a backend; ``periphery``: the SPEC 8 bits its codes ops compute
    (passed to them as their last argument; without any, the ops get the Sections 2-3 arguments)."""
    def args(p: GemmParams) -> tuple:
        return p.as_args(with_periphery=True) if periphery else p.as_args()

    def tile_sums(x_codes, w_codes, p: GemmParams):
        return torch.ops.xma2_ops.xbar_tile_sums(x_codes, w_codes, *args(p))

    def mvm(x_codes, wb_codes, wt_codes, coef_b, coef_t, p: GemmParams):
        return torch.ops.xma2_ops.xbar_mvm(x_codes, wb_codes, wt_codes, coef_b, coef_t, *args(p))

    key = "CUDA" if "cuda" in devices else "CPU"
    coef_grad = unfold_codes = None
    packed = {}
    if torch._C._dispatch_has_kernel_for_dispatch_key("xma2_ops::xbar_pack_weights", key):
        def pack_weights(w_codes, p: GemmParams):
            return torch.ops.xma2_ops.xbar_pack_weights(w_codes, *args(p))

        def mvm_packed(x_codes, wb_codes, wb_packed, wt_codes, wt_packed, coef_b, coef_t, p: GemmParams):
            return torch.ops.xma2_ops.xbar_mvm_packed(x_codes, wb_codes, wb_packed, wt_codes, wt_packed, coef_b, coef_t,
                                                      *args(p))

        def coef_grad_packed(x_codes, w_codes, w_packed, gy, p: GemmParams):
            return torch.ops.xma2_ops.xbar_coef_grad_packed(x_codes, w_codes, w_packed, gy, *args(p))

        packed = dict(pack_weights=pack_weights, mvm_packed=mvm_packed, coef_grad_packed=coef_grad_packed)
    if torch._C._dispatch_has_kernel_for_dispatch_key("xma2_ops::xbar_coef_grad", key):
        def coef_grad(x_codes, w_codes, gy, p: GemmParams):
            return torch.ops.xma2_ops.xbar_coef_grad(x_codes, w_codes, gy, *args(p))
    if torch._C._dispatch_has_kernel_for_dispatch_key("xma2_ops::xbar_unfold_codes", key):
        def unfold_codes(x_codes, kernel_size, dilation, padding, stride):
            return torch.ops.xma2_ops.xbar_unfold_codes(x_codes, kernel_size, dilation, padding, stride)
    return Backend(name, tile_sums, mvm, devices, coef_grad, small_codes=(key == "CPU"), unfold_codes=unfold_codes,
                   periphery=periphery, **packed)


def _reference_cell_tile_sums(x_codes, gq, p: GemmParams, frac_bits: int) -> torch.Tensor:
    return reference.cell_tile_sums(x_codes.cpu(), gq.cpu(), p, frac_bits).to(x_codes.device)


_BACKENDS: Dict[str, Backend] = {"reference": Backend("reference", _reference_tile_sums, _reference_mvm, ("cpu", "cuda"),
                                                      cell_tile_sums=_reference_cell_tile_sums)}
def _torch_op_cells(key: str) -> dict:
    """The C++ device-model ops of a dispatch key, when the extension registers them."""
    if not (hasattr(torch.ops.xma2_ops, "xbar_cell_tile_sums")
            and torch._C._dispatch_has_kernel_for_dispatch_key("xma2_ops::xbar_cell_tile_sums", key)):
        return {}

    def tile_sums(x_codes, gq, p: GemmParams, frac_bits: int):
        return torch.ops.xma2_ops.xbar_cell_tile_sums(x_codes, gq, *p.as_args(), frac_bits)

    def mvm(x_codes, gb, gt, coef_b, coef_t, p: GemmParams, frac_bits: int):
        return torch.ops.xma2_ops.xbar_cell_mvm(x_codes, gb, gt, coef_b, coef_t, *p.as_args(), frac_bits)

    def coef_grad(x_codes, gq, gy, p: GemmParams, frac_bits: int):
        return torch.ops.xma2_ops.xbar_cell_coef_grad(x_codes, gq, gy, *p.as_args(), frac_bits)

    return dict(cell_tile_sums=tile_sums, cell_mvm_kernel=mvm, cell_coef_grad=coef_grad)


if _HAS_C:
    # The CPU bit-plane kernels compute differential sensing, sign-magnitude inputs and half-even rounding
    # (csrc/cpu/xbar_cpu_block.h); the CUDA kernel none of SPEC 8.
    _BACKENDS["cpu"] = dataclasses.replace(_torch_op_backend("cpu", ("cpu",), KERNEL_PERIPHERY),
                                           **_torch_op_cells("CPU"))
    if torch._C._dispatch_has_kernel_for_dispatch_key("xma2_ops::xbar_mvm", "CUDA"):
        _BACKENDS["cuda"] = _torch_op_backend("cuda", ("cuda",))


def _load_triton() -> Optional[Backend]:
    try:
        mod = importlib.import_module("xma2_ops.triton_kernels")
    except ImportError:
        return None
    return Backend("triton", mod.tile_sums, mod.mvm, mod.DEVICES, cell_tile_sums=getattr(mod, "cell_tile_sums", None),
                   cell_mvm_kernel=getattr(mod, "cell_mvm", None), pack_weights=mod.pack_weights,
                   mvm_packed=mod.mvm_packed)


_TRITON = _load_triton()
if _TRITON is not None:
    _BACKENDS["triton"] = _TRITON


_ALL_BACKENDS = ("cpu", "cuda", "triton", "reference")


def _periphery_backend() -> Backend:
    """What cpu, cuda and triton run under a periphery (SPEC 8) that the kernels do not compute:
    periphery.py's exact GEMM-per-conversion form, the same bits on every device; mvm and the
    coefficient gradients from its tile sums in the one order of every backend."""
    def mvm(x_codes, wb, wt, coef_b, coef_t, p):
        return _mvm_from_tile_sums(lambda x, w: periphery.tile_sums(x, w, p), x_codes, wb, wt, coef_b, coef_t,
                                   wb.shape[1])

    return Backend("periphery", periphery.tile_sums, mvm, ("cpu", "cuda"), small_codes=True,
                   cell_tile_sums=periphery.cell_tile_sums)


_PERIPHERY = _periphery_backend()


def backend_for(name: Optional[str], device: torch.device, p: GemmParams,
                cells: bool = False) -> Tuple[Backend, GemmParams]:
    """get_backend and the params it runs: a periphery (SPEC 8) whose kernel form
    (GemmParams.kernel_form) keeps only bits that the backend's kernels compute (``Backend.periphery``;
    none for the device-model ops, ``cells``) runs there; any other runs periphery.py on every backend
    but the reference (whose own loops compute section 8 literally)."""
    be = get_backend(name, device)
    kp = p.kernel_form()
    if kp is not None and not (kp.periphery & ~(0 if cells else be.periphery)):
        return be, kp
    return (be if be.name == "reference" else _PERIPHERY), p


def _missing_reason(name: str) -> str:
    if name == "cpu":
        return _C_HINT.format(err=_C_ERROR)
    if name == "cuda":
        return ("the C++ extension did not load" if not _HAS_C else
                "xma2_ops was built without its CUDA kernels (needs a CUDA build of torch and nvcc at build time)")
    return "Triton is not installed or failed to import (pip install triton)"


def available_backends(with_reasons: bool = False) -> Union[List[str], Dict[str, Optional[str]]]:
    """Names of the backends this install can run (on some device).  ``with_reasons=True``: a dict
    of every backend name to None (available) or why it is missing (e.g. the extension's import error)."""
    if not with_reasons:
        return list(_BACKENDS)
    return {name: None if name in _BACKENDS else _missing_reason(name) for name in _ALL_BACKENDS}


def check_backend_name(name: Optional[str]) -> None:
    if name is None or (isinstance(name, str) and name in _BACKENDS):
        return
    hint = f" ({_missing_reason(name)})" if isinstance(name, str) and name in _ALL_BACKENDS else ""
    raise ValueError(f"backend: expected one of {available_backends()} or None, got {name!r}{hint}")


def get_backend(name: Optional[str], device: torch.device) -> Backend:
    """The named backend, or the best one for ``device`` when name is None.

    On CUDA tensors the default is "triton" (the CUDA kernel has not been measured on a GPU yet),
    else "cuda" when the extension was built with its CUDA kernels, else the slow "reference".
    On CPU tensors it is the C++ "cpu" kernel; "triton" on CPU (TRITON_INTERPRET=1) is only
    for tests and must be asked for by name.  Falling back to "reference" warns (once) why.
    """
    check_backend_name(name)
    if name is None:
        order = ["triton", "cuda", "reference"] if device.type == "cuda" else ["cpu", "reference"]
        name = next(n for n in order if n in _BACKENDS)
        if name == "reference":
            _warn_no_c()
    be = _BACKENDS[name]
    if device.type not in be.devices:
        raise ValueError(f"backend: {name!r} runs on {list(be.devices)} tensors, got tensors on {device}")
    return be


# ------------------------------------------------------------------ the ops the layers call (autograd at op level)
@torch.library.custom_op("xma2_ops::crossbar_mvm", mutates_args=())
def _crossbar_mvm(x_codes: torch.Tensor, wb_codes: torch.Tensor, wt_codes: Optional[torch.Tensor],
                  coef_b: torch.Tensor, coef_t: Optional[torch.Tensor], rows: int, cols: int, input_bits: int,
                  input_signed: bool, dac_bits: int, weight_bits: int, cell_bits: int, adc_levels: int,
                  adc_clip: int, periphery: int, backend: str, wb_packed: Optional[torch.Tensor] = None,
                  wt_packed: Optional[torch.Tensor] = None) -> torch.Tensor:
    p = GemmParams(rows, cols, input_bits, input_signed, dac_bits, weight_bits, cell_bits, adc_levels, adc_clip,
                   periphery)
    be, p = backend_for(backend, x_codes.device, p)
    return be.mvm_with(x_codes, wb_codes, wb_packed, wt_codes, wt_packed, coef_b, coef_t, p)


@_crossbar_mvm.register_fake
def _crossbar_mvm_fake(x_codes, wb_codes, wt_codes, coef_b, coef_t, *args, wb_packed=None, wt_packed=None):
    torch._check(x_codes.dim() == 2 and wb_codes.dim() == 2)
    torch._check(x_codes.shape[1] == wb_codes.shape[0])
    return coef_b.new_empty((x_codes.shape[0], wb_codes.shape[1]))


def _crossbar_mvm_setup(ctx, inputs, output) -> None:
    x_codes, wb_codes, wt_codes, coef_b, coef_t, *ints, backend, wb_packed, wt_packed = inputs
    ctx.save_for_backward(x_codes, wb_codes, wt_codes, wb_packed, wt_packed)
    ctx.params = GemmParams(*ints)
    ctx.backend = backend
    ctx.coef_dtype = coef_b.dtype


def _crossbar_mvm_backward(ctx, gy):
    # Exact: y is linear in the coefficients, dy/dcoef[r, n] = T_int[r, :, n] (SPEC 5).
    x_codes, wb_codes, wt_codes, wb_packed, wt_packed = ctx.saved_tensors
    be, p = backend_for(ctx.backend, x_codes.device, ctx.params)
    g_b = g_t = None
    if ctx.needs_input_grad[3]:
        g_b = be.coef_gradient(x_codes, wb_codes, gy, p, wb_packed).to(ctx.coef_dtype)
    if wt_codes is not None and ctx.needs_input_grad[4]:
        g_t = be.coef_gradient(x_codes, wt_codes, gy, p, wt_packed).to(ctx.coef_dtype)
    return (None, None, None, g_b, g_t) + (None,) * 13


_crossbar_mvm.register_autograd(_crossbar_mvm_backward, setup_context=_crossbar_mvm_setup)


def crossbar_mvm(x_codes, wb_codes, wt_codes, coef_b, coef_t, p: GemmParams, backend: str, wb_packed=None,
                 wt_packed=None) -> torch.Tensor:
    """y [M, N] = sum_r coef_b T_b_int + coef_t T_t_int on ``backend``, differentiable in the coefficients;
    ``wb_packed``/``wt_packed``: the backend's packed forms of the codes (ProgrammedWeight.packed), or None."""
    return torch.ops.xma2_ops.crossbar_mvm(x_codes, wb_codes, wt_codes, coef_b, coef_t, *p.op_args(), backend,
                                           wb_packed, wt_packed)


@torch.library.custom_op("xma2_ops::straight_through_conv2d", mutates_args=())
def _ste_conv2d(x: torch.Tensor, w: torch.Tensor, stride: List[int], padding: List[int],
                dilation: List[int]) -> torch.Tensor:
    low = ConvLowering(tuple(x.shape), tuple(w.shape), tuple(stride), tuple(padding), tuple(dilation))
    return x.new_zeros(low.out_shape)


@_ste_conv2d.register_fake
def _ste_conv2d_fake(x, w, stride, padding, dilation):
    low = ConvLowering(tuple(x.shape), tuple(w.shape), tuple(stride), tuple(padding), tuple(dilation))
    return x.new_empty(low.out_shape)


@torch.library.custom_op("xma2_ops::straight_through_linear", mutates_args=())
def _ste_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.new_zeros((*x.shape[:-1], w.shape[0]))


@_ste_linear.register_fake
def _ste_linear_fake(x, w):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def _ste_setup(ctx, inputs, output) -> None:
    x, w, *geometry = inputs
    ctx.save_for_backward(x, w)
    ctx.geometry = tuple(tuple(g) for g in geometry)


def _ste_backward(ctx, gy):
    x, w = ctx.saved_tensors
    low = (ConvLowering(tuple(x.shape), tuple(w.shape), *ctx.geometry) if ctx.geometry
           else LinearLowering(tuple(x.shape), tuple(w.shape)))
    gx, gw = low.ste_grads(gy, x, w)
    return (gx if ctx.needs_input_grad[0] else None, gw if ctx.needs_input_grad[1] else None) + (None,) * len(
        ctx.geometry)


_ste_conv2d.register_autograd(_ste_backward, setup_context=_ste_setup)
_ste_linear.register_autograd(_ste_backward, setup_context=_ste_setup)


def straight_through(x: torch.Tensor, w: torch.Tensor, lowering) -> torch.Tensor:
    """Zeros of the layer's output shape whose gradient is the float layer's at (x, w)."""
    if isinstance(lowering, ConvLowering):
        return torch.ops.xma2_ops.straight_through_conv2d(x, w, list(lowering.stride), list(lowering.padding),
                                                          list(lowering.dilation))
    return torch.ops.xma2_ops.straight_through_linear(x, w)


@torch.library.custom_op("xma2_ops::crossbar_mvm_cells", mutates_args=())
def _crossbar_mvm_cells(x_codes: torch.Tensor, gb: torch.Tensor, gt: Optional[torch.Tensor], coef_b: torch.Tensor,
                        coef_t: Optional[torch.Tensor], rows: int, cols: int, input_bits: int, input_signed: bool,
                        dac_bits: int, weight_bits: int, cell_bits: int, adc_levels: int, adc_clip: int,
                        periphery: int, frac_bits: int, backend: str) -> torch.Tensor:
    p = GemmParams(rows, cols, input_bits, input_signed, dac_bits, weight_bits, cell_bits, adc_levels, adc_clip,
                   periphery)
    be, p = backend_for(backend, x_codes.device, p, cells=True)
    return be.cell_mvm(x_codes, gb, gt, coef_b, coef_t, p, frac_bits)


@_crossbar_mvm_cells.register_fake
def _crossbar_mvm_cells_fake(x_codes, gb, gt, coef_b, coef_t, *args):
    torch._check(x_codes.dim() == 2 and gb.dim() == 4)
    torch._check(x_codes.shape[1] == gb.shape[2])
    return coef_b.new_empty((x_codes.shape[0], gb.shape[3]))


def _crossbar_mvm_cells_setup(ctx, inputs, output) -> None:
    x_codes, gb, gt, coef_b, coef_t, *ints, frac_bits, backend = inputs
    ctx.save_for_backward(x_codes, gb, gt)
    ctx.params = GemmParams(*ints)
    ctx.frac_bits, ctx.backend, ctx.coef_dtype = frac_bits, backend, coef_b.dtype


def _crossbar_mvm_cells_backward(ctx, gy):
    x_codes, gb, gt = ctx.saved_tensors
    be, p = backend_for(ctx.backend, x_codes.device, ctx.params, cells=True)
    g_b = g_t = None
    if ctx.needs_input_grad[3]:
        g_b = be.cell_coef_gradient(x_codes, gb, gy, p, ctx.frac_bits).to(ctx.coef_dtype)
    if gt is not None and ctx.needs_input_grad[4]:
        g_t = be.cell_coef_gradient(x_codes, gt, gy, p, ctx.frac_bits).to(ctx.coef_dtype)
    return (None, None, None, g_b, g_t) + (None,) * 12


_crossbar_mvm_cells.register_autograd(_crossbar_mvm_cells_backward, setup_context=_crossbar_mvm_cells_setup)


def crossbar_mvm_cells(x_codes, gb, gt, coef_b, coef_t, p: GemmParams, frac_bits: int, backend: str) -> torch.Tensor:
    """crossbar_mvm over non-ideal cells: conductances gb/gt [2, S, K, N] int32 (SPEC 7.2)."""
    return torch.ops.xma2_ops.crossbar_mvm_cells(x_codes, gb, gt, coef_b, coef_t, *p.op_args(), frac_bits, backend)
