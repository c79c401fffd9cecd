"""The registered torch.ops: opcheck (schema, fake impls, autograd registration) and torch.compile."""
import pytest
import torch

import xma2_ops
from xma2_ops import XbarConfig
from xma2_ops.config import GemmParams


def _codes(seed, m=5, k=37, n=6, signed=True):
    g = torch.Generator().manual_seed(seed)
    lo = -7 if signed else 0
    return (torch.randint(lo, 8, (m, k), generator=g, dtype=torch.int32),
            torch.randint(-15, 16, (k, n), generator=g, dtype=torch.int32))


P = GemmParams(rows=16, cols=4, input_bits=4, input_signed=True, dac_bits=1, weight_bits=5, cell_bits=2,
               adc_levels=7, adc_clip=48)


def test_opcheck_tile_sums():
    x, w = _codes(0)
    torch.library.opcheck(torch.ops.xma2_ops.xbar_tile_sums.default, (x, w, *P.as_args()))


@pytest.mark.parametrize("with_task", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_mvm(with_task, dtype):
    x, w = _codes(1)
    wt = torch.flip(w, (0,)).contiguous()
    cb = torch.randn(3, 6, dtype=dtype)
    ct = torch.randn(3, 6, dtype=dtype) if with_task else None
    torch.library.opcheck(torch.ops.xma2_ops.xbar_mvm.default,
                          (x, w, wt if with_task else None, cb, ct, *P.as_args()))


def test_torch_compile_fullgraph_op():
    x, w = _codes(2)
    cb = torch.randn(3, 6, dtype=torch.float64)

    def f(x, w, cb):
        return torch.ops.xma2_ops.xbar_mvm(x, w, None, cb, None, *P.as_args()) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, w, cb), f(x, w, cb), rtol=0, atol=0)


def test_torch_compile_module():
    torch.manual_seed(0)
    model = torch.nn.Sequential(xma2_ops.XbarConv2d(3, 4, 3, padding=1, config=XbarConfig(rows=16, cols=4)),
                                torch.nn.ReLU()).eval()
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(compiled(x), expected, rtol=0, atol=0)


def test_op_rejects_codes_out_of_range():
    x, w = _codes(3)
    with pytest.raises(RuntimeError, match="x_codes"):
        torch.ops.xma2_ops.xbar_tile_sums(x * 100, w, *P.as_args())
    with pytest.raises(RuntimeError, match="int32"):
        torch.ops.xma2_ops.xbar_tile_sums(x.long(), w, *P.as_args())
