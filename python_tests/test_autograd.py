"""Gradients of SPEC 5: gradcheck in ideal mode, exact mask/scale gradients and the
straight-through estimator in quantised mode."""
import pytest
import torch
import torch.nn.functional as F

import xma2_ops
from xma2_ops import quant
from xma2_ops import XbarConfig
from xma2_ops.backends import reference as ref
from xma2_ops.lowering import effective_weight

IDEAL = XbarConfig(rows=5, cols=2, weight_bits=None, input_bits=None, adc_bits=None)


@pytest.mark.parametrize("stride,padding,dilation", [(1, 0, 1), (2, 1, 1), (1, 2, 2)])
def test_gradcheck_ideal_conv(stride, padding, dilation):
    g = torch.Generator().manual_seed(stride * 10 + padding)
    x = torch.randn(2, 2, 6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, 2, 2, 3, dtype=torch.float64, generator=g, requires_grad=True)
    wt = torch.randn(3, 2, 2, 3, dtype=torch.float64, generator=g, requires_grad=True)
    tr, tc = IDEAL.tiles(12, 3)
    m = torch.rand(tr, tc, dtype=torch.float64, generator=g).requires_grad_()
    a = torch.randn(tr, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, generator=g, requires_grad=True)

    def fn(x, w, wt, m, a, b):
        return xma2_ops.xbar_conv2d(x, w, b, stride, padding, dilation, config=IDEAL, task_weight=wt, pe_mask=m,
                                    col_scale=a)

    assert torch.autograd.gradcheck(fn, (x, w, wt, m, a, b))


def test_gradcheck_ideal_linear():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(4, 7, dtype=torch.float64, generator=g, requires_grad=True)
    wt = torch.randn(4, 7, dtype=torch.float64, generator=g, requires_grad=True)
    m = torch.rand(2, 2, dtype=torch.float64, generator=g).requires_grad_()
    a = torch.randn(2, 4, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, wt, m, a: xma2_ops.xbar_linear(x, w, config=IDEAL, task_weight=wt, pe_mask=m, col_scale=a),
        (x, w, wt, m, a))


def _quant_case(seed, signed):
    g = torch.Generator().manual_seed(seed)
    cfg = XbarConfig(rows=7, cols=2, weight_bits=5, cell_bits=2, input_bits=4, dac_bits=1, adc_bits=3,
                     input_signed=signed)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, generator=g)
    w = torch.randn(3, 3, 2, 2, dtype=torch.float64, generator=g)
    wt = torch.randn(3, 3, 2, 2, dtype=torch.float64, generator=g)
    tr, tc = cfg.tiles(12, 3)
    m = torch.rand(tr, tc, dtype=torch.float64, generator=g)
    m[0, 0] = 0.0
    a = torch.randn(tr, 3, dtype=torch.float64, generator=g)
    s_x = 0.6 * x.abs().max() / cfg.input_qmax(signed)  # clips some inputs
    return cfg, x, w, wt, m, a, s_x


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_mask_and_scale_gradients_are_exact(signed, backend):
    """y is linear in pe_mask and col_scale (they act after the ADC): the gradient must equal the
    finite difference of the quantised forward exactly (up to float64 rounding)."""
    cfg, x, w, wt, m, a, s_x = _quant_case(1, signed)
    gy = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9))

    def loss(m_, a_):
        return (xma2_ops.xbar_conv2d(x, w, config=cfg, task_weight=wt, pe_mask=m_, col_scale=a_,
                                     input_scale=s_x, backend=backend) * gy).sum()

    m_ = m.clone().requires_grad_()
    a_ = a.clone().requires_grad_()
    loss(m_, a_).backward()
    base = loss(m, a)
    for t, grad in ((m, m_.grad), (a, a_.grad)):
        fd = torch.zeros_like(t)
        for i in range(t.numel()):
            bumped = t.clone()
            step = -0.25 if float(t.view(-1)[i]) > 0.5 else 0.25  # masks must stay in [0, 1]
            bumped.view(-1)[i] += step
            fd.view(-1)[i] = ((loss(bumped, a) if t is m else loss(m, bumped)) - base) / step
        torch.testing.assert_close(grad, fd, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("signed", [False, True])
def test_straight_through_gradients(signed):
    """x, weight, task_weight: gradients of the float layer at the dequantised point, zero for
    clipped inputs (SPEC 5), built here by hand from the reference quantisers."""
    cfg, x, w, wt, m, a, s_x = _quant_case(2, signed)
    xg, wg, wtg = (t.clone().requires_grad_() for t in (x, w, wt))
    y = xma2_ops.xbar_conv2d(xg, wg, config=cfg, task_weight=wtg, pe_mask=m, col_scale=a, input_scale=s_x,
                             backend="cpu")
    gy = torch.randn_like(y)
    y.backward(gy)

    s_w = quant.derived_scale(w, cfg.weight_qmax)
    s_t = quant.derived_scale(wt, cfg.weight_qmax)
    x_deq = (quant.quantize_input(x, s_x, cfg.input_bits, signed) * s_x).requires_grad_()
    wb_deq = (quant.quantize_weight(w, s_w, cfg.weight_bits) * s_w).requires_grad_()
    wt_deq = (quant.quantize_weight(wt, s_t, cfg.weight_bits) * s_t).requires_grad_()
    y_ste = F.conv2d(x_deq, effective_weight(wb_deq, wt_deq, m, a, cfg.rows, cfg.cols))
    y_ste.backward(gy)
    r = torch.round(x / s_x)
    lo = -cfg.input_qmax(signed) if signed else 0
    keep = (r >= lo) & (r <= cfg.input_qmax(signed))
    assert not bool(keep.all()), "the case must clip some inputs"
    torch.testing.assert_close(xg.grad, x_deq.grad * keep, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(wg.grad, wb_deq.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(wtg.grad, wt_deq.grad, rtol=1e-12, atol=1e-12)
    assert float(xg.grad[~keep].abs().max()) == 0.0


def test_bias_gradient_and_weight_only_mode():
    cfg = XbarConfig(rows=4, cols=2, weight_bits=4, input_bits=None, adc_bits=None)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, generator=g, requires_grad=True)
    y = xma2_ops.xbar_conv2d(x, w, b, padding=1, config=cfg)
    s = quant.derived_scale(w, cfg.weight_qmax)
    w_fq = quant.quantize_weight(w.detach(), s, 4) * s
    torch.testing.assert_close(y, F.conv2d(x, w_fq, b, padding=1), rtol=1e-12, atol=1e-12)
    y.sum().backward()
    torch.testing.assert_close(b.grad, torch.full((3,), 32.0, dtype=torch.float64))
    x2 = x.detach().requires_grad_()
    F.conv2d(x2, w_fq, b, padding=1).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    assert w.grad is not None and float(w.grad.abs().sum()) > 0
