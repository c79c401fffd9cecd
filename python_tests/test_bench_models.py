"""benchmarks/bench_models.py and bench_device_eval.py --quick run (smoke tests of the scripts: no timing
is asserted)."""
import sys
from pathlib import Path

import pytest

from xma2_ops.backends import available_backends

pytestmark = pytest.mark.skipif("cpu" not in available_backends(), reason="C++ extension not built")


def test_bench_models_quick(capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import bench_models
    finally:
        sys.path.pop(0)
    bench_models.main(["--quick", "--threads", "1", "--profile"])
    out = capsys.readouterr().out
    for row in ("float", "default", "lossless", "weight-only", "ideal", "xbar.kernel", "xbar.unfold_codes"):
        assert f"\n{row} " in out or f"\n{row}  " in out, row


def test_bench_device_eval_quick(capsys, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import bench_device_eval
    finally:
        sys.path.pop(0)
    bench_device_eval.main(["--quick", "--out", str(tmp_path), "--chips", "2", "--modes", "naive", "calibrated"])
    out = capsys.readouterr().out
    assert "2 chips x 50 images" in out and "results identical across workers: True" in out
    for workers in (1, 2):
        assert f"workers {workers}: wall" in out and "calibrated" in out.split(f"workers {workers}: wall")[1]


def test_bench_ops_kernels_on_the_example_layers(capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import bench_ops
    finally:
        sys.path.pop(0)
    bench_ops.main(["--kernels", "--threads", "1", "--repeats", "1"])
    out = capsys.readouterr().out
    for shape, mkn in (("100x24x14x14", "19600 x 216 x 24"), ("100x192x2x2", "400 x 1728 x 192")):
        assert shape in out and mkn in out, (shape, out)
