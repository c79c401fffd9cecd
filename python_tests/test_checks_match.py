"""The Triton backend's host checks (xma2_ops.checks) give the C++ ops' messages (csrc/xbar_check.h,
the source) for the same bad inputs, where both check the same thing (parameters, K, code ranges;
shape and dtype messages differ in how sizes and dtypes print and are not compared)."""
import dataclasses

import pytest
import torch

from xma2_ops.backends import available_backends
from xma2_ops.config import GemmParams

pytestmark = pytest.mark.skipif(not {"cpu", "triton"} <= set(available_backends()),
                                reason="needs the C++ extension and Triton")

P = GemmParams(rows=8, cols=4, input_bits=4, input_signed=False, dac_bits=1, weight_bits=4, cell_bits=2,
               adc_levels=15, adc_clip=48)


def _args():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 16, (3, 10), generator=g, dtype=torch.int32)
    w = torch.randint(-7, 8, (10, 5), generator=g, dtype=torch.int32)
    return x, w


def _cases():
    x, w = _args()
    bad_x, bad_w = x.clone(), w.clone()
    bad_x[0, 0], bad_w[1, 1] = 16, -9
    params = [("rows", 0), ("rows", 1 << 17), ("cols", 0), ("input_bits", 17), ("input_bits", 0),
              ("weight_bits", 1), ("weight_bits", 17), ("dac_bits", 9), ("cell_bits", 0), ("adc_clip", 0),
              ("adc_levels", 1 << 24), ("adc_levels", 49)]
    cases = [(f"{name}={v}", x, w, dataclasses.replace(P, **{name: v})) for name, v in params]
    cases.append(("signed input_bits=1", x, w, dataclasses.replace(P, input_signed=True, input_bits=1)))
    cases.append(("K mismatch", x, w[:9], P))
    cases.append(("x codes out of range", bad_x, w, P))
    cases.append(("w codes out of range", x, bad_w, P))
    return cases


def _message(fn) -> str:
    with pytest.raises(RuntimeError) as err:
        fn()
    return str(err.value).splitlines()[0]


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c[0])
def test_triton_host_checks_give_the_cpp_messages(case):
    from xma2_ops.backends.triton import ops as triton_ops
    _, x, w, p = case
    cpp = _message(lambda: torch.ops.xma2_ops.xbar_tile_sums(x, w, *p.as_args()))
    triton = _message(lambda: triton_ops.tile_sums(x, w, p))
    if case[0].endswith("codes out of range"):  # the CPU kernels' range check (csrc/cpu) omits the values seen
        assert triton.startswith(cpp + ", got ["), (triton, cpp)
    else:
        assert triton == cpp
