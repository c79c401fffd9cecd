"""Argument checks of the raw C++ ops (csrc/xbar_check.h and the CPU op functions): every bad
integer argument is refused with a message naming it, before any cast to int can truncate it, and
every size product is checked for overflow before anything is allocated.  Calls that could crash
run in a subprocess, so that a crash fails the test instead of killing pytest."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from xma2_ops.backends import available_backends
from xma2_ops.config import MAX_ADC_CLIP, GemmParams

pytestmark = pytest.mark.skipif("cpu" not in available_backends(), reason="C++ extension not built")

P = GemmParams(rows=16, cols=4, input_bits=4, input_signed=True, dac_bits=1, weight_bits=5, cell_bits=2,
               adc_levels=7, adc_clip=48)
ARGS = ("rows", "cols", "input_bits", "input_signed", "dac_bits", "weight_bits", "cell_bits", "adc_levels",
        "adc_clip")


def _codes(m=5, k=37, n=6):
    g = torch.Generator().manual_seed(0)
    return (torch.randint(-7, 8, (m, k), generator=g, dtype=torch.int32),
            torch.randint(-15, 16, (k, n), generator=g, dtype=torch.int32))


def _call_all(args):
    """Each op that takes the crossbar arguments, called with `args`."""
    x, w = _codes()
    tr = -(-x.shape[1] // max(1, min(args[0], 1 << 20)))
    coef = torch.ones(tr, w.shape[1], dtype=torch.float64)
    gy = torch.ones(x.shape[0], w.shape[1], dtype=torch.float64)
    return [lambda: torch.ops.xma2_ops.xbar_tile_sums(x, w, *args),
            lambda: torch.ops.xma2_ops.xbar_mvm(x, w, None, coef, None, *args),
            lambda: torch.ops.xma2_ops.xbar_coef_grad(x, w, gy, *args)]


def _with(**kw):
    args = list(P.as_args())
    for name, value in kw.items():
        args[ARGS.index(name)] = value
    return tuple(args)


# Values a cast to int would truncate to something valid (2**32 + 8 -> 8), or wrap negative.
HUGE = [2**31 + 8, 2**32 + 8, 2**32, 2**63 - 1, -(2**32) + 4]


@pytest.mark.parametrize("name", ["rows", "cols", "input_bits", "dac_bits", "weight_bits", "cell_bits",
                                  "adc_levels"])
@pytest.mark.parametrize("value", HUGE)
def test_int_args_beyond_range_are_refused(name, value):
    for call in _call_all(_with(**{name: value})):
        with pytest.raises(RuntimeError, match=name):
            call()


def test_adc_levels_above_clip_is_refused():
    # levels > clip >= Pmax used to be taken for a lossless ADC by the CUDA and Triton kernels.
    pmax = 16 * 1 * 3
    for call in _call_all(_with(adc_levels=pmax + 5, adc_clip=pmax)):
        with pytest.raises(RuntimeError, match="adc_levels.*adc_clip"):
            call()


@pytest.mark.parametrize("clip", [MAX_ADC_CLIP + 1, 2**62, 0, -5])
def test_adc_clip_out_of_range_is_refused(clip):
    for call in _call_all(_with(adc_clip=clip)):
        with pytest.raises(RuntimeError, match="adc_clip"):
            call()


def test_largest_adc_clip_is_accepted():
    x, w = _codes()
    args = _with(adc_levels=(1 << 24) - 1, adc_clip=MAX_ADC_CLIP)
    from xma2_ops.backends import reference
    p = GemmParams(*args)
    assert torch.equal(torch.ops.xma2_ops.xbar_tile_sums(x, w, *args), reference.tile_sums(x, w, p))


def test_adc_levels_beyond_24_bits_is_refused():
    for call in _call_all(_with(adc_levels=1 << 24, adc_clip=1 << 25)):
        with pytest.raises(RuntimeError, match="adc_levels"):
            call()


def _assert_refused(code: str, pattern: str) -> None:
    """Runs `code` in a fresh interpreter; it must raise a RuntimeError naming `pattern`. A crash
    shows as a non-zero exit of the child, not of pytest."""
    body = textwrap.indent(textwrap.dedent(code).strip(), "    ")
    prog = ("import torch, xma2_ops\ntry:\n" + body + "\nexcept RuntimeError as e:\n    print('REFUSED:', e)\n"
            "else:\n    print('ACCEPTED')\n")
    proc = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"child crashed (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    assert "REFUSED:" in proc.stdout, proc.stdout
    assert pattern in proc.stdout, proc.stdout


@pytest.mark.parametrize("x_shape,kernel,dilation,padding,stride", [
    ((1, 1, 2, 1), (1, 1), (1, 1), (2**31 + 32767, 2**31 - 32768), (1, 1)),   # B*Ho*Wo past int64
    ((1, 1, 2, 1), (1, 1), (1, 1), (2**62, 0), (1, 1)),                        # H + 2*padding past int64
    ((1, 1, 2, 2), (2**40, 2**40), (1, 1), (2**40, 2**40), (1, 1)),            # C*kh*kw past int64
    ((1, 1, 2, 2), (2**33, 1), (2**31, 1), (0, 0), (1, 1)),                    # dilation*(kh-1) past int64
    ((1, 1, 2, 2), (1, 1), (1, 1), (2**40, 2**40), (1, 1)),                    # output numel past int64
])
def test_unfold_size_overflow_is_refused(x_shape, kernel, dilation, padding, stride):
    _assert_refused(f"""
        x = torch.zeros({x_shape}, dtype=torch.int32)
        torch.ops.xma2_ops.xbar_unfold_codes(x, {kernel}, {dilation}, {padding}, {stride})
        """, "xbar_unfold_codes")


def test_tile_sums_output_size_overflow_is_refused():
    # [Tr, M, N] with M * N past int64, from stride-0 (expanded) codes: refused before any work.
    _assert_refused("""
        args = (16, 4, 4, False, 1, 5, 2, 7, 48)
        x = torch.zeros(1, 1, dtype=torch.int32).expand(2**40, 1)
        w = torch.zeros(1, 1, dtype=torch.int32).expand(1, 2**40)
        torch.ops.xma2_ops.xbar_tile_sums(x, w, *args)
        """, "xbar")
