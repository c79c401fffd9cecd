"""XbarConfig: every hardware parameter of the simulated crossbar, validated once.

Units: ``rows``/``cols`` are crossbar cells, every ``*_bits`` is bits, ``adc_clip`` is
the partial-sum value (in units of one input-chunk x weight-slice product) that maps to
the ADC's full scale.  See docs/SPEC.md for the semantics.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from .device import DeviceModel

# Within these limits (rows <= 2^16, bits <= 16) every partial sum and every digital tile
# sum T_int stays below 2^50 (see tile_sum_bound): exact in int64 and in float64.
_MAX_DIM = 1 << 16
# ADC full scale: with P <= Pmax < 2^33 and n < 2^24, 2*P*n + clip (and its fixed-point form
# of SPEC 7.2, 2^F times larger with F <= 16) stays below 2^63 in every backend's int64 ADC.
MAX_ADC_CLIP = 1 << 32


# Periphery conventions (SPEC 8): field -> its values, the default (Sections 2-3) first.
PERIPHERY_FIELDS: Dict[str, Tuple[str, str]] = {
    "sensing": ("per_polarity", "differential"),
    "input_accumulation": ("digital", "analog"),
    "signed_inputs": ("two_pass", "sign_magnitude"),
    "adc_rounding": ("half_up", "half_even"),
    "row_split": ("fixed", "even"),
    "adc_range": ("clip", "tile_rows"),
}
# Each non-default value is one bit of GemmParams.periphery (the order of PERIPHERY_FIELDS).
PERIPHERY_BIT: Dict[str, int] = {name: 1 << i for i, name in enumerate(PERIPHERY_FIELDS)}
# The periphery bits that a bit-plane kernel can compute itself, once analog accumulation is reduced to
# one chunk (GemmParams.kernel_form): the C++ CPU kernels do (BackendBase.periphery, backends/base.py), the
# row split and the per-tile ADC range included (their tile layout and per-tile ADCs: csrc/xbar_quant.h).
KERNEL_PERIPHERY = (PERIPHERY_BIT["sensing"] | PERIPHERY_BIT["signed_inputs"] | PERIPHERY_BIT["adc_rounding"]
                    | PERIPHERY_BIT["row_split"] | PERIPHERY_BIT["adc_range"])
# Named sets of conventions for XbarConfig.conventions(); docs/PERIPHERY.md gives the sources.
PERIPHERY_PRESETS: Dict[str, Dict[str, str]] = {
    "xma2": {name: values[0] for name, values in PERIPHERY_FIELDS.items()},
    # CrossSim 3.2's defaults: differential (BALANCED) sensing, analog input accumulation, sign-magnitude
    # inputs, numpy's rint (half to even), the EQUAL row partition, per-array ADC range.
    "crosssim": {"sensing": "differential", "input_accumulation": "analog", "signed_inputs": "sign_magnitude",
                 "adc_rounding": "half_even", "row_split": "even", "adc_range": "tile_rows"},
}


def row_tile_sizes(k: int, rows: int, row_split: str = "fixed") -> Tuple[int, ...]:
    """The rows of each of the Tr = ceil(K/R) row tiles (SPEC 1 and 8.4): the one Python rule.

    fixed: R rows each, the last the rest.  even: K/Tr each when Tr divides K, else
    round_half_even(K/Tr) for the first Tr - 1 and the rest for the last (CrossSim's EQUAL rule);
    refused when that last tile would exceed R rows."""
    tr = -(-k // rows)
    if tr <= 1:
        return (k,) if k else ()
    if row_split == "fixed":
        return (rows,) * (tr - 1) + (k - (tr - 1) * rows,)
    size = round(k / tr) if k % tr else k // tr  # Python's round() is half to even, k / tr exact enough (K < 2^53)
    last = k - (tr - 1) * size
    if last > rows:
        raise ValueError(f"XbarConfig.row_split: 'even' splits K = {k} rows into {tr} tiles of {size} and a last one "
                         f"of {last} > R = {rows} rows; use row_split='fixed' or other rows")
    return (size,) * (tr - 1) + (last,)


# ---- derived numbers (SPEC 2, 3, 8.1): each computed here once; XbarConfig and GemmParams delegate.
def magnitude_bits(input_bits: int, signed: bool) -> int:
    """Magnitude bits per input polarity: bits - 1 signed, bits unsigned."""
    return input_bits - 1 if signed else input_bits


def weight_slice_count(weight_bits: int, cell_bits: int) -> int:
    """S = ceil((wb-1)/cb): cell columns per weight polarity."""
    return -(-(weight_bits - 1) // cell_bits)


def input_chunk_count(x_bits: int, dac_bits: int) -> int:
    """I = ceil(magnitude bits / db): DAC cycles per input polarity."""
    return -(-x_bits // dac_bits)


def partial_sum_max(rows: int, dac_bits: int, cell_bits: int) -> int:
    """Pmax of SPEC 3: R (2^db - 1)(2^cb - 1)."""
    return rows * (2 ** dac_bits - 1) * (2 ** cell_bits - 1)


def full_scale_per_row(cell_bits: int, d_bits: int) -> int:
    """Vmax of one row (SPEC 8.1): (2^cb - 1)(2^D - 1), D the bits one conversion sees per input."""
    return (2 ** cell_bits - 1) * (2 ** d_bits - 1)


def row_layout(k: int, rows: int, row_split: str):
    """How K rows map to row tiles: R (fixed split) or each tile's rows (even split; SPEC 8.4)."""
    return rows if row_split == "fixed" else row_tile_sizes(k, rows, "even")


def _check_int(name: str, value, lo: int, hi: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        expected = "an int or None" if allow_none else "an int"
        raise TypeError(f"XbarConfig.{name}: expected {expected}, got {type(value).__name__} ({value!r})")
    if not lo <= value <= hi:
        raise ValueError(f"XbarConfig.{name}: expected an int in [{lo}, {hi}], got {value}")


@dataclass(frozen=True)
class XbarConfig:
    """Crossbar hardware configuration (frozen; validated on creation).

    rows, cols      crossbar (PE) size in cells: K rows (inputs) x N columns (outputs).
    weight_bits     signed weight precision in bits (magnitude ``weight_bits-1`` bits,
                    stored on a differential pair); None = float weights.
    cell_bits       bits stored per ReRAM cell (one weight slice per cell column).
    input_bits      input (activation) precision in bits; None = float inputs.
    dac_bits        bits driven per input cycle (1 = bit-serial).
    adc_bits        ADC resolution in bits; None = ideal ADC (exact partial sums).
    adc_clip        partial sum mapped to the ADC full scale; None = Pmax (no clipping).
    input_signed    True/False fix the input encoding; None = signed when a negative value
                    is seen (the op: in this call; modules: during calibration).
    device          the ReRAM cells' non-idealities (DeviceModel, SPEC 7); None = ideal cells.

    Periphery conventions (SPEC 8; defaults = Sections 2-3 bit for bit; ``conventions(name)``
    gives a named set):
    sensing             "per_polarity": each weight polarity's column has its own conversion;
                        "differential": the + and - columns are subtracted before one signed ADC.
    input_accumulation  "digital": one conversion per input chunk (DAC cycle), shift-and-add after;
                        "analog": the chunks are summed with their weights before one conversion.
    signed_inputs       "two_pass": negative and positive inputs driven in two passes;
                        "sign_magnitude": one pass, each chunk carries the input's sign.
    adc_rounding        "half_up" or "half_even": how a value exactly between two codes rounds.
    row_split           "fixed": row tiles of R rows, the last the rest; "even": tiles as equal
                        as possible (SPEC 8.4).
    adc_range           "clip": one full scale for every tile (adc_clip, default from R rows);
                        "tile_rows": with adc_clip=None, each tile's full scale from its own rows.
    """

    rows: int = 128
    cols: int = 128
    weight_bits: Optional[int] = 8
    cell_bits: int = 2
    input_bits: Optional[int] = 8
    dac_bits: int = 1
    adc_bits: Optional[int] = 8
    adc_clip: Optional[int] = None
    input_signed: Optional[bool] = None
    device: Optional[DeviceModel] = None
    sensing: str = "per_polarity"
    input_accumulation: str = "digital"
    signed_inputs: str = "two_pass"
    adc_rounding: str = "half_up"
    row_split: str = "fixed"
    adc_range: str = "clip"

    @classmethod
    def conventions(cls, name: str, **fields) -> "XbarConfig":
        """A config with a named set of periphery conventions (``PERIPHERY_PRESETS``: "xma2" = the
        defaults, "crosssim" = CrossSim 3.2's defaults); ``fields`` set the rest."""
        if name not in PERIPHERY_PRESETS:
            raise ValueError(f"XbarConfig.conventions: expected one of {sorted(PERIPHERY_PRESETS)}, got {name!r}")
        return cls(**{**PERIPHERY_PRESETS[name], **fields})

    def __post_init__(self) -> None:
        _check_int("rows", self.rows, 1, _MAX_DIM)
        _check_int("cols", self.cols, 1, _MAX_DIM)
        _check_int("weight_bits", self.weight_bits, 2, 16, allow_none=True)
        _check_int("cell_bits", self.cell_bits, 1, 8)
        _check_int("input_bits", self.input_bits, 1, 16, allow_none=True)
        _check_int("dac_bits", self.dac_bits, 1, 8)
        _check_int("adc_bits", self.adc_bits, 1, 24, allow_none=True)
        if self.adc_clip is not None:
            if isinstance(self.adc_clip, bool) or not isinstance(self.adc_clip, int):
                raise TypeError(f"XbarConfig.adc_clip: expected a positive int or None, got {self.adc_clip!r}")
            if not 1 <= self.adc_clip <= MAX_ADC_CLIP:
                raise ValueError(f"XbarConfig.adc_clip: expected an int in [1, 2**32] or None, got {self.adc_clip}")
        if self.input_signed is not None and not isinstance(self.input_signed, bool):
            raise TypeError(f"XbarConfig.input_signed: expected True, False or None, got {self.input_signed!r}")
        if self.adc_bits is not None and (self.input_bits is None or self.weight_bits is None):
            raise ValueError(
                "XbarConfig.adc_bits: an ADC needs integer partial sums, so adc_bits must be None "
                f"when input_bits ({self.input_bits}) or weight_bits ({self.weight_bits}) is None")
        if self.input_bits is not None and self.weight_bits is None:
            raise ValueError(
                f"XbarConfig.input_bits: quantised inputs need quantised weights (no mode computes integer inputs "
                f"with float weights), so input_bits must be None when weight_bits is None, got {self.input_bits}")
        if self.device is not None:
            if not isinstance(self.device, DeviceModel):
                raise TypeError(f"XbarConfig.device: expected a DeviceModel or None, got {type(self.device).__name__}")
            if self.weight_bits is None:
                raise ValueError("XbarConfig.device: a device model needs programmed cells, so weight_bits must be "
                                 "set (the ideal crossbar, weight_bits=None, holds float weights)")
        if self.input_signed is True and self.input_bits == 1:
            raise ValueError("XbarConfig.input_bits: signed inputs need input_bits >= 2 (one sign bit), got 1")
        for name, values in PERIPHERY_FIELDS.items():
            v = getattr(self, name)
            if not isinstance(v, str):
                raise TypeError(f"XbarConfig.{name}: expected one of {values}, got {type(v).__name__} ({v!r})")
            if v not in values:
                raise ValueError(f"XbarConfig.{name}: expected one of {values}, got {v!r}")
        if self.adc_bits == 1 and (self.sensing == "differential"
                                   or (self.signed_inputs == "sign_magnitude" and self.input_signed is not False)):
            # A signed ADC has 2^b - 2 steps with 0 a code: one bit gives no step at all.
            raise ValueError("XbarConfig.adc_bits: a signed ADC (sensing='differential', or signed_inputs="
                             "'sign_magnitude' with inputs that may be signed) needs adc_bits >= 2, got 1")
        if self.quantized and self.adc_clip is None:
            for signed in (False, True):
                if signed and self.input_bits < 2:
                    continue
                if self.full_scale(self.rows, signed) > MAX_ADC_CLIP:
                    raise ValueError(
                        f"XbarConfig.input_accumulation: the ADC full scale {self.full_scale(self.rows, signed)} "
                        f"(rows x cell levels x input levels) exceeds 2**32; set adc_clip or use fewer bits or rows")

    # ---- derived numbers (SPEC sections 2 and 3) ----
    @property
    def ideal(self) -> bool:
        """No quantisation at all: y = conv2d(x, W_eff)."""
        return self.weight_bits is None and self.input_bits is None

    @property
    def quantized(self) -> bool:
        """Integer inputs and weights: the bit-sliced crossbar path."""
        return self.weight_bits is not None and self.input_bits is not None

    @property
    def weight_qmax(self) -> int:
        """Qw = 2^(wb-1) - 1."""
        assert self.weight_bits is not None
        return 2 ** (self.weight_bits - 1) - 1

    @property
    def weight_slices(self) -> int:
        """S = ceil((wb-1)/cb): cell columns per weight polarity."""
        assert self.weight_bits is not None
        return weight_slice_count(self.weight_bits, self.cell_bits)

    def input_qmax(self, signed: bool) -> int:
        """Qx: 2^ab - 1 unsigned, 2^(ab-1) - 1 signed."""
        assert self.input_bits is not None
        return 2 ** (self.input_bits - 1) - 1 if signed else 2 ** self.input_bits - 1

    def input_magnitude_bits(self, signed: bool) -> int:
        assert self.input_bits is not None
        return magnitude_bits(self.input_bits, signed)

    def input_chunks(self, signed: bool) -> int:
        """I = ceil(bits/db): DAC cycles per input polarity."""
        return input_chunk_count(self.input_magnitude_bits(signed), self.dac_bits)

    @property
    def pmax(self) -> int:
        """Largest analog partial sum of Section 3: R (2^db - 1)(2^cb - 1)."""
        return partial_sum_max(self.rows, self.dac_bits, self.cell_bits)

    @property
    def periphery(self) -> int:
        """The periphery conventions as GemmParams' bit field (0 = Sections 2-3).  adc_range='tile_rows'
        counts only with adc_clip=None (a given clip is every tile's full scale)."""
        bits = sum(PERIPHERY_BIT[n] for n, values in PERIPHERY_FIELDS.items() if getattr(self, n) != values[0])
        return bits & ~PERIPHERY_BIT["adc_range"] if self.adc_clip is not None else bits

    def full_scale(self, rows: int, signed: bool) -> int:
        """Vmax of SPEC 8.1 for a tile of ``rows`` rows: rows (2^cb - 1) D, D = 2^db - 1 (digital) or
        2^bits - 1 (analog accumulation; bits = the input's magnitude bits)."""
        d_bits = self.input_magnitude_bits(signed) if self.input_accumulation == "analog" else self.dac_bits
        return rows * full_scale_per_row(self.cell_bits, d_bits)

    @property
    def clip(self) -> int:
        """ADC full scale (adc_clip, default the full scale of R rows: Pmax under the default conventions)."""
        if self.adc_clip is not None:
            return self.adc_clip
        return self.full_scale(self.rows, bool(self.input_signed)) if self.input_bits is not None else self.pmax

    @property
    def adc_levels(self) -> int:
        """n = min(2^ba - 1, clip); 0 for the ideal ADC."""
        if self.adc_bits is None:
            return 0
        return min(2 ** self.adc_bits - 1, self.clip)

    @property
    def uses_cells(self) -> bool:
        """A device model with some non-ideality: the kernels read per-cell conductances (SPEC 7)."""
        return self.device is not None and not self.device.ideal

    @property
    def adc_step(self) -> float:
        """P_hat = code * adc_step (clip / n); 1 for the ideal ADC (ideal cells)."""
        return 1.0 if self.adc_bits is None else self.clip / self.adc_levels

    @property
    def adc_lossless(self) -> bool:
        """True when every possible partial sum is reproduced exactly (see adc_is_identity)."""
        return adc_is_identity(self.adc_levels, self.clip, self.pmax)

    def tile_sum_bound(self, signed: bool) -> int:
        """Upper bound of |T_int| of one row tile (codes times shifts, before any float)."""
        return GemmParams.from_config(self, signed).tile_sum_bound

    def row_layout(self, k: int):
        """How K rows map to row tiles: R (fixed split) or each tile's rows (even split; SPEC 8.4)."""
        return row_layout(k, self.rows, self.row_split)

    def tiles(self, k: int, n: int) -> tuple[int, int]:
        """(Tr, Tc) for a [K, N] weight matrix."""
        return math.ceil(k / self.rows), math.ceil(n / self.cols)

    def resolve_signed(self, has_negative: bool) -> bool:
        return has_negative if self.input_signed is None else self.input_signed


def _adc_signed(periphery: int, input_signed: bool) -> bool:
    return bool(periphery & PERIPHERY_BIT["sensing"]) or (bool(periphery & PERIPHERY_BIT["signed_inputs"])
                                                          and input_signed)


def adc_levels_for(adc_bits: int, clip: int, signed: bool) -> int:
    """n of SPEC 8.2: min(2^b - 1, clip) for an unsigned ADC, min(2^b - 2, 2 clip) for a signed one."""
    return min(2 ** adc_bits - 2, 2 * clip) if signed else min(2 ** adc_bits - 1, clip)


def adc_is_identity(levels: int, clip: int, pmax: int) -> bool:
    """The one Python definition of a lossless ADC: every code equals its partial sum.

    levels == 0 is the ideal ADC.  Otherwise levels == clip >= Pmax is sufficient for code(P) = P
    for every P in [0, Pmax] (n = clip makes the step 1; clip >= Pmax means nothing saturates);
    other configs whose codes happen to equal P (tiny Pmax) just take the general path.
    levels > clip gives code = round(P n / clip) != P and is refused by the ops' checks."""
    return levels == 0 or (levels == clip and clip >= pmax)


@dataclass(frozen=True)
class GemmParams:
    """Integer parameters of one crossbar GEMM (a resolved XbarConfig plus the input sign)."""

    rows: int
    cols: int
    input_bits: int
    input_signed: bool
    dac_bits: int
    weight_bits: int
    cell_bits: int
    adc_levels: int  # n of SPEC 3 / 8.2 for a tile of R rows; 0 = ideal ADC
    adc_clip: int  # full scale for a tile of R rows
    periphery: int = 0  # SPEC 8 conventions, PERIPHERY_BIT flags; 0 = Sections 2-3

    @classmethod
    def from_config(cls, config: "XbarConfig", input_signed: bool) -> "GemmParams":
        assert config.quantized
        periphery = config.periphery
        clip = config.adc_clip if config.adc_clip is not None else config.full_scale(config.rows, input_signed)
        levels = 0 if config.adc_bits is None else adc_levels_for(config.adc_bits, clip,
                                                                  _adc_signed(periphery, input_signed))
        return cls(config.rows, config.cols, config.input_bits, input_signed, config.dac_bits,
                   config.weight_bits, config.cell_bits, levels, clip, periphery)

    def as_args(self, with_periphery: bool = False) -> tuple:
        """The integer arguments of the C++/CUDA/Triton kernels.  ``with_periphery``: and the periphery bit
        field, last (the C++ CPU codes ops, which compute some of SPEC 8: ``BackendBase.periphery``); without it
        the kernels compute Sections 2-3 only."""
        args = (self.rows, self.cols, self.input_bits, self.input_signed, self.dac_bits, self.weight_bits,
                self.cell_bits, self.adc_levels, self.adc_clip)
        if with_periphery:
            return args + (self.periphery,)
        assert self.periphery == 0, "the kernels compute the default periphery only"
        return args

    def op_args(self) -> tuple:
        """The integer arguments of the crossbar_mvm ops: as_args and the periphery."""
        return (self.rows, self.cols, self.input_bits, self.input_signed, self.dac_bits, self.weight_bits,
                self.cell_bits, self.adc_levels, self.adc_clip, self.periphery)

    # ---- periphery (SPEC 8)
    def kernel_form(self) -> Optional["GemmParams"]:
        """The params whose bit-plane arithmetic gives exactly these tile sums, for the C++/CUDA/Triton
        kernels, or None.  Its ``periphery`` keeps only bits that a kernel may compute itself
        (``BackendBase.periphery``: differential sensing, sign-magnitude inputs, half-even rounding, the even row
        split, the per-tile ADC range); 0 means Sections 2-3.  Analog accumulation over inputs of at most 8 magnitude bits is one DAC chunk of all
        of them (V = P of that chunk, Vmax = its Pmax, under any sensing and sign convention); with the
        ideal ADC only the row split changes a value."""
        if self.periphery == 0:
            return self
        if self.adc_levels == 0 and not self.has("row_split"):
            return dataclasses.replace(self, periphery=0)
        p = self
        if p.has("input_accumulation") and p.x_bits <= 8:
            p = dataclasses.replace(p, dac_bits=p.x_bits, periphery=p.periphery & ~PERIPHERY_BIT["input_accumulation"])
        if p.periphery & ~KERNEL_PERIPHERY:
            return None
        return p

    def has(self, flag: str) -> bool:
        """Whether the non-default value of periphery field ``flag`` is set."""
        return bool(self.periphery & PERIPHERY_BIT[flag])

    @property
    def adc_signed(self) -> bool:
        """A conversion may see V < 0: a signed, symmetric ADC (SPEC 8.2)."""
        return _adc_signed(self.periphery, self.input_signed)

    @property
    def conversion_bits(self) -> int:
        """Bits of the input values one conversion sees: the DAC chunk, or (analog accumulation) every
        magnitude bit of the input (SPEC 8.1)."""
        return self.x_bits if self.has("input_accumulation") else self.dac_bits

    def conversion_bound(self, w_max: int) -> int:
        """Largest |V| of one conversion of a tile of R rows with weight values up to ``w_max`` (levels, or
        fixed-point conductances): R (2^D - 1) w_max."""
        return self.rows * ((1 << self.conversion_bits) - 1) * w_max

    @property
    def full_scale_unit(self) -> int:
        """Vmax of one row: (2^cb - 1) D (SPEC 8.1)."""
        return full_scale_per_row(self.cell_bits, self.conversion_bits)

    def tile_rows(self, k: int) -> Tuple[int, ...]:
        """Rows of each row tile (row_tile_sizes)."""
        return row_tile_sizes(k, self.rows, "even" if self.has("row_split") else "fixed")

    def row_layout(self, k: int):
        """R (fixed split) or each tile's rows (even split): XbarConfig.row_layout."""
        return row_layout(k, self.rows, "even" if self.has("row_split") else "fixed")

    def tile_adc(self, rows: int) -> Tuple[int, int]:
        """(levels n, clip) of the ADC of a tile of ``rows`` rows: per tile under adc_range='tile_rows'
        (set only with the default clip, the full scale of R rows), else (adc_levels, adc_clip)."""
        if not self.has("adc_range") or self.adc_levels == 0:
            return self.adc_levels, self.adc_clip
        clip = rows * self.full_scale_unit
        # n = min(2^b - 1, clip) (unsigned) or min(2^b - 2, 2 clip) (signed): the R-row n caps it.
        return min(self.adc_levels, (2 if self.adc_signed else 1) * clip), clip

    def tile_steps(self, k: int, frac_bits: Optional[int] = None) -> list:
        """The value of one unit of T_int per row tile: (hi - lo) / n, 1 for the ideal ADC, or 2^-F for
        the ideal ADC on fixed-point cells (SPEC 7.2)."""
        out = []
        for rows in self.tile_rows(k):
            levels, clip = self.tile_adc(rows)
            if levels == 0:
                out.append(1.0 if frac_bits is None else 2.0 ** -frac_bits)
            else:
                out.append((2 if self.adc_signed else 1) * clip / levels)
        return out

    @property
    def x_bits(self) -> int:
        """Magnitude bits per input polarity."""
        return magnitude_bits(self.input_bits, self.input_signed)

    @property
    def chunks(self) -> int:
        return input_chunk_count(self.x_bits, self.dac_bits)

    @property
    def slices(self) -> int:
        return weight_slice_count(self.weight_bits, self.cell_bits)

    @property
    def pmax(self) -> int:
        return partial_sum_max(self.rows, self.dac_bits, self.cell_bits)

    @property
    def adc_identity(self) -> bool:
        """Every ADC code equals its partial sum (config.adc_is_identity; SPEC 8.2: n = hi - lo and
        |V| <= clip for every reachable V)."""
        if self.periphery == 0:
            return adc_is_identity(self.adc_levels, self.adc_clip, self.pmax)
        span = (2 if self.adc_signed else 1) * self.adc_clip
        return self.adc_levels == 0 or (self.adc_levels == span and self.adc_clip >= self.rows * self.full_scale_unit)

    @property
    def tile_sum_bound(self) -> int:
        """Upper bound of |T_int| of one row tile (codes times shifts, before any float)."""
        per_sum = self.adc_levels if self.adc_levels else self.pmax
        shifts = sum(2 ** (i * self.dac_bits + j * self.cell_bits)
                     for i in range(self.chunks) for j in range(self.slices))
        # Each sign of x_p * w_q products comes from two (input, weight) polarity pairs, whose sums
        # share one bound: the positive and the negative part of T are each at most per_sum * shifts * 2.
        return 2 * per_sum * shifts


def adc_multiply_shift(levels: int, clip: int, pmax: int) -> Optional[Tuple[int, int]]:
    """The ADC of SPEC 3 without a division, for kernels where an integer division is slow (GPUs):
    ``(mult, shift)`` with, for every partial sum 0 <= P <= pmax and N = 2 P n + clip,

        floor(N / (2 clip)) == (N * mult) >> shift,   N < 2^31,  mult < 2^31,  shift >= 32,

    so that the code is one 32-bit multiply-high (``umulhi(N, mult) >> (shift - 32)``) and a clamp to
    n.  None when these bounds cannot hold (a lossless or an ideal ADC, or N too large): kernels then
    divide.  Why it is exact: with D = 2 clip, shift = max(32, bitlength(N_max D)) and
    mult = ceil(2^shift / D), the error e = mult D - 2^shift is in [0, D), so
    N mult / 2^shift = N / D + N e / (D 2^shift) with N e < N_max D < 2^shift: the extra term is below
    1 / D and cannot carry floor(N / D) to the next integer (N / D is at most 1 - 1/D above it)."""
    if levels == 0:
        return None
    d = 2 * clip
    n_max = 2 * pmax * levels + clip
    if n_max >= 1 << 31:
        return None
    shift = max(32, (n_max * d).bit_length())
    mult = -(-(1 << shift) // d)
    if mult >= 1 << 31:
        return None
    return mult, shift
