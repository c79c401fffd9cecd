"""Argument checks, each written once in Python.

- The public functions' checks (SPEC 6): tensors, shapes, dtypes, devices, scales, masks, and the
  checks that need data, gathered by ``DataChecks`` into one host synchronisation per call.
- The kernel-level checks of the Triton backend (shapes, dtypes, parameters, code ranges,
  conductances): they mirror the C++ ops' checks, whose messages (csrc/xbar_check.h) are the source;
  python_tests/test_checks_match.py feeds both the same bad inputs.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch

from .config import MAX_ADC_CLIP, GemmParams, XbarConfig
from .quant import compute_dtype

ScaleArg = Union[None, float, torch.Tensor]
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Largest GEMM a call may describe (rows x max(K, N) elements): far beyond any memory, and small
# enough that no size product in any backend can overflow int64.
MAX_GEMM_ELEMS = 1 << 56


# ------------------------------------------------------------------ argument checks (SPEC 6)
def check_tensor(name: str, t, ref_t: torch.Tensor, shape: Optional[Sequence[int]] = None,
                  float_only: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if float_only and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    if t.device != ref_t.device:
        raise RuntimeError(f"{name}: expected a tensor on {ref_t.device} (like x), got one on {t.device}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")


def pair(name: str, v, minimum: int) -> Tuple[int, int]:
    t = (v, v) if isinstance(v, int) and not isinstance(v, bool) else tuple(v) if isinstance(v, (tuple, list)) else None
    if t is None or len(t) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) and i >= minimum for i in t):
        raise ValueError(f"{name}: expected an int >= {minimum} or a pair of them, got {v!r}")
    return t


def check_common(x, weight, bias, config, task_weight) -> None:
    if not isinstance(config, XbarConfig):
        raise TypeError(f"config: expected an XbarConfig, got {type(config).__name__}")
    check_tensor("x", x, x)
    check_tensor("weight", weight, x)
    for name, t, shape in (("weight", weight, None), ("bias", bias, (weight.shape[0],)),
                           ("task_weight", task_weight, tuple(weight.shape))):
        if t is None:
            continue
        check_tensor(name, t, x, shape)
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype} (like x), got {t.dtype}")


class DataChecks:
    """Checks that need tensor values, read back in one host synchronisation.

    ``require(ok, message)`` records a 0-dim bool tensor that must be True; ``value(t)`` records a
    0-dim tensor whose value the caller needs; ``run()`` reads all of them with one ``tolist()``
    and raises the first failed requirement.  Under torch.compile nothing is read (``run`` returns
    None for every value)."""

    def __init__(self) -> None:
        self._items: List[torch.Tensor] = []
        self._messages: List[Optional[str]] = []

    def require(self, ok: torch.Tensor, message: str) -> None:
        self._items.append(ok)
        self._messages.append(message)

    def value(self, t: torch.Tensor) -> int:
        self._items.append(t)
        self._messages.append(None)
        return len(self._items) - 1

    def run(self) -> Optional[list]:
        if not self._items or torch.compiler.is_compiling():
            return None
        vals = torch.stack([t.detach().reshape(()).to(torch.float64) for t in self._items]).tolist()
        for v, msg in zip(vals, self._messages):
            if msg is not None and not v:
                raise ValueError(msg)
        return vals


def scale_tensor(name: str, given: ScaleArg, like: torch.Tensor, n_cols: Optional[int],
                  checks: DataChecks) -> Optional[torch.Tensor]:
    """A given scale (float or tensor: scalar, or [N] when n_cols is set), checked, in the compute
    dtype of ``like``; None when not given (the caller derives it)."""
    if given is None:
        return None
    if isinstance(given, bool) or not isinstance(given, (int, float, torch.Tensor)):
        raise TypeError(f"{name}: expected None, a float or a tensor, got {type(given).__name__}")
    cd = compute_dtype(like)
    if isinstance(given, torch.Tensor):
        check_tensor(name, given, like)
        allowed = {()} | ({(n_cols,), (1,)} if n_cols is not None else {(1,)})
        if tuple(given.shape) not in allowed:
            what = f"a scalar or shape ({n_cols},)" if n_cols is not None else "a scalar"
            raise ValueError(f"{name}: expected {what}, got shape {tuple(given.shape)}")
        s = given.detach().to(cd)
        checks.require((torch.isfinite(s) & (s > 0)).all(), f"{name}: expected positive finite values")
        return s.reshape(-1) if s.dim() else s
    if not (float(given) > 0 and float(given) < float("inf")):
        raise ValueError(f"{name}: expected a positive finite value, got {given!r}")
    return torch.tensor(float(given), dtype=cd, device=like.device)


def check_masks(config: XbarConfig, k: int, n: int, x: torch.Tensor, task_weight, pe_mask, col_scale,
                 checks: DataChecks):
    tr, tc = config.tiles(k, n)
    if pe_mask is None:
        pe_mask = torch.zeros(tr, tc, dtype=x.dtype, device=x.device)
    else:
        check_tensor("pe_mask", pe_mask, x, (tr, tc))
        if pe_mask.numel():
            lo, hi = torch.aminmax(pe_mask.detach())
            checks.require((lo >= 0) & (hi <= 1), "pe_mask: expected values in [0, 1] (1 = re-programmed PE), "
                                                  "got NaN or values outside")
            if task_weight is None:
                checks.require(hi == 0, "pe_mask: selects re-programmed PEs but task_weight is None")
    if col_scale is None:
        col_scale = torch.ones(tr, n, dtype=x.dtype, device=x.device)
    else:
        check_tensor("col_scale", col_scale, x, (tr, n))
        checks.require(torch.isfinite(col_scale.detach()).all(), "col_scale: expected finite values, got NaN or inf")
    return pe_mask, col_scale


def check_cell_sums(p: GemmParams, frac_bits: int, *gqs) -> None:
    """Every partial sum P_F of the cells must be exact in every backend (int64 ADC arithmetic with
    2 P_F n + clip 2^F, float64 GEMMs below 2^53): refuse conductances that could break that."""
    g_max = max(int(g.max()) for g in gqs if g is not None and g.numel())
    p_max = p.conversion_bound(g_max)  # analog accumulation: one conversion sees every chunk
    shifts = sum(2 ** (i * p.dac_bits + j * p.cell_bits) for i in range(p.chunks) for j in range(p.slices))
    t_max = 2 * (p_max if p.adc_levels == 0 else p.adc_levels) * shifts  # |T_int| of one row tile (ideal ADC: P_F)
    if (p_max >= 2 ** 52 or 2 * p_max * max(p.adc_levels, 1) + (p.adc_clip << frac_bits) >= 2 ** 62
            or (4 * p.adc_levels + 2) * (p.adc_clip << frac_bits) >= 2 ** 62 or t_max >= 2 ** 53):
        raise ValueError(f"config.device: conductances up to {g_max / 2 ** frac_bits:.4g} level steps give partial "
                         f"sums up to {p_max} and tile sums up to {t_max} (fixed point), too large for exact "
                         f"arithmetic: lower frac_bits, rows or the variation")


# ------------------------------------------------------------------ kernel-level checks (csrc/xbar_check.h)
_MAX_X_BITS = 16  # input magnitude bits per polarity (as the C++ kernels)
_MAX_W_BITS = 15  # weight magnitude bits per polarity
_MAX_ROWS = 1 << 16  # keeps every int32 partial dot of the Triton kernels exact
_MAX_COLS = 1 << 16  # as rows (XbarConfig's limit)
_MAX_ADC_LEVELS = (1 << 24) - 1  # n = min(2^adc_bits - 1, clip) with adc_bits <= 24
_MAX_FRAC_BITS = 16  # DeviceModel.frac_bits
_MAX_G_DIGITS = 5  # base-128 digits of an int32 conductance (< 2^31 <= 2^35)


def check_codes(name: str, codes: torch.Tensor, lo: int, hi: int) -> None:
    if codes.numel() and not (int(codes.min()) >= lo and int(codes.max()) <= hi):
        raise RuntimeError(f"xbar: {name} must hold codes in [{lo}, {hi}], "
                           f"got [{int(codes.min())}, {int(codes.max())}]")


def check_params(p: GemmParams) -> None:
    """The parameter checks of the C++ ops (csrc/xbar_check.h make_params_checked)."""
    if not 1 <= p.rows <= _MAX_ROWS:
        raise RuntimeError(f"xbar: rows must be in [1, {_MAX_ROWS}], got {p.rows}")
    if not 1 <= p.cols <= _MAX_COLS:
        raise RuntimeError(f"xbar: cols must be in [1, {_MAX_COLS}], got {p.cols}")
    lo, hi = (2, _MAX_X_BITS + 1) if p.input_signed else (1, _MAX_X_BITS)
    if not lo <= p.input_bits <= hi:
        raise RuntimeError(f"xbar: input_bits must be in [{lo}, {hi}] (input_signed={int(p.input_signed)}), "
                           f"got {p.input_bits}")
    if not 2 <= p.weight_bits <= _MAX_W_BITS + 1:
        raise RuntimeError(f"xbar: weight_bits must be in [2, {_MAX_W_BITS + 1}], got {p.weight_bits}")
    if not 1 <= p.dac_bits <= 8:
        raise RuntimeError(f"xbar: dac_bits must be in [1, 8], got {p.dac_bits}")
    if not 1 <= p.cell_bits <= 8:
        raise RuntimeError(f"xbar: cell_bits must be in [1, 8], got {p.cell_bits}")
    if not 1 <= p.adc_clip <= MAX_ADC_CLIP:
        raise RuntimeError(f"xbar: adc_clip must be in [1, 2^32], got {p.adc_clip}")
    if not 0 <= p.adc_levels <= _MAX_ADC_LEVELS:
        raise RuntimeError(f"xbar: adc_levels must be in [0, 2^24 - 1] (0 = ideal ADC), got {p.adc_levels}")
    if p.adc_levels > p.adc_clip:
        raise RuntimeError(f"xbar: adc_levels must be <= adc_clip (n = min(2^adc_bits - 1, clip)), got "
                           f"adc_levels={p.adc_levels}, adc_clip={p.adc_clip}")


def check_x(x_codes: torch.Tensor) -> None:
    if x_codes.dim() != 2:
        raise RuntimeError(f"xbar: x_codes must be [M, K], got {tuple(x_codes.shape)}")
    if x_codes.dtype != torch.int32:
        raise RuntimeError(f"xbar: x_codes must be int32, got {x_codes.dtype}")


def check_gemm(x_codes: torch.Tensor, w_codes: torch.Tensor, p: GemmParams) -> None:
    """Shapes, dtypes, devices and parameters (no data: also inside the ops, under tracing)."""
    if x_codes.dim() != 2 or w_codes.dim() != 2:
        raise RuntimeError(f"xbar: x_codes must be [M, K] and w_codes [K, N], got {tuple(x_codes.shape)} "
                           f"and {tuple(w_codes.shape)}")
    if x_codes.dtype != torch.int32 or w_codes.dtype != torch.int32:
        raise RuntimeError(f"xbar: x_codes and w_codes must be int32, got {x_codes.dtype} and {w_codes.dtype}")
    if x_codes.shape[1] != w_codes.shape[0]:
        raise RuntimeError(f"xbar: x_codes has K={x_codes.shape[1]} but w_codes has K={w_codes.shape[0]}")
    if x_codes.device != w_codes.device:
        raise RuntimeError(f"xbar: x_codes and w_codes must be on one device, got {x_codes.device} and "
                           f"{w_codes.device}")
    check_params(p)


def check_x_values(x_codes: torch.Tensor, p: GemmParams) -> None:
    qx = (1 << p.x_bits) - 1
    check_codes("x_codes", x_codes, -qx if p.input_signed else 0, qx)


def check_data(x_codes: torch.Tensor, w_codes: torch.Tensor, p: GemmParams) -> None:
    check_x_values(x_codes, p)
    qw = (1 << (p.weight_bits - 1)) - 1
    check_codes("w_codes", w_codes, -qw, qw)


def check_coefs(x_codes, n: int, n_tiles: int, w_name: str, wb, wt, coef_b, coef_t, op: str) -> None:
    """The coefficient and task-weight checks of mvm / cell_mvm (shapes, dtypes, devices)."""
    if (wt is None) != (coef_t is None):
        raise RuntimeError(f"{op}: {w_name[1]} and coef_t must be given together")
    if coef_b.dtype not in (torch.float32, torch.float64):
        raise RuntimeError(f"{op}: coef_b must be float32 or float64, got {coef_b.dtype}")
    if coef_b.device != x_codes.device:
        raise RuntimeError(f"{op}: coef_b must be on {x_codes.device} (like x_codes), got {coef_b.device}")
    if tuple(coef_b.shape) != (n_tiles, n):
        raise RuntimeError(f"{op}: coef_b must be [Tr, N] = [{n_tiles}, {n}], got {tuple(coef_b.shape)}")
    if wt is not None:
        if wt.shape != wb.shape or wt.dtype != torch.int32:
            raise RuntimeError(f"{op}: {w_name[1]} must be int32 of shape {tuple(wb.shape)} (like {w_name[0]}), "
                               f"got {wt.dtype} of shape {tuple(wt.shape)}")
        if coef_t.shape != coef_b.shape or coef_t.dtype != coef_b.dtype:
            raise RuntimeError(f"{op}: coef_t must match coef_b in shape and dtype")
        if wt.device != x_codes.device or coef_t.device != x_codes.device:
            raise RuntimeError(f"{op}: {w_name[1]} and coef_t must be on x_codes' device")


CELL_NAMES = ("gb", "gt")


def check_cells(x_codes: torch.Tensor, gq: torch.Tensor, p: GemmParams, frac_bits: int, name: str = "gq") -> None:
    """Shapes, dtypes, devices and parameters of a cell call (no data)."""
    check_x(x_codes)
    check_params(p)
    if gq.dim() != 4 or gq.dtype != torch.int32:
        raise RuntimeError(f"xbar_cells: {name} must be int32 [2, S, K, N] (polarity, slice, row, column), got "
                           f"{gq.dtype} of shape {tuple(gq.shape)}")
    want = (2, p.slices, x_codes.shape[1])
    if tuple(gq.shape[:3]) != want:
        raise RuntimeError(f"xbar_cells: {name} must be [2, S, K, N] with S = {p.slices} slices (weight_bits="
                           f"{p.weight_bits}, cell_bits={p.cell_bits}) and K = {x_codes.shape[1]} (x_codes), got "
                           f"{tuple(gq.shape)}")
    if gq.device != x_codes.device:
        raise RuntimeError(f"xbar_cells: x_codes and {name} must be on one device, got {x_codes.device} and "
                           f"{gq.device}")
    if isinstance(frac_bits, bool) or not isinstance(frac_bits, int) or not 0 <= frac_bits <= _MAX_FRAC_BITS:
        raise RuntimeError(f"xbar_cells: frac_bits must be an int in [0, {_MAX_FRAC_BITS}], got {frac_bits!r}")


def cell_digits(p: GemmParams, k: int, frac_bits: int, *gqs) -> int:
    """Checks the conductances' values; returns the base-128 digits the kernel splits them into.

    Refused, with the bound in the message: a negative conductance, and any whose partial sums
    could leave int64 anywhere in the kernel -- P_F <= R (2^db - 1) g_max, the ADC numerator
    2 P_F n + clip 2^F, and the shift-and-add T_int (bounded by the sum of its terms' magnitudes)."""
    g_max = 0
    for name, g in gqs:
        if g is not None and g.numel():
            lo, hi = torch.aminmax(g)
            lo, hi = int(lo), int(hi)
            if lo < 0:
                raise RuntimeError(f"xbar_cells: {name} must hold conductances >= 0, got {lo}")
            g_max = max(g_max, hi)
    rows = max(1, min(p.rows, k))
    shifts_w = sum(1 << (j * p.cell_bits) for j in range(p.slices))
    if p.adc_levels == 0:  # code = P_F; sum over input polarities and chunks of 2^shift P_F <= sum_k |x_k| g
        p_f = rows * ((1 << 7) - 1) * g_max
        t_abs = 2 * rows * ((1 << p.x_bits) - 1) * g_max * shifts_w
        adc = 0
    else:
        p_f = rows * ((1 << p.dac_bits) - 1) * g_max
        shifts_x = sum(1 << (i * p.dac_bits) for i in range(p.chunks))
        t_abs = (2 if p.input_signed else 1) * 2 * p.adc_levels * shifts_x * shifts_w
        adc = 2 * p_f * p.adc_levels + (p.adc_clip << frac_bits)
    worst = max(p_f, t_abs, adc)
    if worst >= 1 << 63:
        raise RuntimeError(f"xbar_cells: conductances up to {g_max} (fixed point, {g_max / 2 ** frac_bits:.4g} level "
                           f"steps) with rows={p.rows} give partial sums or tile sums up to {worst} >= 2^63: "
                           f"they would overflow int64; lower frac_bits, rows or the conductances")
    return max(1, -(-g_max.bit_length() // 7))




def check_digits(g_digits: int) -> None:
    if not 1 <= g_digits <= _MAX_G_DIGITS:
        raise RuntimeError(f"xbar_cells: g_digits must be in [1, {_MAX_G_DIGITS}] (base-128 digits of int32 "
                           f"conductances), got {g_digits}")
