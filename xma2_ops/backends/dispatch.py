"""Which backend runs a call: the ``Backend`` names, the default per device type, and the
periphery (SPEC 8) conventions a backend's kernels compute.

The backends (one module each in this package): "cpu" and "cuda" (cpp.py, the C++ extension),
"triton" (triton/, optional: needs Triton), "reference" (reference.py, the readable oracle), and
"periphery" (periphery.py), which is never asked for by name: cpu, cuda and triton run it for a
periphery their kernels do not compute (``backend_for``).
"""
from __future__ import annotations

import enum
import importlib
from typing import Dict, List, Optional, Tuple, Union

import torch

from ..config import GemmParams
from . import cpp, periphery, reference
from .base import BackendBase


class Backend(str, enum.Enum):
    """The backend names a call may ask for (``backend=``; a plain string works as well).

    CPU         the C++ bit-plane kernels (csrc/cpu) on CPU tensors; the default there.
    CUDA        the C++ CUDA kernels on CUDA tensors (a build with nvcc).
    TRITON      fused Triton kernels; the default on CUDA tensors.  On CPU tensors they run in
                Triton's interpreter (TRITON_INTERPRET=1): for tests, and only when asked for by name.
    REFERENCE   the readable oracle (backends/reference.py) on any device; slow.
    """

    CPU = "cpu"
    CUDA = "cuda"
    TRITON = "triton"
    REFERENCE = "reference"


# The default backend per device type: the first of these that this install has.  Falling back to
# "reference" warns (once) why.
PRIORITIES: Dict[str, Tuple[Backend, ...]] = {
    "cuda": (Backend.TRITON, Backend.CUDA, Backend.REFERENCE),
    "cpu": (Backend.CPU, Backend.REFERENCE),
}

_BACKENDS: Dict[str, BackendBase] = {"reference": reference.BACKEND}
_BACKENDS.update(cpp.backends())
_TRITON_ERROR: Optional[BaseException] = None
try:
    _triton = importlib.import_module("xma2_ops.backends.triton.ops")
except ImportError as _err:
    _TRITON_ERROR = _err
else:
    _BACKENDS["triton"] = BackendBase("triton", _triton.tile_sums, _triton.mvm, _triton.DEVICES,
                                      cell_tile_sums=_triton.cell_tile_sums, cell_mvm_kernel=_triton.cell_mvm,
                                      pack_weights=_triton.pack_weights, mvm_packed=_triton.mvm_packed)


def backend_for(name: Optional[str], device: torch.device, p: GemmParams,
                cells: bool = False) -> Tuple[BackendBase, GemmParams]:
    """get_backend and the params it runs: a periphery (SPEC 8) whose kernel form
    (GemmParams.kernel_form) keeps only bits that the backend's kernels compute (``BackendBase.periphery``,
    or ``cell_periphery`` for the device-model ops, ``cells``) runs there; any other runs periphery.py on
    every backend but the reference (whose own loops compute section 8 literally)."""
    be = get_backend(name, device)
    kp = p.kernel_form()
    if kp is not None and not (kp.periphery & ~(be.cell_periphery if cells else be.periphery)):
        return be, kp
    return (be if be.name == "reference" else periphery.BACKEND), p


def _missing_reason(name: str) -> str:
    if name == "cpu":
        return cpp.C_HINT.format(err=cpp.C_ERROR)
    if name == "cuda":
        return ("the C++ extension did not load" if not cpp.HAS_C else
                "xma2_ops was built without its CUDA kernels (needs a CUDA build of torch and nvcc at build time)")
    return "Triton is not installed or failed to import (pip install triton)"


def available_backends(with_reasons: bool = False) -> Union[List[str], Dict[str, Optional[str]]]:
    """Names of the backends this install can run (on some device).  ``with_reasons=True``: a dict
    of every backend name to None (available) or why it is missing (e.g. the extension's import error)."""
    if not with_reasons:
        return list(_BACKENDS)
    return {b.value: None if b.value in _BACKENDS else _missing_reason(b.value) for b in Backend}


def check_backend_name(name: Optional[str]) -> None:
    if name is None or (isinstance(name, str) and name in _BACKENDS):
        return
    known = isinstance(name, str) and name in [b.value for b in Backend]
    hint = f" ({_missing_reason(name)})" if known else ""
    raise ValueError(f"backend: expected one of {available_backends()} or None, got {name!r}{hint}")


def get_backend(name: Optional[str], device: torch.device) -> BackendBase:
    """The named backend, or the best one for ``device`` when name is None (``PRIORITIES``)."""
    check_backend_name(name)
    if name is None:
        name = next(b.value for b in PRIORITIES.get(device.type, PRIORITIES["cpu"]) if b.value in _BACKENDS)
        if name == "reference":
            cpp.warn_no_c()
    be = _BACKENDS[name]
    reasons = be.not_supported_reasons(device)
    if reasons:
        raise ValueError(reasons[0])
    return be
