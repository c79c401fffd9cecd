"""The training schedule of ``mta.fit``: epochs per stage, optimiser, learning rates."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .checks import check_choice, check_number


@dataclass(frozen=True)
class Schedule:
    """Training schedule.  Every method trains ``stage2_epochs`` epochs with its final trainable
    set; tier-1 ``learned`` (and ``sensitivity`` with criterion ``delta``) first spends
    ``stage1_epochs`` on the dense search stage; ``snip``/``snip_per_cell`` use ``sensitivity_batches``
    batches, taken after ``probe_head_epochs`` epochs that fit only the head (and task BN) on the frozen
    backbone (0: through the fresh, random head, whose gradients are random projections of the error).
    Optimiser: Adam (default) or SGD with momentum 0.9, one learning rate per parameter kind.
    The defaults were picked on the example's animals/letters tasks (1500 images, batch 64,
    144 steps): higher rates for the few adapted weights than usual fine-tuning, and small rates
    for the discrete masks and shift scales, whose straight-through updates otherwise flip levels
    too often (piggyback/xbm at 1e-3 and xma at 3e-2 fell below the classifier baseline; xma2 at
    lr_scale 3e-3 never left the level 1).  The re-programmed PEs of pe/xma2 get a rate of their own,
    ``lr_reprogrammed``, chosen on held-out training images (``--validate``; fine-tuning stays best at
    ``lr_weight``): the per-cell selection re-programs small PEs of the first layers, which have to move
    further than when every weight moves (README, "The re-programmed PEs' learning rate").
    ``hw_epochs`` more epochs follow stage 2 with the same trainable set through the layers' own config
    (see training.py); 0 trains weight-only."""

    stage1_epochs: int = 1
    stage2_epochs: int = 6
    hw_epochs: int = 1        # ADC-aware final stage: epochs through the layers' own (quantised) config
    hw_lr_factor: float = 0.3  # its learning rates, relative to stage 2 (a short fine-tune from there)
    sensitivity_batches: int = 4
    probe_head_epochs: int = 0  # head-only epochs before the snip probe (see above)
    calib_batches: int = 4
    bn_batches: int = 16      # task BN statistics re-estimated with the final masks (0: keep running stats)
    optimizer: str = "adam"
    lr_weight: float = 3e-3   # task weights of every PE (finetune; the dense stage 1 of learned/delta selection)
    lr_reprogrammed: float = 1e-2  # task weights of the tier-1 re-programmed PEs (pe, xma2; see below)
    lr_head: float = 1e-2     # classifier head and BN
    lr_mask: float = 1e-4     # binary scores (piggyback, xbm, PE scores; init 1e-2, threshold 5e-3): Piggyback's lr
    lr_scale: float = 1e-2    # real parameters of the shift column scales (xma, xma2), init 1

    def __post_init__(self) -> None:
        check_choice("Schedule", "optimizer", self.optimizer, ("adam", "sgd"))
        for name in ("stage1_epochs", "stage2_epochs", "hw_epochs", "sensitivity_batches", "probe_head_epochs",
                     "calib_batches", "bn_batches"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"Schedule.{name}: expected an int >= 0, got {type(v).__name__} ({v!r})")
            if v < 0:
                raise ValueError(f"Schedule.{name}: expected an int >= 0, got {v}")
        check_number("Schedule", "hw_lr_factor", self.hw_lr_factor, "a finite value > 0",
                     lambda v: 0.0 < v < math.inf)
        for name in ("lr_weight", "lr_reprogrammed", "lr_head", "lr_mask", "lr_scale"):
            check_number("Schedule", name, getattr(self, name), "a finite learning rate >= 0",
                         lambda v: 0.0 <= v < math.inf)
