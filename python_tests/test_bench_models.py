"""benchmarks/bench_models.py --quick runs (a smoke test of the script: no timing is asserted)."""
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
