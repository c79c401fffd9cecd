"""The programmed crossbar state: what the cells of a layer's PEs hold.

Real crossbars are programmed once and read many times.  ``ProgrammedWeight`` is the result of
programming one weight tensor: its integer codes per cell position (SPEC 2) and the scale that
maps them back to weights.  Every kernel reads these codes; nothing downstream re-derives them
from the float weight.  (The device model of SPEC 7 adds the cells' conductances here.)

Who programs:
- the functional API (``xbar_conv2d``/``xbar_linear``) programs a temporary state on every call:
  stateless, always right;
- ``XbarConv2d``/``XbarLinear`` own a ``ProgrammingCache`` per weight slot ("weight" for the
  backbone, "task_weight" for tier 1): in training mode they program on every forward (weights
  change every step); in eval mode they keep the state while the weight's *content* is unchanged,
  checked by an exact comparison with a copy taken at programming time.  So every way of changing
  a weight is seen: optimizer steps, ``load_state_dict``, ``.to()``, in-place writes, ``.data``
  writes and writes through ``.numpy()`` (none of which need to bump ``_version``).

Threads: a layer shared by threads is programmed once per weight content.  In eval mode a cache
programs under its lock and first looks again whether another thread has just programmed the
same weight, so every thread uses that one state (one write, one chip); the chip's counters are
advanced under their own lock, so every write and read gets its own number.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional, Tuple

import torch

from .device import CellState, DeviceModel, cell_weight_codes, program_cells
from .quant import compute_dtype, quantize_weight


class _Lock:
    """A re-entrant lock that deep-copies and pickles as a fresh, unlocked one (layers are copied
    with copy.deepcopy; a threading lock itself cannot be)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()

    def __enter__(self) -> bool:
        return self._lock.__enter__()

    def __exit__(self, *exc) -> None:
        self._lock.__exit__(*exc)

    def __reduce__(self):
        return (_Lock, ())


@dataclass
class ChipPosition:
    """Where a layer sits on the chip and how often its cells were written and read: the counters
    that number the random draws of SPEC 7 (device.stream).  Layers own one; the functional API
    uses a fresh one per call (layer 0: the same chip every call).  The counters advance under a
    lock: threads sharing a layer never get the same number, nor lose one."""

    layer: int = 0
    writes: int = 0
    reads: int = 0
    _lock: _Lock = field(default_factory=_Lock, compare=False, repr=False)

    def next_write(self) -> int:
        with self._lock:
            self.writes += 1
            return self.writes - 1

    def next_read(self) -> int:
        with self._lock:
            self.reads += 1
            return self.reads - 1


@dataclass(frozen=True)
class ProgrammedWeight:
    """One weight tensor [N, ...] programmed onto crossbars.

    codes   [K, N] int32 weight codes in [-Qw, Qw] (the GEMM layout of SPEC 1; K = prod(shape[1:])).
    scale   weight scale s_w: a 0-dim tensor or one per output column [N] (compute dtype).
    shape   the float weight's shape (to map gradients and dequantised weights back).
    cells   with a non-ideal device model (SPEC 7): the programmed cells' conductances; else None.
    key     what the programming depended on besides the weight (bits, cells, device).

    ``packed(backend, params)`` is the backend's kernel form of ``codes`` (bit planes, tile bytes),
    made from these codes on first use and kept in this object only: it lives and dies with the codes
    (re-programming makes a new ProgrammedWeight), so it cannot be stale.  The codes are read-only;
    an in-place write to them (which no code of the package makes) is still seen by their version
    counter and re-packs.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    weight_bits: int
    shape: tuple
    cells: Optional[CellState] = None
    key: tuple = ()
    _kept: dict = field(default_factory=dict, compare=False, repr=False)  # key -> (version, derived form)

    def _keep(self, key: tuple, version: tuple, make):
        """``make()``, kept here under ``key`` until ``version`` changes (the codes or the scale were
        written in place)."""
        hit = self._kept.get(key)
        if hit is None or hit[0] != version:
            hit = (version, make())
            self._kept[key] = hit
        return hit[1]

    def packed(self, backend, params) -> Optional[torch.Tensor]:
        """``backend.pack_weights(codes, params)``, made once per (backend, params, XMA2_CPU_ISA); None
        when the backend packs per call, and under torch.compile (the op then packs inside the graph)."""
        if backend.pack_weights is None or torch.compiler.is_compiling():
            return None
        from .backends import backend_for
        runs, kp = backend_for(backend.name, self.codes.device, params)
        if runs.name != backend.name:
            return None  # (a periphery that the kernels do not compute runs backends/periphery.py, which packs nothing)
        # the params the kernel runs (GemmParams.kernel_form), which the packed header is checked against
        key = ("packed", backend.name, kp.as_args(with_periphery=True), os.environ.get("XMA2_CPU_ISA", ""))
        return self._keep(key, (_version_of(self.codes),), lambda: backend.pack_weights(self.codes, kp))

    def dequantized(self, dtype: torch.dtype, gq: Optional[torch.Tensor] = None) -> torch.Tensor:
        """s * codes in the weight's own layout [N, ...]: the weight the cells hold, as a float
        weight (from the conductances ``gq`` of one read when the cells are non-ideal).  From the
        codes it is made once per dtype and kept here, like ``packed`` (a fresh read's is not)."""
        s = self.scale.reshape(-1, 1)
        if gq is not None:
            return _weight_layout(cell_weight_codes(gq, self.cells.cell_bits, self.cells.device.frac_bits), s,
                                  self.shape, dtype)
        if torch.compiler.is_compiling():
            return _weight_layout(self.codes, s, self.shape, dtype)
        return self._keep(("dequantized", dtype), (_version_of(self.codes), _version_of(self.scale)),
                          lambda: _weight_layout(self.codes, s, self.shape, dtype))


def _weight_layout(codes: torch.Tensor, s: torch.Tensor, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """s * codes [K, N] as a contiguous float weight [N, ...] (a transposed view would make every
    convolution with it copy or take a slow path)."""
    return (codes.T.to(s.dtype) * s).contiguous().reshape(shape).to(dtype)


def _version_of(t: torch.Tensor) -> int:
    """t's version counter (bumped by in-place writes); -1 for inference tensors, which have none
    (and cannot be written outside inference mode)."""
    try:
        return t._version
    except RuntimeError:
        return -1


def program_key(weight_bits: int, cell_bits: int, device: Optional[DeviceModel]) -> tuple:
    return (weight_bits,) if device is None else (weight_bits, cell_bits, device)


def program_weight(w: torch.Tensor, scale: torch.Tensor, weight_bits: int, *, cell_bits: int = 0,
                   device: Optional[DeviceModel] = None, chip: Optional[ChipPosition] = None) -> ProgrammedWeight:
    """Program ``w`` [N, ...] with ``scale`` (scalar or [N], in w's compute dtype): SPEC 2 weight codes,
    and with a (non-ideal) ``device`` the cells of SPEC 7.1, written at ``chip``."""
    cd = compute_dtype(w)
    s = scale.to(cd)
    w2 = w.detach().reshape(w.shape[0], -1).to(cd)
    codes = quantize_weight(w2, s.reshape(-1, 1), weight_bits).T.contiguous().to(torch.int32)
    cells = None
    if device is not None:
        chip = chip if chip is not None else ChipPosition()
        cells = program_cells(codes, weight_bits, cell_bits, device, chip.layer, chip.next_write())
    return ProgrammedWeight(codes, s, weight_bits, tuple(w.shape), cells, program_key(weight_bits, cell_bits, device))


class _Entry(NamedTuple):
    """A programmed state and what it was programmed from (replaced as a whole, so a thread never
    sees the state of one programming with the source of another)."""

    state: ProgrammedWeight
    source: Optional[torch.Tensor]  # copy of the weight (None: not kept, never reused)
    given_scale: Optional[torch.Tensor]


class ProgrammingCache:
    """A layer's programmed state for one weight slot, reused while the weight is unchanged.

    ``same_source`` says (on the device) whether ``w`` equals (bit for bit, same shape/dtype/device)
    the tensor the state was programmed from, with the same scale and bits; ``store`` keeps a copy
    of ``w`` for that comparison.  One comparison per forward in eval mode, no global state, no
    keys on tensor identity or version counters (which ``.data`` writes do not bump).
    ``program_once`` programs under the cache's lock (see the module docstring: threads)."""

    def __init__(self, lock: Optional[_Lock] = None) -> None:
        self._entry: Optional[_Entry] = None
        self.lock = lock if lock is not None else _Lock()  # a layer's caches share one

    @property
    def state(self) -> Optional[ProgrammedWeight]:
        entry = self._entry
        return None if entry is None else entry.state

    def clear(self) -> None:
        self._entry = None

    def same_source(self, w: torch.Tensor, given_scale: Optional[torch.Tensor],
                    key: tuple) -> Optional[Tuple[torch.Tensor, ProgrammedWeight]]:
        """(a 0-dim bool tensor: is ``w`` what the state was programmed from, with the same
        programming ``key``?, that state).  None when it cannot be (no state, other
        key/shape/dtype/device/scale kind).  The flag stays on the device: the caller folds it
        into its one host synchronisation, and then uses the state returned with it (not
        ``self.state``, which another thread may have replaced meanwhile)."""
        entry = self._entry
        src = None if entry is None else entry.source
        if (src is None or entry.state.key != key or src.shape != w.shape
                or src.dtype != w.dtype or src.device != w.device):
            return None
        if (given_scale is None) != (entry.given_scale is None):
            return None
        same = (src == w).all()
        if given_scale is not None:
            if given_scale.shape != entry.given_scale.shape:
                return None
            same = same & (given_scale == entry.given_scale).all()
        return same, entry.state

    def store(self, w: torch.Tensor, given_scale: Optional[torch.Tensor], state: ProgrammedWeight,
              keep_source: bool) -> None:
        source = w.detach().clone() if keep_source else None
        given = given_scale.detach().clone() if (keep_source and given_scale is not None) else None
        self._entry = _Entry(state, source, given)

    def program_once(self, w: torch.Tensor, given_scale: Optional[torch.Tensor], key: tuple,
                     make: Callable[[], ProgrammedWeight]) -> ProgrammedWeight:
        """The state for ``w``: ``make()`` (which programs and checks), stored, unless another
        thread has stored one for this very weight while this one waited for the lock."""
        with self.lock:
            hit = self.same_source(w, given_scale, key)
            if hit is not None and bool(hit[0]):
                return hit[1]
            state = make()
            self.store(w, given_scale, state, keep_source=True)
            return state
