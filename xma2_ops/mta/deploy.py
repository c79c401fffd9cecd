"""On-chip calibration of a model's current task on its programmed chip (docs/DEVICE.md, "Deploying
on a chip").

No real chip runs a network naively: its ADC ranges and BatchNorm statistics are calibrated on the
chip, column gains/offsets are compensated digitally, and drift is compensated with a reference
read (aihwkit's GlobalDriftCompensation).  ``deploy`` does the same here with unlabelled task
inputs only, on the chip the layers hold (``config.device``, ``xma2_ops.program(model, seed)``):

- ``"adc"``: ``calibrate_adc(..., cells=True)``: ADC clips from the partial sums of the device cells;
- ``"gain"``: per output column, y <- g_n y + o_n on the crossbar output (before the bias), the least
  squares fit of the chip's layer outputs to the ideal-cell outputs of the same layer on the same
  inputs, layer by layer in network order (each layer's inputs from the already-corrected chip);
- ``"bn"``: ``refresh_bn_stats`` through the chip (the quantised forward on the cells, eval mode), for a
  task that owns its BNs; with ``MethodSpec.task_bn=False`` the BNs are the backbone's, shared by every
  task and not in the task file, so the step leaves them alone (``Deployment.bn_skipped``);
- ``"bn_shift"`` (paired): every BN's running statistics moved by what the chip changes, measured on the
  same calibration inputs: mean += chip mean - ideal-cell mean, var *= chip var / ideal-cell var (the
  ideal-cell passes run on the model as ``deploy`` found it, before any step, without reading the
  chip).  The base is ``bn_base`` (``ideal_bn_stats`` over e.g. the task's whole training set: a
  digital computation, no chip read), or without it the task's trained statistics;
  the calibration inputs' sampling error cancels in the difference.  "bn" instead replaces the
  statistics with the chip's estimate on the calibration inputs alone, whose sampling error on a
  nearly ideal chip costs more than the chip does (docs/DEVICE.md).  Same task_bn=False rule as "bn";
- ``"drift"`` (optional): one scalar per layer, mean |ideal| / mean |chip| (corrected so far), folded
  into the same correction (global drift compensation);
- ``"fold"`` (last): each layer's correction folded, exactly, into the BatchNorm its output feeds and
  nothing else feeds on (found by tracing the model with torch.fx), so that it costs nothing at
  inference: BN computes gamma (z - mu) / s + beta per channel, and with z = g y + o + b that is the
  same BN with gamma' = gamma g and mu' = b + (mu - o - b) / g applied to y + b.  Layers without such a
  BN (a residual branch reads the output too, no BN, a BN without affine or running statistics, a
  BN shared with the backbone, i.e. ``MethodSpec.task_bn=False``) keep the digital correction.

Steps run in the order given; the default is ("adc", "gain", "bn_shift", "fold").

Why BN and not XMA2's tier-2 column scales: those are shift levels {0, +-2^k} per PE row tile, so a
real gain does not fit them without a multiplier, and a column's re-programmed PEs carry no scale at
all; the BN after each crossbar conv is a per-channel affine already computed digitally for the task.
The correction that remains lives on the layers (``out_gain``/``out_offset``) and travels in the task
file; a folded one travels as the task's BN (``task_bn``).
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.fx
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..calibration import calibrate_adc
from ..modules import XbarConv2d, XbarLinear
from .calibration import refresh_bn_stats
from .layers import bn_layers, xbar_layers

STEPS = ("adc", "bn", "bn_shift", "gain", "drift", "fold")
# bn after gain: its statistics must be those of the corrected outputs; fold last (it folds the final ones)
DEFAULT_STEPS = ("adc", "gain", "bn_shift", "fold")
DEFAULT_INPUTS = 256  # inputs (not batches) taken from the loader when ``batches`` is None


BNStats = Dict[str, Tuple[torch.Tensor, torch.Tensor]]  # {BN name: (running mean, running var)}, float64


@dataclasses.dataclass
class LayerDeployment:
    """What deploy changed in one crossbar layer (None: the step did not run or does not apply)."""

    name: str
    old_clip: Optional[int] = None
    new_clip: Optional[int] = None
    gain_min: Optional[float] = None
    gain_max: Optional[float] = None
    offset_absmax: Optional[float] = None
    drift: Optional[float] = None  # the drift step's scale
    error_before: Optional[float] = None  # ||chip - ideal|| / ||ideal|| of the layer output before the gain step
    error_after: Optional[float] = None  # ... after it
    folded_into: Optional[str] = None  # the fold step: the BN that now holds the correction
    not_folded: Optional[str] = None  # ... or why the layer keeps its digital correction


@dataclasses.dataclass
class Deployment:
    """``deploy``'s result: the steps run, the inputs used, per layer what changed, the BN layers
    re-estimated (or why the bn step re-estimated none), and the chip's BN estimate the "bn_shift" step
    measured (what a later ``shift_bn`` on the same inputs starts from; None without that step)."""

    steps: Tuple[str, ...]
    inputs: int
    batches: int
    layers: List[LayerDeployment]
    bn_layers: List[str]
    bn_skipped: Optional[str] = None
    bn_chip: Optional[BNStats] = dataclasses.field(default=None, repr=False)

    def layer(self, name: str) -> LayerDeployment:
        return next(lc for lc in self.layers if lc.name == name)


def _check_args(model, steps, batches, adc_batches) -> Tuple[Tuple[str, ...], List[Tuple[str, nn.Module]]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if isinstance(steps, str) or not isinstance(steps, (tuple, list)):
        raise TypeError(f"steps: expected a tuple of step names from {STEPS}, got {steps!r}")
    for s in steps:
        if s not in STEPS:
            raise ValueError(f"steps: unknown step {s!r}; expected names from {STEPS}")
    if len(set(steps)) != len(steps) or not steps:
        raise ValueError(f"steps: expected distinct step names from {STEPS}, at least one, got {tuple(steps)!r}")
    if "fold" in steps and steps[-1] != "fold":  # a later step would fit or normalise the folded outputs again
        raise ValueError(f"steps: 'fold' must be the last step, got {tuple(steps)!r}")
    for name, v in (("batches", batches), ("adc_batches", adc_batches)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name}: expected an int >= 1 or None, got {v!r}")
    layers = xbar_layers(model)
    if not layers:
        raise ValueError("model: has no crossbar layers (XbarConv2d/XbarLinear): nothing to deploy")
    no_chip = [n for n, m in layers if m.config.device is None]
    if no_chip:
        raise ValueError(f"model: crossbar layer(s) {no_chip} have no config.device (no chip to calibrate on); "
                         "set XbarConfig.device (DeviceModel.preset('ideal') for ideal cells)")
    return tuple(steps), layers


def calibration_inputs(loader: Iterable, batches: Optional[int] = None) -> List[torch.Tensor]:
    """The calibration batches: ``batches`` batches, or (None) batches until DEFAULT_INPUTS inputs."""
    try:
        items = iter(loader)
    except TypeError:
        raise TypeError(f"loader: expected an iterable of batches, got {type(loader).__name__}") from None
    xs: List[torch.Tensor] = []
    seen = 0
    for item in items:
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"loader: expected items x or (x, ...) with x a tensor, got {type(x).__name__}")
        xs.append(x)
        seen += x.shape[0] if x.dim() else 1
        if (batches is not None and len(xs) >= batches) or (batches is None and seen >= DEFAULT_INPUTS):
            break
    if not xs:
        raise ValueError("loader: expected at least one batch, got none (an empty loader or an exhausted iterator)")
    return xs


def _flat(y: torch.Tensor) -> torch.Tensor:
    """A layer output as [rows, N] float64 (conv: every output position of every input is a row)."""
    return (y.movedim(1, -1).reshape(-1, y.shape[1]) if y.dim() == 4 else y.reshape(-1, y.shape[-1])).double()


def _fit_in_one_pass(model: nn.Module, layers: List[Tuple[str, nn.Module]], x: torch.Tensor, step: str,
                     info: Dict[str, LayerDeployment]) -> None:
    """The "gain" / "drift" step: one chip forward of all the calibration inputs ``x``; as the forward
    reaches a crossbar layer (network order), its chip and ideal-cell crossbar outputs on the input it
    gets -- from the layers before it, already corrected -- give its correction, which its own forward
    then applies."""
    names = {id(m): n for n, m in layers}

    def fit(layer: nn.Module, args) -> None:
        name = names[id(layer)]
        y = _flat(layer.crossbar_output(args[0], cells=True))
        ref = _flat(layer.crossbar_output(args[0], cells=False))
        g, o = _current(layer, y.shape[1], y.device)
        if step == "gain":
            info[name].error_before = _rel_error(y * g + o, ref)
            g, o = _fit_gain(y, ref)
            info[name].error_after = _rel_error(y * g + o, ref)
            info[name].gain_min, info[name].gain_max = float(g.min()), float(g.max())
            info[name].offset_absmax = float(o.abs().max())
        else:
            scale = float(ref.abs().mean() / (y * g + o).abs().mean().clamp_min(1e-30))
            info[name].drift = scale
            g, o = g * scale, o * scale
        layer.set_output_correction(g.float(), o.float())

    handles = [m.register_forward_pre_hook(fit) for _, m in layers]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()


def _current(layer: nn.Module, n: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    if layer.out_gain is None:
        return torch.ones(n, dtype=torch.float64, device=device), torch.zeros(n, dtype=torch.float64, device=device)
    return layer.out_gain.double(), layer.out_offset.double()


def _rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


def _fit_gain(y: torch.Tensor, ref: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per column n, (g, o) minimising sum (g y + o - ref)^2; a constant column keeps g = 1."""
    my, mr = y.mean(0), ref.mean(0)
    dy = y - my
    var = (dy * dy).mean(0)
    cov = (dy * (ref - mr)).mean(0)
    flat = var <= 1e-12 * (my * my).clamp_min(1e-30)  # (a dead column: only the offset is fitted)
    g = torch.where(flat, torch.ones_like(var), cov / torch.where(flat, torch.ones_like(var), var))
    return g, mr - g * my


def _bn_after(model: nn.Module) -> Dict[str, Tuple[str, nn.Module]]:
    """{crossbar layer name: (name, BN)} for every crossbar layer whose output goes to one BatchNorm
    and nowhere else, that BN being called once and on nothing else (the graph of ``model`` traced by
    torch.fx with the crossbar and BN layers as leaves); {} if the model does not trace."""
    class _Leaves(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, (XbarConv2d, XbarLinear, _BatchNorm)) or super().is_leaf_module(m, qualname)

    try:
        graph = _Leaves().trace(model)
    except Exception:  # (data-dependent control flow and the like: no fold, the correction stays)
        return {}
    mods = dict(model.named_modules())
    calls = [n for n in graph.nodes if n.op == "call_module"]
    count = collections.Counter(n.target for n in calls)
    pairs = {}
    for node in calls:
        users = list(node.users)
        if (isinstance(mods[node.target], (XbarConv2d, XbarLinear)) and count[node.target] == 1 and len(users) == 1
                and users[0].op == "call_module" and isinstance(mods[users[0].target], _BatchNorm)
                and count[users[0].target] == 1 and users[0].args == (node,) and not users[0].kwargs):
            pairs[node.target] = (users[0].target, mods[users[0].target])
    return pairs


def _shares_backbone_bn(model: nn.Module) -> bool:
    task = getattr(model, "mta_task", None)
    return task is not None and not task.spec.task_bn


def bn_stats(model: nn.Module, xs: List[torch.Tensor]) -> BNStats:
    """{BN name: (mean, var)} that ``refresh_bn_stats`` estimates on ``xs`` with the layers' config now;
    every BN's buffers are put back."""
    bns = bn_layers(model)
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for _, m in bns]
    try:
        refresh_bn_stats(model, [(x, None) for x in xs], batches=len(xs))
        return {n: (m.running_mean.double().clone(), m.running_var.double().clone()) for n, m in bns}
    finally:
        for (_, m), st in zip(bns, saved):
            m.load_state_dict(st)


@torch.no_grad()
def ideal_bn_stats(model: nn.Module, loader: Iterable) -> BNStats:
    """The BN statistics ``refresh_bn_stats`` estimates over every input of ``loader`` (items ``x`` or
    ``(x, ...)``) with the crossbar layers on ideal cells (``layer.ideal_cells``: the weight codes
    through the same periphery, the chip's cells and counters untouched); every BN is put back."""
    layers = xbar_layers(model)
    xs = [item[0] if isinstance(item, (tuple, list)) else item for item in loader]
    if not xs or not all(isinstance(x, torch.Tensor) for x in xs):
        raise TypeError("loader: expected a non-empty iterable of tensors x or items (x, ...)")
    was_training = model.training
    try:
        model.eval()
        for _, m in layers:
            m.ideal_cells = True
        return bn_stats(model, xs)
    finally:
        for _, m in layers:
            m.ideal_cells = False
        model.train(was_training)


def set_bn(model: nn.Module, stats: BNStats) -> None:
    """Each BN's running statistics set to ``stats`` (a ``bn_stats`` result)."""
    for n, m in bn_layers(model):
        m.running_mean.copy_(stats[n][0])
        m.running_var.copy_(stats[n][1])


def shift_bn(model: nn.Module, base: BNStats, now: BNStats) -> None:
    """Each BN's running mean += now - base mean, running var *= now / base var (two ``bn_stats`` on the
    same inputs: the "bn_shift" step, base = ideal cells, now = the chip)."""
    for n, m in bn_layers(model):
        (mi, vi), (mc, vc) = base[n], now[n]
        m.running_mean.copy_(m.running_mean.double() + (mc - mi))
        m.running_var.copy_(m.running_var.double() * vc / vi.clamp_min(1e-30))


def _fold(model: nn.Module, layers: List[Tuple[str, nn.Module]], info: Dict[str, LayerDeployment]) -> None:
    """The "fold" step (module docstring): every correction that can go into the BN after it does."""
    corrected = [(n, m) for n, m in layers if m.out_gain is not None]
    if not corrected:
        return
    pairs = _bn_after(model)
    for name, layer in corrected:
        bn_name, bn = pairs.get(name, (None, None))
        g, o = layer.out_gain.double(), layer.out_offset.double()
        if _shares_backbone_bn(model):
            info[name].not_folded = "the BN is the backbone's, shared by the tasks (task_bn=False)"
        elif bn is None:
            info[name].not_folded = "the output does not go to one BatchNorm only"
        elif bn.weight is None or bn.running_mean is None:
            info[name].not_folded = f"BN {bn_name} has no affine weight or no running statistics"
        elif not bool((g.abs() > 1e-12).all()):
            info[name].not_folded = "a column's gain is 0"
        else:
            b = layer.bias.double() if layer.bias is not None else torch.zeros_like(g)
            bn.running_mean.copy_(b + (bn.running_mean.double() - o - b) / g)
            bn.weight.copy_(bn.weight.double() * g)
            layer.set_output_correction(None, None)
            info[name].folded_into = bn_name


@torch.no_grad()
def deploy(model: nn.Module, loader: Iterable, steps: Sequence[str] = DEFAULT_STEPS,
           batches: Optional[int] = None, *, adc_method: str = "percentile",
           percentile: float = 99.99, adc_batches: Optional[int] = 1,
           bn_base: Optional[BNStats] = None) -> Deployment:
    """Calibrate the current task of ``model`` on its programmed chip from unlabelled inputs of
    ``loader`` (items ``x`` or ``(x, ...)``): ``batches`` batches, default (None) as many as give
    DEFAULT_INPUTS = 256 inputs.  ``steps`` run in the order given (module docstring: "adc", "bn",
    "bn_shift", "gain", "drift", "fold"); the default ("adc", "gain", "bn_shift", "fold") shifts BN
    after the gain, on the corrected outputs (BN estimated before the gain would normalise outputs the
    gain then changes: measured worse on a ``typical`` chip), then folds the corrections into the BNs;
    every crossbar layer needs a ``config.device`` (an ideal device is accepted: every step then
    changes nothing material).  ``adc_method``/``percentile`` go to ``calibrate_adc``,
    which reads the first ``adc_batches`` of the batches (default 1: a batch of 64 inputs already gives
    each layer up to 2048 input rows x N columns x every conversion of partial sums; None: all).
    ``bn_base``: the "bn_shift" step's base, ``ideal_bn_stats(model, inputs)`` of the model before
    deploy (e.g. over the task's whole training set; it does not depend on the chip, so one serves
    every chip); None: the task's trained statistics.
    The model is left in its training mode; returns what changed (``Deployment``).

    The "gain" correction (and "drift", folded into it) costs N multiplies and N adds per output
    position of a layer (``mta.report``) unless "fold" moved it into the BN that follows the layer
    (``LayerDeployment.folded_into``; ``not_folded`` says why a layer keeps it)."""
    steps, layers = _check_args(model, steps, batches, adc_batches)
    xs = calibration_inputs(loader, batches)
    result = Deployment(steps, sum(int(x.shape[0]) for x in xs), len(xs), [LayerDeployment(n) for n, _ in layers], [])
    info: Dict[str, LayerDeployment] = {lc.name: lc for lc in result.layers}
    was_training = model.training
    try:
        model.eval()
        for _, m in layers:  # the chip the calibration runs on (programmed now if not yet)
            m.program()
        ideal_bn = None
        if "bn_shift" in steps and not _shares_backbone_bn(model):  # (the model as found, on ideal cells)
            ideal_bn = ideal_bn_stats(model, xs)
        for step in steps:
            if step == "adc":
                old = {n: m.config.adc_clip for n, m in layers}
                clips = calibrate_adc(model, xs, batches=min(len(xs), adc_batches or len(xs)), method=adc_method,
                                      percentile=percentile, cells=True)
                for n, clip in clips.items():
                    info[n].old_clip, info[n].new_clip = old[n], clip
            elif step in ("bn", "bn_shift"):
                if _shares_backbone_bn(model):
                    result.bn_skipped = ("the BN layers are the backbone's, shared by the tasks (task_bn=False): "
                                         "re-estimating them on this task would change every task")
                elif step == "bn":
                    refresh_bn_stats(model, [(x, None) for x in xs], batches=len(xs))
                    result.bn_layers = [n for n, _ in bn_layers(model)]
                else:
                    if bn_base is not None:
                        set_bn(model, bn_base)
                    result.bn_chip = bn_stats(model, xs)
                    shift_bn(model, ideal_bn, result.bn_chip)
                    result.bn_layers = [n for n, _ in bn_layers(model)]
            elif step == "fold":
                _fold(model, layers, info)
            else:  # "gain" / "drift": every layer fitted on the already-corrected chip forward
                _fit_in_one_pass(model, layers, torch.cat(xs), step, info)
    finally:
        model.train(was_training)
    return result
