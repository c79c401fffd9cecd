"""Re-programming cost of a task on the crossbars: PEs, cells, energy, endurance, mask memory.

Cell model (docs/SPEC.md section 2): a weight is stored as a differential pair, each polarity
in S = ceil((weight_bits-1)/cell_bits) cells, so a PE with ``r`` used rows and ``c`` used
columns holds ``r * c * S * 2`` cells.  Re-programming a PE writes all of its cells
(``cells_written``, program-and-verify of the whole array); ``cells_changed`` counts only the
cells whose stored level differs from what the PE held before (a lower bound for a
write-only-what-changes scheme).  A cell write counts whatever its outcome (docs/SPEC.md 7.3):
with a device model (``XbarConfig.device``) the stuck cells of a re-programmed PE cost their
write attempt like the others, and both counts come from the levels the cells are *meant* to
hold, so a device model without write-verify changes no count, energy or endurance.  Switching
from task A to task B re-writes every PE that is re-programmed in A or in B (a PE re-programmed
only in A must be restored to the backbone).

Write-verify (docs/SPEC.md 7.4, ``DeviceModel.verify_tolerance``): every pulse is a cell write.
``cell_writes`` counts the pulses of the written cells (= ``cells_written`` without verify),
``max_pulses`` the most any written cell took, ``mean_pulses`` = cell_writes / cells_written.  The
pulses are those the layers' programmed cells took (``layer.programmed.cells.pulses``, and the
task write's in re-programmed PEs): with verify on, a report programs the layers whose state is
not current (``layer.program()``, the adapter in its deployed form).  A PE restored to the
backbone counts the pulses of the backbone's programming, and ``endurance`` counts a task's
pulses again each time it is deployed (one programming per task, not a new draw per switch).

Energy = cell writes (pulses) x ``EnergyModel.write_energy_j``.  Default 10 pJ per cell write: an assumed
order of magnitude for a multi-level ReRAM cell written with an incremental-step
program-and-verify loop (several SET/RESET pulses of pJ scale each; see e.g. the M-ISPVA
scheme in Perez et al., "Optimization of Multi-Level Operation in RRAM Arrays for In-Memory
Computing", Electronics 10(9):1084, 2021).  It is a placeholder to override with your
device's number: every method's energy is linear in it, so ratios between methods are not.

Inference cost (``report(model, example_input=x)``), per image and per layer, from the op's
semantics (SPEC 2-4) and the positions M (output pixels) the layer computes for ``x``:
  cycles        M * P * I: P input passes (2 when the layer's inputs are signed and driven in two
                passes; 1 under signed_inputs='sign_magnitude'), I input chunks (DAC cycles per
                pass).  A PE none of whose columns is converted (every tier-2 scale 0) is not
                activated at all.
  dac_conversions  cycles * (used rows of every active PE)
  cell_reads    cycles * (used rows * used columns * S slices * 2 polarities, every active PE):
                every cell of a driven row conducts, also in columns that are not converted
  adc_conversions  cycles * (converted columns * S * 2, every PE): a column whose tier-2 scale
                is 0 needs no conversion; re-programmed PEs convert all their columns.  SPEC 8:
                input_accumulation='analog' converts once per pass (not per chunk), sensing=
                'differential' once per column pair (not per polarity)
  shift_adds    one digital shift-and-add per ADC code (SPEC 3), plus M per tier-2 column
                scale that is neither 0 nor 1 (a shift, or a multiply for real scales)
  correction_muls / correction_adds  a layer with ``mta.deploy``'s digital column correction
                (``out_gain``): M * N multiplies and M * N adds (M = output positions); not in the
                energy (``EnergyModel`` has no multiply figure)
  energy        the counts times the per-operation figures of ``EnergyModel`` (defaults: ISAAC)
  latency       cycles * read_cycle_s: the PEs, slices and polarities of a layer work in
                parallel (each PE with its own ADC, as in ISAAC), layers one after the other
                (no pipelining): an upper bound for a pipelined design's per-image latency.

Mask memory (bits of task-specific state besides the digital head/BN): tier 1 one bit per PE,
tier 2 ``bits`` per column entry of a frozen PE (1 for xbm, ShiftLevels.bits for xma/xma2),
Piggyback one bit per weight, fine-tuning ``weight_bits`` per weight.  ``adapter_bits`` adds
the stored task weights (``weight_bits`` each) of re-programmed PEs.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .. import quant
from ..config import XbarConfig
from ..quant import column_tiles, expand_tiles
from .masks import pe_cell_counts, pe_extent, pe_max, pe_sum, to_kn
from .layers import use_config, weight_only, xbar_layers
from .task import task_info
from .taskfile import load_task

PathLike = Union[str, os.PathLike]
State = Dict[str, Tuple[torch.Tensor, torch.Tensor]]  # layer -> (pe mask bool [Tr,Tc], cell levels [K,N,2,S])
# layer -> pulses (cell writes, int64 [K,N,2,S]) of the write each cell holds; None: one per cell (no verify)
Pulses = Dict[str, Optional[torch.Tensor]]


@dataclass(frozen=True)
class EnergyModel:
    """Energy (joules) and time (seconds) per operation; every field can be overridden.

    Write: see the module docstring.  Inference figures are derived from the component table of
    ISAAC (Shafiee et al., "ISAAC: A Convolutional Neural Network Accelerator with In-Situ Analog
    Arithmetic in Crossbars", ISCA 2016, Table 6, 32 nm; per in-situ multiply-accumulate unit:
    8 ADCs of 8 bits at 1.28 GS/s, 16 mW; 8 x 128 1-bit DACs, 4 mW; 8 crossbars of 128 x 128
    2-bit cells, 2.4 mW, read in 100 ns; 4 shift-and-add units, 0.2 mW, 1.2 GHz):
      adc_energy_j       16 mW / 8 / 1.28 GS/s = 1.5625 pJ per 8-bit conversion; other resolutions
                         scale as 2^(bits - 8) (constant Walden figure of merit), an ideal ADC
                         (adc_bits None) counts as the lossless resolution ceil(log2(Pmax + 1))
      dac_energy_j       4 mW / 1024 x 100 ns = 0.39 pJ per 1-bit conversion; a db-bit DAC counts
                         (2^db - 1) times that (an assumption: ISAAC only uses 1-bit DACs)
      cell_read_energy_j 2.4 mW / 8 x 100 ns / (128 x 128) = 1.83 fJ per cell and read cycle
      shift_add_energy_j 0.2 mW / 4 / 1.2 GHz = 0.042 pJ per operation
      read_cycle_s       100 ns per crossbar read (one input chunk on every row)
    """

    write_energy_j: float = 10e-12
    adc_energy_j: float = 16e-3 / 8 / 1.28e9
    adc_reference_bits: int = 8
    dac_energy_j: float = 4e-3 / 1024 * 100e-9
    cell_read_energy_j: float = 2.4e-3 / 8 * 100e-9 / (128 * 128)
    shift_add_energy_j: float = 0.2e-3 / 4 / 1.2e9
    read_cycle_s: float = 100e-9

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not (isinstance(v, (int, float)) and v >= 0 and v == v and v != float("inf")):
                raise ValueError(f"EnergyModel.{f.name}: expected a finite number >= 0, got {v!r}")
        if self.adc_reference_bits < 1:
            raise ValueError(f"EnergyModel.adc_reference_bits: expected >= 1, got {self.adc_reference_bits}")

    def adc_conversion_j(self, cfg: XbarConfig) -> float:
        """Energy of one conversion of ``cfg``'s ADC (see the class docstring)."""
        span = cfg.clip * (2 if cfg.sensing == "differential" or cfg.signed_inputs == "sign_magnitude" else 1)
        bits = cfg.adc_bits if cfg.adc_bits is not None else max(1, math.ceil(math.log2(span + 1)))
        return self.adc_energy_j * 2.0 ** (bits - self.adc_reference_bits)

    def dac_conversion_j(self, cfg: XbarConfig) -> float:
        return self.dac_energy_j * (2 ** cfg.dac_bits - 1)


@dataclass
class LayerCost:
    name: str
    pes: int = 0
    reprogrammed_pes: int = 0
    cells_written: int = 0
    cells_changed: int = 0
    cell_writes: int = 0  # pulses over the written cells (write-verify); = cells_written without verify
    max_pulses: int = 0  # the most pulses one written cell took (a max, not a sum, over layers)
    energy_j: float = 0.0
    mask_bits: int = 0
    adapter_bits: int = 0
    weights: int = 0
    piggyback_bits: int = 0
    finetune_bits: int = 0
    # per inference (one image), computed when report() gets an example input (module docstring)
    adc_conversions: int = 0
    dac_conversions: int = 0
    cell_reads: int = 0
    shift_adds: int = 0
    # mta.deploy's digital column correction y <- g y + o: N multiplies and N adds per output position
    correction_muls: int = 0
    correction_adds: int = 0
    inference_energy_j: float = 0.0
    latency_s: float = 0.0

    def __iadd__(self, o: "LayerCost") -> "LayerCost":
        for f in fields(self):
            if f.name == "max_pulses":
                self.max_pulses = max(self.max_pulses, o.max_pulses)
            elif f.name != "name":
                setattr(self, f.name, getattr(self, f.name) + getattr(o, f.name))
        return self

    @property
    def mean_pulses(self) -> float:
        """Pulses per written cell (1 without write-verify; 0 when no cell is written)."""
        return self.cell_writes / self.cells_written if self.cells_written else 0.0


@dataclass
class CostReport:
    method: str
    layers: List[LayerCost]
    per_inference: bool = False  # the inference fields were computed (report(..., example_input=...))
    total: LayerCost = field(init=False)

    def __post_init__(self) -> None:
        self.total = LayerCost("total")
        for lc in self.layers:
            self.total += lc

    @property
    def pe_fraction(self) -> float:
        return self.total.reprogrammed_pes / max(1, self.total.pes)

    def as_dict(self) -> dict:
        return {"method": self.method, "pe_fraction": self.pe_fraction, "per_inference": self.per_inference,
                "total": _as_dict(self.total), "layers": [_as_dict(lc) for lc in self.layers]}

    def table(self) -> str:
        cols = ["pes", "reprogrammed_pes", "cells_written", "cells_changed", "energy_j", "mask_bits", "adapter_bits"]
        if self.total.cell_writes != self.total.cells_written:  # write-verify re-pulsed some cells
            cols[3:3] = ["cell_writes", "max_pulses"]
        if self.per_inference:
            cols += ["adc_conversions", "dac_conversions", "cell_reads", "shift_adds", "inference_energy_j",
                     "latency_s"]
            if self.total.correction_muls:  # a deployed digital correction (mta.deploy)
                cols[-2:-2] = ["correction_muls", "correction_adds"]
        width = max(len(lc.name) for lc in self.layers + [self.total])
        lines = [f"{'layer':<{width}} " + " ".join(f"{c:>18}" for c in cols)]
        for lc in self.layers + [self.total]:
            vals = [f"{getattr(lc, c):>18.3e}" if isinstance(getattr(lc, c), float) else f"{getattr(lc, c):>18d}"
                    for c in cols]
            lines.append(f"{lc.name:<{width}} " + " ".join(vals))
        return "\n".join(lines)


def _as_dict(lc: LayerCost) -> dict:
    return {**asdict(lc), "mean_pulses": lc.mean_pulses}


def _compute_dtype(w: torch.Tensor) -> torch.dtype:
    """The dtype the op quantises a weight in: float64 stays float64, other floats float32."""
    return torch.float64 if w.dtype == torch.float64 else torch.float32


def _cell_levels(w: torch.Tensor, cfg: XbarConfig) -> torch.Tensor:
    """Stored level of every cell of weight tensor ``w`` [N, ...]: int64 [K, N, 2, S] (polarity
    +/-, slice).  The codes come from the op's own quantiser (reference.derived_scale over the
    whole tensor and reference.quantize_weight, in the weight's compute dtype, as the op runs
    them), so the cost model counts exactly the codes the crossbars are programmed with."""
    w_kn = to_kn(w.detach()).to(_compute_dtype(w))
    codes = quant.quantize_weight(w_kn, quant.derived_scale(w_kn, cfg.weight_qmax), cfg.weight_bits).to(torch.int64)
    pols = [codes.clamp(min=0), (-codes).clamp(min=0)]
    return torch.stack([torch.stack([quant.bit_field(p, j, cfg.cell_bits) for j in range(cfg.weight_slices)], -1)
                        for p in pols], -2)


@contextlib.contextmanager
def _deployed_form(layer: nn.Module):
    """The layer's adapter (if any) in its deployed (eval-mode) form for the block."""
    ad = layer.adapter
    was = ad.training if ad is not None else None
    if ad is not None:
        ad.eval()
    try:
        yield
    finally:
        if ad is not None:
            ad.train(was)


@torch.no_grad()
def _deployed_adapter(layer: nn.Module):
    """``layer.adapter(layer)`` in its deployed (eval-mode) form: (task_weight, pe_mask, col_scale)."""
    with _deployed_form(layer):
        return layer.adapter(layer)


@torch.no_grad()
def _layer_pulses(layer: nn.Module, sel: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Pulses [K, N, 2, S] (int64) of the write every cell of ``layer`` holds: the task write's where
    ``sel`` [K, N] (re-programmed PEs), the backbone's elsewhere; None without write-verify."""
    cfg = layer.config
    if not (cfg.uses_cells and cfg.device.verify_tolerance is not None):
        return None
    with _deployed_form(layer):
        layer.program()  # no-op when the programmed state is current
    pulses = layer.programmed.cells.write_pulses()
    if sel is not None:
        pulses = torch.where(sel.to(pulses.device), layer.programmed_task.cells.write_pulses(), pulses)
    return pulses.permute(2, 3, 0, 1).cpu().long()  # [2, S, K, N] -> the levels' [K, N, 2, S]


def _deployed(model: nn.Module, with_pulses: bool) -> Tuple[State, Pulses]:
    """deployed_state, and with ``with_pulses`` the pulses of the cells' writes (else all None)."""
    state: State = {}
    pulses: Pulses = {}
    for name, layer in xbar_layers(model):
        cfg = layer.config
        if cfg.weight_bits is None:
            raise ValueError(f"{name}: cost needs quantised weights (config.weight_bits is None)")
        k, n = layer.weight[0].numel(), layer.weight.shape[0]
        tr, tc = layer.tiles
        base = _cell_levels(layer.weight.cpu(), cfg)
        mask = torch.zeros(tr, tc, dtype=torch.bool)
        sel = None
        if layer.adapter is not None:
            w_t, pm, _ = _deployed_adapter(layer)
            if pm is not None and w_t is not None:
                mask = pm.detach().cpu() > 0
                task = _cell_levels(w_t.cpu(), cfg)
                sel = expand_tiles(mask, k, n, cfg.row_layout(k), cfg.cols)
                base = torch.where(sel[:, :, None, None], task, base)
        state[name] = (mask, base)
        pulses[name] = _layer_pulses(layer, sel) if with_pulses else None
    return state, pulses


def deployed_state(model: nn.Module) -> State:
    """What every PE of the current task stores: (re-programmed mask, cell levels)."""
    return _deployed(model, False)[0]


def deployed_pulses(model: nn.Module) -> Pulses:
    """Per layer, the pulses (cell writes) of the write every cell of the current task holds,
    int64 [K, N, 2, S] like the levels of deployed_state; None for a layer without write-verify
    (one pulse per cell write).  Programs layers whose state is not current (module docstring)."""
    return _deployed(model, True)[1]


def backbone_state(model: nn.Module) -> State:
    """The crossbars holding the backbone only."""
    saved = [(m, m.adapter) for _, m in xbar_layers(model)]
    try:
        for m, _ in saved:
            m.adapter = None
        return deployed_state(model)
    finally:
        for m, a in saved:
            m.adapter = a


def _task(model: nn.Module, path: PathLike, with_pulses: bool) -> Tuple[State, Pulses]:
    other = copy.deepcopy(model)
    load_task(other, path)
    return _deployed(other, with_pulses)


def task_state(model: nn.Module, path: PathLike) -> State:
    """deployed_state of the adapter at ``path`` on this backbone (``model`` is not changed)."""
    return _task(model, path, False)[0]


def _written_pulses(pulses: Optional[torch.Tensor], written: torch.Tensor, cells: Tuple[int, int]) -> torch.Tensor:
    """Pulses [K, N, 2, S] that one switch gives the cells of the ``written`` [K, N] positions (0
    elsewhere); ``pulses`` None: one per written cell (no write-verify)."""
    if pulses is None:
        return written[:, :, None, None].expand(-1, -1, *cells).long()
    return torch.where(written[:, :, None, None], pulses, 0)


def _switch_cost(model: nn.Module, prev: State, new: State, energy: EnergyModel, pulses: Pulses) -> List[LayerCost]:
    info = task_info(model)
    spec = info.spec
    impl = spec.impl
    out = []
    for name, layer in xbar_layers(model):
        cfg = layer.config
        k, n = layer.weight[0].numel(), layer.weight.shape[0]
        (m_prev, lv_prev), (m_new, lv_new) = prev[name], new[name]
        write = m_prev | m_new
        ext = pe_extent(k, n, cfg.row_layout(k), cfg.cols)
        used = ext.prod(-1)  # weights per PE
        slices = cfg.weight_slices
        changed = pe_sum((lv_prev != lv_new).sum((-1, -2)), cfg.row_layout(k), cfg.cols).long()
        lc = LayerCost(name, pes=write.numel(), reprogrammed_pes=int(m_new.sum()))
        lc.cells_written = int(pe_cell_counts(layer)[write].sum())
        lc.cells_changed = int(changed[write].sum())
        written = _written_pulses(pulses[name], expand_tiles(write, k, n, cfg.row_layout(k), cfg.cols), (2, slices))
        lc.cell_writes = int(written.sum())
        lc.max_pulses = int(written.max()) if written.numel() else 0
        lc.energy_j = lc.cell_writes * energy.write_energy_j
        lc.weights = k * n
        lc.piggyback_bits = k * n
        lc.finetune_bits = k * n * cfg.weight_bits
        frozen_cols = int((ext[..., 1] * (~m_new)).sum())  # column entries of frozen PEs
        reprog_weights = int(used[m_new].sum())
        lc.mask_bits = impl.mask_bits(lc.pes, frozen_cols, lc.weights, cfg.weight_bits, spec)  # methods.py
        lc.adapter_bits = impl.adapter_bits(lc.mask_bits, reprog_weights, cfg.weight_bits)
        out.append(lc)
    return out


@torch.no_grad()
def _positions(model: nn.Module, example_input: torch.Tensor) -> Dict[str, int]:
    """Output positions per image of every crossbar layer for ``example_input`` (a batch): one
    cheap forward (eval mode, weight-only config; the positions do not depend on the config)."""
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 2 or example_input.shape[0] < 1:
        raise ValueError("example_input: expected a batch tensor [B, ...] with B >= 1, got "
                         + (f"shape {tuple(example_input.shape)}" if isinstance(example_input, torch.Tensor)
                            else type(example_input).__name__))
    seen: Dict[str, int] = {}
    batch = example_input.shape[0]

    def hook(name):
        def fn(mod, args, out):
            seen[name] = out.numel() // (out.shape[1] if out.dim() == 4 else out.shape[-1]) // batch
        return fn

    layers = xbar_layers(model)
    handles = [m.register_forward_hook(hook(n)) for n, m in layers]
    was_training = model.training
    try:
        model.eval()
        with use_config(model, weight_only):
            model(example_input)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [n for n, _ in layers if n not in seen]
    if missing:
        raise ValueError(f"example_input: the forward did not reach crossbar layer(s) {missing}")
    return seen


def _inference_cost(model: nn.Module, lcs: List[LayerCost], positions: Dict[str, int], energy: EnergyModel) -> None:
    """Fill the per-inference fields of ``lcs`` (module docstring) for the current task."""
    for lc, (name, layer) in zip(lcs, xbar_layers(model)):
        cfg = layer.config
        if not cfg.quantized:
            raise ValueError(f"{name}: inference cost needs the quantised crossbar (config.input_bits and "
                             f"weight_bits set), got {cfg}")
        k, n = layer.weight[0].numel(), layer.weight.shape[0]
        tr, tc = layer.tiles
        pm, cs = torch.zeros(tr, tc), None
        if layer.adapter is not None:
            _, m, c = _deployed_adapter(layer)
            pm = pm if m is None else m.detach().cpu().float()
            cs = None if c is None else c.detach().cpu().float()
        elif layer.pe_mask is not None or layer.col_scale is not None:
            pm = pm if layer.pe_mask is None else layer.pe_mask.detach().cpu().float()
            cs = None if layer.col_scale is None else layer.col_scale.detach().cpu().float()
        ext = pe_extent(k, n, cfg.row_layout(k), cfg.cols)
        alpha = torch.ones(tr, n) if cs is None else cs
        # per PE and column: converted (re-programmed PE, or a frozen one with a nonzero scale)
        reprog = column_tiles(pm > 0, n, cfg.cols)  # [Tr, N]
        converted = reprog | (alpha != 0)
        scaled = ~reprog & (alpha != 0) & (alpha != 1)
        conv_pe = pe_sum(converted.float(), 1, cfg.cols).round().long()  # [Tr, Tc] converted columns
        active = conv_pe > 0
        signed = bool(layer.input_signed) if cfg.input_signed is None else cfg.input_signed
        passes = 2 if (signed and cfg.signed_inputs == "two_pass") else 1
        chunks = cfg.input_chunks(signed)
        cycles = positions[name] * passes * chunks
        slices = cfg.weight_slices
        lc.dac_conversions = cycles * int(ext[..., 0][active].sum())
        lc.cell_reads = cycles * int((ext[..., 0] * ext[..., 1])[active].sum()) * slices * 2
        # SPEC 8: analog accumulation converts once per pass instead of once per chunk; differential
        # sensing once per pair of columns instead of once per polarity.
        conversions = positions[name] * passes * (1 if cfg.input_accumulation == "analog" else chunks)
        lc.adc_conversions = (conversions * int(conv_pe.sum()) * slices
                              * (1 if cfg.sensing == "differential" else 2))
        lc.shift_adds = lc.adc_conversions + positions[name] * int(scaled.sum())
        if layer.out_gain is not None:  # (not in inference_energy_j: the energy model has no multiply cost)
            lc.correction_muls = lc.correction_adds = positions[name] * n
        lc.inference_energy_j = (lc.adc_conversions * energy.adc_conversion_j(cfg)
                                 + lc.dac_conversions * energy.dac_conversion_j(cfg)
                                 + lc.cell_reads * energy.cell_read_energy_j
                                 + lc.shift_adds * energy.shift_add_energy_j)
        lc.latency_s = cycles * energy.read_cycle_s if bool(active.any()) else 0.0


def report(model: nn.Module, previous_task: Union[None, PathLike, State] = None,
           energy: EnergyModel = EnergyModel(), example_input: Optional[torch.Tensor] = None) -> CostReport:
    """Cost of running the current task of ``model``, starting from the backbone (default), from
    the adapter file ``previous_task`` or from a :func:`deployed_state`.  With ``example_input``
    (a batch of inputs of the model) the report also counts the per-inference (per image)
    operations, energy and latency of the current task (module docstring)."""
    if previous_task is None:
        prev = backbone_state(model)
    elif isinstance(previous_task, dict):
        prev = previous_task
    else:
        prev = task_state(model, previous_task)
    new, pulses = _deployed(model, True)
    lcs = _switch_cost(model, prev, new, energy, pulses)
    if example_input is not None:
        _inference_cost(model, lcs, _positions(model, example_input), energy)
    return CostReport(task_info(model).spec.label, lcs, per_inference=example_input is not None)


def endurance(model: nn.Module, tasks: Sequence[PathLike], cycles: int = 1) -> Dict[str, torch.Tensor]:
    """Writes of the most-written cell of every PE ([Tr, Tc] int64 per layer) when the crossbars
    start from the backbone and run the adapters ``tasks`` in order, ``cycles`` times: the writes
    per PE without write-verify, every pulse with it (module docstring).  ``model`` is not
    changed (a task's layers may be programmed on a copy)."""
    states = [_task(model, p, True) for p in tasks]
    prev = backbone_state(model)
    layers = dict(xbar_layers(model))
    counts = {name: torch.zeros_like(lv) for name, (_, lv) in prev.items()}  # per cell [K, N, 2, S]
    for _ in range(cycles):
        for st, pulses in states:
            for name, c in counts.items():
                cfg = layers[name].config
                k, n = c.shape[:2]
                written = expand_tiles(prev[name][0] | st[name][0], k, n, cfg.row_layout(k), cfg.cols)
                c += _written_pulses(pulses[name], written, tuple(c.shape[2:]))
            prev = st
    return {name: pe_max(c.amax((-1, -2)), layers[name].config.row_layout(c.shape[0]), layers[name].config.cols)
            for name, c in counts.items()}
