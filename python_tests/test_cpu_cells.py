"""The C++ device-model ops of the cpu backend (csrc/cpu/cells.cpp, docs/SPEC.md 7.2):
xbar_cell_tile_sums bit for bit against backends.reference.cell_tile_sums on every path (the AVX2 int16
kernel, the generic ATen-GEMM one forced by XMA2_CPU_ISA=scalar, the ideal-ADC GEMM), xbar_cell_mvm
against a float64 combination of reference tile sums in the same order, xbar_cell_coef_grad against
einsum, opcheck, bad arguments, and a whole conv through backend="cpu" vs "reference"."""
from __future__ import annotations

import dataclasses
import random
import subprocess
import sys
import textwrap

import pytest
import torch

import xma2_ops
from xma2_ops import DeviceModel, XbarConfig
from xma2_ops.backends import reference as ref
from xma2_ops.config import GemmParams, row_tile_sizes
from xma2_ops.device import program_cells

from helpers import cpu_isas, ordered_coef_grad, random_conv_case

pytestmark = pytest.mark.skipif(not hasattr(torch.ops.xma2_ops, "xbar_cell_tile_sums")
                                or not torch._C._dispatch_has_kernel_for_dispatch_key(
                                    "xma2_ops::xbar_cell_tile_sums", "CPU"),
                                reason="C++ device-model ops not built")

OPS = torch.ops.xma2_ops
ALL_ON = DeviceModel(on_off=8.0, sigma_abs=0.03, sigma_rel=0.05, saf_low=0.03, saf_high=0.03, nu_mean=0.02,
                     nu_std=0.01, read_time=3600.0, sigma_read=0.02, seed=7, frac_bits=8)
X_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32)


@dataclasses.dataclass
class Case:
    p: GemmParams
    x: torch.Tensor
    g: torch.Tensor
    f: int


def _x_codes(gen, m, k, p: GemmParams, rng: random.Random) -> torch.Tensor:
    q = 2 ** p.x_bits - 1
    x = torch.randint(-q if p.input_signed else 0, q + 1, (m, k), generator=gen, dtype=torch.int32)
    if rng.random() < 0.3:  # sparse, like post-ReLU activations
        x = x * (torch.rand(m, k, generator=gen) < 0.4)
    fits = [d for d in X_DTYPES if torch.iinfo(d).min <= int(x.min() if x.numel() else 0)
            and int(x.max() if x.numel() else 0) <= torch.iinfo(d).max]
    return x.to(rng.choice(fits))


def random_case(seed: int) -> Case:
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    rows = rng.choice([1, 2, 5, 16, 33, 64, 70, 128, 131, 200])
    cb, db = rng.choice([1, 2, 3, 4, 8]), rng.choice([1, 2, 3, 4, 8])
    signed = rng.random() < 0.5
    ib, wb = rng.randint(2, 9), rng.randint(2, 9)
    pmax = rows * (2 ** db - 1) * (2 ** cb - 1)
    adc_bits = rng.choice([None, 1, 2, 3, 5, 8, 10, 12])
    clip = rng.choice([pmax, max(1, pmax // 3), max(1, pmax - 1), pmax + 1, pmax * 2])
    levels = 0 if adc_bits is None else min(2 ** adc_bits - 1, clip)
    p = GemmParams(rows, rng.randint(1, 8), ib, signed, db, wb, cb, levels, clip)
    k = rng.choice([1, rows - 1 if rows > 1 else 1, rows, rows + 1, rng.randint(1, 3 * rows + 7)])
    return _programmed_case(p, k, seed, rng, gen)


def _programmed_case(p: GemmParams, k: int, seed: int, rng: random.Random, gen: torch.Generator) -> Case:
    """Random codes [m, k] and the cells of random weights [k, n] programmed on ALL_ON (random frac bits,
    programming round, cycles and read)."""
    n, m, f = rng.randint(1, 40), rng.randint(1, 23), rng.randint(0, 12)
    qw = 2 ** (p.weight_bits - 1) - 1
    w = torch.randint(-qw, qw + 1, (k, n), generator=gen, dtype=torch.int32)
    dev = dataclasses.replace(ALL_ON, seed=seed, frac_bits=f)
    g = program_cells(w, p.weight_bits, p.cell_bits, dev, rng.randint(0, 3), rng.randint(0, 2)).read(rng.randint(0, 3))
    return Case(p, _x_codes(gen, m, k, p, rng), g, f)


def _fast_eligible(c: Case) -> bool:
    """The conditions under which cells.cpp runs its AVX2 int16 kernel (bar the float-ADC check): a lossy ADC,
    int16 conductances, int32 sums, and for each tile size's ADC the reachable inputs u = clamp(V, -cap, cap) +
    offset in the checked range."""
    p = c.p.kernel_form() or c.p
    if p.adc_levels == 0:
        return False
    gmax = int(c.g.max())
    pb = p.rows * (2 ** p.dac_bits - 1) * gmax
    shifts = sum(2 ** (i * p.dac_bits + j * p.cell_bits) for i in range(p.chunks) for j in range(c.g.shape[1]))
    ok = gmax < 2 ** 15 and pb < 2 ** 31 and 2 * p.adc_levels * shifts < 2 ** 31
    sizes = p.tile_rows(c.x.shape[1]) or [p.rows]
    for rows in {sizes[0], sizes[-1]}:
        clip_f = p.tile_adc(rows)[1] << c.f
        cap = min(pb, clip_f)
        u_lo, u_hi = (clip_f - cap, clip_f + cap) if p.adc_signed else (0, cap)
        ok = ok and u_hi < 2 ** 31 and u_hi - u_lo <= 2 ** 22
    return ok


def _tile_sums(c: Case) -> torch.Tensor:
    return OPS.xbar_cell_tile_sums(c.x, c.g, *c.p.as_args(), c.f)


# ------------------------------------------------------------------ bit for bit
CASE_SEEDS = range(120)


def test_random_cases_cover_every_path():
    cases = [random_case(s) for s in CASE_SEEDS]
    fast = sum(_fast_eligible(c) for c in cases)
    ideal = sum(c.p.adc_levels == 0 for c in cases)
    assert fast >= 40 and ideal >= 10 and len(cases) - fast - ideal >= 10, (fast, ideal)
    # the fast path's last panel of 16 columns runs the 8-column kernel when N mod 16 is 1 ... 8
    tails = [c.g.shape[-1] % 16 for c in cases if _fast_eligible(c)]
    assert sum(1 <= t <= 8 for t in tails) >= 10 and sum(t == 0 or t > 8 for t in tails) >= 10, tails
    # its input packing has a vector form for unsigned inputs of at most 8 bits, a scalar one for the rest
    unsigned = [not c.p.input_signed and c.p.input_bits <= 8 for c in cases if _fast_eligible(c)]
    assert sum(unsigned) >= 10 and len(unsigned) - sum(unsigned) >= 10, unsigned


@pytest.mark.parametrize("seed", CASE_SEEDS)
def test_cell_tile_sums_bit_exact(seed):
    c = random_case(seed)
    want = ref.cell_tile_sums(c.x, c.g, c.p, c.f)
    got = _tile_sums(c)
    assert got.dtype == torch.int64 and got.shape == want.shape
    assert torch.equal(got, want)


@pytest.mark.parametrize("seed", range(0, 120, 4))
def test_cell_tile_sums_generic_path_bit_exact(seed, monkeypatch):
    """XMA2_CPU_ISA=scalar forces the generic path (ATen GEMMs, integer ADC)."""
    c = random_case(seed)
    monkeypatch.setenv("XMA2_CPU_ISA", "scalar")
    assert torch.equal(_tile_sums(c), ref.cell_tile_sums(c.x, c.g, c.p, c.f))


def _extreme_cases():
    """Hand-made conductances at the edges of the paths: int16 (2^15 - 1 / 2^15), P_F at 2^24 and
    2^31, the largest int32, all zero, and ADC ranges past the value-by-value check."""
    out = []
    gen = torch.Generator().manual_seed(99)
    for rows, db, cb, gval, adc, clip_mul, f, signed in [
        (16, 1, 2, 2 ** 15 - 1, 8, 1, 8, False),   # fast, largest int16 conductance
        (16, 1, 2, 2 ** 15, 8, 1, 8, True),        # one past: generic
        (64, 8, 2, 2 ** 15 - 1, 4, 1, 12, False),  # P_F near 2^29
        (2, 8, 8, 2 ** 22, 6, 1, 12, True),        # P_F past 2^24 (float64 GEMM)
        (1, 1, 1, 2 ** 31 - 1, 3, 1, 0, False),    # largest int32 conductance
        (200, 8, 2, 2 ** 31 - 1, 0, 1, 16, True),  # ideal ADC, tile sums past 2^53 (int64 GEMM)
        (7, 3, 3, 0, 5, 1, 4, True),               # all zero
        (128, 8, 4, 5000, 12, 2, 12, False),       # clip 2^F past the checked float-ADC range
        (33, 2, 3, 3000, 1, 3, 10, True),          # 1-bit ADC, clip above Pmax
        (5, 4, 1, 700, 12, 1, 9, False),           # ADC with more levels than needed
    ]:
        wb, ib = (16, 8) if adc == 0 else (9, 8)
        s = -(-(wb - 1) // cb)
        k, n, m = 2 * rows + 3, 19, 13
        pmax = rows * (2 ** db - 1) * (2 ** cb - 1)
        clip = pmax * clip_mul
        levels = 0 if adc == 0 else min(2 ** adc - 1, clip)
        p = GemmParams(rows, 4, ib, signed, db, wb, cb, levels, clip)
        g = torch.randint(0, gval + 1, (2, s, k, n), generator=gen, dtype=torch.int64)
        g[..., 0] = gval  # a full column: the largest partial sums
        q = 2 ** p.x_bits - 1
        x = torch.randint(-q if signed else 0, q + 1, (m, k), generator=gen, dtype=torch.int32)
        x[0] = q  # a full row
        out.append(Case(p, x, g.to(torch.int32), f))
    return out


@pytest.mark.parametrize("idx", range(10))
@pytest.mark.parametrize("isa", ["auto", "scalar"])
def test_extreme_conductances_bit_exact(idx, isa, monkeypatch):
    monkeypatch.setenv("XMA2_CPU_ISA", isa)
    c = _extreme_cases()[idx]
    want = ref.cell_tile_sums(c.x, c.g, c.p, c.f)
    if c.p.rows * (2 ** c.p.dac_bits - 1) * int(c.g.max()) >= 2 ** 53:
        # the reference's float64 matmul is not exact there: compare with an int64 product
        want = _int64_cell_tile_sums(c)
    assert torch.equal(_tile_sums(c), want)


def _int64_cell_tile_sums(c: Case) -> torch.Tensor:
    """SPEC 7.2 for the ideal ADC in plain int64 (T = x . sum_j 2^(j cb) (g+ - g-) per tile)."""
    g = c.g.to(torch.int64)
    shifts = torch.tensor([2 ** (j * c.p.cell_bits) for j in range(g.shape[1])], dtype=torch.int64)
    w = torch.einsum("j,jkn->kn", shifts, g[0] - g[1])
    x = c.x.to(torch.int64)
    k = x.shape[1]
    tiles = [x[:, k0:k0 + c.p.rows] @ w[k0:k0 + c.p.rows] for k0 in range(0, k, c.p.rows)]
    assert c.p.adc_levels == 0
    return torch.stack(tiles)


def test_ideal_cells_equal_integer_tile_sums():
    """Gq = L 2^F (no non-ideality) gives the codes of SPEC 3 exactly (ideal ADC: times 2^F)."""
    from xma2_ops.device import cell_levels
    for seed in range(8):
        c = random_case(300 + seed)
        qw = 2 ** (c.p.weight_bits - 1) - 1
        w = torch.randint(-qw, qw + 1, (c.x.shape[1], c.g.shape[3]), generator=torch.Generator().manual_seed(seed),
                          dtype=torch.int32)
        g = (cell_levels(w, c.p.weight_bits, c.p.cell_bits) << c.f).to(torch.int32)
        want = ref.tile_sums(c.x, w, c.p) * (2 ** c.f if c.p.adc_levels == 0 else 1)
        assert torch.equal(OPS.xbar_cell_tile_sums(c.x, g, *c.p.as_args(), c.f), want)


# ------------------------------------------------------------------ mvm and the coefficient gradient
def _coefs(gen, tr, n, dtype, zero_frac):
    c = torch.randn(tr, n, generator=gen, dtype=dtype)
    return c * (torch.rand(tr, n, generator=gen) >= zero_frac)


@pytest.mark.parametrize("seed", range(24))
def test_cell_mvm_equals_float64_combination(seed):
    c = random_case(500 + seed)
    gen = torch.Generator().manual_seed(seed)
    dtype = (torch.float32, torch.float64)[seed % 2]
    tr, n = -(-c.x.shape[1] // c.p.rows), c.g.shape[3]
    with_task = seed % 3 != 0
    gt = program_cells(torch.randint(-3, 4, (c.x.shape[1], n), generator=gen, dtype=torch.int32),
                       c.p.weight_bits, c.p.cell_bits, dataclasses.replace(ALL_ON, frac_bits=c.f), 1, 1).read(0)
    cb = _coefs(gen, tr, n, dtype, 0.3 if seed % 4 else 1.0)  # some rows with every coefficient zero
    ct = _coefs(gen, tr, n, dtype, 0.5) if with_task else None
    y = OPS.xbar_cell_mvm(c.x, c.g, gt if with_task else None, cb, ct, *c.p.as_args(), c.f)
    tb = ref.cell_tile_sums(c.x, c.g, c.p, c.f).double()
    tt = ref.cell_tile_sums(c.x, gt, c.p, c.f).double() if with_task else None
    acc = torch.zeros(c.x.shape[0], n, dtype=torch.float64)
    for r in range(tr):  # row tile outer, then base, then task (the op's documented order)
        acc += cb[r].double() * tb[r]
        if with_task:
            acc += ct[r].double() * tt[r]
    assert y.dtype == dtype
    assert torch.equal(y, acc.to(dtype))


def test_cell_mvm_skips_all_zero_coefficients():
    """Zero coefficients give exactly zero outputs (the skipped PEs cannot matter)."""
    c = random_case(7)
    tr, n = -(-c.x.shape[1] // c.p.rows), c.g.shape[3]
    y = OPS.xbar_cell_mvm(c.x, c.g, None, torch.zeros(tr, n, dtype=torch.float64), None, *c.p.as_args(), c.f)
    assert torch.equal(y, torch.zeros_like(y))


@pytest.mark.parametrize("seed", range(16))
def test_cell_coef_grad_equals_einsum(seed):
    c = random_case(700 + seed)
    gy = torch.randn(c.x.shape[0], c.g.shape[3], generator=torch.Generator().manual_seed(seed),
                     dtype=(torch.float32, torch.float64)[seed % 2])
    got = OPS.xbar_cell_coef_grad(c.x, c.g, gy, *c.p.as_args(), c.f)
    want = torch.einsum("rmn,mn->rn", ref.cell_tile_sums(c.x, c.g, c.p, c.f).double(), gy.double())
    assert got.dtype == torch.float64 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("seed", range(0, 120, 5))
def test_cell_coef_grad_is_one_ordered_sum(seed, monkeypatch):
    """xbar_cell_coef_grad on every path (ideal ADC, the AVX2 kernel, the generic one forced by
    XMA2_CPU_ISA=scalar), with 1 and 2 threads and repeated: the bits of helpers.ordered_coef_grad."""
    c = random_case(seed)
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    m = rng.choice([129, 256, rng.randint(300, 600)])
    x = _x_codes(gen, m, c.x.shape[1], c.p, rng)
    gy = torch.randn(m, c.g.shape[3], generator=gen, dtype=torch.float64)
    want = ordered_coef_grad(ref.cell_tile_sums(x, c.g, c.p, c.f), gy)
    threads = torch.get_num_threads()
    try:
        for isa in ("auto", "scalar"):
            monkeypatch.setenv("XMA2_CPU_ISA", isa)
            for t in (1, 2, 2, 1):
                torch.set_num_threads(t)
                got = OPS.xbar_cell_coef_grad(x, c.g, gy, *c.p.as_args(), c.f)
                assert torch.equal(got, want), (seed, isa, t, c.p, (got - want).abs().max())
    finally:
        torch.set_num_threads(threads)


def test_large_rows_blocks_and_threads():
    """More rows than one work item, on every thread count (the per-worker accumulators)."""
    p = GemmParams(128, 128, 8, False, 1, 8, 2, 255, 384)
    gen = torch.Generator().manual_seed(3)
    w = torch.randint(-127, 128, (300, 40), generator=gen, dtype=torch.int32)
    g = program_cells(w, 8, 2, DeviceModel.preset("typical"), 0, 0).read(0)
    x = torch.randint(0, 256, (1000, 300), generator=gen, dtype=torch.int32).to(torch.uint8)
    want = ref.cell_tile_sums(x, g, p, 8)
    cb = torch.randn(3, 40, generator=gen, dtype=torch.float64)
    gy = torch.randn(1000, 40, generator=gen, dtype=torch.float64)
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            assert torch.equal(OPS.xbar_cell_tile_sums(x, g, *p.as_args(), 8), want)
            y = OPS.xbar_cell_mvm(x, g, None, cb, None, *p.as_args(), 8)
            assert torch.equal(y, _combine(cb, want))
            torch.testing.assert_close(OPS.xbar_cell_coef_grad(x, g, gy, *p.as_args(), 8),
                                       torch.einsum("rmn,mn->rn", want.double(), gy), rtol=1e-12, atol=1e-9)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("adc_bits,isa", [(8, "auto"), (8, "scalar"), (None, "auto")])
def test_very_long_rows(adc_bits, isa, monkeypatch):
    """40000-row crossbars: fewer input rows per work item (the per-thread buffers stay small),
    on the fast (int16), generic and ideal-ADC paths."""
    monkeypatch.setenv("XMA2_CPU_ISA", isa)
    gen = torch.Generator().manual_seed(8)
    rows, k, n, m = 40000, 45000, 3, 60
    pmax = rows * 3
    p = GemmParams(rows, 2, 8, False, 1, 9, 2, 0 if adc_bits is None else 255, pmax // 3)
    w = torch.randint(-255, 256, (k, n), generator=gen, dtype=torch.int32)
    g = program_cells(w, 9, 2, dataclasses.replace(ALL_ON, frac_bits=4), 0, 0).read(0)
    x = torch.randint(0, 256, (m, k), generator=gen, dtype=torch.int32).to(torch.uint8)
    want = ref.cell_tile_sums(x, g, p, 4)
    assert torch.equal(OPS.xbar_cell_tile_sums(x, g, *p.as_args(), 4), want)
    cb = torch.randn(2, n, generator=gen, dtype=torch.float64)
    assert torch.equal(OPS.xbar_cell_mvm(x, g, None, cb, None, *p.as_args(), 4), _combine(cb, want))


def _combine(coef, t):
    acc = torch.zeros(t.shape[1:], dtype=torch.float64)
    for r in range(t.shape[0]):
        acc += coef[r].double() * t[r].double()
    return acc


def test_empty_shapes():
    p = GemmParams(8, 4, 4, True, 1, 5, 2, 7, 24)
    for m, k, n in [(0, 5, 3), (4, 0, 3), (4, 5, 0)]:
        x, g = torch.zeros(m, k, dtype=torch.int32), torch.zeros(2, 2, k, n, dtype=torch.int32)
        assert torch.equal(OPS.xbar_cell_tile_sums(x, g, *p.as_args(), 4), ref.cell_tile_sums(x, g, p, 4))
        tr = -(-k // 8)
        y = OPS.xbar_cell_mvm(x, g, None, torch.ones(tr, n, dtype=torch.float64), None, *p.as_args(), 4)
        assert y.shape == (m, n) and torch.equal(y, torch.zeros(m, n, dtype=torch.float64))
        gr = OPS.xbar_cell_coef_grad(x, g, torch.ones(m, n), *p.as_args(), 4)
        assert gr.shape == (tr, n) and torch.equal(gr, torch.zeros(tr, n, dtype=torch.float64))


# ------------------------------------------------------------------ opcheck
P_OP = GemmParams(16, 4, 5, True, 2, 6, 2, 7, 40)


def _op_args(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-15, 16, (6, 37), generator=gen, dtype=torch.int32).to(torch.int8)
    g = program_cells(torch.randint(-31, 32, (37, 5), generator=gen, dtype=torch.int32), 6, 2,
                      dataclasses.replace(ALL_ON, frac_bits=6), 0, 0).read(0)
    return x, g, gen


def test_opcheck_cell_tile_sums():
    x, g, _ = _op_args()
    torch.library.opcheck(OPS.xbar_cell_tile_sums.default, (x, g, *P_OP.as_args(), 6))


@pytest.mark.parametrize("with_task", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_cell_mvm(with_task, dtype):
    x, g, gen = _op_args(1)
    gt = torch.flip(g, (2,)).contiguous()
    cb = torch.randn(3, 5, generator=gen, dtype=dtype)
    ct = torch.randn(3, 5, generator=gen, dtype=dtype) if with_task else None
    torch.library.opcheck(OPS.xbar_cell_mvm.default, (x, g, gt if with_task else None, cb, ct, *P_OP.as_args(), 6))


def test_opcheck_cell_coef_grad():
    x, g, gen = _op_args(2)
    gy = torch.randn(6, 5, generator=gen, dtype=torch.float32)
    torch.library.opcheck(OPS.xbar_cell_coef_grad.default, (x, g, gy, *P_OP.as_args(), 6))


def test_opcheck_cell_ops_with_a_periphery():
    """The periphery argument (differential sensing, sign-magnitude inputs, even split) through opcheck."""
    x, g, gen = _op_args(5)
    args = (*dataclasses.replace(P_OP, adc_levels=6).as_args(), 6, 1 | 4 | 16)
    cb = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    torch.library.opcheck(OPS.xbar_cell_tile_sums.default, (x, g, *args))
    torch.library.opcheck(OPS.xbar_cell_mvm.default, (x, g, None, cb, None, *args))
    torch.library.opcheck(OPS.xbar_cell_coef_grad.default, (x, g, torch.randn(6, 5, generator=gen), *args))


# ------------------------------------------------------------------ bad arguments
def _bad_calls():
    x, g, _ = _op_args(3)
    a = list(P_OP.as_args())
    cb = torch.ones(3, 5, dtype=torch.float64)
    ts, mvm, cg = OPS.xbar_cell_tile_sums, OPS.xbar_cell_mvm, OPS.xbar_cell_coef_grad

    def with_arg(i, v):
        b = list(a)
        b[i] = v
        return b

    return [
        (lambda: ts(x, g[0], *a, 6), r"g must be \[2, S, K, N\]"),
        (lambda: ts(x, g.to(torch.int64), *a, 6), "g must be int32"),
        (lambda: ts(x, g[:, :, :30], *a, 6), "K=37 but g has K=30"),
        (lambda: ts(x, g[:, :2].contiguous(), *a, 6), "S = ceil"),
        (lambda: ts(x, -g, *a, 6), r"g must hold conductances >= 0"),
        (lambda: ts(x.float(), g, *a, 6), "x_codes must be int32, int16, int8 or uint8"),
        (lambda: ts(x + 40, g, *a, 6), "x_codes must hold codes"),
        (lambda: ts(x, g, *a, 17), "frac_bits"),
        (lambda: ts(x, g, *a, -1), "frac_bits"),
        (lambda: ts(x, g, *with_arg(0, 0), 6), "rows"),
        (lambda: ts(x, g, *with_arg(4, 9), 6), "dac_bits"),
        (lambda: ts(x, g, *with_arg(6, 0), 6), "cell_bits"),
        (lambda: ts(x, g, *with_arg(8, 0), 6), "adc_clip"),
        (lambda: ts(x, g, *with_arg(7, 50), 6), "adc_levels"),
        (lambda: mvm(x, g, None, cb[:2], None, *a, 6), r"coef_b must be \[Tr, N\]"),
        (lambda: mvm(x, g, None, cb.long(), None, *a, 6), "coef_b must be float32 or float64"),
        (lambda: mvm(x, g, g, cb, None, *a, 6), "gt and coef_t must be given together"),
        (lambda: mvm(x, g, g[:, :, :, :4], cb, cb, *a, 6), "gt must be int32 of shape"),
        (lambda: mvm(x, g, g, cb, cb.float(), *a, 6), "coef_t must match coef_b"),
        (lambda: mvm(x, -g, None, cb, None, *a, 6), "gb must hold conductances"),
        (lambda: mvm(x, g, -g, cb, cb, *a, 6), "gt must hold conductances"),
        (lambda: cg(x, g, torch.ones(5, 5), *a, 6), r"gy must be \[M, N\]"),
        (lambda: cg(x, g, torch.ones(6, 5, dtype=torch.int32), *a, 6), "gy must be floating point"),
    ]


@pytest.mark.parametrize("idx", range(23))
def test_bad_arguments_name_the_argument(idx):
    fn, pattern = _bad_calls()[idx]
    with pytest.raises(RuntimeError, match=pattern):
        fn()


def test_overflowing_configs_refused_in_a_subprocess():
    """Conductances whose partial sums or tile sums could overflow int64 are refused (a crash, or a
    silently wrapped result, would fail the child)."""
    prog = textwrap.dedent("""
        import torch, xma2_ops
        from xma2_ops.config import GemmParams, row_tile_sizes
        ops = torch.ops.xma2_ops
        x = torch.full((2, 70000), 255, dtype=torch.int32)
        g = torch.full((2, 2, 70000, 1), 2 ** 31 - 1, dtype=torch.int32)
        for name, p, f in [
            ("adc", GemmParams(65536, 1, 8, False, 8, 16, 8, 2 ** 24 - 1, 2 ** 32), 16),
            ("signed adc", GemmParams(65536, 1, 8, False, 8, 16, 8, 2 ** 24 - 2, 2 ** 32, 1), 16),
            ("tile", GemmParams(65536, 1, 16, False, 8, 16, 8, 0, 2 ** 32), 16),
        ]:
            xx = x if p.x_bits == 8 else torch.full((2, 70000), 2 ** 16 - 1, dtype=torch.int32)
            try:
                ops.xbar_cell_tile_sums(xx, g, *p.as_args(with_periphery=True)[:-1], f, p.periphery)
                print("NOT REFUSED", name)
            except RuntimeError as e:
                print("REFUSED:", name, str(e).splitlines()[0])
    """)
    proc = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"child crashed (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    assert "NOT REFUSED" not in proc.stdout, proc.stdout
    lines = dict(line.split(" xbar_cell: ", 1) for line in proc.stdout.splitlines() if line.startswith("REFUSED"))
    assert set(lines) == {"REFUSED: adc", "REFUSED: signed adc", "REFUSED: tile"}, proc.stdout
    assert "2 * u * adc_levels + span" in lines["REFUSED: adc"] and "u = P_F," in lines["REFUSED: adc"], proc.stdout
    assert "signed ADC: u = clamp(P_F" in lines["REFUSED: signed adc"], proc.stdout
    assert "REFUSED: tile" in proc.stdout and "tile sums" in proc.stdout, proc.stdout


# ------------------------------------------------------------------ SPEC 8 conventions in the cell ops
# The cell ops compute the codes kernels' periphery bits: differential sensing (1), sign-magnitude inputs (4),
# half-even rounding (8), the even row split (16), the per-tile ADC range (32), and analog accumulation (2) of
# at most 8 bits as one DAC chunk (GemmParams.kernel_form), on the AVX2 kernel and the generic path.
_FIELDS_OF_BIT = {1: ("sensing", "differential"), 2: ("input_accumulation", "analog"),
                  4: ("signed_inputs", "sign_magnitude"), 8: ("adc_rounding", "half_even"), 16: ("row_split", "even"),
                  32: ("adc_range", "tile_rows")}
CELL_BITS = [1, 4, 1 | 4, 16, 1 | 16, 1 | 2, 1 | 4 | 16, 8, 1 | 8, 32, 1 | 32, 63]


def periphery_case(seed: int, bits: int) -> Case:
    """A random call under the periphery ``bits``: lossy (saturating or not), lossless-range and ideal ADCs,
    signed and unsigned inputs, K over one or several (even-split) tiles, programmed cells of ALL_ON."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    rows = rng.choice([1, 5, 16, 33, 64, 70, 128, 131])
    cb, db = rng.choice([1, 2, 3, 4]), rng.choice([1, 2, 3, 4])
    signed, wb = rng.random() < 0.6, rng.randint(2, 9)
    pmax = rows * (2 ** db - 1) * (2 ** cb - 1)
    adc_bits = rng.choice([None, 2, 3, 5, 8, 8, 10])
    clip = None if bits & 32 or rng.random() < 0.5 else rng.choice([max(1, pmax // 3), pmax, pmax + 1, 2 * pmax])
    cfg = XbarConfig(rows=rows, cols=rng.randint(1, 8), weight_bits=wb, cell_bits=cb, input_bits=rng.randint(2, 8),
                     dac_bits=db, adc_bits=adc_bits, adc_clip=clip, input_signed=signed,
                     **dict(v for b, v in _FIELDS_OF_BIT.items() if bits & b))
    p = GemmParams.from_config(cfg, signed)
    assert p.periphery == bits
    while True:  # under the even split only a K whose last tile fits R rows
        k = rng.choice([rng.randint(1, rows), rows * rng.randint(2, 3), rng.randint(rows + 1, 3 * rows + 7)])
        try:
            row_tile_sizes(k, rows, "even" if bits & 16 else "fixed")
            break
        except ValueError:
            continue
    return _programmed_case(p, k, seed, rng, gen)


def _cell_args(p: GemmParams, f: int) -> tuple:
    """The ops' arguments under the kernel form of ``p`` (what the cpu backend passes)."""
    kp = p.kernel_form()
    assert kp is not None
    return kp.as_args(with_periphery=True)[:-1] + (f, kp.periphery)


@pytest.mark.parametrize("bits", CELL_BITS)
def test_cell_ops_compute_the_periphery(bits, monkeypatch):
    """xbar_cell_tile_sums / xbar_cell_mvm (task cells, zero coefficients) / xbar_cell_coef_grad with
    ``periphery=bits`` against reference.cell_tile_sums (SPEC 8 literally): T_int int64-exact, mvm and the
    coefficient gradients in the one ordered sum, on the AVX2 kernel and the generic path (XMA2_CPU_ISA=scalar)."""
    gen = torch.Generator().manual_seed(4000 + bits)
    fast = 0
    for trial in range(16):
        c = periphery_case(40000 + 100 * bits + trial, bits)
        args = _cell_args(c.p, c.f)
        want = ref.cell_tile_sums(c.x, c.g, c.p, c.f)
        tr, m, n = want.shape
        gt = program_cells(torch.randint(-3, 4, (c.x.shape[1], n), generator=gen, dtype=torch.int32),
                           c.p.weight_bits, c.p.cell_bits, dataclasses.replace(ALL_ON, frac_bits=c.f), 1, 1).read(0)
        cb, ct = _coefs(gen, tr, n, torch.float64, 0.3), _coefs(gen, tr, n, torch.float32, 0.5)
        want_y = torch.zeros(m, n, dtype=torch.float64)
        want_t = ref.cell_tile_sums(c.x, gt, c.p, c.f).double()
        for r in range(tr):  # row tile outer, then base, then task (the op's documented order)
            want_y += cb[r] * want[r].double()
            want_y += ct[r].double() * want_t[r]
        gy = torch.randn(m, n, generator=gen, dtype=torch.float64)
        want_g = ordered_coef_grad(want, gy)
        fast += _fast_eligible(c)
        for isa in ("auto", "scalar"):
            monkeypatch.setenv("XMA2_CPU_ISA", isa)
            where = (trial, isa, c.p, c.f)
            assert torch.equal(OPS.xbar_cell_tile_sums(c.x, c.g, *args), want), where
            assert torch.equal(OPS.xbar_cell_mvm(c.x, c.g, gt, cb, ct.double(), *args), want_y), where
            assert torch.equal(OPS.xbar_cell_coef_grad(c.x, c.g, gy, *args), want_g), where
    assert fast >= 5, fast  # the AVX2 kernel was among the paths tested


def _ran_aten_gemm(fn) -> bool:
    """Whether ``fn()`` ran an ATen GEMM: the generic path of the cell ops does (one per row block, tile and
    chunk), the AVX2 kernel does not."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return any(e.name == "aten::mm" for e in prof.events())


@pytest.mark.skipif("avx2" not in cpu_isas(), reason="needs the AVX2 cell kernel (an AVX2 CPU)")
@pytest.mark.parametrize("preset", ["typical", "mnsim", "ideal"])
@pytest.mark.parametrize("rounding", ["half_up", "half_even"])
def test_device_grids_run_the_avx2_kernel_bit_exact(preset, rounding, monkeypatch):
    """On the presets' conductance grids (frac_bits 8, 128 rows, 8-bit ADC) the AVX2 kernel runs under both
    roundings and both sensings, bit for bit as the reference: its ADC in float64 where float32 is not exact
    for every reachable V_F (half-even's half-down form: until the float64 form these calls took the
    generic path, twice as slow)."""
    monkeypatch.delenv("XMA2_CPU_ISA", raising=False)
    gen = torch.Generator().manual_seed(11)
    dev = DeviceModel.preset(preset)
    for sensing, signed in [("per_polarity", False), ("differential", False), ("differential", True)]:
        cfg = XbarConfig(rows=128, cols=32, adc_rounding=rounding, sensing=sensing, input_signed=signed)
        p = GemmParams.from_config(cfg, signed)
        w = torch.randint(-127, 128, (200, 32), generator=gen, dtype=torch.int32)
        g = program_cells(w, p.weight_bits, p.cell_bits, dev, 0, 0).read(0)
        x = torch.randint(-127 if signed else 0, 128 if signed else 256, (20, 200), generator=gen, dtype=torch.int32)
        got = []
        generic = _ran_aten_gemm(lambda: got.append(OPS.xbar_cell_tile_sums(x, g, *_cell_args(p, dev.frac_bits))))
        assert not generic, (sensing, signed)
        assert torch.equal(got[0], ref.cell_tile_sums(x, g, p, dev.frac_bits)), (sensing, signed)


def test_cell_ops_periphery_is_tested_where_it_differs(monkeypatch):
    """Not vacuous: differential sensing, sign-magnitude inputs and half-even rounding each change T_int on
    these cells, and the op follows on both paths."""
    c = periphery_case(7, 0)
    p0 = dataclasses.replace(c.p, rows=16, input_signed=True, input_bits=6, dac_bits=2, cell_bits=2, weight_bits=6,
                             adc_levels=6, adc_clip=12)
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(-31, 32, (20, 40), generator=gen, dtype=torch.int32)
    w = torch.randint(-31, 32, (40, 9), generator=gen, dtype=torch.int32)
    g = program_cells(w, 6, 2, dataclasses.replace(ALL_ON, frac_bits=0), 0, 0).read(0)
    t0 = ref.cell_tile_sums(x, g, p0, 0)
    for bits in (1, 4, 1 | 8):
        p = dataclasses.replace(p0, periphery=bits)
        want = ref.cell_tile_sums(x, g, p, 0)
        assert not torch.equal(want, t0), bits
        for isa in ("auto", "scalar"):
            monkeypatch.setenv("XMA2_CPU_ISA", isa)
            assert torch.equal(OPS.xbar_cell_tile_sums(x, g, *_cell_args(p, 0)), want), (bits, isa)


def test_cell_ops_refuse_periphery_bits_they_do_not_compute():
    x, g, _ = _op_args(4)
    for bad in (2, 64, -1, 1 | 2):
        with pytest.raises(RuntimeError, match="periphery"):
            OPS.xbar_cell_tile_sums(x, g, *P_OP.as_args(), 6, bad)
    with pytest.raises(RuntimeError, match="periphery 1.*even adc_levels"):  # a signed ADC needs an even n
        OPS.xbar_cell_tile_sums(x, g, *P_OP.as_args(), 6, 1)


# ------------------------------------------------------------------ the whole layer
@pytest.mark.parametrize("seed", range(10))
def test_conv2d_with_device_cpu_vs_reference(seed):
    case = random_conv_case(900 + seed)
    dev = dataclasses.replace(ALL_ON, seed=seed, frac_bits=random.Random(seed).randint(0, 10))
    cfg = dataclasses.replace(case.config, device=dev)
    kw = {**case.kwargs(), "config": cfg}
    y_cpu = xma2_ops.xbar_conv2d(case.x, case.weight, **kw, backend="cpu")
    y_ref = xma2_ops.xbar_conv2d(case.x, case.weight, **kw, backend="reference")
    assert y_cpu.dtype == torch.float64
    torch.testing.assert_close(y_cpu, y_ref, rtol=1e-12, atol=1e-12)


def test_conv2d_default_config_typical_device_cpu_vs_reference():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 16, 6, 6, generator=gen, dtype=torch.float64).relu()
    w = torch.randn(12, 16, 3, 3, generator=gen, dtype=torch.float64)
    cfg = XbarConfig(device=DeviceModel.preset("typical"))
    y_cpu = xma2_ops.xbar_conv2d(x, w, None, 1, 1, config=cfg, backend="cpu")
    y_ref = xma2_ops.xbar_conv2d(x, w, None, 1, 1, config=cfg, backend="reference")
    torch.testing.assert_close(y_cpu, y_ref, rtol=1e-12, atol=1e-12)
    assert not torch.equal(y_cpu, xma2_ops.xbar_conv2d(x, w, None, 1, 1, config=XbarConfig(), backend="cpu"))
