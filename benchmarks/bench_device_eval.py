"""The example's device evaluation (``evaluate_device``: one adapter on several chips): seconds per
--deploy mode with 1 worker and with --workers forked workers, measured in one run.

    python benchmarks/bench_device_eval.py                      # typical, 5 chips, 1000 letters test images
    python benchmarks/bench_device_eval.py --modes naive calibrated --chips 5 --workers 2
    python benchmarks/bench_device_eval.py --quick              # tiny backbone, 2 chips, 50 images (smoke test)
    python benchmarks/bench_device_eval.py --sensing differential   # chips under differential sensing

The adapter is xma2@10 % freshly prepared on the example's backbone (cached under --out, trained
there on the first call) with the example's calibrated ADC clips; training it would not change the
cost of evaluating it.  Prints, per worker count, the wall time of the whole evaluation and the
speed-up over one worker; the results must be the same (checked).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import timing  # noqa: E402
import torch  # noqa: E402

from xma2_ops import mta  # noqa: E402
from xma2_ops.mta.experiment import cli  # noqa: E402
from xma2_ops.mta.experiment.backbone import backbone, backbone_adc_clips  # noqa: E402
from xma2_ops.mta.experiment.data import builtin_tasks, source_task  # noqa: E402
from xma2_ops.mta.experiment.evaluate import DEPLOY_MODES, evaluate_device  # noqa: E402
from xma2_ops.mta.experiment.quick import adc_data  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="xma2_out", help="the example's --out (its cached backbone is reused)")
    p.add_argument("--device", default="typical")
    p.add_argument("--modes", nargs="+", default=["naive"], choices=DEPLOY_MODES)
    p.add_argument("--chips", type=int, default=5)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--n-test", type=int, default=0, help="test images (0: all 1000)")
    p.add_argument("--sensing", default="per_polarity", choices=["per_polarity", "differential"],
                   help="the example's --sensing (its backbone is trained and cached per sensing)")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    argv = ["--out", a.out, "--device", a.device, "--device-chips", str(a.chips), "--device-n-test", str(a.n_test),
            "--deploy", *a.modes, "--tasks", "sk_digits" if a.quick else "letters", "--sensing", a.sensing] + \
        (["--quick"] if a.quick else [])
    args = cli.parse_args(argv)
    torch.manual_seed(args.seed)
    src = source_task(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    model = backbone(args, src, Path(args.out), False)
    backbone_adc_clips(model, adc_data(args, model, src[0]), args, lambda *_: None)
    train, test = next(iter(builtin_tasks(args).values()))
    mta.prepare(model, mta.MethodSpec("xma2", budget=0.1, selection="sensitivity"), int(test[1].max()) + 1)
    results, walls = {}, {}
    for workers in sorted({1, a.workers}):
        args.device_workers = workers
        t0 = time.perf_counter()
        results[workers] = evaluate_device(model, test, args, False, "", train)
        walls[workers] = time.perf_counter() - t0
    same = all(r == results[1] for r in results.values())
    print(f"{timing.cpu_name()}, {timing.load()}, {args.device} ({args.sensing}), {args.device_chips} chips x "
          f"{results[1].n_test} images, modes {' '.join(args.deploy)}; results identical across workers: {same}")
    for workers, res in results.items():
        per_mode = ", ".join(f"{m} {sum(s):.1f} chip-s" for m, s in res.seconds.items())
        print(f"  workers {workers}: wall {walls[workers]:7.1f} s  ({per_mode})  speed-up over 1 worker "
              f"{walls[1] / walls[workers]:.2f}x")
    if not same:
        raise SystemExit("the chips' results depend on the worker count")


if __name__ == "__main__":
    main()
