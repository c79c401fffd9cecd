"""The runs of an experiment: which method specs, with or without the ADC-aware stage."""
from __future__ import annotations

import dataclasses
from typing import List, NamedTuple

from .. import METHODS, TIER1, MethodSpec, Schedule
from ..masks import ShiftLevels
from ..methods import CRITERIA

class Run(NamedTuple):
    """One adaption run: a method spec, trained with the ADC-aware final stage or weight-only."""

    spec: MethodSpec
    hw: bool = True

    @property
    def label(self) -> str:
        return self.spec.label + ("" if self.hw else "/weight-only")

def _parse_label(label: str, flag: str, **kw) -> MethodSpec:
    """"xma2@10%" -> MethodSpec("xma2", budget=0.1, **kw); "xma2@10%cells": a budget in cells."""
    m, _, b = label.partition("@")
    if m not in METHODS:
        raise SystemExit(f"{flag}: unknown method in {label!r}, expected one of {METHODS}")
    unit = "cells" if b.endswith("%cells") else "pes"
    try:
        budget = float(b.removesuffix("cells").rstrip("%")) / 100 if b else 0.1
    except ValueError:
        raise SystemExit(f"{flag}: expected METHOD, METHOD@PCT% or METHOD@PCT%cells, got {label!r}") from None
    return MethodSpec(m, budget=budget, budget_unit=unit, **kw)

def method_list(args) -> List[Run]:
    specs = []
    for m in args.methods:
        if m in TIER1:
            specs += [MethodSpec(m, budget=b, budget_unit=args.budget_unit, **selection_kw(args))
                      for b in args.budgets]
        else:
            specs.append(MethodSpec(m))
    for label in args.also:
        head, _, how = label.partition("/")
        if how not in ("learned",) + CRITERIA:
            raise SystemExit(f"--also: expected METHOD@BUDGET/{{{','.join(('learned',) + CRITERIA)}}}, got {label!r}")
        extra = (_parse_label(head, "--also", selection="learned") if how == "learned"
                 else _parse_label(head, "--also", selection="sensitivity", criterion=how))
        if extra not in specs:
            specs.append(extra)
    # the same methods with the backbone's BN (task_bn=False)
    specs += [_parse_label(label, "--shared-bn", task_bn=False, **selection_kw(args)) for label in args.shared_bn]
    runs = [Run(s) for s in specs]  # with --hw-epochs 0 the ADC-aware stage has no epochs
    if args.hw_epochs > 0:  # the ablation: the same methods without the ADC-aware stage
        runs += [Run(_parse_label(label, "--weight-only-also", **selection_kw(args)), hw=False)
                 for label in args.weight_only_also]
    return [Run(dataclasses.replace(r.spec, levels=shift_levels(args)), r.hw) for r in runs]

def training_schedule(args) -> Schedule:
    """The Schedule of the training flags (epochs, optimiser, learning rates, the sensitivity probe)."""
    return Schedule(stage1_epochs=args.stage1_epochs, stage2_epochs=args.stage2_epochs,
                    hw_epochs=args.hw_epochs, optimizer=args.optimizer, lr_weight=args.lr_weight,
                    lr_reprogrammed=args.lr_reprogrammed, lr_head=args.lr_head, lr_mask=args.lr_mask,
                    lr_scale=args.lr_scale,
                    sensitivity_batches=args.sensitivity_batches, probe_head_epochs=args.probe_head_epochs)


def shift_levels(args) -> ShiftLevels:
    """The tier-2 shift levels of every run (--shift-levels; runs from before that flag: the default)."""
    k = getattr(args, "shift_levels", None)
    return ShiftLevels(*k) if k else ShiftLevels()


def selection_kw(args) -> dict:
    """The tier-1 selection of the budget sweep (--selection, --criterion)."""
    return {"selection": args.selection, "criterion": args.criterion}


def ref_label(args) -> str:
    """The run the targets are stated for: xma2 at 10 % of the sweep's budget unit and selection."""
    return MethodSpec("xma2", budget=0.1, budget_unit=args.budget_unit, levels=shift_levels(args),
                      **selection_kw(args)).label
