"""The mta experiment (xma2_ops.mta.experiment; examples/train_mta.py and python -m xma2_ops.mta):
the --quick CI run, DistributedDataParallel on 2 CPU ranks, the ImageFolder path, and the resnet50 path."""
from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_mta.py"
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


def _example():
    """The experiment's library (what the example script runs)."""
    from types import SimpleNamespace

    from xma2_ops.mta.experiment import backbone, cli, stats, targets
    return SimpleNamespace(parse_args=cli.parse_args, main=cli.main, build_model=backbone.build_model,
                           summarize=stats.summarize, paired_differences=stats.paired_differences,
                           check_targets=targets.check_targets)


def test_quick_run(tmp_path):
    """python -m xma2_ops.mta --quick (what examples/train_mta.py --quick runs): every kind of run, on
    the 2 built-in tasks --quick keeps (sk_digits, letters; 4 before the quick run was made quicker)."""
    out = tmp_path / "out"
    env = {k: v for k, v in ENV.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    r = subprocess.run([sys.executable, "-m", "xma2_ops.mta", "--quick", "--out", str(out), "--no-progress",
                        "--threads", "1"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "wall time" in r.stdout and "backbone MNIST accuracy with the percentile clips" in r.stdout
    assert "the full run (this command without --quick): 44 runs (11 methods x 4 tasks x 1 seed(s))" in r.stdout
    rows = list(csv.DictReader(open(out / "results.csv")))
    tasks = {"sk_digits", "letters"}
    assert {row["task"] for row in rows} == tasks | {"AVERAGE"}
    methods = {row["method"] for row in rows}
    expected = {"finetune", "classifier", "piggyback", "xbm", "xma", "pe@10%cells/snip_per_cell",
                "xma2@10%cells/snip_per_cell", "xma2@10%/delta", "xma2@10%/snip",
                "xma2@10%cells/snip_per_cell/weight-only"}
    assert methods == expected
    by_method = {}
    for row in rows:
        if row["seed"] != "mean":
            by_method.setdefault(row["method"], []).append(float(row["acc"]))
    for row in rows:  # one seed: the average row is the mean over the tasks (the table's own arithmetic)
        if row["task"] == "AVERAGE":
            assert abs(float(row["acc"]) - sum(by_method[row["method"]]) / len(tasks)) < 0.01, row
    cells = {row["task"]: float(row["cells_written"]) for row in rows if row["method"] == "finetune"}
    for row in rows:
        if row["method"] == "finetune":
            assert float(row["pe_pct"]) == 100.0
        if "cells/" in row["method"]:  # a budget of 10 % of the cells (finetune writes every cell)
            assert 0 < float(row["cells_written"]) <= 0.10 * cells[row["task"]], row
        elif row["method"].startswith(("pe@10%", "xma2@10%")):
            assert 0 < float(row["pe_pct"]) <= 10.0
        if row["method"] in ("classifier", "xbm", "xma"):
            assert float(row["pe_pct"]) == 0.0 and int(float(row["cells_written"])) == 0
        assert float(row["infer_nJ"]) > 0 and float(row["adc_per_img"]) > 0
    res = json.loads((out / "results.json").read_text())
    meta = res["meta"]
    assert meta["switch_bit_identical"] is True and meta["omp_wait_policy"] == "PASSIVE"  # set by the re-exec
    assert meta["config"]["rows"] == meta["config"]["cols"] == 128
    pmax = 128 * 3
    assert meta["adc_clips"] and all(1 <= c <= pmax for c in meta["adc_clips"].values())
    assert set(meta["backbone_acc"]) == {"pmax", "percentile"}
    assert {t["target"].split(" ", 1)[1] for t in res["targets"]} >= {
        "average within 1 point of finetune", ">= 10x less re-programming energy than finetune"}
    for png in ("accuracy_vs_pes.png", "accuracy_vs_energy.png", "pe_masks.png"):
        assert (out / png).stat().st_size > 1000
    assert len(list((out / "adapters").glob("*.safetensors"))) == len(tasks) * len(expected)
    backbone = list(out.glob("backbone_*.safetensors"))
    assert len(backbone) == 1  # cached: a rerun reuses it
    mod = _example()
    args = mod.parse_args(["--quick", "--out", str(out)])
    assert args.n_test <= 100 and args.stage2_epochs == 1 and args.rows == args.cols == 128
    assert mod.parse_args(["--xbar", "32"]).rows == 32 and mod.parse_args(["--xbar", "64", "--cols", "32"]).cols == 32


def test_statistics_over_seeds_against_numpy_and_scipy():
    """summarize / paired_differences / check_targets on synthetic rows: mean +- sample std over
    seeds of the per-seed task average, and the paired t interval computed here with scipy."""
    from scipy import stats
    mod = _example()
    rng = np.random.default_rng(7)
    methods = ["finetune", "xma2@10%/snip", "pe@10%/snip", "piggyback"]
    tasks = ["a", "b", "c"]
    acc = {(m, s, t): float(rng.uniform(50, 99)) for m in methods for s in (3, 4, 5, 6) for t in tasks}
    rows = [{"seed": s, "task": t, "method": m, "acc": acc[(m, s, t)], "pe_pct": 10.0, "energy_uJ": 2.0 if m !=
             "finetune" else 50.0} for (m, s, t) in acc]
    summary = mod.summarize(rows)
    by = {(r["task"], r["method"]): r for r in summary}
    for m in methods:
        per_seed = [np.mean([acc[(m, s, t)] for t in tasks]) for s in (3, 4, 5, 6)]
        assert by[("AVERAGE", m)]["acc"] == pytest.approx(np.mean(per_seed), abs=0.006)
        assert by[("AVERAGE", m)]["acc_std"] == pytest.approx(np.std(per_seed, ddof=1), abs=0.006)
        for t in tasks:
            v = [acc[(m, s, t)] for s in (3, 4, 5, 6)]
            assert by[(t, m)]["acc"] == pytest.approx(np.mean(v), abs=0.006)
            assert by[(t, m)]["acc_std"] == pytest.approx(np.std(v, ddof=1), abs=0.006)
    paired = mod.paired_differences(rows, "xma2@10%/snip")
    d = {(p["method"], p["task"]): p for p in paired}
    for m in ("finetune", "pe@10%/snip", "piggyback"):
        diffs = np.array([np.mean([acc[("xma2@10%/snip", s, t)] - acc[(m, s, t)] for t in tasks]) for s in (3, 4, 5, 6)])
        lo, hi = stats.t.interval(0.95, len(diffs) - 1, loc=diffs.mean(), scale=stats.sem(diffs))
        assert d[(m, "AVERAGE")]["diff"] == pytest.approx(diffs.mean(), abs=0.006)
        assert (d[(m, "AVERAGE")]["ci95_lo"], d[(m, "AVERAGE")]["ci95_hi"]) == pytest.approx((lo, hi), abs=0.006)
        db = np.array([acc[("xma2@10%/snip", s, "b")] - acc[(m, s, "b")] for s in (3, 4, 5, 6)])
        assert d[(m, "b")]["diff"] == pytest.approx(db.mean(), abs=0.006)
    targets = {t["target"]: t for t in mod.check_targets(summary, paired, "xma2@10%/snip")}
    ft, x = by[("AVERAGE", "finetune")]["acc"], by[("AVERAGE", "xma2@10%/snip")]["acc"]
    assert targets["xma2@10%/snip average within 1 point of finetune"]["met"] == (x >= ft - 1.0)
    assert targets["xma2@10%/snip >= 10x less re-programming energy than finetune"]["met"] is True
    pe = d[("pe@10%/snip", "AVERAGE")]
    assert targets["xma2@10%/snip above pe@10%/snip by more than the paired 95 % interval"]["met"] == (
        pe["ci95_lo"] > 0)
    worse = [t for t in tasks if by[(t, "xma2@10%/snip")]["acc"] <= by[(t, "piggyback")]["acc"]]
    assert targets["xma2@10%/snip above piggyback on every task"]["met"] == (not worse)


def test_two_seeds_vary_the_run_but_not_the_backbone(tmp_path):
    out = tmp_path / "seeds"
    rows = _example().main(["--quick", "--tasks", "sk_digits", "--methods", "xma2", "--also", "--weight-only-also",
                            "--seeds", "2", "--out", str(out), "--no-progress", "--threads", "1", "--hw-epochs", "0"])
    assert [(r["seed"], r["method"]) for r in rows] == [(0, "xma2@10%cells/snip_per_cell"), (1, "xma2@10%cells/snip_per_cell")]
    a0, a1 = (sorted((out / "adapters" / f"seed{s}").glob("*.safetensors")) for s in (0, 1))
    assert len(a0) == len(a1) == 1 and a0[0].read_bytes() != a1[0].read_bytes()  # other head init, data order
    assert len(list(out.glob("backbone_*.safetensors"))) == 1
    res = json.loads((out / "results.json").read_text())
    avg = [r for r in res["average"] if r["task"] == "AVERAGE"]
    assert len(avg) == 1 and avg[0]["n_seeds"] == 2
    assert avg[0]["acc"] == pytest.approx((rows[0]["acc"] + rows[1]["acc"]) / 2, abs=0.006)
    assert {r["eval"] for r in rows} == {"test"}


def test_validate_evaluates_on_held_out_training_images(tmp_path, capsys):
    argv = ["--quick", "--tasks", "sk_digits", "--methods", "classifier", "--also", "--weight-only-also",
            "--backbone-weights", str(_small_backbone(tmp_path)), "--no-progress", "--threads", "1"]
    mod = _example()
    test = mod.main(argv + ["--out", str(tmp_path / "test")])
    val = mod.main(argv + ["--out", str(tmp_path / "val"), "--validate", "60"])
    assert [r["eval"] for r in test] == ["test"] and [r["eval"] for r in val] == ["validation"]
    assert "every accuracy below is on 60 held-out training images" in capsys.readouterr().out
    # 60 images: every accuracy is a multiple of 1/60 (the test set has 100)
    assert abs(val[0]["acc"] * 60 / 100 - round(val[0]["acc"] * 60 / 100)) < 0.02


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_cpu_ranks_agree(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(SCRIPT), "--quick", "--tasks", "sk_digits",
           "--methods", "classifier", "xma2", "--also", "--weight-only-also", "--out", str(out), "--no-progress",
           "--threads", "1", "--device", "ideal", "--device-chips", "1"]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ranks = [json.loads((out / f"ddp_rank{i}.json").read_text()) for i in range(2)]
    assert ranks[0]["hashes"] == ranks[1]["hashes"] and len(ranks[0]["hashes"]) == 2
    def without_timing(rows):
        return [{k: v for k, v in r.items() if k != "train_s" and not k.startswith(("device_chip_s", "device_wall_s"))}
                for r in rows]
    assert without_timing(ranks[0]["rows"]) == without_timing(ranks[1]["rows"])
    # the chips' evaluation is shared by the ranks (the ideal preset: every chip is the ideal-cell model)
    assert "chips' evaluation (2 ranks)" in r.stdout
    assert all(row["device_acc_naive"] == row["ideal_acc_subset"] for row in ranks[0]["rows"])
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["world_size"] == 2 and res["meta"]["switch_bit_identical"] is True


def _small_backbone(tmp_path) -> Path:
    """A (random) small backbone saved as the example caches it: ImageFolder tasks need one."""
    import torch
    from safetensors.torch import save_file
    mod = _example()
    torch.manual_seed(0)
    model = mod.build_model(mod.parse_args(["--quick"]), 10)
    path = tmp_path / "small_backbone.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_image_folder_tasks(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for task, split in (("stripes", False), ("blobs", True)):
        for sub in (("train", "test") if split else ("",)):
            for c in range(3):
                d = root / task / sub / f"class{c}"
                d.mkdir(parents=True)
                for i in range(12 if sub != "test" else 4):
                    a = rng.integers(0, 60, (20, 20)).astype(np.uint8)
                    a[:, c * 6:(c + 1) * 6] = 255 if task == "stripes" else a[:, c * 6:(c + 1) * 6]
                    a[c * 6:(c + 1) * 6, :] = 255 if task == "blobs" else a[c * 6:(c + 1) * 6, :]
                    Image.fromarray(a).convert("RGB" if i % 2 else "L").save(d / f"{i}.{'png' if i % 3 else 'jpg'}")
    out = tmp_path / "out"
    mod = _example()
    rows = mod.main(["--quick", "--data-root", str(root), "--methods", "classifier", "finetune", "xma2",
                     "--also", "--weight-only-also", "--backbone-weights", str(_small_backbone(tmp_path)),
                     "--out", str(out), "--no-progress", "--threads", "1"])
    assert {r["task"] for r in rows} == {"stripes", "blobs"}
    assert len(rows) == 6
    by = {(r["task"], r["method"]): r for r in rows}
    assert by[("stripes", "finetune")]["acc"] >= 50.0  # 3 trivially separable classes
    assert (out / "results.csv").exists()


def test_resnet_archs_load_torchvision_keys(tmp_path):
    """--arch resnet18 --backbone-weights FILE: a state dict with torchvision's keys (random
    weights here; a real torchvision checkpoint has the same keys and shapes) loads as it is, the
    CIFAR stem is detected from the file, and the pipeline runs on 32x32 RGB ImageFolder tasks."""
    import torch
    from PIL import Image
    from xma2_ops import XbarConv2d, models
    mod = _example()
    for arch, convs in (("resnet18", 20), ("resnet50", 53)):
        args = mod.parse_args(["--arch", arch, "--out", str(tmp_path)])
        model = mod.build_model(args, 10)
        assert sum(isinstance(m, XbarConv2d) for m in model.modules()) == convs
    torch.manual_seed(0)
    ckpt = tmp_path / "r18.pt"
    torch.save(models.resnet18(num_classes=1000, cifar=True).state_dict(), ckpt)
    rng = np.random.default_rng(0)
    for c in range(2):
        d = tmp_path / "data" / "bars" / f"c{c}"
        d.mkdir(parents=True)
        for i in range(5):
            a = rng.integers(0, 50, (32, 32, 3)).astype(np.uint8)
            a[:, c * 16:(c + 1) * 16] = 255
            Image.fromarray(a).save(d / f"{i}.png")
    out = tmp_path / "r18"
    rows = mod.main(["--quick", "--arch", "resnet18", "--backbone-weights", str(ckpt), "--data-root",
                     str(tmp_path / "data"), "--methods", "classifier", "--also", "--weight-only-also",
                     "--adc-clip", "pmax", "--hw-epochs", "0", "--out", str(out), "--no-progress"])
    assert len(rows) == 1 and rows[0]["pes"] == 694 and rows[0]["task"] == "bars"
    bad = tmp_path / "bad.pt"
    torch.save({"conv1.weight": torch.zeros(64, 3, 3, 3), "nonsense": torch.zeros(1)}, bad)
    with pytest.raises(SystemExit, match="not a torchvision resnet18"):
        mod.build_model(mod.parse_args(["--arch", "resnet18", "--backbone-weights", str(bad)]), 10)
    with pytest.raises(SystemExit, match="--backbone-weights"):
        mod.main(["--arch", "resnet50", "--data-root", str(tmp_path / "data"), "--out", str(tmp_path)])


def test_spinning_hint_only_for_a_spinning_policy_on_a_loaded_machine(monkeypatch):
    """The old busy-machine hint is gone (the command line sets a passive policy itself); what is
    left is a note when the user chose a spinning policy and the machine is loaded."""
    from xma2_ops.mta.experiment import threads
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (3.0, 3.0, 3.0))
    lines = []
    threads.spinning_hint(lines.append, {})
    threads.spinning_hint(lines.append, {"OMP_WAIT_POLICY": "PASSIVE"})
    threads.spinning_hint(lines.append, {"GOMP_SPINCOUNT": "1000"})
    assert lines == []
    threads.spinning_hint(lines.append, {"OMP_WAIT_POLICY": "active"})
    assert len(lines) == 1 and "load average 3.0 on 2 cores" in lines[0] and "PASSIVE" in lines[0]
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.4, 0.4, 0.4))
    threads.spinning_hint(lines.append, {"GOMP_SPINCOUNT": "INFINITE"})
    assert len(lines) == 1


def test_adapters_from_an_earlier_run_are_evaluated_without_training(tmp_path):
    """--adapters-from: the same adapters (bit for bit), the same accuracies and costs, now also on a chip,
    also from two folders that each hold some of them; a missing file or one of another method is refused by
    name."""
    base = ["--quick", "--tasks", "sk_digits", "--methods", "classifier", "xma2", "--also", "--weight-only-also",
            "--no-progress", "--threads", "1", "--hw-epochs", "0"]
    first = tmp_path / "first"
    rows = _example().main(base + ["--out", str(first)])
    bb = ["--backbone-weights", str(next(first.glob("backbone_*.safetensors")))]
    again = tmp_path / "again"
    rows2 = _example().main(base + bb + ["--out", str(again), "--adapters-from", str(first), "--device", "mnsim",
                                         "--device-chips", "1", "--device-n-test", "20"])
    keys = ("task", "method", "acc", "cells_written", "energy_uJ", "infer_nJ")
    assert [[r[k] for k in keys] for r in rows2] == [[r[k] for k in keys] for r in rows] and len(rows) == 2
    assert all("device_acc_naive" in r for r in rows2)
    names = sorted(p.name for p in (first / "adapters").glob("*.safetensors"))
    assert len(names) == 2 and names == sorted(p.name for p in (again / "adapters").glob("*.safetensors"))
    for n in names:
        assert (again / "adapters" / n).read_bytes() == (first / "adapters" / n).read_bytes(), n
    # runs split over two folders (say one per task): each adapter from the first folder that has it
    split = [tmp_path / "split_a", tmp_path / "split_b"]
    for d, n in zip(split, names):
        (d / "adapters").mkdir(parents=True)
        (d / "adapters" / n).write_bytes((first / "adapters" / n).read_bytes())
    rows3 = _example().main(base + bb + ["--out", str(tmp_path / "third"), "--adapters-from", *map(str, split)])
    assert [[r[k] for k in keys] for r in rows3] == [[r[k] for k in keys] for r in rows]
    with pytest.raises(SystemExit, match="--adapters-from: .*not found"):
        _example().main(base[:4] + ["piggyback"] + base[6:] + bb + ["--out", str(again), "--adapters-from", str(first)])
    with pytest.raises(SystemExit, match=f"--adapters-from: {split[0]}.*, {split[1]}.* not found"):
        _example().main(base[:4] + ["piggyback"] + base[6:] + bb + ["--out", str(again), "--adapters-from", *map(str, split)])
    (first / "adapters" / names[1]).write_bytes((first / "adapters" / names[0]).read_bytes())  # classifier's file as xma2's
    with pytest.raises(SystemExit, match="holds method classifier, expected xma2@10%"):
        _example().main(base + bb + ["--out", str(again), "--adapters-from", str(first)])
    with pytest.raises(SystemExit, match="--noise-aware trains the adapters"):
        _example().main(base + ["--device", "mnsim", "--noise-aware", "--adapters-from", str(first)])
