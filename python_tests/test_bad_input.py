"""SPEC 6: every bad argument gets a clear error naming it; tricky-but-valid inputs work."""
import pytest
import torch

import xma2_ops
from xma2_ops import XbarConfig
from xma2_ops.backends import reference as ref

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
    (dict(weight_bits=None, adc_bits=None), ValueError, "input_bits"),  # would silently run a float conv
    (dict(weight_bits=None, input_bits=2, adc_bits=None), ValueError, "input_bits"),
    (dict(adc_clip=2 ** 63 - 1), ValueError, "adc_clip"),  # overflowed the int64 ADC (UBSan)
    (dict(adc_clip=2 ** 32 + 1), ValueError, "adc_clip"),
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
    (dict(bias=torch.randn(4, dtype=torch.float64)), TypeError, "bias"),  # gave a float64 output
    (dict(backend="fpga", config=XbarConfig(weight_bits=None, input_bits=None, adc_bits=None)), ValueError,
     "backend"),
    (dict(backend="fpga", config=XbarConfig(input_bits=None, adc_bits=None)), ValueError, "backend"),
    (dict(weight=torch.full((4, 3, 3, 3), float("nan")), config=XbarConfig(input_bits=None, adc_bits=None)),
     ValueError, "weight"),  # weight-only mode returned NaN
    (dict(task_weight=torch.full((4, 3, 3, 3), float("nan")), pe_mask=torch.ones(4, 2)), ValueError, "task_weight"),
    (dict(weight_scale=torch.ones(4), weight=torch.full((4, 3, 3, 3), float("inf"))), ValueError, "weight"),
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


QUANT_MODES = [CFG, XbarConfig(rows=8, cols=2, input_bits=None, adc_bits=None),
               XbarConfig(rows=8, cols=2, weight_bits=None, input_bits=None, adc_bits=None)]


@pytest.mark.parametrize("config", QUANT_MODES)
def test_empty_dimensions_give_the_bias(config):
    """Cin = 0, in_features = 0, H = 0 with padding, out_features = 0: no input gives zero partial
    sums (a reshape error or IndexError before)."""
    b = torch.randn(4)
    y = xma2_ops.xbar_conv2d(torch.randn(2, 0, 5, 5), torch.randn(4, 0, 3, 3), b, padding=1, config=config)
    assert torch.equal(y, b.view(1, 4, 1, 1).expand(2, 4, 5, 5))
    y = xma2_ops.xbar_conv2d(torch.randn(2, 3, 0, 4), torch.randn(4, 3, 1, 1), b, padding=1, config=config)
    assert torch.equal(y, b.view(1, 4, 1, 1).expand(2, 4, 2, 6))
    y = xma2_ops.xbar_linear(torch.randn(3, 0), torch.randn(4, 0), b, config=config)
    assert torch.equal(y, b.expand(3, 4))
    y = xma2_ops.xbar_linear(torch.randn(3, 5), torch.randn(0, 5), config=config)
    assert y.shape == (3, 0)
    layer = xma2_ops.XbarLinear(5, 0, config=config)
    assert layer(torch.randn(3, 5)).shape == (3, 0)


def test_layer_config_must_be_an_xbar_config():
    layer = xma2_ops.XbarLinear(3, 4, config=CFG)
    with pytest.raises(TypeError, match="config"):
        layer.config = {"rows": 8}
    layer.config = XbarConfig(rows=2, cols=2)
    assert layer.config.rows == 2


def _run_python(code: str):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_huge_padding_is_refused_not_a_crash():
    """B*Ho*Wo overflowed int64 in the CPU im2col of codes: a segfault (run in a subprocess)."""
    r = _run_python(
        "import torch, xma2_ops\n"
        "try:\n"
        "    xma2_ops.xbar_conv2d(torch.rand(1,1,2,1), torch.randn(1,1,1,1), padding=(2**31+32767, 2**31-32768),\n"
        "                         config=xma2_ops.XbarConfig(rows=8, cols=2, adc_bits=6))\n"
        "except ValueError as e:\n"
        "    print('refused:', e)\n")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "refused: x:" in r.stdout


def test_missing_extension_warns_and_says_why():
    """A failed import of the C++ extension (ABI mismatch after a torch upgrade) must not silently
    make every CPU call 45-590x slower: a warning with the error and the fix, and a reason."""
    r = _run_python(
        "import sys, warnings\n"
        "sys.modules['xma2_ops._C'] = None  # makes `from . import _C` raise ImportError\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    import torch, xma2_ops\n"
        "    y = xma2_ops.xbar_linear(torch.rand(2, 5), torch.randn(3, 5), config=xma2_ops.XbarConfig(rows=4, cols=2))\n"
        "print('WARN', [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)])\n"
        "print('BACKENDS', xma2_ops.available_backends())\n"
        "print('CPU', xma2_ops.available_backends(with_reasons=True)['cpu'])\n"
        "try:\n"
        "    xma2_ops.xbar_linear(torch.rand(2, 5), torch.randn(3, 5), config=xma2_ops.XbarConfig(), backend='cpu')\n"
        "except ValueError as e:\n"
        "    print('ERR', e)\n")
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    warn = next(line for line in out.splitlines() if line.startswith("WARN"))
    assert "did not load" in warn and "pip install --no-build-isolation" in warn
    assert "BACKENDS ['reference'" in out
    assert "CPU the C++ extension xma2_ops._C did not load" in out
    assert "ERR backend:" in out and "did not load" in out.split("ERR", 1)[1]


@pytest.mark.parametrize("call,exc,name", [
    (lambda: xma2_ops.program("model"), TypeError, "model"),
    (lambda: xma2_ops.calibrate_adc("model", []), TypeError, "model"),
    (lambda: xma2_ops.calibrate_adc(_xbar_net(), [torch.rand(2, 3)], percentile="99"), TypeError, "percentile"),
    (lambda: xma2_ops.calibrate_adc(_xbar_net(), [torch.rand(2, 3)], percentile=float("nan")), ValueError,
     "percentile"),
    (lambda: xma2_ops.calibrate_adc(_xbar_net(), [torch.rand(2, 3)], method="max"), ValueError, "method"),
    (lambda: xma2_ops.calibrate_adc(_xbar_net(), [torch.rand(2, 3)], method=None), TypeError, "method"),
    (lambda: xma2_ops.calibrate_adc(_xbar_net(), [torch.rand(2, 3)], batches="2"), TypeError, "batches"),
    (lambda: xma2_ops.calibrate_adc(_xbar_net(), 3), TypeError, "loader"),
    (lambda: __import__("xma2_ops.mta", fromlist=["mta"]).budget_count("0.1", 10), TypeError, "budget"),
    (lambda: __import__("xma2_ops.mta", fromlist=["mta"]).topk_masks([torch.ones(2, 2)], "0.5"), TypeError,
     "budget"),
], ids=["program_str", "calibrate_str", "percentile_str", "percentile_nan", "method_max", "method_none",
        "batches_str", "loader_int", "budget_count_str", "topk_str"])
def test_model_level_calls_name_the_bad_argument(call, exc, name):
    """A string model gave a bare AttributeError, a string percentile/budget a raw comparison
    TypeError; each now names the argument."""
    with pytest.raises(exc, match=rf"^{name}\b"):
        call()


def _xbar_net():
    torch.manual_seed(0)
    return xma2_ops.convert(torch.nn.Sequential(torch.nn.Linear(3, 2)), XbarConfig(rows=4, cols=2))
