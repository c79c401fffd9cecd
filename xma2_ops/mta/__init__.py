"""Multi-task adaption on crossbars: one frozen backbone, one small adapter per task.

    from xma2_ops import mta
    mta.prepare(model, mta.MethodSpec("xma2", budget=0.1), num_classes=10, head="fc")
    mta.fit(model, train_loader, mta.Schedule())      # trains, then calibrates input ranges
    mta.save_task(model, "task.safetensors")
    mta.load_task(model, "task.safetensors")           # switch tasks on the same backbone
    mta.deploy(model, unlabelled_loader)               # on-chip calibration: ADC, BN, column gains
    print(mta.report(model).table())                   # PEs, cells, energy, mask memory

See methods.py (methods, selection, schedule), masks.py (STE, shift levels, budgets),
adapters.py (file format), deploy.py (on-chip calibration) and cost.py (cost model and its constants).
"""
from .adapters import backbone_hash, load_task, read_task, save_task
from .cost import (CostReport, EnergyModel, LayerCost, backbone_state, deployed_pulses, deployed_state, endurance,
                   report, task_state)
from .deploy import Deployment, LayerDeployment, deploy
from .masks import ShiftLevels, binarize, budget_count, topk_masks, topk_masks_by_cost
from .methods import (METHODS, TIER1, LayerAdapter, MethodSpec, Schedule, TaskInfo, adapters, calibrate, fit,
                      prepare, recalibrate_bn, select_pes, set_train, task_info, use_config, weight_only,
                      xbar_layers)

__all__ = ["METHODS", "TIER1", "CostReport", "EnergyModel", "LayerAdapter", "LayerCost", "MethodSpec", "Schedule",
           "ShiftLevels", "TaskInfo", "adapters", "backbone_hash", "backbone_state", "binarize", "budget_count",
           "calibrate", "deploy", "Deployment", "LayerDeployment", "deployed_pulses", "deployed_state", "endurance", "fit", "load_task", "prepare", "read_task",
           "recalibrate_bn", "report", "save_task", "select_pes", "set_train", "task_info", "task_state", "topk_masks", "topk_masks_by_cost",
           "use_config", "weight_only", "xbar_layers"]
