"""ADC range calibration: each crossbar layer's ``adc_clip`` from the partial sums it really sees.

SPEC 3's default full scale is Pmax = R (2^db - 1)(2^cb - 1), the largest partial sum a PE can
produce.  Real partial sums are far smaller (sparse, small input chunks and weight slices), so an
8-bit ADC spread over [0, Pmax] resolves them coarsely; hardware designs calibrate the ADC range
instead.  ``calibrate_adc`` runs a few batches, collects every analog partial sum P of every
(row tile, polarity, input chunk, weight slice) of each layer (ideal cells, the layer's own input
quantiser and programmed weight codes; under the periphery conventions of SPEC 8 the value V that
one conversion sees: a difference of polarities, a sum of chunks, a signed input), and picks the
clip (for a signed ADC, from |V|: its range is [-clip, clip]):

- ``method="percentile"``: the smallest clip covering ``percentile`` % of the partial sums
  (zeros included: they are what the ADC converts most);
- ``method="mse"``: the clip minimising the mean squared ADC error sum_P (P_hat(P) - P)^2 over the
  observed histogram, searched over every clip in [1, max P] (exact) when max P <= 2048, else
  over a geometric grid of 2048 clips.

The histogram is kept as the distinct partial sums seen and their counts (memory grows with what
is seen, not with Pmax, which reaches 2^32 for the largest configs).

``cells=True`` (on-chip calibration, ``mta.deploy``'s "adc" step; every layer needs a
``config.device``, an ideal device's cells being its codes): the partial sums come from the
layer's programmed device cells instead of the ideal codes -- one read of the fixed-point
conductances Gq [2, S, K, N] of SPEC 7 (``programmed.cells.read``, the read noise of the layer's
next read, without advancing its counters), the re-programmed (tier-1) PEs' cells where the
current ``pe_mask`` selects them.  A conversion sees V_F in units of 2^-F level steps; it is
collected as round_half_even(V_F / 2^F), in level units like the clip (an integer clip cannot
resolve finer).  With ``cells=False`` (default) the ideal-code behaviour is unchanged.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from .backends import periphery
from .config import GemmParams, adc_levels_for
from .modules import XbarConv2d, XbarLinear
from .quant import adc_codes, expand_tiles, quantize_input

_MAX_ROWS = 2048  # input rows per layer and batch whose partial sums are collected (sampled evenly)
_BINCOUNT_SPAN = 1 << 22  # value ranges up to this are counted by bincount, wider ones by unique
_EXHAUSTIVE_CLIPS = 2048  # "mse": every clip up to this many, else a geometric grid of this many


Counts = Tuple[torch.Tensor, torch.Tensor]  # (distinct partial sums, ascending, int64; their counts, int64)


def _no_counts() -> Counts:
    return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)


def _merge(a: Counts, b: Counts) -> Counts:
    """The counts of a and b together (memory: the distinct values only, never [0, Pmax])."""
    values, inverse = torch.unique(torch.cat([a[0], b[0]]), sorted=True, return_inverse=True)
    return values, torch.zeros_like(values).index_add_(0, inverse, torch.cat([a[1], b[1]]))


def _cell_slices(layer: nn.Module) -> List[List[torch.Tensor]]:
    """slices[q][j] [K, N] (int64, units of 2^-F level steps): one read of the cells the layer's
    current state drives (backbone cells; the task's where ``pe_mask`` re-programs a PE)."""
    st = layer.programmed
    gq = st.cells.read(layer.chip.reads)  # the next read's draw; the counter is not advanced
    tw, pm = layer.adapter(layer)[:2] if layer.adapter is not None else (layer.task_weight, layer.pe_mask)
    task = layer.programmed_task
    if tw is not None and pm is not None and task is not None and task.cells is not None:
        k, n = st.codes.shape
        sel = expand_tiles(pm.detach() > 0, k, n, layer.config.row_layout(k), layer.config.cols).to(gq.device)
        gq = torch.where(sel, task.cells.read(layer.chip.reads), gq)
    g = gq.to(torch.int64)
    return [[g[q, j] for j in range(g.shape[1])] for q in range(2)]


def _count(v: torch.Tensor) -> Counts:
    """The distinct values of the int64 tensor v (ascending) and their counts: ``torch.unique``'s
    result, by one bincount over [min, max] when that range is small (no sort: several times faster)."""
    if not v.numel():
        return _no_counts()
    lo, hi = (int(t) for t in torch.aminmax(v))
    if hi - lo >= _BINCOUNT_SPAN:
        return torch.unique(v, sorted=True, return_counts=True)
    counts = torch.bincount((v - lo).flatten(), minlength=hi - lo + 1)
    values = torch.nonzero(counts).flatten()
    return values + lo, counts[values]


def _histogram(layer: nn.Module, x: torch.Tensor, cells: bool = False) -> Counts:
    """The distinct partial sum values P that ``x`` produces in ``layer`` and how often each occurs
    (``cells``: from the programmed device cells, in level units; module docstring)."""
    cfg = layer.config
    if float(layer.input_range) == 0.0:
        layer.observe_input(x)  # a never-calibrated layer calibrates on its first batch, as its forward would
    signed = bool(layer.input_signed) if cfg.input_signed is None else cfg.input_signed
    rng = float(layer.input_range)
    s_x = torch.tensor(rng / cfg.input_qmax(signed) if rng > 0 else 1.0, dtype=torch.float64)
    codes = quantize_input(x.detach().double(), s_x, cfg.input_bits, signed)
    if isinstance(layer, XbarConv2d):
        if layer.padding_mode != "zeros":
            codes = nn.functional.pad(codes, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
            padding = 0
        else:
            padding = layer.padding
        cols = nn.functional.unfold(codes, layer.kernel_size, dilation=layer.dilation, padding=padding,
                                    stride=layer.stride)
        codes = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    else:
        codes = codes.reshape(-1, codes.shape[-1])
    if codes.shape[0] > _MAX_ROWS:
        codes = codes[torch.linspace(0, codes.shape[0] - 1, _MAX_ROWS).long()]
    layer.program()
    p = _layer_params(layer)
    if cells and layer.programmed.cells is not None:  # (an ideal device's cells hold the codes exactly)
        slices, unit = _cell_slices(layer), 2.0 ** -layer.config.device.frac_bits
        w_max = max((int(w.max()) for ws in slices for w in ws if w.numel()), default=0)
    else:
        slices, unit = periphery.code_slices(layer.programmed.codes, p), None
        w_max = (1 << p.cell_bits) - 1
    _, x_all, _, w = periphery.gemm_operands(codes.long(), slices, w_max, p)
    counts = _no_counts()
    for _, _, _, v in periphery.conversions(x_all, w, p):  # exact integers (periphery.gemm_operands)
        v = v.double()
        v = (v if unit is None else v * unit).round().long()  # (x 2^-F is exact too)
        counts = _merge(counts, _count(v))
    return counts


def _layer_params(layer: nn.Module) -> GemmParams:
    cfg = layer.config
    return GemmParams.from_config(cfg, bool(layer.input_signed) if cfg.input_signed is None else cfg.input_signed)


def _adc_mse(values: torch.Tensor, counts: torch.Tensor, clip: int, bits: int, p: Optional[GemmParams] = None) -> float:
    """sum_V count(V) (V_hat(V) - V)^2 over the distinct values V seen, through the ADC of ``p``'s
    periphery (SPEC 8.2; None: the unsigned, half-up ADC of SPEC 3)."""
    signed = p is not None and p.adc_signed
    n = adc_levels_for(bits, clip, signed)
    code = adc_codes(values, n, clip, 0, signed, p is not None and p.has("adc_rounding"))
    v_hat = code * ((2 if signed else 1) * clip / n)
    return float((counts.double() * (v_hat - values.double()) ** 2).sum())


def choose_clip(hist: torch.Tensor, adc_bits: int, method: str = "percentile", percentile: float = 99.99) -> int:
    """The ADC clip for a dense histogram of partial sums (hist[P] = count of P; see the module docstring)."""
    values = torch.nonzero(hist).flatten()
    return _choose_clip((values, hist[values].long()), adc_bits, method, percentile)


def _choose_clip(counts: Counts, adc_bits: int, method: str, percentile: float, p: Optional[GemmParams] = None) -> int:
    """The ADC clip for the counts of the distinct partial sums (ascending values, counts > 0); for a
    signed ADC (``p.adc_signed``) the percentile covers |V| and the error is the signed ADC's."""
    if p is not None and p.adc_signed and method == "percentile":
        counts = _merge(_no_counts(), (counts[0].abs(), counts[1]))
    values, n_p = counts
    total = int(n_p.sum())
    if total == 0 or int(n_p[values != 0].sum()) == 0:
        return 1
    top = int(values.abs().max())
    if method == "percentile":
        cum = torch.cumsum(n_p, 0)
        # the smallest P whose cumulative count reaches the target (the target truncated to an integer)
        target = int(torch.tensor(percentile / 100.0 * total, dtype=cum.dtype))
        if target <= 0:
            return 1
        i = int(torch.searchsorted(cum, torch.tensor(target, dtype=cum.dtype)))
        clip = int(values[i]) if i < values.numel() else top
        return max(1, min(clip, top))
    if method == "mse":
        if top <= _EXHAUSTIVE_CLIPS:
            candidates = list(range(1, top + 1))
        else:  # a geometric grid: the error changes slowly with the clip at this scale
            candidates = sorted({max(1, int(round(v))) for v in torch.logspace(0, torch.log10(
                torch.tensor(float(top))), _EXHAUSTIVE_CLIPS, dtype=torch.float64).tolist()} | {top})
        errors = [_adc_mse(values, n_p, c, adc_bits, p) for c in candidates]
        return candidates[min(range(len(errors)), key=errors.__getitem__)]
    raise ValueError(f"method: expected 'percentile' or 'mse', got {method!r}")


@torch.no_grad()
def calibrate_adc(model: nn.Module, loader: Iterable, batches: int = 2, method: str = "percentile",
                  percentile: float = 99.99, cells: bool = False) -> Dict[str, int]:
    """Set ``adc_clip`` of every quantised crossbar layer of ``model`` from ``batches`` batches of
    ``loader`` (items ``x`` or ``(x, ...)``); returns {layer name: clip}.  Layers keep their input
    calibration (run one calibrated forward first, e.g. ``mta.calibrate``, or the first batch does it).
    ``cells``: the partial sums of the programmed device cells (module docstring); every such layer
    must have a non-ideal ``config.device``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float)):
        raise TypeError(f"percentile: expected a number in (0, 100], got {type(percentile).__name__} ({percentile!r})")
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile: expected a value in (0, 100], got {percentile}")
    if not isinstance(method, str):
        raise TypeError(f"method: expected 'percentile' or 'mse', got {type(method).__name__} ({method!r})")
    if method not in ("percentile", "mse"):  # refused before any batch runs
        raise ValueError(f"method: expected 'percentile' or 'mse', got {method!r}")
    if isinstance(batches, bool) or not isinstance(batches, int):
        raise TypeError(f"batches: expected an int >= 1, got {type(batches).__name__} ({batches!r})")
    if batches < 1:
        raise ValueError(f"batches: expected an int >= 1, got {batches!r}")
    if not isinstance(cells, bool):
        raise TypeError(f"cells: expected a bool, got {type(cells).__name__} ({cells!r})")
    try:
        items = iter(loader)
    except TypeError:
        raise TypeError(f"loader: expected an iterable of batches, got {type(loader).__name__}") from None
    layers = {name: m for name, m in model.named_modules()
              if isinstance(m, (XbarConv2d, XbarLinear)) and m.config.quantized and m.config.adc_bits is not None}
    if cells:
        no_chip = [name for name, m in layers.items() if m.config.device is None]
        if no_chip:
            raise ValueError(f"cells: layer(s) {no_chip} have no config.device (no chip to read); use cells=False")
    hists = {name: _no_counts() for name in layers}

    def hook(name):
        def fn(mod, args):
            hists[name] = _merge(hists[name], _histogram(mod, args[0], cells))
        return fn

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in layers.items()]
    was_training = model.training
    seen = 0
    try:
        model.eval()
        for item in itertools.islice(items, batches):  # (takes no batch beyond those it uses)
            model(item[0] if isinstance(item, (tuple, list)) else item)
            seen += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if seen == 0:  # no partial sum seen: every clip would be 1 (every partial sum saturated)
        raise ValueError("loader: expected at least one batch, got none (an empty loader or an exhausted "
                         "iterator); no adc_clip was changed")
    clips = {}
    for name, m in layers.items():
        clips[name] = _choose_clip(hists[name], m.config.adc_bits, method, percentile, _layer_params(m))
        m.config = dataclasses.replace(m.config, adc_clip=clips[name])
    return clips
