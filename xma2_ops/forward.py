"""The one body of every crossbar call (docs/SPEC.md sections 4-6): the stateless functional API
(functional.py) calls it without state, a layer's Crossbar (crossbar.py) with its own.

Data path: argument checks (checks.py) -> program the weights (programmed.py; a layer's Crossbar
brings its programmed-state caches instead) -> quantise x (quant.py) and lower it to the GEMM
(lowering.py) -> one op call ``torch.ops.xma2_ops.crossbar_mvm`` (ops.py; the backend is picked in
backends/dispatch.py) -> the layer's layout.

Host synchronisation: every check that needs data (finite values, mask ranges, the input's sign
and range, whether a layer's programmed weight is still current) is gathered into one tensor and
read with one ``tolist()`` per call.  Under ``torch.compile`` these data checks are skipped (they
would break the graph) and layers re-program their weights inside the graph; validate a model
once in eager mode.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .backends import check_backend_name, get_backend
from .checks import MAX_GEMM_ELEMS, DataChecks, check_cell_sums, check_common, check_masks, pair, scale_tensor
from .config import GemmParams, XbarConfig
from .device import DeviceModel
from .lowering import ConvLowering, LinearLowering, coefficients, effective_weight
from .ops import crossbar_mvm, crossbar_mvm_cells, straight_through
from .programmed import ChipPosition, ProgrammedWeight, ProgrammingCache, program_key, program_weight
from .quant import compute_dtype, derived_scale, input_in_range, quantize_input


@dataclass
class CallState:
    """What a stateful caller (a layer's Crossbar) brings to a call: its programmed-state caches
    (backbone, task), whether a cached state may be reused (eval mode), its place on the chip (SPEC 7
    draws), whether the device model's cells are used, the input sign decided at calibration (a
    bool, or a 0-dim bool tensor read in the one synchronisation) and a callback told the sign used."""

    caches: Tuple[ProgrammingCache, ProgrammingCache]
    chip: ChipPosition
    reuse: bool
    cells: bool
    signed: Union[None, bool, torch.Tensor] = None
    on_sign: Optional[Callable[[bool], None]] = None


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

    def program(self, target: "_Target", checks: DataChecks) -> ProgrammedWeight:
        w = self.weight.detach()
        scale = self.given
        if scale is None:
            wc = w.to(compute_dtype(w))
            amax = wc.abs().amax()
            ok = torch.isfinite(amax)  # max|W| is NaN or inf exactly when W is not finite
            scale = derived_scale(wc, 2 ** (target.weight_bits - 1) - 1, amax)
        else:
            ok = torch.isfinite(w).all()
        if target.device is not None:  # cells are drawn from the codes at once: check before
            checks = DataChecks()
        checks.require(ok, f"{self.name}: expected finite values, got NaN or inf")
        if target.device is not None:
            checks.run()
        return program_weight(w, scale, target.weight_bits, cell_bits=target.cell_bits, device=target.device,
                              chip=target.chip)

    def program_checked(self, target: "_Target") -> ProgrammedWeight:
        """Programs and checks the weight at once (a state that gets cached must be a valid one)."""
        checks = DataChecks()
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


def _prepare_slots(slots: List[_WeightSlot], target: _Target, checks: DataChecks, reuse: bool) -> None:
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
    checks = DataChecks()
    _prepare_slots(slots, target, checks, reuse=True)
    _finish_slots(slots, target, checks.run(), keep_source=True)


# ------------------------------------------------------------------ the one body
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


def run(x, weight, bias, lowering, config: XbarConfig, task_weight, pe_mask, col_scale, input_scale, weight_scale,
        task_weight_scale, backend, state: Optional[CallState] = None) -> torch.Tensor:
    """The one body of xbar_conv2d / xbar_linear and the layers (_body), its phases labelled."""
    phase = _Phase()
    try:
        return _body(phase, x, weight, bias, lowering, config, task_weight, pe_mask, col_scale, input_scale,
                     weight_scale, task_weight_scale, backend, state)
    finally:
        phase(None)


def _body(phase: _Phase, x, weight, bias, lowering, config: XbarConfig, task_weight, pe_mask, col_scale,
          input_scale, weight_scale, task_weight_scale, backend, state: Optional[CallState]) -> torch.Tensor:
    """``state``: a layer's (CallState), or None (the stateless functional API: programs every call, the
    input sign from this call's x, a fresh chip position, the device model's cells when the config has
    a non-ideal device)."""
    if state is None:
        signed, caches, reuse, on_sign, chip, cells = None, (None, None), False, None, None, None
    else:
        signed, caches, reuse, on_sign = state.signed, state.caches, state.reuse, state.on_sign
        chip, cells = state.chip, state.cells
    m, k, n = lowering.gemm_mkn
    if m * max(k, n, 1) > MAX_GEMM_ELEMS:
        raise ValueError(f"x: the crossbar GEMM of this call would be [{m}, {k}] x [{k}, {n}], beyond any memory "
                         f"(check the input shape, padding and dilation)")
    check_backend_name(backend)
    config.row_layout(k)  # refuses an even split whose last tile would exceed R rows (SPEC 8.4)
    phase("xbar.checks")
    checks = DataChecks()
    no_masks = task_weight is None and pe_mask is None and col_scale is None  # W_eff = W
    pe_mask, col_scale = check_masks(config, k, n, x, task_weight, pe_mask, col_scale, checks)
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
    slots = [_WeightSlot("weight", weight, scale_tensor("weight_scale", weight_scale, weight, n, checks), caches[0])]
    if task_weight is not None:
        slots.append(_WeightSlot("task_weight", task_weight,
                                 scale_tensor("task_weight_scale", task_weight_scale, task_weight, n, checks),
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
    s_x = scale_tensor("input_scale", input_scale, x, None, checks) if quantized else None
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
    g_b = g_t = None
    if cells:
        noise = w_b.cells.read_noise(read)
        g_b = w_b.cells.read(read, noise)
        if w_t is not None:  # (the same stream as the backbone's cells: the same draw, made once)
            g_t = w_t.cells.read(read, noise if w_t.cells.shares_reads(w_b.cells) else None)

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
        s_x = derived_scale(x, config.input_qmax(signed), amax.to(cd))
    elif s_x.dim():
        s_x = s_x.reshape(())
    x_int = quantize_input(x.detach().to(cd), s_x, params.input_bits, signed)
    x_int = x_int.to(_code_dtype(params, be))
    phase("xbar.unfold_codes")
    x_codes = lowering.unfold_codes(x_int, be)
    phase("xbar.kernel")
    steps = params.tile_steps(x_codes.shape[1], config.device.frac_bits if cells else None)
    coef_b, coef_t = coefficients(pe_mask, col_scale, s_x, w_b.scale, w_t.scale if w_t is not None else None,
                                  params.cols, steps, cd, w_t is not None)
    if cells:
        frac_bits = config.device.frac_bits
        check_cell_sums(params, frac_bits, g_b, g_t)
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


def _straight_through_term(x, weight, task_weight, pe_mask, col_scale, s_x, w_b: ProgrammedWeight,
                           w_t: Optional[ProgrammedWeight], params: GemmParams, lowering, g_b=None,
                           g_t=None) -> torch.Tensor:
    """Zero in value; its gradient w.r.t. x and the weights is that of the float layer at the
    dequantised point, every quantiser as the identity, inputs clipped by the input quantiser
    getting none (SPEC 5).  pe_mask/col_scale get their exact gradient through the op instead."""
    cd = compute_dtype(x)
    xc = x.to(cd)
    keep = input_in_range(xc.detach(), s_x, params.input_bits, params.input_signed).to(x.dtype)
    x_deq = (quantize_input(xc.detach(), s_x, params.input_bits, params.input_signed) * s_x).to(x.dtype)
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


# ------------------------------------------------------------------ the public functions' argument handling
def _conv_lowering(x, weight, stride, padding, dilation, groups) -> Tuple[torch.Tensor, ConvLowering]:
    if groups != 1:
        raise ValueError(f"groups: only groups=1 is supported (each group would need its own PE grid), got {groups}")
    if weight.dim() != 4:
        raise ValueError(f"weight: expected 4 dims [Cout, Cin, kh, kw], got shape {tuple(weight.shape)}")
    if x.dim() != 4:
        raise ValueError(f"x: expected 4 dims [B, Cin, H, W] (or 3 unbatched), got shape {tuple(x.shape)}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"x: expected {weight.shape[1]} input channels (weight.shape[1]), got {x.shape[1]}")
    stride = pair("stride", stride, 1)
    dilation = pair("dilation", dilation, 1)
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
    padding = pair("padding", padding, 0)
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


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, config, task_weight=None,
           pe_mask=None, col_scale=None, input_scale=None, weight_scale=None, task_weight_scale=None, backend=None,
           state: Optional[CallState] = None) -> torch.Tensor:
    """xbar_conv2d's arguments checked and lowered, then ``run``."""
    check_common(x, weight, bias, config, task_weight)
    if isinstance(x, torch.Tensor) and x.dim() == 3:
        return conv2d(x.unsqueeze(0), weight, bias, stride, padding, dilation, groups, config=config,
                      task_weight=task_weight, pe_mask=pe_mask, col_scale=col_scale, input_scale=input_scale,
                      weight_scale=weight_scale, task_weight_scale=task_weight_scale, backend=backend, state=state)[0]
    x, low = _conv_lowering(x, weight, stride, padding, dilation, groups)
    return run(x, weight, bias, low, config, task_weight, pe_mask, col_scale, input_scale, weight_scale,
               task_weight_scale, backend, state)


def linear(x, weight, bias=None, *, config, task_weight=None, pe_mask=None, col_scale=None, input_scale=None,
           weight_scale=None, task_weight_scale=None, backend=None, state: Optional[CallState] = None) -> torch.Tensor:
    """xbar_linear's arguments checked and lowered, then ``run``."""
    check_common(x, weight, bias, config, task_weight)
    low = _linear_lowering(x, weight)
    return run(x, weight, bias, low, config, task_weight, pe_mask, col_scale, input_scale, weight_scale,
               task_weight_scale, backend, state)
