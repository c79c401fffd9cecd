"""examples/train_mta.py: the --quick CI run, DistributedDataParallel on 2 CPU ranks, the
ImageFolder path, and the resnet50 path."""
from __future__ import annotations

import csv
import importlib.util
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
    spec = importlib.util.spec_from_file_location("train_mta", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_run(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--no-progress", "--threads", "1"],
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "wall time" in r.stdout
    rows = list(csv.DictReader(open(out / "results.csv")))
    tasks = {"animals", "sk_digits", "letters", "shapes"}
    assert {row["task"] for row in rows} == tasks | {"AVERAGE"}
    methods = {row["method"] for row in rows}
    for m in ("finetune", "classifier", "piggyback", "xbm", "xma", "pe@10%/snip", "xma2@10%/snip",
              "xma2@10%/learned", "xma2@10%/delta", "xma2@10%/snip/sharedBN"):
        assert m in methods
    by_method = {}
    for row in rows:
        if row["task"] != "AVERAGE":
            by_method.setdefault(row["method"], []).append(float(row["acc"]))
    for row in rows:  # the average row is the mean over the tasks (the table's own arithmetic)
        if row["task"] == "AVERAGE":
            assert abs(float(row["acc"]) - sum(by_method[row["method"]]) / 4) < 0.01, row
    for row in rows:
        if row["method"] == "finetune":
            assert float(row["pe_pct"]) == 100.0
        if row["method"] in ("classifier", "xbm", "xma"):
            assert float(row["pe_pct"]) == 0.0 and int(float(row["cells_written"])) == 0
        if row["method"].startswith(("pe@10%", "xma2@10%")):
            assert 0 < float(row["pe_pct"]) <= 10.0
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["switch_bit_identical"] is True
    for png in ("accuracy_vs_pes.png", "pe_masks.png"):
        assert (out / png).stat().st_size > 1000
    assert len(list((out / "adapters").glob("*.safetensors"))) == 4 * 10
    backbone = list(out.glob("backbone_*.safetensors"))
    assert len(backbone) == 1  # cached: a rerun reuses it
    mod = _example()
    args = mod.parse_args(["--quick", "--out", str(out)])
    assert args.n_test <= 100 and args.stage2_epochs == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_cpu_ranks_agree(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(SCRIPT), "--quick", "--tasks", "sk_digits",
           "--methods", "classifier", "xma2", "--shared-bn", "--also", "--out", str(out), "--no-progress",
           "--threads", "1"]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ranks = [json.loads((out / f"ddp_rank{i}.json").read_text()) for i in range(2)]
    assert ranks[0]["hashes"] == ranks[1]["hashes"] and len(ranks[0]["hashes"]) == 2
    assert ranks[0]["rows"] == ranks[1]["rows"]
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["world_size"] == 2 and res["meta"]["switch_bit_identical"] is True


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
                     "--shared-bn", "--also", "--out", str(out), "--no-progress", "--threads", "1"])
    assert {r["task"] for r in rows} == {"stripes", "blobs"}
    assert len(rows) == 6
    by = {(r["task"], r["method"]): r for r in rows}
    assert by[("stripes", "finetune")]["acc"] >= 50.0  # 3 trivially separable classes
    assert (out / "results.csv").exists()


def test_resnet50_path(tmp_path):
    mod = _example()
    args = mod.parse_args(["--arch", "resnet50", "--out", str(tmp_path)])
    if importlib.util.find_spec("torchvision") is None:
        with pytest.raises(SystemExit, match="torchvision"):
            mod.build_model(args, 10)
    else:
        from xma2_ops import XbarConv2d
        model = mod.build_model(args, 10)
        assert sum(isinstance(m, XbarConv2d) for m in model.modules()) == 53
    with pytest.raises(SystemExit, match="--data-root"):
        mod.main(["--arch", "resnet50", "--out", str(tmp_path)])
