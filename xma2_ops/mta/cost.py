"""Re-programming cost of a task on the crossbars: PEs, cells, energy, endurance, mask memory.

Cell model (docs/SPEC.md section 2): a weight is stored as a differential pair, each polarity
in S = ceil((weight_bits-1)/cell_bits) cells, so a PE with ``r`` used rows and ``c`` used
columns holds ``r * c * S * 2`` cells.  Re-programming a PE writes all of its cells
(``cells_written``, program-and-verify of the whole array); ``cells_changed`` counts only the
cells whose stored level differs from what the PE held before (a lower bound for a
write-only-what-changes scheme).  A cell write counts whatever its outcome (docs/SPEC.md 7.3):
with a device model (``XbarConfig.device``) the stuck cells of a re-programmed PE cost their
write attempt like the others, and both counts come from the levels the cells are *meant* to
hold, so a device model changes no count, energy or endurance.  Switching from task A to task B re-writes every PE that is
re-programmed in A or in B (a PE re-programmed only in A must be restored to the backbone).

Energy = cells x ``EnergyModel.write_energy_j``.  Default 10 pJ per cell write: an assumed
order of magnitude for a multi-level ReRAM cell written with an incremental-step
program-and-verify loop (several SET/RESET pulses of pJ scale each; see e.g. the M-ISPVA
scheme in Perez et al., "Optimization of Multi-Level Operation in RRAM Arrays for In-Memory
Computing", Electronics 10(9):1084, 2021).  It is a placeholder to override with your
device's number: every method's energy is linear in it, so ratios between methods are not.

Mask memory (bits of task-specific state besides the digital head/BN): tier 1 one bit per PE,
tier 2 ``bits`` per column entry of a frozen PE (1 for xbm, ShiftLevels.bits for xma/xma2),
Piggyback one bit per weight, fine-tuning ``weight_bits`` per weight.  ``adapter_bits`` adds
the stored task weights (``weight_bits`` each) of re-programmed PEs.
"""
from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Dict, List, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .. import reference as ref
from ..config import XbarConfig
from ..reference import expand_tiles
from .masks import pe_extent, pe_sum, to_kn
from .methods import TIER1, task_info, xbar_layers

PathLike = Union[str, os.PathLike]
State = Dict[str, Tuple[torch.Tensor, torch.Tensor]]  # layer -> (pe mask bool [Tr,Tc], cell levels [K,N,2,S])


@dataclass(frozen=True)
class EnergyModel:
    """Energy constants (joules); see the module docstring for the default's source."""

    write_energy_j: float = 10e-12


@dataclass
class LayerCost:
    name: str
    pes: int = 0
    reprogrammed_pes: int = 0
    cells_written: int = 0
    cells_changed: int = 0
    energy_j: float = 0.0
    mask_bits: int = 0
    adapter_bits: int = 0
    weights: int = 0
    piggyback_bits: int = 0
    finetune_bits: int = 0

    def __iadd__(self, o: "LayerCost") -> "LayerCost":
        for f in fields(self):
            if f.name != "name":
                setattr(self, f.name, getattr(self, f.name) + getattr(o, f.name))
        return self


@dataclass
class CostReport:
    method: str
    layers: List[LayerCost]
    total: LayerCost = field(init=False)

    def __post_init__(self) -> None:
        self.total = LayerCost("total")
        for lc in self.layers:
            self.total += lc

    @property
    def pe_fraction(self) -> float:
        return self.total.reprogrammed_pes / max(1, self.total.pes)

    def as_dict(self) -> dict:
        return {"method": self.method, "pe_fraction": self.pe_fraction, "total": asdict(self.total),
                "layers": [asdict(lc) for lc in self.layers]}

    def table(self) -> str:
        cols = ["pes", "reprogrammed_pes", "cells_written", "cells_changed", "energy_j", "mask_bits", "adapter_bits"]
        width = max(len(lc.name) for lc in self.layers + [self.total])
        lines = [f"{'layer':<{width}} " + " ".join(f"{c:>16}" for c in cols)]
        for lc in self.layers + [self.total]:
            vals = [f"{getattr(lc, c):>16.3e}" if c == "energy_j" else f"{getattr(lc, c):>16d}" for c in cols]
            lines.append(f"{lc.name:<{width}} " + " ".join(vals))
        return "\n".join(lines)


def _compute_dtype(w: torch.Tensor) -> torch.dtype:
    """The dtype the op quantises a weight in: float64 stays float64, other floats float32."""
    return torch.float64 if w.dtype == torch.float64 else torch.float32


def _cell_levels(w: torch.Tensor, cfg: XbarConfig) -> torch.Tensor:
    """Stored level of every cell of weight tensor ``w`` [N, ...]: int64 [K, N, 2, S] (polarity
    +/-, slice).  The codes come from the op's own quantiser (reference.derived_scale over the
    whole tensor and reference.quantize_weight, in the weight's compute dtype, as the op runs
    them), so the cost model counts exactly the codes the crossbars are programmed with."""
    w_kn = to_kn(w.detach()).to(_compute_dtype(w))
    codes = ref.quantize_weight(w_kn, ref.derived_scale(w_kn, cfg.weight_qmax), cfg.weight_bits).to(torch.int64)
    pols = [codes.clamp(min=0), (-codes).clamp(min=0)]
    return torch.stack([torch.stack([ref.bit_field(p, j, cfg.cell_bits) for j in range(cfg.weight_slices)], -1)
                        for p in pols], -2)


def deployed_state(model: nn.Module) -> State:
    """What every PE of the current task stores: (re-programmed mask, cell levels)."""
    state: State = {}
    for name, layer in xbar_layers(model):
        cfg = layer.config
        if cfg.weight_bits is None:
            raise ValueError(f"{name}: cost needs quantised weights (config.weight_bits is None)")
        k, n = layer.weight[0].numel(), layer.weight.shape[0]
        tr, tc = layer.tiles
        base = _cell_levels(layer.weight.cpu(), cfg)
        mask = torch.zeros(tr, tc, dtype=torch.bool)
        ad = layer.adapter
        if ad is not None:
            was = ad.training
            ad.eval()
            with torch.no_grad():
                w_t, pm, _ = ad(layer)
            ad.train(was)
            if pm is not None and w_t is not None:
                mask = pm.detach().cpu() > 0
                task = _cell_levels(w_t.cpu(), cfg)
                sel = expand_tiles(mask, k, n, cfg.rows, cfg.cols)[:, :, None, None]
                base = torch.where(sel, task, base)
        state[name] = (mask, base)
    return state


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


def task_state(model: nn.Module, path: PathLike) -> State:
    """deployed_state of the adapter at ``path`` on this backbone (``model`` is not changed)."""
    from .adapters import load_task
    other = copy.deepcopy(model)
    load_task(other, path)
    return deployed_state(other)


def _switch_cost(model: nn.Module, prev: State, new: State, energy: EnergyModel) -> List[LayerCost]:
    info = task_info(model)
    spec = info.spec
    out = []
    for name, layer in xbar_layers(model):
        cfg = layer.config
        k, n = layer.weight[0].numel(), layer.weight.shape[0]
        (m_prev, lv_prev), (m_new, lv_new) = prev[name], new[name]
        write = m_prev | m_new
        ext = pe_extent(k, n, cfg.rows, cfg.cols)
        used = ext.prod(-1)  # weights per PE
        slices = cfg.weight_slices
        changed = pe_sum((lv_prev != lv_new).sum((-1, -2)), cfg.rows, cfg.cols).long()
        lc = LayerCost(name, pes=write.numel(), reprogrammed_pes=int(m_new.sum()))
        lc.cells_written = int((used * 2 * slices)[write].sum())
        lc.cells_changed = int(changed[write].sum())
        lc.energy_j = lc.cells_written * energy.write_energy_j
        lc.weights = k * n
        lc.piggyback_bits = k * n
        lc.finetune_bits = k * n * cfg.weight_bits
        frozen_cols = int((ext[..., 1] * (~m_new)).sum())  # column entries of frozen PEs
        reprog_weights = int(used[m_new].sum())
        if spec.method == "finetune":
            lc.mask_bits = lc.finetune_bits
        elif spec.method == "piggyback":
            lc.mask_bits = lc.piggyback_bits
        elif spec.method == "xbm":
            lc.mask_bits = frozen_cols
        elif spec.method == "xma":
            lc.mask_bits = frozen_cols * spec.levels.bits
        elif spec.method == "pe":
            lc.mask_bits = lc.pes
        elif spec.method == "xma2":
            lc.mask_bits = lc.pes + frozen_cols * spec.levels.bits
        lc.adapter_bits = lc.mask_bits
        if spec.method in TIER1:
            lc.adapter_bits += reprog_weights * cfg.weight_bits
        out.append(lc)
    return out


def report(model: nn.Module, previous_task: Union[None, PathLike, State] = None,
           energy: EnergyModel = EnergyModel()) -> CostReport:
    """Cost of running the current task of ``model``, starting from the backbone (default), from
    the adapter file ``previous_task`` or from a :func:`deployed_state`."""
    if previous_task is None:
        prev = backbone_state(model)
    elif isinstance(previous_task, dict):
        prev = previous_task
    else:
        prev = task_state(model, previous_task)
    return CostReport(task_info(model).spec.label, _switch_cost(model, prev, deployed_state(model), energy))


def endurance(model: nn.Module, tasks: Sequence[PathLike], cycles: int = 1) -> Dict[str, torch.Tensor]:
    """Writes per PE ([Tr, Tc] int64 per layer) when the crossbars start from the backbone and
    run the adapters ``tasks`` in order, ``cycles`` times.  ``model`` is not changed."""
    states = [task_state(model, p) for p in tasks]
    prev = backbone_state(model)
    counts = {name: torch.zeros_like(m, dtype=torch.int64) for name, (m, _) in prev.items()}
    for _ in range(cycles):
        for st in states:
            for name in counts:
                counts[name] += (prev[name][0] | st[name][0]).long()
            prev = st
    return counts
