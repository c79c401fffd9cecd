"""Imperfect ReRAM cells (docs/SPEC.md section 7): the device model and the programming of a
weight's cells into fixed-point conductances.

Every physical cell -- (polarity q, slice j, row k, column n) of a weight's [K, N] GEMM layout --
gets a conductance G in units of one level step of an ideal cell.  Programming draws its
variation and drift exponent; the fault map belongs to the chip; read noise is drawn per forward
call.  All draws come from CPU generators seeded from (device seed, layer, purpose, counter), so
the same seed gives the same chip on every backend, machine and run; the kernels only read the
resulting integer conductances ``Gq = round_half_even(G * 2^frac_bits)``.

Choices where SPEC 7 leaves room (docs/DESIGN.md):
- a stuck cell neither drifts nor carries programming variation (its filament does not follow
  the write); read noise, a property of the read-out, applies to every cell;
- the functional API is stateless: it programs layer 0, write 0, read 0 of the chip on every
  call, so repeated calls see the same chip and the same read noise; layers count their writes
  and reads, so a layer re-draws read noise on every forward and programming variation on every
  re-programming;
- a fault draw is one uniform number per cell: stuck low when u < saf_low, stuck high when
  u >= 1 - saf_high;
- write-verify (SPEC 7.4): pulse 1 of a write is the write of SPEC 7.1 itself (its stream, its
  draws), so a cell that passes at once holds exactly what it holds without verify; pulse p >= 2
  and every verify read have their own streams (``_verify_pulses``).
"""
from __future__ import annotations

import collections
import hashlib
import math
from dataclasses import dataclass, fields
from typing import Dict, Optional, Tuple

import torch

# Presets: every value with its source.  Rates are fractions of cells, sigmas fractions of one
# cell's full range (sigma_abs, sigma_read) or of its own conductance (sigma_rel).
_PRESETS: Dict[str, dict] = {
    # Every non-ideality off: results are those of SPEC sections 1-6, bit for bit.
    "ideal": {},
    # MNSIM 2.0's evaluation setting (Zhu et al., "MNSIM 2.0", GLSVLSI 2020): 1 % device
    # variation and 0.1 % stuck-at faults (split evenly between low and high here: an assumption).
    "mnsim": dict(sigma_rel=0.01, saf_low=0.0005, saf_high=0.0005),
    # Stuck-at-fault rates measured on a fabricated ReRAM crossbar (Chen et al., "Rescuing
    # memristor-based neuromorphic design with high defects", DAC 2017), used by PytorX:
    # 1.75 % stuck at the high-resistance (low-conductance) state, 9.04 % at the low-resistance one.
    "chen2017": dict(saf_low=0.0175, saf_high=0.0904),
    # A "typical" multi-level ReRAM chip: on/off ratio 10, programming variation 5 % of the cell's
    # conductance plus 1 % of its range, 0.1 % stuck cells of each kind, small power-law drift read
    # one day after programming, 1 % read noise.  Orders of magnitude from the survey literature
    # (not one measured chip): an assumption, to be overridden with a chip's own numbers.
    "typical": dict(on_off=10.0, sigma_abs=0.01, sigma_rel=0.05, saf_low=0.001, saf_high=0.001,
                    nu_mean=0.005, nu_std=0.002, read_time=86400.0, sigma_read=0.01),
}


def _check_float(name: str, v, lo: float, hi: float = math.inf, lo_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"DeviceModel.{name}: expected a number, got {type(v).__name__} ({v!r})")
    v = float(v)
    if math.isnan(v) or v < lo or (lo_open and v == lo) or v > hi:
        rng = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise ValueError(f"DeviceModel.{name}: expected a value in {rng}, got {v}")
    return v


@dataclass(frozen=True)
class DeviceModel:
    """Non-ideal ReRAM cells (SPEC 7); every field off by default.

    on_off      on/off conductance ratio of a cell (> 1; inf = the lowest level conducts 0).
    sigma_abs   programming variation, std as a fraction of the cell's range (2^cell_bits - 1 levels).
    sigma_rel   programming variation, std as a fraction of the cell's own conductance.
    saf_low     fraction of cells stuck at the lowest conductance (g0).
    saf_high    fraction of cells stuck at the highest conductance (2^cell_bits - 1 + g0).
    nu_mean     mean drift exponent nu (G(t) = G (t / 1 s)^-nu), per cell nu ~ N(nu_mean, nu_std), >= 0.
    nu_std      std of the drift exponent.
    read_time   seconds between programming and reading (>= 1; 1 = no drift).
    sigma_read  read noise, std as a fraction of the cell's range, drawn anew per forward call.
    seed        the chip: the same seed gives the same fault map and draws everywhere.
    frac_bits   fractional bits of the fixed-point conductances Gq = round(G 2^frac_bits) (0-16).
    verify_tolerance   write-verify (SPEC 7.4): a written cell is read back and re-pulsed until
                |G_verify - G_ideal(L)| <= verify_tolerance (level steps, finite, >= 0); None = no verify.
    verify_max_pulses  pulses per cell write at most (1-1000); only used with a verify_tolerance.
    remap_stuck  stuck-aware programming (an extension of SPEC 7.1, off by default; docs/DEVICE.md):
                every weight with a stuck cell is programmed with the cell levels, among all pairs of
                per-slice levels of its + and - cells that leave the stuck cells at their stuck
                level, whose shift-and-add is closest to its code -- the chip's fault map being known
                from its test (march test or write-verify).  Other weights keep the SPEC 2 levels.
    """

    on_off: float = math.inf
    sigma_abs: float = 0.0
    sigma_rel: float = 0.0
    saf_low: float = 0.0
    saf_high: float = 0.0
    nu_mean: float = 0.0
    nu_std: float = 0.0
    read_time: float = 1.0
    sigma_read: float = 0.0
    seed: int = 0
    frac_bits: int = 8
    verify_tolerance: Optional[float] = None
    verify_max_pulses: int = 10
    remap_stuck: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "verify_tolerance":
                # None = no verify; else finite level steps (an infinite tolerance is no verify: say None)
                if v is not None:
                    _check_float(f.name, v, 0.0, 1e6)
                continue
            if f.name == "remap_stuck":
                if not isinstance(v, bool):
                    raise TypeError(f"DeviceModel.remap_stuck: expected a bool, got {type(v).__name__} ({v!r})")
                continue
            if f.name in ("seed", "frac_bits", "verify_max_pulses"):
                if isinstance(v, bool) or not isinstance(v, int):
                    raise TypeError(f"DeviceModel.{f.name}: expected an int, got {type(v).__name__} ({v!r})")
                lo, hi = {"seed": (0, 2 ** 63 - 1), "frac_bits": (0, 16), "verify_max_pulses": (1, 1000)}[f.name]
                if not lo <= v <= hi:
                    raise ValueError(f"DeviceModel.{f.name}: expected an int in [{lo}, {hi}], got {v}")
                continue
            if f.name == "on_off":
                _check_float("on_off", v, 1.0, math.inf, lo_open=True)
            elif f.name in ("saf_low", "saf_high"):
                _check_float(f.name, v, 0.0, 1.0)
            elif f.name == "read_time":
                _check_float("read_time", v, 1.0, 1e12)
            else:
                _check_float(f.name, v, 0.0, 1e3)
        if self.saf_low + self.saf_high > 1.0:
            raise ValueError(f"DeviceModel.saf_low + saf_high: expected at most 1, got "
                             f"{self.saf_low} + {self.saf_high}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "DeviceModel":
        """A named preset (``DeviceModel.presets()``), with fields overridden by keyword."""
        if name not in _PRESETS:
            raise ValueError(f"DeviceModel.preset: expected one of {sorted(_PRESETS)}, got {name!r}")
        return cls(**{**_PRESETS[name], **overrides})

    @staticmethod
    def presets() -> list:
        return sorted(_PRESETS)

    @property
    def ideal(self) -> bool:
        """Every non-ideality off: the cells hold exactly their levels (SPEC 1-6 bit for bit).
        Write-verify does not count: an exact write passes its first verify, so it changes nothing."""
        no_drift = self.read_time == 1.0 or (self.nu_mean == 0.0 and self.nu_std == 0.0)
        return (math.isinf(self.on_off) and self.sigma_abs == 0.0 and self.sigma_rel == 0.0 and
                self.saf_low == 0.0 and self.saf_high == 0.0 and no_drift and self.sigma_read == 0.0)

    def g0(self, cell_bits: int) -> float:
        """Conductance of the lowest level: (2^cb - 1) / (on_off - 1)."""
        return 0.0 if math.isinf(self.on_off) else (2 ** cell_bits - 1) / (self.on_off - 1.0)


# ------------------------------------------------------------------ random streams
def stream(seed: int, layer: int, purpose: str, counter: int = 0) -> torch.Generator:
    """A CPU generator for one purpose ("fault", "write", "read"; with write-verify also
    "write/pulse<p>" and "verify/pulse<p>") of one layer of the chip."""
    digest = hashlib.sha256(f"xma2/{seed}/{layer}/{purpose}/{counter}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2 ** 63 - 1))


# ------------------------------------------------------------------ programming
@dataclass(frozen=True)
class CellState:
    """The cells of one programmed weight: conductances after programming and drift, float64
    [2, S, K, N] (polarity +/-, slice, row, column), on the weight's device; ``stuck`` marks
    stuck cells (bool, same shape).  ``read(counter)`` gives the fixed-point conductances of one
    read (with read noise when the device has it).

    With write-verify (SPEC 7.4, ``device.verify_tolerance`` set), same layout: ``pulses`` (int16)
    is the number of pulses each cell's write took (1 ... verify_max_pulses) and ``verify_failed``
    (bool) marks the cells that used every pulse and still failed verify -- the faults the chip
    knows about (``known_faults()``).  Both are None without verify."""

    g: torch.Tensor
    stuck: torch.Tensor
    device: DeviceModel
    cell_bits: int
    layer: int
    pulses: Optional[torch.Tensor] = None
    verify_failed: Optional[torch.Tensor] = None
    levels: Optional[torch.Tensor] = None  # the levels L written, int64 [2, S, K, N] (remap_stuck: not SPEC 2's)

    def read(self, counter: int = 0, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Gq of read ``counter``; ``noise``: that read's ``read_noise(counter)`` when the caller has
        it already (drawn here otherwise)."""
        d = self.device
        if d.sigma_read == 0:
            return fixed_point(self.g, d.frac_bits)
        eps = self.read_noise(counter) if noise is None else noise
        # G + (2^cb - 1) sigma_read eps3, clamped, in place on the scaled noise (eps itself may serve the
        # layer's task cells too): the same roundings as out of place, two passes fewer
        g = (eps.to(self.g.device) * ((2 ** self.cell_bits - 1) * d.sigma_read)).add_(self.g).clamp_min_(0.0)
        return fixed_point(g, d.frac_bits, scratch=True)

    def read_noise(self, counter: int = 0) -> Optional[torch.Tensor]:
        """eps3 of read ``counter`` (SPEC 7.1), float64 on the CPU; None without read noise."""
        if self.device.sigma_read == 0:
            return None
        return torch.randn(self.g.shape, generator=stream(self.device.seed, self.layer, "read", counter),
                           dtype=torch.float64)

    def shares_reads(self, other: "CellState") -> bool:
        """Whether ``other``'s reads draw the same read noise as this state's: the same stream (device
        seed, layer) and shape -- a layer's backbone and task cells, so one draw serves both."""
        return (self.layer == other.layer and self.device.seed == other.device.seed
                and self.device.sigma_read == other.device.sigma_read and self.g.shape == other.g.shape)

    def known_faults(self) -> torch.Tensor:
        """bool [2, S, K, N]: the cells whose write failed verify after ``verify_max_pulses`` pulses
        (SPEC 7.4).  All False without verify: a chip that does not verify cannot know its faults
        (stuck cells that happen to hold their target are not faults either)."""
        return self.verify_failed if self.verify_failed is not None else torch.zeros_like(self.stuck)

    def write_pulses(self) -> torch.Tensor:
        """int16 [2, S, K, N]: the pulses (cell writes, SPEC 7.4 cost) each cell's write took; 1
        without verify."""
        return self.pulses if self.pulses is not None else torch.ones(self.g.shape, dtype=torch.int16,
                                                                      device=self.g.device)


def fixed_point(g: torch.Tensor, frac_bits: int, scratch: bool = False) -> torch.Tensor:
    """Gq = round_half_even(G 2^F) as int32 (checked: no conductance beyond int32).  ``scratch``: ``g`` is the
    caller's own temporary and is overwritten (one pass less over the cells on every read)."""
    q = g.mul_(2.0 ** frac_bits).round_() if scratch else torch.round(g * (2.0 ** frac_bits))
    top = float(q.max()) if q.numel() else 0.0
    if top >= 2 ** 31:
        raise ValueError(f"device: a conductance of {top / 2 ** frac_bits:.4g} level steps does not fit int32 at "
                         f"frac_bits={frac_bits}: lower frac_bits or the variation")
    return q.to(torch.int32)


def cell_levels(codes: torch.Tensor, weight_bits: int, cell_bits: int) -> torch.Tensor:
    """Levels L [2, S, K, N] of the cells holding weight codes [K, N] (SPEC 2 slices of w+ and w-)."""
    c = codes.to(torch.int64)
    s = -(-(weight_bits - 1) // cell_bits)
    mask = 2 ** cell_bits - 1
    pols = (c.clamp(min=0), (-c).clamp(min=0))
    return torch.stack([torch.stack([(p >> (j * cell_bits)) & mask for j in range(s)]) for p in pols])


def program_cells(codes: torch.Tensor, weight_bits: int, cell_bits: int, device: DeviceModel, layer: int,
                  write: int) -> CellState:
    """Program the cells of weight codes [K, N] (SPEC 7.1, and 7.4 with write-verify).  ``write``
    numbers the layer's writes: each draws its own programming variation and drift exponents; the
    fault map depends on (seed, layer) only, so a cell stuck for one write is stuck for every write."""
    levels = cell_levels(codes.cpu(), weight_bits, cell_bits)
    shape = levels.shape
    u = torch.rand(shape, generator=stream(device.seed, layer, "fault"), dtype=torch.float64)
    low, high = u < device.saf_low, u >= 1.0 - device.saf_high
    if device.remap_stuck:
        levels = _remapped(codes.cpu(), levels, low, high, cell_bits, device, layer)
    top = float(2 ** cell_bits - 1)
    g0 = device.g0(cell_bits)
    ideal = levels.to(torch.float64) + g0  # G_ideal(L)
    gen = stream(device.seed, layer, "write", write)
    g = _pulse(ideal, top, device, gen)
    nu = None
    if device.read_time > 1.0 and (device.nu_mean > 0 or device.nu_std > 0):
        # drawn from the write's stream right after pulse 1's variation, whatever verify does next
        nu = (device.nu_mean + device.nu_std * torch.randn(shape, generator=gen, dtype=torch.float64)).clamp_min(0.0)
    pulses = failed = None
    if device.verify_tolerance is not None:
        stuck_g = torch.where(low, torch.full_like(g, g0), torch.full_like(g, top + g0))
        g, pulses, failed = _verify_pulses(g, ideal, low | high, stuck_g, top, device, layer, write)
    if nu is not None:  # drift starts after the last pulse
        g = (g * torch.pow(torch.tensor(device.read_time, dtype=torch.float64), -nu)).clamp_min(0.0)
    g = torch.where(low, torch.full_like(g, g0), torch.where(high, torch.full_like(g, top + g0), g))
    dev = codes.device
    return CellState(g.to(dev), (low | high).to(dev), device, cell_bits, layer,
                     None if pulses is None else pulses.to(dev), None if failed is None else failed.to(dev),
                     levels.to(dev))


# remap_stuck's levels per (chip, layer, codes): noise-aware training re-programs the same codes on every
# batch (fresh variation, same faults), and the search is the slow part of programming
_REMAP_CACHE: "collections.OrderedDict[tuple, torch.Tensor]" = collections.OrderedDict()
_REMAP_CACHE_SIZE = 64


def _remapped(codes: torch.Tensor, levels: torch.Tensor, low: torch.Tensor, high: torch.Tensor, cell_bits: int,
              device: DeviceModel, layer: int) -> torch.Tensor:
    """stuck_aware_levels, remembered by what it depends on: the fault map (seed, layer, rates), the
    cell width and the codes (their bytes' digest)."""
    key = (device.seed, layer, device.saf_low, device.saf_high, cell_bits, tuple(levels.shape), str(codes.dtype),
           hashlib.sha256(codes.contiguous().numpy().tobytes()).hexdigest())
    hit = _REMAP_CACHE.get(key)
    if hit is not None:
        _REMAP_CACHE.move_to_end(key)
        return hit.to(torch.int64)
    out = stuck_aware_levels(levels, low, high, cell_bits)
    _REMAP_CACHE[key] = out.to(torch.int16)  # (a quarter of the memory; levels < 2^15)
    while len(_REMAP_CACHE) > _REMAP_CACHE_SIZE:
        _REMAP_CACHE.popitem(last=False)
    return out


MAX_REMAP_ENCODINGS = 1 << 16  # remap_stuck enumerates (2^(cb+1) - 1)^(S-1) digit choices per weight


def stuck_aware_levels(levels: torch.Tensor, low: torch.Tensor, high: torch.Tensor, cell_bits: int,
                       chunk: int = 8192) -> torch.Tensor:
    """``DeviceModel.remap_stuck``: levels [2, S, K, N] (int64, SPEC 2's) with every weight that has
    a stuck cell (``low``/``high``, same shape) re-encoded.  Per slice j the pair holds the signed digit
    d_j = L+_j - L-_j; a stuck cell fixes its own level (0 or top = 2^cb - 1), so d_j ranges over an
    interval (both cells free: [-top, top]).  Of all digit vectors in those intervals the one whose
    sum_j 2^(j cb) d_j is closest to the weight's code is taken (ties: the smallest sum_j |d_j|, then
    the first in enumeration order); free cells then hold the smallest levels giving d_j.  Exact: the
    digits of slices 1 ... S-1 are enumerated, and for each choice the best d_0 is the remainder
    clamped to slice 0's interval (|remainder - d_0| is convex in d_0)."""
    top = 2 ** cell_bits - 1
    s = levels.shape[1]
    n_rest = (2 * top + 1) ** (s - 1)
    if n_rest > MAX_REMAP_ENCODINGS:
        raise ValueError(f"DeviceModel.remap_stuck: {n_rest} digit choices per weight for {s} slices of "
                         f"{cell_bits} bits exceed {MAX_REMAP_ENCODINGS}; use fewer weight bits or more cell bits")
    stuck = low | high
    hit = stuck.flatten(0, 1).any(0)  # [K, N]: weights with a stuck cell
    if not bool(hit.any()):
        return levels
    out = levels.clone()
    k_idx, n_idx = hit.nonzero(as_tuple=True)
    base = torch.tensor([1 << (j * cell_bits) for j in range(s)], dtype=torch.int64)
    values = torch.arange(-top, top + 1, dtype=torch.int64)
    rest = (torch.cartesian_prod(*[values] * (s - 1)).reshape(n_rest, s - 1) if s > 1
            else torch.zeros(1, 0, dtype=torch.int64))  # [E, S-1]: digits of slices 1 ... S-1
    rest_sum, rest_size = rest @ base[1:], rest.abs().sum(1)
    for start in range(0, len(k_idx), chunk):
        k, n = k_idx[start:start + chunk], n_idx[start:start + chunk]
        lv, st = levels[:, :, k, n], stuck[:, :, k, n]  # [2, S, W]
        val = torch.where(high[:, :, k, n], top, 0)  # a stuck cell's level
        code = ((lv[0] - lv[1]) * base[:, None]).sum(0)  # [W]
        # d_j = L+_j - L-_j over the levels each cell can hold: its stuck level, or 0 ... top
        lo = torch.where(st[0], val[0], 0) - torch.where(st[1], val[1], top)  # [S, W]
        hi = torch.where(st[0], val[0], top) - torch.where(st[1], val[1], 0)
        ok = torch.ones(len(k), n_rest, dtype=torch.bool)
        for j in range(1, s):
            dj = rest[:, j - 1][None, :]
            ok &= (dj >= lo[j][:, None]) & (dj <= hi[j][:, None])
        d0 = torch.minimum(torch.maximum(code[:, None] - rest_sum[None, :], lo[0][:, None]), hi[0][:, None])  # [W, E]
        err = (rest_sum[None, :] + d0 - code[:, None]).abs()
        score = torch.where(ok, err * (s * top + 1) + rest_size[None, :] + d0.abs(), torch.iinfo(torch.int64).max)
        best = score.argmin(1)
        d = torch.cat([d0.gather(1, best[:, None]).T, rest[best].T], 0)  # [S, W]
        plus = torch.where(st[0], val[0], torch.where(st[1], d + val[1], d.clamp_min(0)))
        minus = torch.where(st[1], val[1], torch.where(st[0], val[0] - d, (-d).clamp_min(0)))
        out[0, :, k, n], out[1, :, k, n] = plus, minus
    return out


def _pulse(ideal: torch.Tensor, top: float, device: DeviceModel, gen: torch.Generator) -> torch.Tensor:
    """One programming pulse on every cell: G_prog = G_ideal + top sigma_abs eps1 + G_ideal sigma_rel eps2,
    G >= 0 (SPEC 7.1); draws eps1 then eps2, full tensors, from ``gen``."""
    if device.sigma_abs > 0 or device.sigma_rel > 0:
        e1 = torch.randn(ideal.shape, generator=gen, dtype=torch.float64)
        e2 = torch.randn(ideal.shape, generator=gen, dtype=torch.float64)
        return (ideal + top * device.sigma_abs * e1 + ideal * device.sigma_rel * e2).clamp_min(0.0)
    return ideal


def _verify_pulses(g: torch.Tensor, ideal: torch.Tensor, stuck: torch.Tensor, stuck_g: torch.Tensor, top: float,
                   device: DeviceModel, layer: int, write: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Write-verify (SPEC 7.4) after pulse 1 (``g``, before drift): returns the written conductances
    (stuck cells: whatever was last written, their stuck value overrides it), the pulses per cell
    (int16) and the cells that failed every verify.

    Streams (device.stream, counter = ``write``): pulse p >= 2 draws eps1, eps2 from purpose
    "write/pulse<p>", the verify read after pulse p >= 1 draws eps from "verify/pulse<p>" (pulse 1
    is the write of SPEC 7.1, purpose "write").  Every stream draws full tensors, so a cell's draws
    depend on (seed, layer, write, pulse) only, never on which other cells still need pulses."""
    tau, max_pulses = float(device.verify_tolerance), device.verify_max_pulses

    def failed_verify(g_now: torch.Tensor, pulse: int) -> torch.Tensor:
        held = torch.where(stuck, stuck_g, g_now)  # a stuck cell ignores the pulse
        if device.sigma_read > 0:
            eps = torch.randn(held.shape, generator=stream(device.seed, layer, f"verify/pulse{pulse}", write),
                              dtype=torch.float64)
            held = (held + top * device.sigma_read * eps).clamp_min(0.0)
        return (held - ideal).abs() > tau

    pulses = torch.ones(g.shape, dtype=torch.int16)
    active = failed_verify(g, 1)
    for pulse in range(2, max_pulses + 1):
        if not bool(active.any()):
            break
        if device.sigma_read == 0 and not bool((active & ~stuck).any()):
            # only stuck cells left and a noiseless verify read: each fails every remaining pulse
            pulses[active] = max_pulses
            break
        g = torch.where(active, _pulse(ideal, top, device, stream(device.seed, layer, f"write/pulse{pulse}", write)),
                        g)
        pulses += active
        active = active & failed_verify(g, pulse)
    return g, pulses, active


def cell_weight_codes(gq: torch.Tensor, cell_bits: int, frac_bits: int) -> torch.Tensor:
    """The weight codes the cells actually hold, [K, N] float64: sum_j 2^(j cb) (G+_j - G-_j) / 2^F
    (an ideal device gives back the integer codes; g0 cancels in the differential pair)."""
    s = gq.shape[1]
    shifts = torch.tensor([2.0 ** (j * cell_bits) for j in range(s)], dtype=torch.float64, device=gq.device)
    d = (gq[0].to(torch.float64) - gq[1].to(torch.float64))
    return torch.einsum("j,jkn->kn", shifts, d) / 2.0 ** frac_bits
