"""xbar_conv2d / xbar_linear: the public, stateless crossbar layers (docs/SPEC.md sections 4-6).

Data path: argument checks -> program the weights (programmed.py; a layer passes its own
programmed state instead) -> quantise x and lower it to the GEMM (lowering.py) -> one op call
``torch.ops.xma2_ops.crossbar_mvm`` (_ops.py: backend choice, autograd) -> the layer's layout.

Host synchronisation: every check that needs data (finite values, mask ranges, the input's sign
and range, whether a layer's programmed weight is still current) is gathered into one tensor and
read with one ``tolist()`` per call.  Under ``torch.compile`` these data checks are skipped (they
would break the graph) and layers re-program their weights inside the graph; validate a model
once in eager mode.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from . import reference as ref
from ._ops import check_backend_name, crossbar_mvm, crossbar_mvm_cells, get_backend, straight_through
from .config import GemmParams, XbarConfig
from .device import DeviceModel
from .lowering import ConvLowering, LinearLowering, coefficients, effective_weight
from .programmed import (ChipPosition, ProgrammedWeight, ProgrammingCache, compute_dtype, program_key,
                         program_weight)

ScaleArg = Union[None, float, torch.Tensor]
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Largest GEMM a call may describe (rows x max(K, N) elements): far beyond any memory, and small
# enough that no size product in any backend can overflow int64.
_MAX_GEMM_ELEMS = 1 << 56


# ------------------------------------------------------------------ argument checks (SPEC 6)
def _check_tensor(name: str, t, ref_t: torch.Tensor, shape: Optional[Sequence[int]] = None,
                  float_only: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if float_only and t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    if t.device != ref_t.device:
        raise RuntimeError(f"{name}: expected a tensor on {ref_t.device} (like x), got one on {t.device}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")


def _pair(name: str, v, minimum: int) -> Tuple[int, int]:
    t = (v, v) if isinstance(v, int) and not isinstance(v, bool) else tuple(v) if isinstance(v, (tuple, list)) else None
    if t is None or len(t) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) and i >= minimum for i in t):
        raise ValueError(f"{name}: expected an int >= {minimum} or a pair of them, got {v!r}")
    return t


def _check_common(x, weight, bias, config, task_weight) -> None:
    if not isinstance(config, XbarConfig):
        raise TypeError(f"config: expected an XbarConfig, got {type(config).__name__}")
    _check_tensor("x", x, x)
    _check_tensor("weight", weight, x)
    for name, t, shape in (("weight", weight, None), ("bias", bias, (weight.shape[0],)),
                           ("task_weight", task_weight, tuple(weight.shape))):
        if t is None:
            continue
        _check_tensor(name, t, x, shape)
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype} (like x), got {t.dtype}")


class _DataChecks:
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


def _scale_tensor(name: str, given: ScaleArg, like: torch.Tensor, n_cols: Optional[int],
                  checks: _DataChecks) -> Optional[torch.Tensor]:
    """A given scale (float or tensor: scalar, or [N] when n_cols is set), checked, in the compute
    dtype of ``like``; None when not given (the caller derives it)."""
    if given is None:
        return None
    if isinstance(given, bool) or not isinstance(given, (int, float, torch.Tensor)):
        raise TypeError(f"{name}: expected None, a float or a tensor, got {type(given).__name__}")
    cd = compute_dtype(like)
    if isinstance(given, torch.Tensor):
        _check_tensor(name, given, like)
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


def _check_masks(config: XbarConfig, k: int, n: int, x: torch.Tensor, task_weight, pe_mask, col_scale,
                 checks: _DataChecks):
    tr, tc = config.tiles(k, n)
    if pe_mask is None:
        pe_mask = torch.zeros(tr, tc, dtype=x.dtype, device=x.device)
    else:
        _check_tensor("pe_mask", pe_mask, x, (tr, tc))
        if pe_mask.numel():
            lo, hi = torch.aminmax(pe_mask.detach())
            checks.require((lo >= 0) & (hi <= 1), "pe_mask: expected values in [0, 1] (1 = re-programmed PE), "
                                                  "got NaN or values outside")
            if task_weight is None:
                checks.require(hi == 0, "pe_mask: selects re-programmed PEs but task_weight is None")
    if col_scale is None:
        col_scale = torch.ones(tr, n, dtype=x.dtype, device=x.device)
    else:
        _check_tensor("col_scale", col_scale, x, (tr, n))
        checks.require(torch.isfinite(col_scale.detach()).all(), "col_scale: expected finite values, got NaN or inf")
    return pe_mask, col_scale


# ------------------------------------------------------------------ programming the weights
@dataclass
class _WeightSlot:
    """One weight (backbone or task) on its way to a programmed state."""

    name: str
    weight: torch.Tensor
    given: Optional[torch.Tensor]  # a given scale, or None (derived: max|W| / Qw)
    cache: Optional[ProgrammingCache]
    state: Optional[ProgrammedWeight] = None
    same_index: Optional[int] = None  # index of the "unchanged since programming" flag in the checks
    seen: Optional[ProgrammedWeight] = None  # the cached state that flag is about

    def program(self, target: "_Target", checks: _DataChecks) -> ProgrammedWeight:
        w = self.weight.detach()
        scale = self.given
        if scale is None:
            wc = w.to(compute_dtype(w))
            amax = wc.abs().amax()
            ok = torch.isfinite(amax)  # max|W| is NaN or inf exactly when W is not finite
            scale = ref.derived_scale(wc, 2 ** (target.weight_bits - 1) - 1, amax)
        else:
            ok = torch.isfinite(w).all()
        if target.device is not None:  # cells are drawn from the codes at once: check before
            checks = _DataChecks()
        checks.require(ok, f"{self.name}: expected finite values, got NaN or inf")
        if target.device is not None:
            checks.run()
        return program_weight(w, scale, target.weight_bits, cell_bits=target.cell_bits, device=target.device,
                              chip=target.chip)

    def program_checked(self, target: "_Target") -> ProgrammedWeight:
        """Programs and checks the weight at once (a state that gets cached must be a valid one)."""
        checks = _DataChecks()
        state = self.program(target, checks)
        checks.run()
        return state


@dataclass(frozen=True)
class _Target:
    """What the weights are programmed onto: bits, and the cells of a non-ideal device (or None)."""

    weight_bits: int
    cell_bits: int
    device: Optional[DeviceModel]
    chip: ChipPosition

    @property
    def key(self) -> tuple:
        return program_key(self.weight_bits, self.cell_bits, self.device)


def _prepare_slots(slots: List[_WeightSlot], target: _Target, checks: _DataChecks, reuse: bool) -> None:
    """Programs every slot that has no cache to reuse (training mode, the functional API); a cached
    slot (eval mode) asks its cache, and the decision waits for the checks' synchronisation."""
    for slot in slots:
        if not (reuse and slot.cache is not None):
            slot.state = slot.program(target, checks)
            continue
        hit = slot.cache.same_source(slot.weight, slot.given, target.key)
        if hit is not None:
            slot.same_index, slot.seen = checks.value(hit[0]), hit[1]


def _finish_slots(slots: List[_WeightSlot], target: _Target, vals: Optional[list], keep_source: bool) -> None:
    """After the synchronisation: reuse unchanged programmed weights; program the new or changed
    ones once, under the cache's lock, so that threads sharing a layer share one programming."""
    for slot in slots:
        if slot.state is None:
            if slot.same_index is not None and vals is not None and vals[slot.same_index]:
                slot.state = slot.seen
            else:  # first programming, or the weight changed since (rare)
                slot.state = slot.cache.program_once(slot.weight, slot.given, target.key,
                                                     lambda slot=slot: slot.program_checked(target))
        elif slot.cache is not None:
            slot.cache.store(slot.weight, slot.given, slot.state, keep_source)


def _target(config: XbarConfig, cells: bool, chip: Optional[ChipPosition]) -> _Target:
    return _Target(config.weight_bits, config.cell_bits, config.device if cells else None,
                   chip if chip is not None else ChipPosition())


def program_layer(weight: torch.Tensor, task_weight: Optional[torch.Tensor], config: XbarConfig,
                  caches: Tuple[ProgrammingCache, ProgrammingCache], chip: ChipPosition) -> None:
    """Program a layer's weights (derived scales) into its caches now, unless they are current."""
    slots = [_WeightSlot("weight", weight, None, caches[0])]
    if task_weight is not None:
        slots.append(_WeightSlot("task_weight", task_weight, None, caches[1]))
    target = _target(config, config.uses_cells, chip)
    checks = _DataChecks()
    _prepare_slots(slots, target, checks, reuse=True)
    _finish_slots(slots, target, checks.run(), keep_source=True)


# ------------------------------------------------------------------ the shared body
def _empty_output(x, weight, bias, lowering, task_weight, pe_mask, col_scale) -> torch.Tensor:
    """No input rows, no inputs (or only padding), or no outputs: y = bias (zero inputs give zero
    partial sums and ADC codes), still connected to every differentiable argument."""
    y = x.new_zeros(lowering.out_shape)
    for t in (x, weight, task_weight, pe_mask, col_scale):
        if isinstance(t, torch.Tensor) and t.requires_grad:
            y = y + 0 * t.sum()
    return y if bias is None else lowering.add_bias(y, bias)


class _Phase:
    """Labels the stretches of a layer's forward for torch.profiler (``xbar.checks``, ``xbar.program``, ...;
    benchmarks/bench_models.py sums them); does nothing unless a profiler runs (and never when compiling)."""

    def __init__(self) -> None:
        self._on = not torch.compiler.is_compiling() and torch._C._autograd._profiler_enabled()
        self._current = None

    def __call__(self, name: Optional[str]) -> None:
        """Ends the current stretch and starts ``name`` (None: only ends)."""
        if not self._on:
            return
        if self._current is not None:
            self._current.__exit__(None, None, None)
        self._current = torch.profiler.record_function(name) if name else None
        if self._current is not None:
            self._current.__enter__()


def _xbar(*args, **kwargs) -> torch.Tensor:
    """The shared body of xbar_conv2d / xbar_linear and the layers (_xbar_body), its phases labelled."""
    phase = _Phase()
    try:
        return _xbar_body(phase, *args, **kwargs)
    finally:
        phase(None)


def _xbar_body(phase: _Phase, x, weight, bias, lowering, config: XbarConfig, task_weight, pe_mask, col_scale,
               input_scale, weight_scale, task_weight_scale, backend, *,
               signed: Union[None, bool, torch.Tensor] = None,
               caches: Tuple[Optional[ProgrammingCache], Optional[ProgrammingCache]] = (None, None),
               reuse: bool = False, on_sign: Optional[Callable[[bool], None]] = None,
               chip: Optional[ChipPosition] = None, cells: Optional[bool] = None) -> torch.Tensor:
    """``signed``/``caches``/``reuse``/``on_sign``/``chip``/``cells`` are the layers' own: the input
    sign decided at calibration (a bool, or a 0-dim bool tensor read in the one synchronisation),
    their programmed-state caches, whether a cached state may be reused (eval mode), a callback
    told the sign that was used, the layer's place on the chip (SPEC 7 draws), and whether the
    device model's cells are used in this call (default: when the config has a non-ideal device)."""
    m, k, n = lowering.gemm_mkn
    if m * max(k, n, 1) > _MAX_GEMM_ELEMS:
        raise ValueError(f"x: the crossbar GEMM of this call would be [{m}, {k}] x [{k}, {n}], beyond any memory "
                         f"(check the input shape, padding and dilation)")
    check_backend_name(backend)
    config.row_layout(k)  # refuses an even split whose last tile would exceed R rows (SPEC 8.4)
    phase("xbar.checks")
    checks = _DataChecks()
    no_masks = task_weight is None and pe_mask is None and col_scale is None  # W_eff = W
    pe_mask, col_scale = _check_masks(config, k, n, x, task_weight, pe_mask, col_scale, checks)
    if m == 0 or k == 0 or n == 0 or x.numel() == 0:  # (x may be empty while padding makes rows)
        checks.run()
        return _empty_output(x, weight, bias, lowering, task_weight, pe_mask, col_scale)
    if config.weight_bits is None:  # ideal crossbar: y = conv(x, W_eff)
        checks.run()
        phase("xbar.float_forward")
        w_eff = weight if no_masks else effective_weight(weight, task_weight, pe_mask.to(x.dtype),
                                                         col_scale.to(x.dtype), config.row_layout(k), config.cols)
        y = lowering.float_forward(x, w_eff)
        return y if bias is None else lowering.add_bias(y, bias)

    compiling = torch.compiler.is_compiling()
    slots = [_WeightSlot("weight", weight, _scale_tensor("weight_scale", weight_scale, weight, n, checks), caches[0])]
    if task_weight is not None:
        slots.append(_WeightSlot("task_weight", task_weight,
                                 _scale_tensor("task_weight_scale", task_weight_scale, task_weight, n, checks),
                                 caches[1]))
    cells = config.uses_cells if cells is None else (cells and config.uses_cells)
    if cells and compiling:
        raise RuntimeError("config.device: the device model's random draws run outside torch.compile graphs; "
                           "compile a model without a device model, or run it eagerly")
    target = _target(config, cells, chip)
    phase("xbar.program")
    _prepare_slots(slots, target, checks, reuse and not compiling)
    phase("xbar.checks")
    quantized = config.quantized
    be = get_backend(backend, x.device) if quantized else None
    s_x = _scale_tensor("input_scale", input_scale, x, None, checks) if quantized else None
    sign_index = None
    if quantized:
        # One pass over x gives finiteness, the sign decision and max|x| for a derived scale.
        lo, hi = torch.aminmax(x.detach())
        checks.require(torch.isfinite(lo) & torch.isfinite(hi), "x: expected finite values, got NaN or inf")
        if config.input_signed is not None:
            signed = config.input_signed
        elif signed is None:
            signed = lo < 0
        if isinstance(signed, torch.Tensor):
            sign_index = checks.value(signed)
        amax = torch.maximum(-lo, hi)
    vals = checks.run()
    phase("xbar.program")
    _finish_slots(slots, target, vals, keep_source=reuse and not compiling)
    w_b = slots[0].state
    w_t = slots[1].state if task_weight is not None else None
    # One read of the cells per call (read noise is drawn per read): conductances [2, S, K, N].
    read = target.chip.next_read() if cells else 0
    g_b = w_b.cells.read(read) if cells else None
    g_t = w_t.cells.read(read) if (cells and w_t is not None) else None

    if not quantized:  # weight-only: fake-quantised weights (as the cells hold them), straight-through gradient
        phase("xbar.float_forward")
        wq_b = _fake_quantized(weight, w_b, g_b)
        wq_t = _fake_quantized(task_weight, w_t, g_t) if w_t is not None else None
        w_eff = wq_b if no_masks else effective_weight(wq_b, wq_t, pe_mask.to(x.dtype), col_scale.to(x.dtype),
                                                       config.row_layout(k), config.cols)
        y = lowering.float_forward(x, w_eff)
        return y if bias is None else lowering.add_bias(y, bias)

    if sign_index is not None:
        signed = bool(vals[sign_index]) if vals is not None else bool(signed)  # bool(): graph break when compiling
    if signed and config.input_bits < 2:
        raise ValueError("config.input_bits: signed inputs need input_bits >= 2, got 1")
    if on_sign is not None:
        on_sign(signed)
    params = GemmParams.from_config(config, signed)
    phase("xbar.quantize_input")
    cd = compute_dtype(x)
    if s_x is None:
        s_x = ref.derived_scale(x, config.input_qmax(signed), amax.to(cd))
    elif s_x.dim():
        s_x = s_x.reshape(())
    x_int = ref.quantize_input(x.detach().to(cd), s_x, params.input_bits, signed)
    x_int = x_int.to(_code_dtype(params, be))
    phase("xbar.unfold_codes")
    x_codes = lowering.unfold_codes(x_int, be)
    phase("xbar.kernel")
    steps = params.tile_steps(x_codes.shape[1], config.device.frac_bits if cells else None)
    coef_b, coef_t = coefficients(pe_mask, col_scale, s_x, w_b.scale, w_t.scale if w_t is not None else None,
                                  params.cols, steps, cd, w_t is not None)
    if cells:
        frac_bits = config.device.frac_bits
        _check_cell_sums(params, frac_bits, g_b, g_t)
        y = crossbar_mvm_cells(x_codes, g_b, g_t, coef_b, coef_t, params, frac_bits, be.name)
    else:
        y = crossbar_mvm(x_codes, w_b.codes, w_t.codes if w_t is not None else None, coef_b, coef_t, params, be.name,
                         w_b.packed(be, params), w_t.packed(be, params) if w_t is not None else None)
    phase("xbar.fold_output")
    y = lowering.fold_output(y.to(x.dtype))
    phase("xbar.straight_through")
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (task_weight is not None and task_weight.requires_grad)):
        y = y + _straight_through_term(x, weight, task_weight, pe_mask, col_scale, s_x, w_b, w_t, params, lowering,
                                       g_b, g_t)
    phase(None)
    return y if bias is None else lowering.add_bias(y, bias)


def _fake_quantized(weight: torch.Tensor, state: ProgrammedWeight, gq: Optional[torch.Tensor]) -> torch.Tensor:
    """The weight the cells hold, in the weight's dtype, with the straight-through gradient to ``weight``
    when one is needed (without one: the programmed state's own dequantised copy, no per-call work)."""
    wq = state.dequantized(weight.dtype, gq)
    if torch.is_grad_enabled() and weight.requires_grad:
        return weight + (wq - weight).detach()
    return wq


def _check_cell_sums(p: GemmParams, frac_bits: int, *gqs) -> None:
    """Every partial sum P_F of the cells must be exact in every backend (int64 ADC arithmetic with
    2 P_F n + clip 2^F, float64 GEMMs below 2^53): refuse conductances that could break that."""
    g_max = max(int(g.max()) for g in gqs if g is not None and g.numel())
    d_bits = p.x_bits if p.has("input_accumulation") else p.dac_bits  # analog: one conversion sees every chunk
    p_max = p.rows * (2 ** d_bits - 1) * g_max
    shifts = sum(2 ** (i * p.dac_bits + j * p.cell_bits) for i in range(p.chunks) for j in range(p.slices))
    t_max = 2 * (p_max if p.adc_levels == 0 else p.adc_levels) * shifts  # |T_int| of one row tile (ideal ADC: P_F)
    if (p_max >= 2 ** 52 or 2 * p_max * max(p.adc_levels, 1) + (p.adc_clip << frac_bits) >= 2 ** 62
            or (4 * p.adc_levels + 2) * (p.adc_clip << frac_bits) >= 2 ** 62 or t_max >= 2 ** 53):
        raise ValueError(f"config.device: conductances up to {g_max / 2 ** frac_bits:.4g} level steps give partial "
                         f"sums up to {p_max} and tile sums up to {t_max} (fixed point), too large for exact "
                         f"arithmetic: lower frac_bits, rows or the variation")


def _straight_through_term(x, weight, task_weight, pe_mask, col_scale, s_x, w_b: ProgrammedWeight,
                           w_t: Optional[ProgrammedWeight], params: GemmParams, lowering, g_b=None,
                           g_t=None) -> torch.Tensor:
    """Zero in value; its gradient w.r.t. x and the weights is that of the float layer at the
    dequantised point, every quantiser as the identity, inputs clipped by the input quantiser
    getting none (SPEC 5).  pe_mask/col_scale get their exact gradient through the op instead."""
    cd = compute_dtype(x)
    xc = x.to(cd)
    keep = ref.input_in_range(xc.detach(), s_x, params.input_bits, params.input_signed).to(x.dtype)
    x_deq = (ref.quantize_input(xc.detach(), s_x, params.input_bits, params.input_signed) * s_x).to(x.dtype)
    x_ste = x * keep + (x_deq - x * keep).detach()
    wq_b = _fake_quantized(weight, w_b, g_b)
    wq_t = _fake_quantized(task_weight, w_t, g_t) if w_t is not None else None
    m, a = pe_mask.detach().to(x.dtype), col_scale.detach().to(x.dtype)
    w_eff = effective_weight(wq_b, wq_t, m, a, params.row_layout(weight[0].numel()), params.cols)
    return straight_through(x_ste, w_eff, lowering)


def _code_dtype(params: GemmParams, backend) -> torch.dtype:
    """The smallest integer dtype of the input codes that the backend takes (int32 by default)."""
    if not backend.small_codes:
        return torch.int32
    if params.input_bits <= 8:
        return torch.int8 if params.input_signed else torch.uint8
    return torch.int16 if params.input_bits <= 15 or params.input_signed else torch.int32


# ------------------------------------------------------------------ the public functions
def _conv_lowering(x, weight, stride, padding, dilation, groups) -> Tuple[torch.Tensor, ConvLowering]:
    if groups != 1:
        raise ValueError(f"groups: only groups=1 is supported (each group would need its own PE grid), got {groups}")
    if weight.dim() != 4:
        raise ValueError(f"weight: expected 4 dims [Cout, Cin, kh, kw], got shape {tuple(weight.shape)}")
    if x.dim() != 4:
        raise ValueError(f"x: expected 4 dims [B, Cin, H, W] (or 3 unbatched), got shape {tuple(x.shape)}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"x: expected {weight.shape[1]} input channels (weight.shape[1]), got {x.shape[1]}")
    stride = _pair("stride", stride, 1)
    dilation = _pair("dilation", dilation, 1)
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same":
            if stride != (1, 1):
                raise ValueError("padding: 'same' needs stride 1 (as in torch.nn.functional.conv2d)")
            totals = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
            x = F.pad(x, (totals[1] // 2, totals[1] - totals[1] // 2, totals[0] // 2, totals[0] - totals[0] // 2))
            padding = (0, 0)
        else:
            raise ValueError(f"padding: expected an int, a pair, 'valid' or 'same', got {padding!r}")
    padding = _pair("padding", padding, 0)
    low = ConvLowering(tuple(x.shape), tuple(weight.shape), stride, padding, dilation)
    ho, wo = low.out_hw
    if ho < 1 or wo < 1:
        raise ValueError(f"x: input {tuple(x.shape[2:])} is too small for kernel {tuple(weight.shape[2:])} "
                         f"with padding {padding} and dilation {dilation}")
    return x, low


def _linear_lowering(x, weight) -> LinearLowering:
    if weight.dim() != 2:
        raise ValueError(f"weight: expected 2 dims [out_features, in_features], got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x: expected last dim {weight.shape[1]} (in_features), got shape {tuple(x.shape)}")
    return LinearLowering(tuple(x.shape), tuple(weight.shape))


def xbar_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: Union[int, Tuple[int, int]] = 1,
    padding: Union[int, Tuple[int, int], str] = 0,
    dilation: Union[int, Tuple[int, int]] = 1,
    groups: int = 1,
    *,
    config: XbarConfig,
    task_weight: Optional[torch.Tensor] = None,
    pe_mask: Optional[torch.Tensor] = None,
    col_scale: Optional[torch.Tensor] = None,
    input_scale: ScaleArg = None,
    weight_scale: ScaleArg = None,
    task_weight_scale: ScaleArg = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Conv2d computed on simulated crossbars (docs/SPEC.md).  Stateless: the weights are
    programmed (quantised) on every call.

    x [B, Cin, H, W] (or unbatched [Cin, H, W]); weight [Cout, Cin, kh, kw]; pe_mask [Tr, Tc];
    col_scale [Tr, Cout] with Tr = ceil(Cin*kh*kw / rows), Tc = ceil(Cout / cols).
    """
    return _conv2d(x, weight, bias, stride, padding, dilation, groups, config=config, task_weight=task_weight,
                   pe_mask=pe_mask, col_scale=col_scale, input_scale=input_scale, weight_scale=weight_scale,
                   task_weight_scale=task_weight_scale, backend=backend)


def _conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, config, task_weight=None,
            pe_mask=None, col_scale=None, input_scale=None, weight_scale=None, task_weight_scale=None, backend=None,
            **layer_state) -> torch.Tensor:
    _check_common(x, weight, bias, config, task_weight)
    if isinstance(x, torch.Tensor) and x.dim() == 3:
        return _conv2d(x.unsqueeze(0), weight, bias, stride, padding, dilation, groups, config=config,
                       task_weight=task_weight, pe_mask=pe_mask, col_scale=col_scale, input_scale=input_scale,
                       weight_scale=weight_scale, task_weight_scale=task_weight_scale, backend=backend,
                       **layer_state)[0]
    x, low = _conv_lowering(x, weight, stride, padding, dilation, groups)
    return _xbar(x, weight, bias, low, config, task_weight, pe_mask, col_scale, input_scale, weight_scale,
                 task_weight_scale, backend, **layer_state)


def xbar_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    config: XbarConfig,
    task_weight: Optional[torch.Tensor] = None,
    pe_mask: Optional[torch.Tensor] = None,
    col_scale: Optional[torch.Tensor] = None,
    input_scale: ScaleArg = None,
    weight_scale: ScaleArg = None,
    task_weight_scale: ScaleArg = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Linear layer on simulated crossbars: x [..., in] -> [..., out]; weight [out, in].
    Stateless: the weights are programmed (quantised) on every call."""
    return _linear(x, weight, bias, config=config, task_weight=task_weight, pe_mask=pe_mask, col_scale=col_scale,
                   input_scale=input_scale, weight_scale=weight_scale, task_weight_scale=task_weight_scale,
                   backend=backend)


def _linear(x, weight, bias=None, *, config, task_weight=None, pe_mask=None, col_scale=None, input_scale=None,
            weight_scale=None, task_weight_scale=None, backend=None, **layer_state) -> torch.Tensor:
    _check_common(x, weight, bias, config, task_weight)
    low = _linear_lowering(x, weight)
    return _xbar(x, weight, bias, low, config, task_weight, pe_mask, col_scale, input_scale, weight_scale,
                 task_weight_scale, backend, **layer_state)
