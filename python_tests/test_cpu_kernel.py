"""The C++ CPU kernel against the readable reference, on every instruction-set path this machine
runs (XMA2_CPU_ISA forces one): bit-exact tile sums, float64 mvm and coefficient gradients,
odd sizes, every bit width, saturated / ideal / lossless ADCs, and the layer-level API."""
import dataclasses
import random
import zlib

import pytest
import torch
import torch.nn.functional as F

import xma2_ops
from xma2_ops import XbarConfig
from xma2_ops.backends import reference as ref
from xma2_ops.backends import available_backends, get_backend
from xma2_ops.config import GemmParams

from helpers import ISA_PROBE, cpu_isas, ordered_coef_grad, ordered_mvm as _ordered_mvm

pytestmark = pytest.mark.skipif("cpu" not in available_backends(), reason="C++ extension not built")

ISAS = cpu_isas()


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("XMA2_CPU_ISA", request.param)
    return request.param


def _params(rows, cols, ib, signed, db, wb, cb, adc_bits, clip=None, **periphery) -> GemmParams:
    cfg = XbarConfig(rows=rows, cols=cols, weight_bits=wb, cell_bits=cb, input_bits=ib, dac_bits=db,
                     adc_bits=adc_bits, adc_clip=clip, input_signed=signed, **periphery)
    return GemmParams.from_config(cfg, signed)


def _codes(gen, m, k, n, p: GemmParams, dtype=torch.int32, density=0.7):
    qx = 2 ** p.x_bits - 1
    qw = 2 ** (p.weight_bits - 1) - 1
    x = torch.randint(-qx if p.input_signed else 0, qx + 1, (m, k), generator=gen)
    x = x * (torch.rand(m, k, generator=gen) < density)  # zeros, as after a ReLU
    w = torch.randint(-qw, qw + 1, (k, n), generator=gen, dtype=torch.int32)
    return x.to(dtype), w


def _check_gemm(x, w, p: GemmParams, gen):
    args = p.as_args(with_periphery=True)  # the periphery (SPEC 8) last: 0, or bits the CPU kernels compute
    t = torch.ops.xma2_ops.xbar_tile_sums(x, w, *args)
    t_ref = ref.tile_sums(x, w, p)
    assert t.dtype == torch.int64 and torch.equal(t, t_ref)
    tr, n = t_ref.shape[0], w.shape[1]
    coef = torch.randn(tr, n, generator=gen, dtype=torch.float64)
    coef[0, : min(n, p.cols)] = 0  # a skipped PE
    y = torch.ops.xma2_ops.xbar_mvm(x, w, None, coef, None, *args)
    torch.testing.assert_close(y, (coef.unsqueeze(1) * t_ref.double()).sum(0), rtol=1e-12, atol=1e-9)
    gy = torch.randn(x.shape[0], n, generator=gen, dtype=torch.float64)
    g = torch.ops.xma2_ops.xbar_coef_grad(x, w, gy, *args)
    torch.testing.assert_close(g, torch.einsum("rmn,mn->rn", t_ref.double(), gy), rtol=1e-12, atol=1e-9)
    # The packed form (made once per programmed weight) gives the same bits as packing per call.
    packed = torch.ops.xma2_ops.xbar_pack_weights(w, *args)
    assert torch.equal(torch.ops.xma2_ops.xbar_mvm_packed(x, w, packed, None, None, coef, None, *args), y)
    assert torch.equal(torch.ops.xma2_ops.xbar_coef_grad_packed(x, w, packed, gy, *args), g)


# rows, cols, input_bits, signed, dac_bits, weight_bits, cell_bits, adc_bits, adc_clip, (M, K, N)
CASES = [
    (128, 128, 8, False, 1, 8, 2, 8, None, (37, 300, 45)),   # the default config, odd K and N
    (33, 7, 6, True, 2, 5, 3, 4, 40, (29, 100, 19)),         # saturated ADC (clip < Pmax), signed
    (1, 3, 3, False, 3, 3, 4, 2, None, (11, 9, 5)),          # single-row tiles
    (100, 16, 5, True, 4, 6, 1, 10, 77, (13, 70, 70)),       # rows > K, dac_bits 4
    (64, 64, 7, False, 2, 7, 3, 1, None, (9, 129, 65)),      # 1-bit ADC
    (17, 5, 2, True, 1, 2, 1, 3, 5, (21, 40, 11)),           # smallest signed input, 1-bit weights
    (40, 24, 8, True, 1, 8, 4, 6, 900, (15, 95, 33)),        # clip > Pmax: coarse but never saturating
    (96, 32, 4, False, 4, 3, 2, 5, None, (10, 200, 40)),     # one chunk, one slice
    (32, 8, 4, False, 2, 9, 8, 5, None, (7, 40, 9)),         # 8-bit cells (beyond int8 tiles)
    (70, 9, 8, True, 8, 8, 1, 9, 3000, (18, 150, 20)),       # 8-bit DAC, signed
    (128, 32, 8, False, 1, 8, 2, 6, None, (301, 200, 40)),   # several row blocks (threads)
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_gemm_matches_reference(isa, case):
    *cfg, (m, k, n) = case
    p = _params(*cfg)
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))  # stable across runs
    x, w = _codes(gen, m, k, n, p)
    _check_gemm(x, w, p, gen)


def test_random_configs(isa):
    """Every cell_bits 1-4, dac_bits 1-4, adc_bits 1-10, random sizes and clips."""
    rnd = random.Random(1234)
    gen = torch.Generator().manual_seed(1234)
    for trial in range(24):
        signed = trial % 2 == 1
        ib = rnd.randint(2 if signed else 1, 8)
        p = _params(rnd.choice([1, 5, 31, 32, 33, 64, 70]), rnd.randint(1, 20), ib, signed, trial % 4 + 1,
                    rnd.randint(2, 8), (trial // 4) % 4 + 1, trial % 10 + 1,
                    rnd.choice([None, rnd.randint(1, 200)]))
        x, w = _codes(gen, rnd.randint(1, 20), rnd.randint(1, 150), rnd.randint(1, 40), p)
        _check_gemm(x, w, p, gen)


@pytest.mark.parametrize("adc_bits,clip", [(None, None), (12, None), (10, 384)])
def test_lossless_configs(isa, adc_bits, clip):
    """Ideal ADC, and ADCs with a level per partial sum: the kernel sums x*w exactly."""
    p = _params(128, 32, 8, False, 1, 8, 2, adc_bits, clip)
    assert p.adc_levels == 0 or p.adc_levels == p.adc_clip >= 128 * 3
    gen = torch.Generator().manual_seed(7)
    x, w = _codes(gen, 23, 300, 37, p)
    _check_gemm(x, w, p, gen)
    ps = _params(50, 9, 6, True, 2, 5, 3, None)
    xs, ws = _codes(gen, 17, 120, 21, ps)
    _check_gemm(xs, ws, ps, gen)


# SPEC 8 conventions that the bit-plane kernels compute (periphery bits 1, 4, 8, 16, 32): differential sensing,
# sign-magnitude inputs, half-even rounding, the even row split, the per-tile ADC range (with the default clip);
# test_periphery.py has every combination on random configs.
_PERIPHERY = {"diff": dict(sensing="differential"), "sm": dict(signed_inputs="sign_magnitude"),
              "even": dict(adc_rounding="half_even"),
              "all": dict(sensing="differential", signed_inputs="sign_magnitude", adc_rounding="half_even"),
              "split": dict(row_split="even", adc_range="tile_rows"),
              "all_split": dict(sensing="differential", signed_inputs="sign_magnitude", adc_rounding="half_even",
                                row_split="even", adc_range="tile_rows")}


@pytest.mark.parametrize("conv", list(_PERIPHERY))
@pytest.mark.parametrize("case", CASES[:4] + CASES[5:8] + CASES[9:],
                         ids=[f"case{i}" for i in (0, 1, 2, 3, 5, 6, 7, 9, 10)])
def test_gemm_with_periphery_matches_reference(isa, case, conv):
    """The CASES (but the 1-bit ADC, refused for a signed ADC) under each convention: tile sums, mvm,
    coefficient gradients, packed and unpacked."""
    *cfg, (m, k, n) = case
    p = _params(*cfg, **_PERIPHERY[conv])
    assert p.periphery and p.kernel_form() == p
    gen = torch.Generator().manual_seed(zlib.crc32(repr((case, conv)).encode()))
    x, w = _codes(gen, m, k, n, p)
    _check_gemm(x, w, p, gen)


@pytest.mark.parametrize("conv", list(_PERIPHERY))
def test_periphery_edge_cases(isa, conv):
    """All-zero inputs (skipped chunks: the signed ADC's centre code adds 0), a lossless signed ADC (n = 2 clip,
    the float-GEMM path), sums beyond the int32 lanes (the scalar fallback)."""
    gen = torch.Generator().manual_seed(17)
    p = _params(128, 16, 8, True, 1, 8, 2, 4, 100, **_PERIPHERY[conv])
    _, w = _codes(gen, 5, 200, 24, p)
    x = torch.zeros(5, 200, dtype=torch.int32)
    _check_gemm(x, w, p, gen)
    assert not torch.ops.xma2_ops.xbar_tile_sums(x, w, *p.as_args(with_periphery=True)).any()
    lossless = _params(40, 8, 6, True, 2, 6, 2, 16, None, **_PERIPHERY[conv])
    assert lossless.adc_identity and lossless.adc_levels == (2 if lossless.adc_signed else 1) * lossless.adc_clip
    x, w = _codes(gen, 21, 130, 17, lossless)
    _check_gemm(x, w, lossless, gen)
    wide = _params(8, 4, 16, True, 1, 16, 1, 10, **_PERIPHERY[conv])
    x, w = _codes(gen, 3, 20, 5, wide)
    _check_gemm(x, w, wide, gen)


def test_all_zero_inputs(isa):
    p = _params(128, 16, 8, False, 1, 8, 2, 4, 100)
    gen = torch.Generator().manual_seed(3)
    _, w = _codes(gen, 5, 200, 24, p)
    x = torch.zeros(5, 200, dtype=torch.int32)
    _check_gemm(x, w, p, gen)
    assert not torch.ops.xma2_ops.xbar_tile_sums(x, w, *p.as_args()).any()


def test_sums_beyond_int32_lanes_are_exact(isa):
    """16-bit inputs and weights on 1-bit cells: T_int needs more than 32 bits (scalar fallback)."""
    p = _params(8, 4, 16, False, 1, 16, 1, 10)
    gen = torch.Generator().manual_seed(5)
    x, w = _codes(gen, 3, 20, 5, p)
    _check_gemm(x, w, p, gen)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16])
def test_small_code_dtypes(isa, dtype):
    signed = dtype != torch.uint8
    p = _params(64, 16, 8 if dtype != torch.int16 else 12, signed, 1, 8, 2, 6)
    gen = torch.Generator().manual_seed(11)
    x, w = _codes(gen, 19, 150, 30, p)
    t32 = torch.ops.xma2_ops.xbar_tile_sums(x, w, *p.as_args())
    assert torch.equal(torch.ops.xma2_ops.xbar_tile_sums(x.to(dtype), w, *p.as_args()), t32)
    assert torch.equal(t32, ref.tile_sums(x, w, p))


def test_out_of_range_codes_are_refused(isa):
    p = _params(16, 8, 4, False, 1, 4, 1, 3)
    w = torch.ones(20, 3, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="x_codes"):
        torch.ops.xma2_ops.xbar_tile_sums(torch.full((2, 20), 16, dtype=torch.int32), w, *p.as_args())
    with pytest.raises(RuntimeError, match="x_codes"):
        torch.ops.xma2_ops.xbar_tile_sums(torch.full((2, 20), -1, dtype=torch.int32), w, *p.as_args())
    with pytest.raises(RuntimeError, match="x_codes"):  # 8-bit codes take another packing path
        torch.ops.xma2_ops.xbar_tile_sums(torch.full((2, 20), 16, dtype=torch.uint8), w, *p.as_args())
    ps = _params(16, 8, 8, True, 1, 4, 1, 3)
    with pytest.raises(RuntimeError, match="x_codes"):
        torch.ops.xma2_ops.xbar_tile_sums(torch.full((2, 20), -128, dtype=torch.int8), w, *ps.as_args())
    with pytest.raises(RuntimeError, match="w_codes"):
        torch.ops.xma2_ops.xbar_tile_sums(torch.ones(2, 20, dtype=torch.int32), w * 8, *p.as_args())


def test_bad_isa_name_is_refused(monkeypatch):
    monkeypatch.setenv("XMA2_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="XMA2_CPU_ISA"):
        torch.ops.xma2_ops.xbar_tile_sums(torch.ones(2, 20, dtype=torch.int32), torch.ones(20, 3, dtype=torch.int32),
                                          *ISA_PROBE.as_args())


def test_weight_changes_without_version_bump_are_seen(isa):
    """Weights are packed on every call: a write through `.data` (no version bump) and an
    in-place write (version bump) between two calls both give the new result."""
    p = _params(32, 8, 4, False, 1, 4, 1, 3)
    gen = torch.Generator().manual_seed(2)
    x, w = _codes(gen, 6, 50, 7, p)
    first = torch.ops.xma2_ops.xbar_tile_sums(x, w, *p.as_args())
    assert first.any()
    w.data.neg_()  # the tensor's version counter does not move
    second = torch.ops.xma2_ops.xbar_tile_sums(x, w, *p.as_args())
    assert torch.equal(second, ref.tile_sums(x, w, p))
    assert torch.equal(second, -first)  # negated weights swap the two polarities
    w[3, 2] = 7 if w[3, 2] != 7 else -7
    third = torch.ops.xma2_ops.xbar_tile_sums(x, w, *p.as_args())
    assert torch.equal(third, ref.tile_sums(x, w, p))
    coef = torch.randn(2, 7, generator=gen, dtype=torch.float64)
    y1 = torch.ops.xma2_ops.xbar_mvm(x, w, None, coef, None, *p.as_args())
    w.data.neg_()
    y2 = torch.ops.xma2_ops.xbar_mvm(x, w, None, coef, None, *p.as_args())
    assert torch.equal(y2, -y1)


def test_packed_weights_are_read_and_checked(isa):
    """xbar_mvm_packed reads the packed form, not the codes (so a packed form of other codes gives
    their result: the programmed state must keep the two together), and refuses a packed form made
    for other parameters, or a damaged one."""
    for p in (_params(32, 8, 4, True, 1, 5, 2, 4), _params(32, 8, 4, False, 1, 4, 1, None)):  # lossy, lossless
        gen = torch.Generator().manual_seed(31)
        x, w = _codes(gen, 9, 70, 11, p)
        w2 = -w
        coef = torch.randn(3, 11, generator=gen, dtype=torch.float64)
        packed2 = torch.ops.xma2_ops.xbar_pack_weights(w2, *p.as_args())
        y = torch.ops.xma2_ops.xbar_mvm_packed(x, w, packed2, None, None, coef, None, *p.as_args())
        assert torch.equal(y, torch.ops.xma2_ops.xbar_mvm(x, w2, None, coef, None, *p.as_args()))
        task = torch.ops.xma2_ops.xbar_mvm_packed(x, w, None, w, packed2, coef, coef, *p.as_args())
        assert torch.equal(task, torch.ops.xma2_ops.xbar_mvm(x, w, w2, coef, coef, *p.as_args()))
        other = dataclasses.replace(p, rows=p.rows + 32)
        with pytest.raises(RuntimeError, match="wb_codes_packed is not the packed form"):
            torch.ops.xma2_ops.xbar_mvm_packed(x, w, torch.ops.xma2_ops.xbar_pack_weights(w, *other.as_args()), None,
                                               None, coef, None, *p.as_args())
        for bad in (packed2[:-1], packed2.to(torch.int64), packed2.clone().index_fill_(0, torch.tensor([0]), 7)):
            with pytest.raises(RuntimeError, match="is not the packed form"):
                torch.ops.xma2_ops.xbar_mvm_packed(x, w, bad, None, None, coef, None, *p.as_args())
    for p in (_params(32, 8, 4, True, 1, 5, 2, 4), _params(32, 8, 4, False, 1, 5, 1, None)):
        with pytest.raises(RuntimeError, match=r"w_codes must hold codes in \[-15, 15\]"):
            torch.ops.xma2_ops.xbar_pack_weights(torch.full((70, 3), 16, dtype=torch.int32), *p.as_args())
        one_bad = torch.zeros(70, 3, dtype=torch.int32)
        one_bad[69, 2] = -16  # the last row of a partial tile, the last column of a partial lane block
        with pytest.raises(RuntimeError, match=r"w_codes must hold codes in \[-15, 15\]"):
            torch.ops.xma2_ops.xbar_pack_weights(one_bad, *p.as_args())


def test_many_weight_tensors_stay_correct(isa):
    """More weight tensors than any cache could hold, used in turn: each result stays exact."""
    p = _params(16, 8, 4, True, 1, 5, 2, 4)
    gen = torch.Generator().manual_seed(8)
    x, _ = _codes(gen, 4, 40, 3, p)
    ws = [_codes(gen, 1, 40, 3, p)[1] for _ in range(20)]
    want = [ref.tile_sums(x, w, p) for w in ws]
    for _ in range(2):
        for w, t in zip(ws, want):
            assert torch.equal(torch.ops.xma2_ops.xbar_tile_sums(x, w, *p.as_args()), t)


def test_mvm_bits_do_not_depend_on_the_isa(monkeypatch):
    """Random lossless and lossy configs with task weights: every instruction set this CPU runs
    (and the float-GEMM path of lossless configs) returns the same bits, the ordered sum above."""
    rnd = random.Random(99)
    gen = torch.Generator().manual_seed(99)
    for trial in range(16):
        signed = trial % 2 == 1
        lossless = trial % 4 < 2
        rows = rnd.choice([5, 16, 32, 33, 64])
        if lossless:
            ab, db, cb = rnd.randint(2, 8), rnd.randint(1, 3), rnd.randint(1, 3)
            pmax = rows * (2 ** db - 1) * (2 ** cb - 1)
            bits, clip = rnd.choice([(None, None), (24, pmax + rnd.randint(0, 50))])
            p = _params(rows, 8, ab, signed, db, rnd.randint(2, 8), cb, bits, clip)
            assert p.adc_identity
        else:
            p = _params(rows, 8, rnd.randint(2, 8), signed, rnd.randint(1, 3), rnd.randint(2, 8), rnd.randint(1, 3),
                        rnd.randint(1, 6), rnd.choice([None, rnd.randint(1, 100)]))
            assert not p.adc_identity
        m, k, n = rnd.randint(1, 300), rnd.randint(rows + 1, 4 * rows + 10), rnd.randint(1, 40)
        x, wb = _codes(gen, m, k, n, p)
        wt = _codes(gen, 1, k, n, p)[1]
        tr = -(-k // p.rows)
        dtype = (torch.float64, torch.float32)[trial // 4 % 2]
        cb_ = torch.randn(tr, n, generator=gen, dtype=dtype)
        ct_ = torch.randn(tr, n, generator=gen, dtype=dtype)
        cb_[0, : min(n, 8)] = 0  # a skipped PE in each set
        ct_[-1, : min(n, 8)] = 0
        want = _ordered_mvm(x, wb, wt, cb_, ct_, p)
        for isa in ISAS:
            monkeypatch.setenv("XMA2_CPU_ISA", isa)
            got = torch.ops.xma2_ops.xbar_mvm(x, wb, wt, cb_, ct_, *p.as_args())
            assert torch.equal(got, want), (trial, isa, p)


def test_coef_grad_is_one_ordered_sum(monkeypatch):
    """xbar_coef_grad and xbar_coef_grad_packed (the pe_mask / col_scale gradients) on every
    instruction set, lossless (the float-GEMM path) or not, signed inputs or not, with 1 and 2
    threads and repeated: the bits of helpers.ordered_coef_grad, the one documented order."""
    rnd = random.Random(7)
    gen = torch.Generator().manual_seed(7)
    threads = torch.get_num_threads()
    try:
        for trial in range(12):
            signed = trial % 2 == 1
            rows = rnd.choice([5, 16, 33, 64])
            if trial % 4 < 2:  # lossless: an ideal ADC, or one with clip + 1 levels
                db, cb = rnd.randint(1, 3), rnd.randint(1, 3)
                pmax = rows * (2 ** db - 1) * (2 ** cb - 1)
                bits, clip = rnd.choice([(None, None), (24, pmax)])
                p = _params(rows, 8, rnd.randint(2, 8), signed, db, rnd.randint(2, 8), cb, bits, clip)
                assert p.adc_identity
            else:
                p = _params(rows, 8, rnd.randint(2, 8), signed, rnd.randint(1, 3), rnd.randint(2, 8),
                            rnd.randint(1, 3), rnd.randint(1, 2), rnd.choice([None, rnd.randint(20, 100)]))
                assert not p.adc_identity
            m = (1, 128, 129, rnd.randint(300, 700))[trial % 4]
            k, n = rnd.randint(rows + 1, 4 * rows + 10), rnd.randint(1, 40)
            x, w = _codes(gen, m, k, n, p)
            gy = torch.randn(m, n, generator=gen, dtype=(torch.float64, torch.float32)[trial // 4 % 2])
            want = ordered_coef_grad(ref.tile_sums(x, w, p), gy)
            for isa in ISAS:
                monkeypatch.setenv("XMA2_CPU_ISA", isa)
                packed = torch.ops.xma2_ops.xbar_pack_weights(w, *p.as_args())
                for t in (1, 2, 2, 1, 2):
                    torch.set_num_threads(t)
                    got = torch.ops.xma2_ops.xbar_coef_grad(x, w, gy, *p.as_args())
                    assert torch.equal(got, want), (trial, isa, t, p, (got - want).abs().max())
                    got = torch.ops.xma2_ops.xbar_coef_grad_packed(x, w, packed, gy, *p.as_args())
                    assert torch.equal(got, want), (trial, isa, t, p, "packed")
    finally:
        torch.set_num_threads(threads)


def test_coef_grad_same_bits_on_every_run():
    """Signed inputs, many row blocks, 2 threads: 20 runs give the bits of a 1-thread run."""
    p = _params(32, 8, 6, True, 2, 6, 2, 5, 60)
    gen = torch.Generator().manual_seed(11)
    x, w = _codes(gen, 3000, 200, 48, p)
    gy = torch.randn(3000, 48, generator=gen, dtype=torch.float64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = torch.ops.xma2_ops.xbar_coef_grad(x, w, gy, *p.as_args())
        torch.set_num_threads(2)
        for _ in range(20):
            assert torch.equal(torch.ops.xma2_ops.xbar_coef_grad(x, w, gy, *p.as_args()), want)
    finally:
        torch.set_num_threads(threads)


def test_mask_gradients_do_not_depend_on_the_isa_or_threads(monkeypatch):
    """The pe_mask / col_scale gradients of a whole conv (backend="cpu"), lossless and lossy, signed
    inputs: the same bits on every instruction set and thread count."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, 12, 12, generator=gen, dtype=torch.float64)
    weight = torch.randn(10, 6, 3, 3, generator=gen, dtype=torch.float64)
    task_weight = torch.randn(10, 6, 3, 3, generator=gen, dtype=torch.float64)
    threads = torch.get_num_threads()
    try:
        for adc_bits in (None, 4):
            cfg = XbarConfig(rows=16, cols=4, weight_bits=6, cell_bits=2, input_bits=6, dac_bits=2,
                             adc_bits=adc_bits, input_signed=True)
            tr, tc = cfg.tiles(54, 10)
            results = []
            for isa in ISAS:
                monkeypatch.setenv("XMA2_CPU_ISA", isa)
                for t in (1, 2):
                    torch.set_num_threads(t)
                    pe_mask = torch.rand(tr, tc, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
                    col_scale = torch.rand(tr, 10, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
                    pe_mask.requires_grad_(True)
                    col_scale.requires_grad_(True)
                    y = xma2_ops.xbar_conv2d(x, weight, padding=1, config=cfg, task_weight=task_weight,
                                             pe_mask=pe_mask, col_scale=col_scale, backend="cpu")
                    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(4), dtype=y.dtype))
                    results.append((isa, t, pe_mask.grad, col_scale.grad))
            for isa, t, gm, gc in results[1:]:
                assert torch.equal(gm, results[0][2]) and torch.equal(gc, results[0][3]), (adc_bits, isa, t)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_unfold_codes_matches_f_unfold(dtype):
    gen = torch.Generator().manual_seed(4)
    x = torch.randint(0, 100, (2, 3, 7, 9), generator=gen).to(dtype)
    for kernel, dilation, padding, stride in [((3, 3), (1, 1), (1, 1), (1, 1)), ((2, 3), (2, 1), (0, 2), (2, 3)),
                                              ((1, 1), (1, 1), (0, 0), (1, 1))]:
        got = torch.ops.xma2_ops.xbar_unfold_codes(x, kernel, dilation, padding, stride)
        cols = F.unfold(x.float(), kernel, dilation=dilation, padding=padding, stride=stride)
        assert got.dtype == dtype
        assert torch.equal(got, cols.transpose(1, 2).reshape(-1, cols.shape[1]).to(dtype))


# ---------------------------------------------------------------- through the layer API
LAYER_CONFIGS = [
    XbarConfig(),
    XbarConfig(rows=16, cols=4, adc_bits=4, input_bits=6, dac_bits=2, cell_bits=3),
    XbarConfig(rows=20, cols=3, adc_bits=3, adc_clip=10, weight_bits=5, cell_bits=4, dac_bits=3),
    XbarConfig(rows=32, adc_bits=12, cell_bits=1),  # lossless
    XbarConfig(rows=24, cols=5, adc_bits=None),     # ideal ADC
]


@pytest.mark.parametrize("cfg", LAYER_CONFIGS, ids=[f"cfg{i}" for i in range(len(LAYER_CONFIGS))])
@pytest.mark.parametrize("signed", [False, True])
def test_conv_layer_matches_reference_with_masks(isa, cfg, signed):
    """Masks exactly 0, exactly 1 and soft, column scales, task weights: output and all gradients."""
    gen = torch.Generator().manual_seed(17 + signed)
    x = torch.randn(2, 5, 7, 6, generator=gen, dtype=torch.float64)
    x = x if signed else x.relu()
    w = torch.randn(9, 5, 3, 3, generator=gen, dtype=torch.float64)
    tw = torch.randn(9, 5, 3, 3, generator=gen, dtype=torch.float64)
    tr, tc = cfg.tiles(45, 9)
    m = torch.rand(tr, tc, generator=gen, dtype=torch.float64)
    m.view(-1)[0] = 0.0
    m.view(-1)[-1] = 1.0
    a = torch.rand(tr, 9, generator=gen, dtype=torch.float64) + 0.5
    outs = []
    for backend in ("cpu", "reference"):
        leaves = [t.clone().requires_grad_() for t in (x, w, tw, m, a)]
        y = xma2_ops.xbar_conv2d(leaves[0], leaves[1], None, 1, 1, config=cfg, task_weight=leaves[2],
                                 pe_mask=leaves[3], col_scale=leaves[4], backend=backend)
        y.pow(2).sum().backward()
        outs.append([y.detach()] + [t.grad for t in leaves])
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_linear_layer_and_weight_updates(isa):
    cfg = XbarConfig(rows=16, cols=8, adc_bits=5)
    gen = torch.Generator().manual_seed(23)
    x = torch.randn(7, 40, generator=gen).relu()
    w = torch.randn(12, 40, generator=gen)
    y1 = xma2_ops.xbar_linear(x, w, config=cfg, backend="cpu")
    torch.testing.assert_close(y1, xma2_ops.xbar_linear(x, w, config=cfg, backend="reference"))
    with torch.no_grad():
        w[:3].mul_(-0.5)  # in place: the cached codes and planes must not be reused
    y2 = xma2_ops.xbar_linear(x, w, config=cfg, backend="cpu")
    assert not torch.equal(y1, y2)
    torch.testing.assert_close(y2, xma2_ops.xbar_linear(x, w, config=cfg, backend="reference"))


def test_cpu_backend_uses_fused_ops():
    be = get_backend("cpu", torch.device("cpu"))
    assert be.coef_grad is not None and be.unfold_codes is not None and be.small_codes
