"""Random cases for the raw C++ CPU ops against the reference (xma2_ops.backends.reference.tile_sums), on every
instruction set this CPU runs, plus random bad inputs that must be refused with a RuntimeError.

The number of random cases is XMA2_FUZZ_CASES (default 24); scripts/check_sanitizers.sh runs a few
hundred of them under AddressSanitizer and UndefinedBehaviorSanitizer.  Every case is seeded by its
index, so a failure names a reproducible case."""
from __future__ import annotations

import os
import random

import pytest
import torch

from xma2_ops.backends import reference as ref
from xma2_ops.backends import available_backends
from xma2_ops.config import MAX_ADC_CLIP, GemmParams

from helpers import cpu_isas, ordered_mvm as _ordered_mvm

pytestmark = pytest.mark.skipif("cpu" not in available_backends(), reason="C++ extension not built")

N_CASES = int(os.environ.get("XMA2_FUZZ_CASES", "24"))
OPS = torch.ops.xma2_ops


ISAS = cpu_isas()


def _random_params(rnd: random.Random) -> GemmParams:
    signed = rnd.random() < 0.5
    rows = rnd.choice([1, 2, 7, 31, 32, 33, 63, 64, 65, 100, 128, 129, 200])
    db = rnd.choice([1, 1, 2, 3, 4, 8])
    cb = rnd.choice([1, 2, 2, 3, 4, 7, 8])
    ib = rnd.randint(2 if signed else 1, 16 if rnd.random() < 0.1 else 8)
    wb = rnd.randint(2, 16 if rnd.random() < 0.1 else 8)
    pmax = rows * (2 ** db - 1) * (2 ** cb - 1)
    kind = rnd.random()
    if kind < 0.2:
        levels, clip = 0, pmax  # ideal ADC
    elif kind < 0.35:
        clip = rnd.randint(pmax, min(pmax + 100, (1 << 24) - 1))
        levels = clip  # lossless: one level per partial sum
    elif kind < 0.45:
        clip = rnd.choice([MAX_ADC_CLIP, rnd.randint(pmax, MAX_ADC_CLIP)])
        levels = rnd.randint(1, min(clip, (1 << 24) - 1))  # coarse, never saturating
    else:
        clip = rnd.randint(1, 2 * pmax)
        levels = min(2 ** rnd.randint(1, 12) - 1, clip)
    return GemmParams(rows, rnd.randint(1, 40), ib, signed, db, wb, cb, levels, clip)


def _random_codes(rnd: random.Random, gen: torch.Generator, p: GemmParams, m: int, k: int, n: int):
    qx, qw = 2 ** p.x_bits - 1, 2 ** (p.weight_bits - 1) - 1
    x = torch.randint(-qx if p.input_signed else 0, qx + 1, (m, k), generator=gen, dtype=torch.int64)
    if rnd.random() < 0.3:  # extremes, so that partial sums reach Pmax and the ADC saturates
        x = torch.where(torch.rand(m, k, generator=gen) < 0.5, torch.full_like(x, qx), x)
    x = x * (torch.rand(m, k, generator=gen) < rnd.choice([0.1, 0.7, 1.0]))
    dtypes = [torch.int32] + ([torch.int16] if p.x_bits <= 15 else [])
    if not p.input_signed and p.x_bits <= 8:
        dtypes.append(torch.uint8)
    if p.input_signed and p.x_bits <= 7:
        dtypes.append(torch.int8)
    x = x.to(rnd.choice(dtypes))
    w = torch.randint(-qw, qw + 1, (k, n), generator=gen, dtype=torch.int32)
    if rnd.random() < 0.2:
        x = x.t().contiguous().t()  # column-major codes
    if rnd.random() < 0.2:
        w = w.t().contiguous().t()
    return x, w


@pytest.mark.parametrize("case", range(N_CASES))
def test_random_case_matches_reference(case, monkeypatch):
    rnd = random.Random(case)
    gen = torch.Generator().manual_seed(case)
    p = _random_params(rnd)
    big = rnd.random() < 0.1
    m = rnd.randint(129, 300) if big else rnd.choice([0, 1, 2, 5, 17, 40])
    k = rnd.choice([0, 1, rnd.randint(1, 3 * p.rows + 5)]) if rnd.random() < 0.1 else rnd.randint(1, 3 * p.rows + 5)
    n = rnd.choice([0, 1, 3, 8, 9, 16, 17, 33])
    x, wb = _random_codes(rnd, gen, p, m, k, n)
    _, wt = _random_codes(rnd, gen, p, 1, k, n)
    tr = -(-k // p.rows)
    dtype = rnd.choice([torch.float32, torch.float64])
    cb = torch.randn(tr, n, generator=gen, dtype=dtype)
    ct = torch.randn(tr, n, generator=gen, dtype=dtype)
    if tr and n:
        cb[rnd.randrange(tr)] = 0  # whole tile rows and single PEs skipped
        ct[:, rnd.randrange(n)] = 0
    with_task = rnd.random() < 0.6
    t_ref = ref.tile_sums(x, wb, p)
    y_ref = _ordered_mvm(x, wb, wt if with_task else None, cb, ct if with_task else None, p)
    gy = torch.randn(m, n, generator=gen, dtype=torch.float64)
    g_ref = torch.einsum("rmn,mn->rn", t_ref.double(), gy)
    for isa in ISAS:
        monkeypatch.setenv("XMA2_CPU_ISA", isa)
        t = OPS.xbar_tile_sums(x, wb, *p.as_args())
        assert t.dtype == torch.int64 and torch.equal(t, t_ref), (isa, p)
        y = OPS.xbar_mvm(x, wb, wt if with_task else None, cb, ct if with_task else None, *p.as_args())
        assert y.dtype == dtype and torch.equal(y, y_ref), (isa, p)
        g = OPS.xbar_coef_grad(x, wb, gy, *p.as_args())
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-9)


def _bad_calls(rnd: random.Random, p: GemmParams):
    """(description, call) pairs that must raise RuntimeError."""
    m, k, n = rnd.randint(1, 9), rnd.randint(1, 70), rnd.randint(1, 9)
    qx, qw = 2 ** p.x_bits - 1, 2 ** (p.weight_bits - 1) - 1
    x = torch.zeros(m, k, dtype=torch.int32)
    w = torch.zeros(k, n, dtype=torch.int32)
    tr = -(-k // p.rows)
    cb = torch.zeros(tr, n, dtype=torch.float64)
    args = p.as_args()
    bad_args = []
    for i, lim in [(0, 1 << 16), (1, 1 << 16), (2, 17), (4, 8), (5, 16), (6, 8), (7, (1 << 24) - 1), (8, MAX_ADC_CLIP)]:
        a = list(args)
        a[i] = rnd.choice([lim + 1, -1 if i != 7 else -5, 2 ** 32 + a[i], 2 ** 63 - 1, -(2 ** 63)])
        bad_args.append(tuple(a))
    a = list(args)
    a[7], a[8] = a[8] + 1, a[8]  # more levels than clip
    bad_args.append(tuple(a))
    calls = [("args", lambda a=a: OPS.xbar_tile_sums(x, w, *a)) for a in bad_args]
    calls += [("mvm args", lambda a=a: OPS.xbar_mvm(x, w, None, cb, None, *a)) for a in bad_args[:3]]
    calls += [
        ("x too large", lambda: OPS.xbar_tile_sums(torch.full((m, k), qx + 1, dtype=torch.int32), w, *args)),
        ("x too small", lambda: OPS.xbar_tile_sums(torch.full((m, k), -qx - 1, dtype=torch.int32), w, *args)),
        ("w too large", lambda: OPS.xbar_tile_sums(x, torch.full((k, n), qw + 1, dtype=torch.int32), *args)),
        ("wt too large", lambda: OPS.xbar_mvm(x, w, torch.full((k, n), -qw - 1, dtype=torch.int32), cb, cb, *args)),
        ("x int64", lambda: OPS.xbar_tile_sums(x.long(), w, *args)),
        ("x float", lambda: OPS.xbar_tile_sums(x.float(), w, *args)),
        ("w int16", lambda: OPS.xbar_tile_sums(x, w.short(), *args)),
        ("K mismatch", lambda: OPS.xbar_tile_sums(x, torch.zeros(k + 1, n, dtype=torch.int32), *args)),
        ("x 1-D", lambda: OPS.xbar_tile_sums(x[0], w, *args)),
        ("x 3-D", lambda: OPS.xbar_tile_sums(x[None], w, *args)),
        ("coef shape", lambda: OPS.xbar_mvm(x, w, None, torch.zeros(tr + 1, n, dtype=torch.float64), None, *args)),
        ("coef dtype", lambda: OPS.xbar_mvm(x, w, None, cb.half(), None, *args)),
        ("coef int", lambda: OPS.xbar_mvm(x, w, None, cb.long(), None, *args)),
        ("wt without coef_t", lambda: OPS.xbar_mvm(x, w, w, cb, None, *args)),
        ("coef_t without wt", lambda: OPS.xbar_mvm(x, w, None, cb, cb, *args)),
        ("wt shape", lambda: OPS.xbar_mvm(x, w, w[:, :-1] if n > 1 else w[:0], cb, cb, *args)),
        ("coef_t dtype", lambda: OPS.xbar_mvm(x, w, w, cb, cb.float(), *args)),
        ("gy shape", lambda: OPS.xbar_coef_grad(x, w, torch.zeros(m + 1, n, dtype=torch.float64), *args)),
        ("gy int", lambda: OPS.xbar_coef_grad(x, w, torch.zeros(m, n, dtype=torch.int64), *args)),
        ("unfold 3-D", lambda: OPS.xbar_unfold_codes(torch.zeros(1, 2, 3, dtype=torch.int32), [1, 1], [1, 1],
                                                      [0, 0], [1, 1])),
        ("unfold float", lambda: OPS.xbar_unfold_codes(torch.zeros(1, 1, 3, 3), [1, 1], [1, 1], [0, 0], [1, 1])),
        ("unfold kernel too big", lambda: OPS.xbar_unfold_codes(torch.zeros(1, 1, 3, 3, dtype=torch.int8), [4, 1],
                                                                 [1, 1], [0, 0], [1, 1])),
        ("unfold stride 0", lambda: OPS.xbar_unfold_codes(torch.zeros(1, 1, 3, 3, dtype=torch.int8), [1, 1],
                                                           [1, 1], [0, 0], [0, 1])),
        ("unfold padding < 0", lambda: OPS.xbar_unfold_codes(torch.zeros(1, 1, 3, 3, dtype=torch.int8), [1, 1],
                                                              [1, 1], [-1, 0], [1, 1])),
        ("unfold huge padding", lambda: OPS.xbar_unfold_codes(torch.zeros(1, 1, 2, 1, dtype=torch.int8), [1, 1],
                                                               [1, 1], [2**31 + 32767, 2**31 - 32768], [1, 1])),
        ("unfold huge dilation", lambda: OPS.xbar_unfold_codes(torch.zeros(1, 1, 2, 2, dtype=torch.int8),
                                                                [2**33, 1], [2**31, 1], [0, 0], [1, 1])),
    ]
    return calls


@pytest.mark.parametrize("case", range(max(1, N_CASES // 4)))
def test_random_bad_inputs_are_refused(case, monkeypatch):
    rnd = random.Random(10_000 + case)
    p = _random_params(rnd)
    for isa in ISAS:
        monkeypatch.setenv("XMA2_CPU_ISA", isa)
        for what, call in _bad_calls(rnd, p):
            with pytest.raises(RuntimeError):
                call()
                pytest.fail(f"accepted: {what} ({isa}, {p})")


@pytest.mark.parametrize("case", range(max(1, N_CASES // 4)))
def test_random_unfold_matches_f_unfold(case):
    rnd = random.Random(20_000 + case)
    gen = torch.Generator().manual_seed(20_000 + case)
    b, c, h, w = rnd.randint(1, 3), rnd.randint(1, 4), rnd.randint(1, 12), rnd.randint(1, 12)
    kernel = (rnd.randint(1, 4), rnd.randint(1, 4))
    dilation = (rnd.randint(1, 3), rnd.randint(1, 3))
    padding = (rnd.randint(0, 3), rnd.randint(0, 3))
    stride = (rnd.randint(1, 3), rnd.randint(1, 3))
    dtype = rnd.choice([torch.uint8, torch.int8, torch.int16, torch.int32])
    x = torch.randint(0, 100, (b, c, h, w), generator=gen).to(dtype)
    fits = all(h_ + 2 * p_ >= d_ * (k_ - 1) + 1 for h_, p_, d_, k_ in zip((h, w), padding, dilation, kernel))
    if not fits:
        with pytest.raises(RuntimeError, match="xbar_unfold_codes"):
            OPS.xbar_unfold_codes(x, kernel, dilation, padding, stride)
        return
    got = OPS.xbar_unfold_codes(x, kernel, dilation, padding, stride)
    cols = torch.nn.functional.unfold(x.double(), kernel, dilation=dilation, padding=padding, stride=stride)
    assert got.dtype == dtype
    assert torch.equal(got, cols.transpose(1, 2).reshape(-1, cols.shape[1]).to(dtype))
