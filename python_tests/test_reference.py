"""The oracle itself, checked against independent formulations of SPEC."""
import random

import pytest
import torch
import torch.nn.functional as F

import xma2_ops
from xma2_ops import quant
from xma2_ops import XbarConfig
from xma2_ops.backends import reference as ref
from xma2_ops.config import GemmParams

from helpers import random_conv_case


def test_adc_codes_by_hand():
    # n = 3 levels, clip = 6: step 2; codes round half up, saturate above clip.
    p = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 100])
    assert quant.adc_codes(p, 3, 6).tolist() == [0, 1, 1, 2, 2, 3, 3, 3, 3]
    # clip = 1, one level: P >= 1 -> 1 (P=0.5 boundary cannot occur with integers).
    assert quant.adc_codes(torch.tensor([0, 1, 5]), 1, 1).tolist() == [0, 1, 1]


def test_quantizers_by_hand():
    s = torch.tensor(0.5)
    x = torch.tensor([-1.0, -0.25, 0.25, 0.75, 1.25, 100.0])
    # round half to even: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2
    assert quant.quantize_input(x, s, 3, signed=False).tolist() == [0, 0, 0, 2, 2, 7]
    assert quant.quantize_input(x, s, 3, signed=True).tolist() == [-2, 0, 0, 2, 2, 3]
    assert quant.quantize_weight(torch.tensor([-9.0, 0.26, 1.0]), torch.tensor(0.5), 3).tolist() == [-3, 1, 2]
    assert quant.derived_scale(torch.zeros(3), 7).item() == 1.0


def test_tile_sums_by_hand():
    # One row tile of 2 rows, 1-bit cells and DAC, ideal ADC: T = sum_k x*w exactly.
    x = torch.tensor([[3, 1]])
    w = torch.tensor([[2], [-3]])
    p = GemmParams(rows=2, cols=1, input_bits=2, input_signed=False, dac_bits=1, weight_bits=3, cell_bits=1,
                   adc_levels=0, adc_clip=2)
    assert ref.tile_sums(x, w, p).tolist() == [[[3 * 2 - 1 * 3]]]
    # Same with a 1-level ADC clipped at 1: every non-zero partial sum (a popcount) reads as 1.
    # x=(3,1), w=(2,0): P[i][j] is 1 for (i,j) = (0,1), (1,1) -> T = 2^1 + 2^2 = 6.
    # x=(1,1), w=(0,-3): the negative polarity has P = 1 for (0,0), (0,1) -> T = -(1 + 2) = -3.
    p1 = GemmParams(rows=2, cols=1, input_bits=2, input_signed=False, dac_bits=1, weight_bits=3, cell_bits=1,
                    adc_levels=1, adc_clip=1)
    assert ref.tile_sums(x, torch.tensor([[2], [0]]), p1).tolist() == [[[6]]]
    assert ref.tile_sums(torch.tensor([[1, 1]]), torch.tensor([[0], [-3]]), p1).tolist() == [[[-3]]]


def _fake_quant_conv(case, signed):
    cfg = case.config
    x, w = case.x, case.weight
    s_x = quant.derived_scale(x, cfg.input_qmax(signed))
    s_w = quant.derived_scale(w, cfg.weight_qmax)
    xq = quant.quantize_input(x, s_x, cfg.input_bits, signed) * s_x
    wq = quant.quantize_weight(w, s_w, cfg.weight_bits) * s_w
    return F.conv2d(xq, wq, case.bias, case.stride, case.padding, case.dilation)


@pytest.mark.parametrize("seed", range(12))
def test_lossless_adc_equals_fake_quantized_conv(seed):
    case = random_conv_case(seed)
    rng = random.Random(seed)
    cfg = XbarConfig(rows=rng.choice([1, 5, 16]), cols=3, weight_bits=rng.randint(2, 8),
                     cell_bits=rng.randint(1, 3), input_bits=rng.randint(2, 8), dac_bits=rng.randint(1, 3),
                     adc_bits=rng.choice([None, 16]), input_signed=None)
    assert cfg.adc_lossless
    case.config = cfg
    signed = bool((case.x < 0).any())
    y = ref.xbar_conv2d_reference(case.x, case.weight, case.bias, case.stride, case.padding, case.dilation,
                                  config=cfg)
    torch.testing.assert_close(y, _fake_quant_conv(case, signed), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", range(12))
def test_ideal_equals_conv_with_effective_weight(seed):
    case = random_conv_case(seed, quantized=False)
    cfg = case.config
    cout, k = case.weight.shape[0], case.weight[0].numel()
    tr, tc = cfg.tiles(k, cout)
    m = torch.zeros(tr, tc, dtype=torch.float64) if case.pe_mask is None else case.pe_mask
    a = torch.ones(tr, cout, dtype=torch.float64) if case.col_scale is None else case.col_scale
    w_eff = torch.empty_like(case.weight)
    for n in range(cout):  # per element, straight from SPEC 4
        for kk in range(k):
            r, c = kk // cfg.rows, n // cfg.cols
            wt = 0.0 if case.task_weight is None else case.task_weight.reshape(cout, -1)[n, kk]
            w_eff.view(cout, -1)[n, kk] = m[r, c] * wt + (1 - m[r, c]) * a[r, n] * case.weight.reshape(cout, -1)[n, kk]
    expected = F.conv2d(case.x, w_eff, case.bias, case.stride, case.padding, case.dilation)
    got = ref.xbar_conv2d_reference(case.x, case.weight, **case.kwargs())
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    got_fn = xma2_ops.xbar_conv2d(case.x, case.weight, **case.kwargs())
    torch.testing.assert_close(got_fn, expected, rtol=1e-12, atol=1e-12)


def test_pe_mask_one_ignores_backbone_and_zero_ignores_task():
    case = random_conv_case(3)
    cfg = XbarConfig(rows=8, cols=2)
    cout, k = case.weight.shape[0], case.weight[0].numel()
    tr, tc = cfg.tiles(k, cout)
    ones = torch.ones(tr, tc, dtype=torch.float64)
    wt = torch.randn_like(case.weight)
    y1 = ref.xbar_conv2d_reference(case.x, case.weight, config=cfg, task_weight=wt, pe_mask=ones)
    y2 = ref.xbar_conv2d_reference(case.x, wt, config=cfg)  # the task weight alone, default scale
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    y3 = ref.xbar_conv2d_reference(case.x, case.weight, config=cfg, task_weight=wt, pe_mask=0 * ones)
    torch.testing.assert_close(y3, ref.xbar_conv2d_reference(case.x, case.weight, config=cfg), rtol=0, atol=0)
