"""Multi-task adaption on crossbars: one frozen backbone, one small adapter per task.

    from xma2_ops import mta
    mta.prepare(model, mta.MethodSpec("xma2", budget=0.1), num_classes=10, head="fc")
    mta.fit(model, train_loader, mta.Schedule())      # trains, then calibrates input ranges
    mta.save_task(model, "task.safetensors")
    mta.load_task(model, "task.safetensors")           # switch tasks on the same backbone
    mta.deploy(model, unlabelled_loader)               # on-chip calibration: ADC, BN, column gains
    mta.adapt_on_chip(model, train_loader)             # chip-aware: train with the chip's known faults
    print(mta.report(model).table())                   # PEs, cells, energy, mask memory

Modules: methods.py (MethodSpec, one class per method), schedule.py, adapter.py (LayerAdapter),
task.py (prepare, task_info), training.py (fit), calibration.py (calibrate_inputs, refresh_bn_stats),
masks.py (STE, shift levels, budgets, PE layout), taskfile.py (the task file format), cost.py (cost
model and its constants), deploy.py (on-chip calibration), chip_aware.py (fault-aware adaption to one chip), layers.py (model helpers); experiment/
is the example experiment as a library, with its CLI ``python -m xma2_ops.mta`` (docs/MTA.md).
"""
from .adapter import LayerAdapter
from .calibration import calibrate_inputs, refresh_bn_stats
from .chip_aware import ChipAdaption, adapt_on_chip, fault_weight_error
from .cost import (CostReport, EnergyModel, LayerCost, backbone_state, deployed_pulses, deployed_state, endurance,
                   report, task_state)
from .deploy import Deployment, LayerDeployment, deploy, ideal_bn_stats
from .layers import bn_layers, use_config, weight_only, xbar_layers
from .masks import ShiftLevels, binarize, budget_count, topk_masks, topk_masks_by_cost
from .methods import METHOD_CLASSES, METHODS, TIER1, Method, MethodSpec
from .schedule import Schedule
from .task import TaskInfo, layer_adapters, prepare, set_train, task_info
from .taskfile import backbone_hash, load_task, read_task, save_task
from .training import fit, select_pes

# former names, kept working: ``adapters`` (the function; the file format module is taskfile.py),
# ``calibrate`` (input ranges: calibrate_inputs) and ``recalibrate_bn`` (refresh_bn_stats)
adapters = layer_adapters
calibrate = calibrate_inputs
recalibrate_bn = refresh_bn_stats

__all__ = ["METHODS", "METHOD_CLASSES", "TIER1", "ChipAdaption", "CostReport", "EnergyModel", "LayerAdapter", "LayerCost", "Method",
           "MethodSpec", "Schedule", "ShiftLevels", "TaskInfo", "adapt_on_chip", "adapters", "backbone_hash", "backbone_state",
           "binarize", "bn_layers", "budget_count", "calibrate_inputs", "deploy", "Deployment",
           "LayerDeployment", "deployed_pulses", "deployed_state", "endurance", "fault_weight_error", "fit", "ideal_bn_stats", "layer_adapters", "load_task",
           "prepare", "read_task", "refresh_bn_stats", "report", "save_task", "select_pes",
           "set_train", "task_info", "task_state", "topk_masks", "topk_masks_by_cost", "use_config", "weight_only",
           "xbar_layers"]
