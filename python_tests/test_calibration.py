"""ADC range calibration (xma2_ops.calibrate_adc)."""
import pytest
import torch
import torch.nn as nn

import xma2_ops
from xma2_ops import XbarConfig
from xma2_ops.calibration import _histogram, choose_clip


def test_choose_clip_percentile_and_mse():
    hist = torch.zeros(101, dtype=torch.int64)
    hist[0], hist[3], hist[7], hist[90] = 500, 300, 199, 1
    assert choose_clip(hist, 8, "percentile", 99.9) == 7  # 999 of 1000 sums are <= 7
    assert choose_clip(hist, 8, "percentile", 100.0) == 90
    point = torch.zeros(50, dtype=torch.int64)
    point[5] = 10
    assert choose_clip(point, 8, "mse") == 5  # the first clip that converts P = 5 exactly
    assert choose_clip(torch.zeros(9, dtype=torch.int64), 8) == 1
    with pytest.raises(ValueError, match="method"):
        choose_clip(hist, 8, "max")


def test_histogram_counts_every_partial_sum():
    """Linear layer, 1 row tile: P values of x chunks times weight slices, counted by hand."""
    cfg = XbarConfig(rows=4, cols=2, weight_bits=3, cell_bits=1, input_bits=2, dac_bits=1, input_signed=False)
    layer = xma2_ops.XbarLinear(3, 1, bias=False, config=cfg)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, -1.0, 2.0]]))  # codes 3, -1, 2 (scale 1)
        layer.input_range.fill_(3.0)  # x codes = x
    x = torch.tensor([[3.0, 1.0, 2.0]])
    hist = _histogram(layer, x)
    # w+ = [3, 0, 2] -> slices [1,0,0], [1,0,1]; w- = [0,1,0] -> [0,1,0], [0,0,0]
    # x chunks: bit0 [1,1,0], bit1 [1,0,1]; P = chunk . slice for 2 chunks x 4 slices
    want = torch.zeros(cfg.pmax + 1, dtype=torch.int64)
    for chunk in ([1, 1, 0], [1, 0, 1]):
        for sl in ([1, 0, 0], [1, 0, 1], [0, 1, 0], [0, 0, 0]):
            want[sum(a * b for a, b in zip(chunk, sl))] += 1
    assert torch.equal(hist, want)


def test_calibrated_clips_reduce_the_adc_error():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
    x = torch.randn(4, 8, 10, 10).relu()
    with torch.no_grad():
        y_float = net(x)
    xma2_ops.convert(net, XbarConfig(rows=128, cols=32))
    net.eval()
    with torch.no_grad():
        err_default = float((net(x) - y_float).pow(2).mean())
        clips = xma2_ops.calibrate_adc(net, [(x, None)], batches=1, method="mse")
        err_cal = float((net(x) - y_float).pow(2).mean())
    assert set(clips) == {"0", "2"}
    assert all(1 <= c < XbarConfig(rows=128, cols=32).pmax for c in clips.values())
    assert net[0].config.adc_clip == clips["0"]
    assert err_cal < 0.5 * err_default, (err_cal, err_default)


def _calibrated_net():
    torch.manual_seed(0)
    net = xma2_ops.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)),
                           XbarConfig(rows=16, cols=4))
    net(torch.rand(2, 3, 6, 6))  # input ranges calibrated
    return net


@pytest.mark.parametrize("loader", [[], iter([]), "exhausted"], ids=["empty_list", "empty_iterator", "exhausted"])
def test_empty_loader_is_refused_and_changes_nothing(loader):
    """An empty loader (or an exhausted iterator) gave adc_clip = 1 on every layer (every partial
    sum saturated); now: a ValueError naming ``loader``, layers and mode unchanged."""
    net = _calibrated_net()
    if loader == "exhausted":
        loader = iter([(torch.rand(2, 3, 6, 6), None)])
        next(loader)
    layers = [m for m in net.modules() if isinstance(m, (xma2_ops.XbarConv2d, xma2_ops.XbarLinear))]
    before = [(m.config, m.input_range.clone(), m.input_signed.clone()) for m in layers]
    x = torch.rand(2, 3, 6, 6)
    net.eval()
    with torch.no_grad():
        y = net(x)
    net.train()
    with pytest.raises(ValueError, match="loader"):
        xma2_ops.calibrate_adc(net, loader)
    for m, (cfg, rng, signed) in zip(layers, before):
        assert m.config == cfg and m.config.adc_clip is None
        assert torch.equal(m.input_range, rng) and torch.equal(m.input_signed, signed)
    assert net.training
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x), y)
