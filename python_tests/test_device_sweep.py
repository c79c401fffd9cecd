"""The device sweep (xma2_ops.mta.experiment.device_sweep; examples/device_sweep.py, python -m
xma2_ops.mta device-sweep) --quick: the CSV's rows, the ideal points against the model without a
device, and the noisy points against the ideal accuracy."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "device_sweep.py"
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


def test_quick_sweep(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--no-progress", "--threads", "1"],
                       env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "wall time" in r.stdout
    all_rows = list(csv.DictReader(open(out / "device_sweep.csv")))
    # --quick: sigma_rel {0, 0.2}, saf {0, 0.05} and the typical preset, for the backbone and the noise-aware
    # fine-tune, each under per-polarity and differential sensing (SPEC 8), 3 chips
    got = sorted((row["model"], row["sensing"], row["sweep"], row["value"]) for row in all_rows)
    assert got == sorted((m, s, k, str(v)) for m in ("backbone", "noise-aware") for s in ("per_polarity", "differential")
                         for k, vs in (("sigma_rel", (0.0, 0.2)), ("saf", (0.0, 0.05)), ("preset", ("typical",)))
                         for v in vs)
    for row in all_rows:
        accs = [float(a) for a in row["accs"].split()]
        assert len(accs) == int(row["chips"]) == 3 and int(row["n_eval"]) == 100
        assert abs(float(row["acc_mean"]) - sum(accs) / 3) < 1e-3
    for row in all_rows:  # a zero sigma / rate is the ideal device on every chip, under either sensing
        if row["sweep"] != "preset" and float(row["value"]) == 0.0:
            assert [float(a) for a in row["accs"].split()] == [float(row["ideal_acc"])] * 3, row
    rows = [row for row in all_rows if row["sensing"] == "per_polarity" and row["sweep"] != "preset"]
    by = {(row["model"], row["sweep"], float(row["value"])): row for row in rows}

    # the model without a device, evaluated here on the same images with the experiment's own code
    from xma2_ops import mta
    from xma2_ops.mta.experiment import backbone, data, evaluate
    from xma2_ops.mta.experiment import device_sweep as ds
    args = ds.parse_args(["--quick", "--out", str(out)])
    ex = ds.example_args(args)
    src = data.split(*data.load_mnist(), ex.n_source, 100, ex.seed)
    model = backbone.backbone(ex, src, out, False)  # the cached backbone
    assert all(m.config.device is None for _, m in mta.xbar_layers(model))
    # each sensing's ADC clips were calibrated on the source data: the per-polarity ones here
    clips = json.loads((out / "device_sweep.json").read_text())["meta"]["adc_clips"]["backbone"]["per_polarity"]
    assert set(clips) == {name for name, _ in mta.xbar_layers(model)} and all(c >= 1 for c in clips.values())
    ds.set_device(model, None, "per_polarity", clips)
    ideal = evaluate.evaluate(model, (src[1][0][:100], src[1][1][:100]), 100, False, "")[0]
    assert ideal > 30.0  # a trained backbone (10 classes)
    assert float(by[("backbone", "sigma_rel", 0.0)]["ideal_acc"]) == ideal

    for m in ("backbone", "noise-aware"):
        ideal_m = float(by[(m, "sigma_rel", 0.0)]["ideal_acc"])
        for kind in ("sigma_rel", "saf"):  # a zero sigma / rate is the ideal device on every chip
            zero = by[(m, kind, 0.0)]
            assert [float(a) for a in zero["accs"].split()] == [ideal_m] * 3, zero
        # the largest sigma: not above the ideal accuracy by more than chip noise (and one image)
        big = by[(m, "sigma_rel", 0.2)]
        assert float(big["acc_mean"]) <= ideal_m + 2 * float(big["acc_std"]) + 1.0, big
        # 10 % of the cells stuck (5 % low, 5 % high) wrecks the network: the faults are applied
        assert float(by[(m, "saf", 0.05)]["acc_mean"]) < ideal_m - 15.0
    # different chips are different chips
    assert len({a for row in rows if float(row["value"]) > 0 for a in row["accs"].split()}) > 1
    meta = json.loads((out / "device_sweep.json").read_text())["meta"]
    assert meta["wall_s"] > 0 and meta["args"]["chips"] == 3
    assert (out / "device_sweep.png").stat().st_size > 1000


def test_train_mta_device_option(tmp_path):
    """The experiment's --device (here through python -m xma2_ops.mta) with --deploy naive chip-aware:
    every row carries each mode's accuracy next to the ideal-cell accuracy of the same images, and
    device.csv one row per run, mode and chip, then the chip table; chen2017 (10.8 % stuck cells)
    costs accuracy when naive; the ideal preset costs none, on every chip; the layers' own config
    comes back without the device."""
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "xma2_ops.mta", "--quick", "--tasks", "sk_digits",
                        "--methods", "classifier", "xma2", "--weight-only-also", "--also", "--device", "chen2017",
                        "--device-chips", "2", "--deploy", "naive", "chip-aware", "--out", str(out), "--no-progress",
                        "--threads", "1"], env=ENV, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [row for row in csv.DictReader(open(out / "results.csv")) if row["seed"] != "mean"]
    assert [row["method"] for row in rows] == ["classifier", "xma2@10%cells/snip_per_cell"]
    for row in rows:
        assert int(row["device_n_test"]) == 50
        assert float(row["device_acc_naive"]) < float(row["ideal_acc_subset"]) - 10.0, row
        assert row["device_acc_chip-aware"] != ""
    chips = list(csv.DictReader(open(out / "device.csv")))
    per_chip = [c for c in chips if c["chip"] != "mean"]
    for c in per_chip:  # the chip-aware re-selection's swaps are recorded per chip (xma2 selects PEs)
        assert (c["pes_swapped"] != "") == (c["mode"] == "chip-aware"), c
        if c["mode"] == "chip-aware":
            assert int(c["pes_swapped"]) >= 0
    assert sorted((c["method"], c["mode"], c["chip"]) for c in per_chip) == sorted(
        (m, mode, str(c)) for m in ("classifier", "xma2@10%cells/snip_per_cell") for mode in ("naive", "chip-aware") for c in (0, 1))
    for row in rows:  # the row's mean is the mean of its chips
        for mode in ("naive", "chip-aware"):
            accs = [float(c["acc"]) for c in per_chip if c["method"] == row["method"] and c["mode"] == mode]
            assert abs(sum(accs) / 2 - float(row[f"device_acc_{mode}"])) < 0.01
    meta = json.loads((out / "results.json").read_text())["meta"]
    for row in rows:  # the evaluation's cost per mode (chip-seconds) and wall time are recorded
        assert 0 < float(row["device_chip_s_naive"]) and 0 < float(row["device_chip_s_chip-aware"])
        assert 0 < float(row["device_wall_s"]) < float(meta["wall_s"])
    assert abs(meta["device_wall_s"] - sum(float(row["device_wall_s"]) for row in rows)) < 0.2
    assert f"chips' evaluation ({min(2, os.cpu_count() or 1)} workers)" in r.stdout  # (the default --device-workers)
    table = [c for c in chips if c["chip"] == "mean" and c["task"] == "AVERAGE"]
    assert len(table) == 4 and all(float(c["drop_ci95_lo"]) <= float(c["drop"]) <= float(c["drop_ci95_hi"])
                                   for c in table)
    assert "on chen2017 chips" in r.stdout and "chen2017: chip-aware" in r.stdout
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["switch_bit_identical"] is True and res["meta"]["device"]["saf_high"] == 0.0904
    assert len(res["device_rows"]) == 8

    from xma2_ops import mta
    from xma2_ops.mta.experiment import backbone, cli, data, evaluate
    args = cli.parse_args(["--quick", "--out", str(out), "--device", "ideal", "--device-chips", "3"])
    src = data.split(*data.load_mnist(), args.n_source, 100, args.seed)
    model = backbone.backbone(args, src, out, False)
    res = evaluate.evaluate_device(model, src[1], args, False, "")
    assert res.accs["naive"] == [res.ideal] * 3 and res.n_test == 50
    assert res.ideal == evaluate.evaluate(model, (src[1][0][:50], src[1][1][:50]), 100, False, "")[0]
    assert all(m.config.device is None for _, m in mta.xbar_layers(model))
    # the caller's ideal-cell accuracy is reused only when it covers the same images (all of them)
    assert evaluate.evaluate_device(model, src[1], args, False, "", ideal_all=-1.0).ideal == res.ideal
    args.device_n_test, args.device_chips = 0, 1
    assert evaluate.evaluate_device(model, src[1], args, False, "", ideal_all=-1.0).ideal == -1.0

    # chips evaluated by forked workers give what one process gives, and leave the caller's RNG alone
    mta.prepare(model, mta.MethodSpec("xma2", budget=0.1), 10)
    args = cli.parse_args(["--quick", "--out", str(out), "--device", "typical", "--device-chips", "2",
                           "--deploy", "naive", "calibrated", "chip-aware"])
    by_workers = {}
    for workers in (1, 2):
        args.device_workers = workers
        rng = torch.get_rng_state()
        by_workers[workers] = evaluate.evaluate_device(model, src[1], args, False, "", src[0])
        assert torch.equal(torch.get_rng_state(), rng)
    assert by_workers[1] == by_workers[2]
    assert by_workers[1].pes_swapped[0] is not None and len(by_workers[1].accs["chip-aware"]) == 2
    # 3 chips on 2 workers: chip 2's naive evaluation runs in two parts of its 5 test batches
    args = cli.parse_args(["--quick", "--out", str(out), "--device", "typical", "--device-chips", "3",
                           "--eval-batch", "10"])
    for workers in (1, 2):
        args.device_workers = workers
        by_workers[workers] = evaluate.evaluate_device(model, src[1], args, False, "")
    assert by_workers[1] == by_workers[2] and len(set(by_workers[1].accs["naive"])) > 1


def test_run_forked_keeps_job_order_and_threads():
    from xma2_ops.mta.experiment.runtime import run_forked
    weights = torch.nn.Linear(3, 1)  # read by the job, inherited at the fork (a closure pickles nowhere)
    pid = os.getpid()

    def job(i):
        return i, weights.weight.shape[1] * i, torch.get_num_threads(), os.getpid() != pid

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        in_process = list(run_forked(job, range(7), 1))
        forked = list(run_forked(job, range(7), 2))
        assert torch.get_num_threads() == 2  # the caller's thread count comes back
    finally:
        torch.set_num_threads(threads)
    assert [r[:3] for r in in_process] == [r[:3] for r in forked] == [(i, 3 * i, 1) for i in range(7)]
    assert not any(r[3] for r in in_process) and all(r[3] for r in forked)
