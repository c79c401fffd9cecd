"""Accuracy of the mta experiment's backbone on imperfect ReRAM cells (docs/SPEC.md section 7,
docs/DEVICE.md): programming variation, stuck-at faults and device presets, under both periphery
sensings, for the backbone and a noise-aware fine-tune, on many simulated chips.

The sweep lives in the package (xma2_ops/mta/experiment/device_sweep.py); this script is its
command line, the same as ``python -m xma2_ops.mta device-sweep``:

    python examples/device_sweep.py               # default run (backbone cached under --out)
    python examples/device_sweep.py --quick       # CI: tiny backbone, 2 points per sweep, 3 chips
    python examples/device_sweep.py --help        # every flag

A shared machine: OMP_WAIT_POLICY=PASSIVE is set below before torch is imported, unless you set
OMP_WAIT_POLICY or GOMP_SPINCOUNT yourself (docs/MTA.md).
"""
import os
import sys
from pathlib import Path

if __name__ == "__main__" and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(os.environ):
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # before torch is imported (xma2_ops imports it)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout
from xma2_ops.mta.experiment.device_sweep import main  # noqa: E402

if __name__ == "__main__":
    main(prog="examples/device_sweep.py")
