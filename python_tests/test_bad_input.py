"""SPEC 6: every bad argument gets a clear error naming it; tricky-but-valid inputs work."""
import pytest
import torch

import xma2_ops
from xma2_ops import XbarConfig, reference as ref

CFG = XbarConfig(rows=8, cols=2)


def _args():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 5, generator=g)
    w = torch.randn(4, 3, 3, 3, generator=g)
    return x, w


CONFIG_CASES = [
    (dict(rows=0), ValueError, "rows"),
    (dict(cols=-1), ValueError, "cols"),
    (dict(rows=1.5), TypeError, "rows"),
    (dict(weight_bits=1), ValueError, "weight_bits"),
    (dict(cell_bits=0), ValueError, "cell_bits"),
    (dict(dac_bits=9), ValueError, "dac_bits"),
    (dict(adc_bits=0), ValueError, "adc_bits"),
    (dict(adc_clip=0), ValueError, "adc_clip"),
    (dict(input_signed="yes"), TypeError, "input_signed"),
    (dict(input_bits=None), ValueError, "adc_bits"),  # an ADC needs integer partial sums
    (dict(input_bits=1, input_signed=True), ValueError, "input_bits"),
    (dict(rows=65537), ValueError, "rows"),
    (dict(input_bits=17), ValueError, "input_bits"),
]


@pytest.mark.parametrize("kwargs,exc,match", CONFIG_CASES)
def test_bad_config(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        XbarConfig(**kwargs)


def test_largest_configs_stay_exact():
    """Partial sums beyond int32 (here 70000 rows of 255 x 255) are computed exactly."""
    cfg = XbarConfig(rows=65536, cols=1, weight_bits=16, cell_bits=8, input_bits=16, dac_bits=8, adc_bits=None)
    for signed in (False, True):
        assert cfg.tile_sum_bound(signed) < 2 ** 50
    p = xma2_ops.config.GemmParams.from_config(cfg, False)
    x = torch.full((1, 70000), 2 ** 16 - 1, dtype=torch.int32)
    w = torch.full((70000, 1), 2 ** 15 - 1, dtype=torch.int32)
    t = torch.ops.xma2_ops.xbar_tile_sums(x, w, *p.as_args())
    assert torch.equal(t, ref.tile_sums(x, w, p))
    assert int(t[0, 0, 0]) == 65536 * (2 ** 16 - 1) * (2 ** 15 - 1)
    assert int(t[0, 0, 0]) > 2 ** 31


def _call(**over):
    x, w = _args()
    kw = dict(config=CFG)
    x = over.pop("x", x)
    w = over.pop("weight", w)
    kw.update(over)
    return xma2_ops.xbar_conv2d(x, w, **kw)


OP_CASES = [
    (dict(config="default"), TypeError, "config"),
    (dict(pe_mask=torch.zeros(3, 3)), ValueError, "pe_mask"),
    (dict(pe_mask=torch.full((4, 2), 2.0), task_weight=torch.randn(4, 3, 3, 3)), ValueError, "pe_mask"),
    (dict(pe_mask=torch.full((4, 2), float("nan")), task_weight=torch.randn(4, 3, 3, 3)), ValueError, "pe_mask"),
    (dict(pe_mask=torch.ones(4, 2)), ValueError, "task_weight"),
    (dict(col_scale=torch.ones(4, 3)), ValueError, "col_scale"),
    (dict(col_scale=torch.full((4, 4), float("inf"))), ValueError, "col_scale"),
    (dict(input_scale=float("nan")), ValueError, "input_scale"),
    (dict(input_scale=-1.0), ValueError, "input_scale"),
    (dict(input_scale="big"), TypeError, "input_scale"),
    (dict(weight_scale=torch.ones(3)), ValueError, "weight_scale"),
    (dict(weight_scale=torch.zeros(4)), ValueError, "weight_scale"),
    (dict(x=torch.randint(0, 3, (2, 3, 5, 5))), TypeError, "x"),
    (dict(weight=torch.randn(4, 3, 3, 3, dtype=torch.float64)), TypeError, "weight"),
    (dict(x=torch.randn(2, 5, 5, 5)), ValueError, "input channels"),
    (dict(x=torch.randn(5, 5)), ValueError, "x"),
    (dict(weight=torch.randn(4, 27)), ValueError, "weight"),
    (dict(groups=2), ValueError, "groups"),
    (dict(bias=torch.randn(5)), ValueError, "bias"),
    (dict(task_weight=torch.randn(4, 3, 3, 2)), ValueError, "task_weight"),
    (dict(stride=0), ValueError, "stride"),
    (dict(padding=-1), ValueError, "padding"),
    (dict(padding="full"), ValueError, "padding"),
    (dict(dilation=(1, 2, 3)), ValueError, "dilation"),
    (dict(x=torch.randn(2, 3, 2, 2)), ValueError, "too small"),
    (dict(backend="fpga"), ValueError, "backend"),
    (dict(x=torch.full((2, 3, 5, 5), float("nan"))), ValueError, "x"),
    (dict(weight=torch.full((4, 3, 3, 3), float("inf"))), ValueError, "weight"),
    (dict(weight=torch.randn(4, 3, 3, 3, device="meta")), RuntimeError, "weight"),
    (dict(bias=torch.randn(4, device="meta")), RuntimeError, "bias"),
    (dict(config=XbarConfig(rows=8, cols=2, input_bits=1)), ValueError, "input_bits"),
]


@pytest.mark.parametrize("over,exc,match", OP_CASES)
def test_bad_op_arguments(over, exc, match):
    with pytest.raises(exc, match=match):
        _call(**over)


def test_bad_linear_arguments():
    with pytest.raises(ValueError, match="in_features"):
        xma2_ops.xbar_linear(torch.randn(3, 5), torch.randn(4, 6), config=CFG)
    with pytest.raises(TypeError, match="config"):
        xma2_ops.XbarLinear(3, 4, config=None)
    with pytest.raises(ValueError, match="groups"):
        xma2_ops.XbarConv2d(4, 4, 3, groups=2)


def test_non_contiguous_and_channels_last_inputs_are_correct():
    x, w = _args()
    y = xma2_ops.xbar_conv2d(x, w, config=CFG)
    y_cl = xma2_ops.xbar_conv2d(x.to(memory_format=torch.channels_last), w, config=CFG)
    x_nc = torch.randn(2, 5, 5, 3).permute(0, 3, 1, 2)
    x_nc.copy_(x)
    assert not x_nc.is_contiguous()
    y_nc = xma2_ops.xbar_conv2d(x_nc, w.transpose(2, 3).contiguous().transpose(2, 3), config=CFG)
    torch.testing.assert_close(y_cl, y, rtol=0, atol=0)
    torch.testing.assert_close(y_nc, y, rtol=0, atol=0)
    torch.testing.assert_close(y, ref.xbar_conv2d_reference(x, w, config=CFG), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("config", [CFG, XbarConfig(weight_bits=None, input_bits=None, adc_bits=None)])
def test_zero_sized_batch(config):
    x, w = _args()
    y = xma2_ops.xbar_conv2d(x[:0], w, padding=1, config=config)
    assert y.shape == (0, 4, 5, 5)
    y2 = xma2_ops.xbar_linear(torch.randn(0, 7), torch.randn(3, 7), config=config)
    assert y2.shape == (0, 3)


def test_all_zero_input_uses_scale_one():
    x, w = _args()
    y = xma2_ops.xbar_conv2d(torch.zeros_like(x), w, torch.ones(4), config=CFG)
    torch.testing.assert_close(y, torch.ones(2, 4, 3, 3))
