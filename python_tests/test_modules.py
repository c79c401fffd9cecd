"""XbarConv2d / XbarLinear / convert: drop-in behaviour, calibration, state dicts, training."""
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import xma2_ops
from xma2_ops import XbarConfig, XbarConv2d, XbarLinear

IDEAL = XbarConfig(weight_bits=None, input_bits=None, adc_bits=None)


class TinyResNet(nn.Module):
    """ResNet-style: stem, a basic block, a downsample block with a 1x1 bias-less conv, a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.c1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.c1(x))
        x = F.relu(self.c2(x) + self.down(x))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_ideal_conv_equals_nn_conv(dtype, tol):
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), dtype=dtype)
    xc = XbarConv2d.from_conv(conv, IDEAL)
    x = torch.randn(3, 5, 9, 8, dtype=dtype)
    torch.testing.assert_close(xc(x), conv(x), rtol=tol, atol=tol)


def test_padding_modes_and_same_padding():
    torch.manual_seed(1)
    for kwargs in (dict(padding=1, padding_mode="reflect"), dict(padding=2, padding_mode="circular"),
                   dict(padding="same", dilation=2), dict(padding="valid")):
        conv = nn.Conv2d(2, 3, 3, **kwargs)
        x = torch.randn(2, 2, 7, 6)
        torch.testing.assert_close(XbarConv2d.from_conv(conv, IDEAL)(x), conv(x), rtol=1e-6, atol=1e-6)


def test_from_linear_and_drop_in_state_dict():
    torch.manual_seed(2)
    lin = nn.Linear(9, 4)
    xl = XbarLinear.from_linear(lin, IDEAL)
    x = torch.randn(2, 3, 9)
    torch.testing.assert_close(xl(x), lin(x), rtol=1e-6, atol=1e-6)
    fresh = XbarLinear(9, 4, config=IDEAL)
    fresh.load_state_dict(lin.state_dict())  # strict: a plain layer's state dict loads
    torch.testing.assert_close(fresh(x), lin(x), rtol=1e-6, atol=1e-6)
    conv = nn.Conv2d(3, 4, 3)
    xc = XbarConv2d(3, 4, 3, config=XbarConfig())
    xc.load_state_dict(conv.state_dict())
    assert torch.equal(xc.weight, conv.weight) and torch.equal(xc.bias, conv.bias)


def test_convert_resnet_ideal_matches_and_replaces_every_layer():
    torch.manual_seed(3)
    model = TinyResNet().eval()
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    converted = xma2_ops.convert(model, IDEAL)
    kinds = [type(m) for m in converted.modules()]
    assert kinds.count(XbarConv2d) == 4 and kinds.count(XbarLinear) == 1 and nn.Conv2d not in kinds
    torch.testing.assert_close(converted(x), expected, rtol=1e-5, atol=1e-5)
    keep_fc = xma2_ops.convert(TinyResNet(), IDEAL, linear=False)
    assert type(keep_fc.fc) is nn.Linear


def test_convert_keeps_grouped_convs_digital():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 1))
    with pytest.warns(UserWarning, match="groups"):
        xma2_ops.convert(model, IDEAL)
    assert type(model[0]) is nn.Conv2d and type(model[1]) is XbarConv2d


def test_quantised_resnet_first_conv_with_normalised_inputs():
    """Default config: the stem sees inputs around 0 -> signed inputs are detected, and the
    quantised output tracks the float one."""
    torch.manual_seed(4)
    conv = nn.Conv2d(3, 16, 3, padding=1)
    xc = XbarConv2d.from_conv(conv, XbarConfig())
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        y = xc(x)
    assert bool(xc.input_signed) and float(xc.input_range) == pytest.approx(float(x.abs().max()))
    with torch.no_grad():
        ref = conv(x)
    rel = float((y - ref).norm() / ref.norm())
    # 27 of 128 rows used, ADC full scale at Pmax: the ADC step dominates the error (SPEC 3).
    assert rel < 0.25, rel
    # An unsigned encoding of the same data loses every negative input: much worse.
    xu = XbarConv2d.from_conv(conv, XbarConfig(input_signed=False))
    with torch.no_grad():
        assert float((xu(x) - ref).norm() / ref.norm()) > 2 * rel


def test_calibration_running_max_then_frozen_in_eval():
    xc = XbarConv2d(2, 2, 1, config=XbarConfig(rows=8, cols=2))
    xc(torch.full((1, 2, 2, 2), 0.5))
    xc(torch.full((1, 2, 2, 2), 2.0))
    xc(torch.full((1, 2, 2, 2), 1.0))
    assert float(xc.input_range) == 2.0 and not bool(xc.input_signed)
    xc.eval()
    xc(torch.full((1, 2, 2, 2), -7.0))
    assert float(xc.input_range) == 2.0 and not bool(xc.input_signed)
    fresh = XbarConv2d(2, 2, 1, config=XbarConfig(rows=8, cols=2)).eval()
    fresh(torch.full((1, 2, 2, 2), -3.0))  # never calibrated: the first batch calibrates, even in eval
    assert float(fresh.input_range) == 3.0 and bool(fresh.input_signed)


def test_state_dict_round_trip_with_calibration_and_task_state():
    torch.manual_seed(5)
    model = xma2_ops.convert(TinyResNet(), XbarConfig(rows=16, cols=8))
    model(torch.randn(4, 3, 8, 8))
    layer = model.c1
    tr, tc = layer.tiles
    layer.task_weight = nn.Parameter(torch.randn_like(layer.weight))
    layer.pe_mask = (torch.rand(tr, tc) < 0.5).float()
    layer.col_scale = torch.rand(tr, 8)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    y = model(x)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    other = xma2_ops.convert(TinyResNet(), XbarConfig(rows=16, cols=8))
    other.c1.task_weight = nn.Parameter(torch.zeros_like(other.c1.weight))
    other.c1.pe_mask = torch.zeros(tr, tc)
    other.c1.col_scale = torch.zeros(tr, 8)
    buf.seek(0)
    other.load_state_dict(torch.load(buf))
    other.eval()
    assert torch.equal(other(x), y)


def test_quantised_train_step_reduces_loss():
    torch.manual_seed(6)
    model = xma2_ops.convert(TinyResNet(), XbarConfig(rows=32, cols=8))
    x = torch.randn(16, 3, 8, 8)
    target = torch.randint(0, 5, (16,))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_adapter_hook_supplies_task_state():
    torch.manual_seed(7)
    cfg = XbarConfig(rows=8, cols=2)
    layer = XbarConv2d(2, 4, 3, config=cfg)
    tr, tc = layer.tiles
    tw = torch.randn_like(layer.weight)
    mask = torch.ones(tr, tc)
    layer.adapter = lambda mod: (tw, mask, None)
    x = torch.rand(2, 2, 5, 5)
    expected = xma2_ops.xbar_conv2d(x, layer.weight, layer.bias, config=cfg, task_weight=tw, pe_mask=mask,
                                    input_scale=float(x.abs().max()) / 255)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
