"""Multi-task adaption on simulated ReRAM crossbars: one backbone, one adapter per task.

The experiment lives in the package (xma2_ops/mta/experiment/, docs/MTA.md); this script is its
command line, the same as ``python -m xma2_ops.mta`` and the ``xma2-mta`` console script:

    python examples/train_mta.py                  # full default run, one seed
    python examples/train_mta.py --seeds 5 --methods finetune xma2 --budgets 0.1   # 5 seeds (README)
    python examples/train_mta.py --quick          # smoke run (CI): 2 tasks, tiny subsets, 1 epoch
    python examples/train_mta.py --data-root DIR  # one ImageFolder-style folder per task
    python examples/train_mta.py --arch resnet18 --backbone-weights resnet18.pth --data-root DIR
    python examples/train_mta.py --device typical # also evaluate every adapter on non-ideal cells
    torchrun --nproc_per_node=2 examples/train_mta.py --quick   # DistributedDataParallel (gloo)
    python examples/train_mta.py --help           # every flag

A shared machine: OMP_WAIT_POLICY=PASSIVE is set below before torch is imported, unless you set
OMP_WAIT_POLICY or GOMP_SPINCOUNT yourself (libgomp reads it once, when torch loads; docs/MTA.md).
"""
import os
import sys
from pathlib import Path

if __name__ == "__main__" and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(os.environ):
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # before torch is imported (xma2_ops imports it)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout
from xma2_ops.mta.experiment.cli import main  # noqa: E402

if __name__ == "__main__":
    main(prog="examples/train_mta.py")
