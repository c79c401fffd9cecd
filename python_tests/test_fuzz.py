"""Property-based tests (Hypothesis) of docs/SPEC.md sections 2-4.

1. The reference's quantisers, ADC, bit fields and tile sums against an independent formulation
   written here with plain Python integers: ``fractions.Fraction`` for round-half-to-even of the
   quotient, the ADC as round-half-up of the exact rational ``P n / clip``, bit fields read off
   the binary string, and the bit-sliced partial sums of SPEC 3 as nested Python loops over base-2^db
   and base-2^cb digits.
2. Every backend against the reference on random configs: the raw op
   ``torch.ops.xma2_ops.xbar_tile_sums`` bit for bit (``torch.equal``) on every CPU instruction-set
   path this machine runs (``XMA2_CPU_ISA``), and the public ``xbar_linear`` / ``xbar_conv2d`` with
   ``backend="cpu"`` (every ISA), ``"triton"`` (interpreter on CPU: few, small cases) and
   ``"reference"`` against ``reference.xbar_conv2d_reference`` in float64, with a tolerance of a
   quarter of the smallest output change that one ADC code can make (so one wrong code fails).

Profiles ``ci`` (default) and ``long`` (20x the examples): see strategies.py.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import event, example, given, note, seed
from hypothesis import strategies as st

import xma2_ops
from xma2_ops import quant
from xma2_ops import XbarConfig
from xma2_ops.backends import reference as ref
from xma2_ops.backends import available_backends
from xma2_ops.config import MAX_ADC_CLIP, GemmParams, adc_is_identity

from strategies import ApiCase, GemmCase, api_cases, chunks_of, examples, fuzz_seed, gemm_cases, slices_of

HALF = Fraction(1, 2)
SESSION_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The reference and the Python formulations run single-threaded (tiny tensors: on a loaded
    machine, OpenMP threads only wait for each other); the backend under test gets the session's
    thread count back for its own call (_call)."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(SESSION_THREADS)


# ================================================================== the independent formulation
def ieee_quotient(v: float, s: float, dtype: torch.dtype) -> float:
    """v / s rounded once to ``dtype`` (what a quantiser computing in that dtype sees).

    Python's float division is IEEE binary64, correctly rounded.  For float32 operands, rounding
    that binary64 quotient to binary32 gives the correctly rounded binary32 quotient (double
    rounding is innocuous for division when 53 >= 2*24 + 2)."""
    q = v / s
    if dtype == torch.float32:
        with np.errstate(over="ignore", under="ignore"):
            q = float(np.float32(q))
    return q


def round_half_even(q: float):
    """Round-half-to-even of a float, exactly, with Fraction; +-inf stays +-inf."""
    if math.isinf(q):
        return q
    f = Fraction(q)
    whole = f.numerator // f.denominator  # floor
    rest = f - whole
    if rest > HALF or (rest == HALF and whole % 2 == 1):
        whole += 1
    return whole


def clamp(v, lo: int, hi: int) -> int:
    return lo if v < lo else hi if v > hi else int(v)


def weight_code(v: float, s: float, weight_bits: int, dtype) -> int:
    q = (1 << (weight_bits - 1)) - 1
    return clamp(round_half_even(ieee_quotient(v, s, dtype)), -q, q)


def input_code(v: float, s: float, input_bits: int, signed: bool, dtype) -> int:
    r = round_half_even(ieee_quotient(v, s, dtype))
    if signed:
        q = (1 << (input_bits - 1)) - 1
        return clamp(r, -q, q)
    return clamp(r, 0, (1 << input_bits) - 1)


def adc_levels(adc_bits: int, clip: int) -> int:
    return min((1 << adc_bits) - 1, clip)


def adc_code(p: int, levels: int, clip: int) -> int:
    """The code whose level code*clip/levels is nearest to p (ties up), within [0, levels]:
    round-half-up of the exact rational p*levels/clip."""
    return clamp(math.floor(Fraction(p * levels, clip) + HALF), 0, levels)


def bit_field_of(v: int, index: int, width: int) -> int:
    """Bits [index*width, (index+1)*width) of v >= 0, read off its binary string."""
    bits = format(v, "b")[::-1]  # least significant first
    field = bits[index * width:(index + 1) * width][::-1]
    return int(field, 2) if field else 0


def digits(v: int, base_bits: int, count: int) -> list:
    """``count`` little-endian digits of v >= 0 in base 2^base_bits (v must fit)."""
    out = []
    for _ in range(count):
        v, d = divmod(v, 1 << base_bits)
        out.append(d)
    assert v == 0, "code wider than its chunks/slices"
    return out


def python_tile_sums(x: list, w: list, cfg: XbarConfig, signed: bool) -> list:
    """T_int[r][m][n] of SPEC 3 with Python ints: for every row tile, polarity pair, input chunk and
    weight slice, the exact partial sum P over the tile's rows, its ADC code, shifted and signed."""
    m_total, k_total, n_total = len(x), len(w), len(w[0])
    rows, db, cb = cfg.rows, cfg.dac_bits, cfg.cell_bits
    n_chunks, n_slices = chunks_of(cfg, signed), slices_of(cfg)
    ideal = cfg.adc_bits is None
    clip = cfg.pmax if cfg.adc_clip is None else cfg.adc_clip
    levels = None if ideal else adc_levels(cfg.adc_bits, clip)
    x_pols = [(1, lambda v: max(v, 0)), (-1, lambda v: max(-v, 0))] if signed else [(1, lambda v: v)]
    w_pols = [(1, lambda v: max(v, 0)), (-1, lambda v: max(-v, 0))]
    out = []
    for r in range(-(-k_total // rows)):
        ks = range(r * rows, min((r + 1) * rows, k_total))
        tile = [[0] * n_total for _ in range(m_total)]
        for m in range(m_total):
            for n in range(n_total):
                total = 0
                for sx, xp in x_pols:
                    xd = [digits(xp(x[m][k]), db, n_chunks) for k in ks]
                    for sw, wp in w_pols:
                        wd = [digits(wp(w[k][n]), cb, n_slices) for k in ks]
                        for i in range(n_chunks):
                            for j in range(n_slices):
                                p = sum(a[i] * b[j] for a, b in zip(xd, wd))
                                code = p if ideal else adc_code(p, levels, clip)
                                total += sx * sw * code * (1 << (i * db + j * cb))
                tile[m][n] = total
        out.append(tile)
    return out


# ================================================================== 1. reference vs independent formulation
def _to_dtype(v: float, dtype) -> float:
    """v rounded to dtype; an overflow becomes the largest finite value of that sign."""
    if dtype == torch.float32:
        with np.errstate(over="ignore", under="ignore"):
            v = float(np.float32(v))
    return v if math.isfinite(v) else math.copysign(torch.finfo(dtype).max, v)


SPECIAL_SCALES = [1e-30, 1e30, 1.0, 0.1, 1 / 3, 2.0 ** -100, 2.0 ** 100, 3.0, 1e-7]


@st.composite
def scale_values(draw, dtype):
    lo, hi = (1e-36, 1e36) if dtype == torch.float32 else (1e-300, 1e300)
    s = draw(st.one_of(st.sampled_from(SPECIAL_SCALES), st.floats(lo, hi)))
    return _to_dtype(s, dtype)


@st.composite
def quant_values(draw, s: float, qmax: int, dtype, size: int):
    """Finite values of ``dtype`` around the code grid of scale s: arbitrary floats, values in the
    clamp range, exact code points k*s, half codes (k+1/2)*s (ties, exact when s is a power of two)
    and their neighbours one ulp away."""
    big = min(3.0 * qmax * s, torch.finfo(dtype).max)
    k = st.integers(-2 * qmax - 2, 2 * qmax + 2)
    one = st.one_of(
        st.floats(allow_nan=False, allow_infinity=False, width=32 if dtype == torch.float32 else 64),
        st.floats(-big, big),
        k.map(lambda i: i * s),
        k.map(lambda i: (i + 0.5) * s),
        st.tuples(k, st.sampled_from([-math.inf, math.inf])).map(lambda t: math.nextafter((t[0] + 0.5) * s, t[1])),
    ).map(lambda v: _to_dtype(v, dtype))
    return draw(st.lists(one, min_size=size, max_size=size))


DTYPES = st.sampled_from([torch.float64, torch.float32])


@st.composite
def weight_quant_cases(draw):
    dtype = draw(DTYPES)
    wb = draw(st.integers(2, 16))
    qmax = 2 ** (wb - 1) - 1
    n_rows, n_cols = draw(st.integers(1, 3)), draw(st.integers(1, 12))
    per_row = draw(st.booleans())
    scales = [draw(scale_values(dtype)) for _ in range(n_rows if per_row else 1)]
    rows = [draw(quant_values(scales[i if per_row else 0], qmax, dtype, n_cols)) for i in range(n_rows)]
    return dtype, wb, scales, rows, per_row


@examples(250)
@seed(fuzz_seed(101))
@given(weight_quant_cases())
@example((torch.float64, 3, [1.0], [[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, -3.5, 1e300]], False))
@example((torch.float32, 8, [1e-30], [[3e38, -3e38, 1e-45, 6.35e-29, -6.35e-29]], False))
def test_quantize_weight_matches_integer_formulation(case):
    dtype, wb, scales, rows, per_row = case
    scales = [_to_dtype(v, dtype) for v in scales]  # explicit examples may give float64 literals
    rows = [[_to_dtype(v, dtype) for v in row] for row in rows]
    w = torch.tensor(rows, dtype=dtype)
    s = torch.tensor(scales, dtype=dtype).reshape(-1, 1) if per_row else torch.tensor(scales[0], dtype=dtype)
    got = quant.quantize_weight(w, s, wb)
    assert got.dtype == dtype and got.shape == w.shape
    want = [[weight_code(v, scales[i if per_row else 0], wb, dtype) for v in row] for i, row in enumerate(rows)]
    assert got.tolist() == want


@st.composite
def input_quant_cases(draw):
    dtype = draw(DTYPES)
    signed = draw(st.booleans())
    ab = draw(st.integers(2 if signed else 1, 16))
    qmax = 2 ** (ab - 1) - 1 if signed else 2 ** ab - 1
    s = draw(scale_values(dtype))
    return dtype, ab, signed, s, draw(quant_values(s, qmax, dtype, draw(st.integers(1, 24))))


@examples(250)
@seed(fuzz_seed(102))
@given(input_quant_cases())
@example((torch.float64, 2, True, 1.0, [0.5, -0.5, 1.5, -1.5, 0.49999999999999994, -7.0]))
@example((torch.float64, 1, False, 1.0, [0.5, 1.5, -3.0, 2.5]))
@example((torch.float32, 16, False, 1e-30, [6.5e-26, 1e-40, 3e38]))
def test_quantize_input_matches_integer_formulation(case):
    dtype, ab, signed, s, values = case
    s, values = _to_dtype(s, dtype), [_to_dtype(v, dtype) for v in values]
    got = quant.quantize_input(torch.tensor(values, dtype=dtype), torch.tensor(s, dtype=dtype), ab, signed)
    assert got.dtype == dtype
    assert got.tolist() == [input_code(v, s, ab, signed, dtype) for v in values]
    # The straight-through mask: in range exactly where clamping did not change the rounded value.
    inside = quant.input_in_range(torch.tensor(values, dtype=dtype), torch.tensor(s, dtype=dtype), ab, signed)
    lo = -(2 ** (ab - 1) - 1) if signed else 0
    hi = 2 ** (ab - 1) - 1 if signed else 2 ** ab - 1
    assert inside.tolist() == [lo <= round_half_even(ieee_quotient(v, s, dtype)) <= hi for v in values]


@st.composite
def adc_cases(draw):
    clip = draw(st.one_of(st.integers(1, 3), st.integers(1, 5000), st.integers(1, MAX_ADC_CLIP),
                          st.just(MAX_ADC_CLIP)))
    ba = draw(st.integers(1, 24))
    n = adc_levels(ba, clip)

    def near_threshold(t):  # P next to the boundary between codes k-1 and k: P n / clip = k - 1/2
        k, d = t
        return ((2 * k - 1) * clip) // (2 * n) + d

    p = st.one_of(st.integers(-3, 2 ** 33), st.integers(0, clip + 2), st.sampled_from([0, 1, clip - 1, clip, clip + 1]),
                  st.tuples(st.integers(0, n + 1), st.integers(-1, 1)).map(near_threshold))
    return ba, clip, draw(st.lists(p, min_size=1, max_size=30))


@examples(300)
@seed(fuzz_seed(103))
@given(adc_cases())
@example((3, 14, [0, 1, 2, 3, 4, 5, 6, 7, 13, 14, 15, 100]))  # n = 7, clip = 14: ties at odd P
@example((24, 2 ** 32, [2 ** 33, 2 ** 32 - 1, 2 ** 31, 256, 255, 257]))
@example((12, 5, [0, 1, 2, 3, 4, 5, 6]))  # n = clip: the identity up to clip
def test_adc_codes_match_integer_formulation(case):
    ba, clip, ps = case
    n = adc_levels(ba, clip)
    assert XbarConfig(rows=1, adc_bits=ba, adc_clip=clip).adc_levels == n
    got = quant.adc_codes(torch.tensor(ps, dtype=torch.int64), n, clip)
    assert got.dtype == torch.int64
    got = got.tolist()
    assert got == [adc_code(p, n, clip) for p in ps]
    for p, code in zip(ps, got):
        if 0 <= p <= clip:  # within full scale: the level is the nearest one, at most half a step off
            assert abs(Fraction(code * clip, n) - p) <= Fraction(clip, 2 * n)
            if n == clip:
                assert code == p  # an ADC with a level per partial sum is exact
        elif p > clip:
            assert code == n  # saturation


@examples(100)
@seed(fuzz_seed(104))
@given(st.integers(1, 16).flatmap(lambda width: st.tuples(
    st.just(width), st.integers(0, 62 // width), st.lists(st.integers(0, 2 ** 62), min_size=1, max_size=20))))
def test_bit_field_matches_binary_string(case):
    width, index, values = case
    got = quant.bit_field(torch.tensor(values, dtype=torch.int64), index, width)
    assert got.tolist() == [bit_field_of(v, index, width) for v in values]


@st.composite
def small_adc_configs(draw):
    rows, db, cb = draw(st.integers(1, 8)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    pmax = rows * (2 ** db - 1) * (2 ** cb - 1)
    clip = draw(st.one_of(st.none(), st.integers(1, 3), st.integers(max(1, pmax - 3), pmax + 3),
                          st.integers(1, 4 * pmax)))
    return XbarConfig(rows=rows, cell_bits=cb, dac_bits=db, adc_bits=draw(st.one_of(st.none(), st.integers(1, 12))),
                      adc_clip=clip)


@examples(150)
@seed(fuzz_seed(106))
@given(small_adc_configs())
@example(XbarConfig(rows=1, cell_bits=1, dac_bits=1, adc_bits=2, adc_clip=4))  # n=3 < clip=4, Pmax=1
def test_adc_identity_flag_is_sound(cfg: XbarConfig):
    """config.adc_is_identity (which lets backends skip the bit slicing) may only claim an identity
    ADC when every partial sum 0..Pmax really gets the code P (independent ADC above)."""
    claimed = adc_is_identity(cfg.adc_levels, cfg.clip, cfg.pmax)
    assert cfg.adc_lossless == claimed == GemmParams.from_config(cfg, False).adc_identity
    if cfg.adc_bits is None:
        assert claimed
        event("ideal ADC")
        return
    n = adc_levels(cfg.adc_bits, cfg.clip)
    exact = all(adc_code(p, n, cfg.clip) == p for p in range(cfg.pmax + 1))
    if claimed:
        assert exact, f"adc_is_identity({n}, {cfg.clip}, {cfg.pmax}) but some code differs from its partial sum"
    event("identity ADC" if claimed else "codes == P although not flagged (fast path not taken)" if exact
          else "lossy ADC")


# rows, cols, wb, cb, ab, db, adc_bits, clip, signed: explicit corner cases of SPEC 3
TILE_EXAMPLES = [
    (5, 2, 4, 4, 3, 3, 3, None, False),      # cell_bits >= weight magnitude bits, dac_bits = input bits
    (3, 1, 3, 8, 2, 8, 2, 1, True),          # dac_bits > input magnitude bits, clip 1 (1 level)
    (1, 1, 5, 1, 4, 1, 1, None, True),       # one-row tiles, 1-bit ADC
    (4, 3, 6, 2, 5, 2, 12, 10 ** 6, False),  # clip far above Pmax: codes rounded to 0 or 1
]


def _tile_example(cfg_tuple, m, k, n, seed_):
    rows, cols, wb, cb, ab, db, ba, clip, signed = cfg_tuple
    cfg = XbarConfig(rows=rows, cols=cols, weight_bits=wb, cell_bits=cb, input_bits=ab, dac_bits=db, adc_bits=ba,
                     adc_clip=clip, input_signed=signed)
    g = torch.Generator().manual_seed(seed_)
    qx, qw = cfg.input_qmax(signed), cfg.weight_qmax
    x = torch.randint(-qx if signed else 0, qx + 1, (m, k), generator=g, dtype=torch.int32)
    w = torch.randint(-qw, qw + 1, (k, n), generator=g, dtype=torch.int32)
    x[0] = qx  # a full row: the largest partial sums
    return GemmCase(cfg, GemmParams.from_config(cfg, signed), x, w)


@examples(120)
@seed(fuzz_seed(105))
@given(gemm_cases(budget=200, max_m=3, max_n=3, max_k=300, py_budget=40000))
@example(_tile_example(TILE_EXAMPLES[0], 2, 12, 3, 1))
@example(_tile_example(TILE_EXAMPLES[1], 3, 7, 2, 2))
@example(_tile_example(TILE_EXAMPLES[2], 2, 4, 2, 3))
@example(_tile_example(TILE_EXAMPLES[3], 2, 9, 3, 4))
def test_reference_tile_sums_match_python_loops(case: GemmCase):
    got = ref.tile_sums(case.x, case.w, case.params)
    assert got.dtype == torch.int64
    want = python_tile_sums(case.x.tolist(), case.w.tolist(), case.config, case.params.input_signed)
    assert got.tolist() == want


# ================================================================== 2a. the raw op on every CPU ISA
ISA_FLAGS = {  # /proc/cpuinfo flags each path needs (csrc/cpu/xbar_cpu.cpp, cpu_runs)
    "scalar": set(),
    "avx2": {"avx2", "fma", "popcnt"},
    "avx512": {"avx2", "fma", "popcnt", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vpopcntdq"},
    "amx": {"avx2", "fma", "popcnt", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vpopcntdq",
            "amx_tile", "amx_int8"},
}


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


_FLAGS = _cpu_flags()
HAS_CPU = "cpu" in available_backends()


def _isa_skip_reason(isa: str):
    if not HAS_CPU:
        return "C++ extension not built"
    if isa != "scalar" and not ISA_FLAGS[isa] <= _FLAGS:
        return f"this CPU lacks {sorted(ISA_FLAGS[isa] - _FLAGS)} (/proc/cpuinfo)"
    return None


def _run_with_isa(isa, fn):
    """fn() with XMA2_CPU_ISA=isa (monkeypatched, restored afterwards); a CPU whose flags list the
    ISA but whose build cannot run it skips."""
    with pytest.MonkeyPatch.context() as mp:
        if isa is not None:
            mp.setenv("XMA2_CPU_ISA", isa)
        try:
            return fn()
        except RuntimeError as e:
            if isa is not None and "cannot run that instruction set" in str(e):
                pytest.skip(f"XMA2_CPU_ISA={isa}: {e}")
            raise


def _threaded(fn, *args):
    """fn(*args) with the session's thread count (see _one_thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(SESSION_THREADS)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)


def _small_code_dtype(p: GemmParams, choice: int) -> torch.dtype:
    """int32, or (choice) the smallest dtype that holds the input codes (the CPU op takes uint8/int8/int16)."""
    if choice == 0:
        return torch.int32
    if p.input_signed:
        return torch.int8 if p.input_bits <= 8 else torch.int16 if p.input_bits <= 16 else torch.int32
    return torch.uint8 if p.input_bits <= 8 else torch.int16 if p.input_bits <= 15 else torch.int32


def _make_raw_tile_sums_test(isa: str, n: int, seed_: int):
    reason = _isa_skip_reason(isa)

    @pytest.mark.skipif(reason is not None, reason=reason or "")
    @examples(n)
    @seed(fuzz_seed(seed_))
    @given(case=gemm_cases(budget=1000, max_m=12, max_n=40, max_k=600), small=st.integers(0, 1))
    @example(case=_tile_example((200, 7, 8, 2, 8, 1, 8, None, False), 5, 450, 9, 5), small=1)  # 3 tiles, last partial
    @example(case=_tile_example((129, 3, 16, 3, 16, 5, 12, 2 ** 32, True), 3, 130, 4, 6), small=1)
    @example(case=_tile_example((256, 64, 9, 8, 9, 8, 9, 20000, True), 4, 300, 70, 7), small=0)
    @example(case=_tile_example((1, 1, 2, 1, 1, 1, 1, 1, False), 3, 5, 2, 8), small=1)
    def test(case: GemmCase, small: int):
        p = case.params
        x = case.x.to(_small_code_dtype(p, small))
        got = _run_with_isa(isa, lambda: _threaded(torch.ops.xma2_ops.xbar_tile_sums, x, case.w, *p.as_args()))
        want = ref.tile_sums(case.x, case.w, p)
        assert got.dtype == torch.int64 and got.shape == want.shape
        if not torch.equal(got, want):
            bad = (got != want).nonzero()[0].tolist()
            raise AssertionError(f"XMA2_CPU_ISA={isa}: T_int{bad} = {got[tuple(bad)]}, reference {want[tuple(bad)]}"
                                 f" ({int((got != want).sum())} entries differ)")

    test.__name__ = f"test_tile_sums_op_bit_exact_{isa}"
    return test


test_tile_sums_op_bit_exact_scalar = _make_raw_tile_sums_test("scalar", 250, 201)
test_tile_sums_op_bit_exact_avx2 = _make_raw_tile_sums_test("avx2", 250, 202)
test_tile_sums_op_bit_exact_avx512 = _make_raw_tile_sums_test("avx512", 250, 203)
test_tile_sums_op_bit_exact_amx = _make_raw_tile_sums_test("amx", 250, 204)


# ================================================================== 2b. the public API, every backend
def _gemm_layout(case: ApiCase, y: torch.Tensor) -> torch.Tensor:
    """The op's output as [M, N] in the GEMM's row order."""
    n = case.weight.shape[0]
    return y.reshape(-1, n) if case.kind == "linear" else y.permute(0, 2, 3, 1).reshape(-1, n)


def _call(case: ApiCase, backend: str) -> torch.Tensor:
    threads = torch.get_num_threads()
    torch.set_num_threads(SESSION_THREADS)  # the kernels' threaded paths as users run them
    try:
        if case.kind == "linear":
            return xma2_ops.xbar_linear(case.x, case.weight, case.bias, **case.common_kwargs(), backend=backend)
        return xma2_ops.xbar_conv2d(case.x, case.weight, case.bias, case.stride, case.padding, case.dilation,
                                    **case.common_kwargs(), backend=backend)
    finally:
        torch.set_num_threads(threads)


def _oracle(case: ApiCase) -> torch.Tensor:
    kw = case.common_kwargs()
    if case.kind == "conv":
        return ref.xbar_conv2d_reference(case.x, case.weight, case.bias, case.stride, case.padding, case.dilation, **kw)
    n, k = case.weight.shape  # a linear layer is a 1x1 conv over [M, K, 1, 1]
    if case.task_weight is not None:
        kw["task_weight"] = case.task_weight.reshape(n, k, 1, 1)
    y = ref.xbar_conv2d_reference(case.x.reshape(-1, k, 1, 1), case.weight.reshape(n, k, 1, 1), case.bias, **kw)
    return y.reshape(*case.x.shape[:-1], n)


def _unfold(case: ApiCase, t: torch.Tensor) -> torch.Tensor:
    if case.kind == "linear":
        return t.reshape(-1, t.shape[-1])
    kh, kw = case.weight.shape[2:]
    cols = F.unfold(t, (kh, kw), dilation=case.dilation, padding=case.padding, stride=case.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def output_tolerance(case: ApiCase, with_code: bool = False):
    """(tol [M, N], strict): per output, a quarter of the smallest change one ADC code can make
    there (one code in the lowest slice, 2^0, of the row tile whose coefficient is smallest), but
    never below a bound of the float64 rounding of the backends and of the reference.  ``strict``:
    the rounding bound is below the quarter code everywhere, so any wrong code fails.

    Derivation (as test_equivalence.py): y[m, n] = s_x * adc_step * sum_r (c_b[r, n] T_b[r, m, n]
    + c_t[r, n] T_t[r, m, n]) + bias[n] with c_b = (1 - m) alpha s_w and c_t = m s_t, T integers;
    one code more in tile r moves y by s_x * adc_step * |c[r, n]|.  Both sides compute the same
    exact integers T and round a few products and a sum of Tr terms: their difference is below
    (24 + 4 Tr) eps sum_r |terms| (eps = 2^-52)."""
    cfg = case.config
    n = case.weight.shape[0]
    signed = cfg.resolve_signed(bool((case.x < 0).any()))

    def scale(given, t, qmax):
        s = quant.derived_scale(t, qmax) if given is None else torch.as_tensor(given, dtype=torch.float64)
        return s.double().reshape(-1).expand(n) if s.numel() == 1 else s.double().reshape(-1)

    s_x = float(quant.derived_scale(case.x, cfg.input_qmax(signed)) if case.input_scale is None
                else case.input_scale)
    x_codes = _unfold(case, quant.quantize_input(case.x, torch.tensor(s_x, dtype=torch.float64), cfg.input_bits,
                                               signed))
    p = GemmParams.from_config(cfg, signed)
    k = x_codes.shape[1]
    tr, _ = cfg.tiles(k, n)
    m_col = (torch.zeros(tr, n, dtype=torch.float64) if case.pe_mask is None
             else quant.column_tiles(case.pe_mask, n, cfg.cols))
    alpha = torch.ones(tr, n, dtype=torch.float64) if case.col_scale is None else case.col_scale
    unit = s_x * cfg.adc_step
    weights = [(case.weight, case.weight_scale, lambda s: ((1 - m_col) * alpha * s).abs())]
    if case.task_weight is not None:
        weights.append((case.task_weight, case.task_weight_scale, lambda s: (m_col * s).abs()))
    mag = torch.zeros(x_codes.shape[0], n, dtype=torch.float64)
    effects = []
    for w, given, coef in weights:
        s_w = scale(given, w, cfg.weight_qmax)
        w_codes = quant.quantize_weight(w.reshape(n, -1), s_w.reshape(-1, 1), cfg.weight_bits).T
        c = coef(s_w)  # [Tr, N]
        mag += unit * (c.unsqueeze(1) * ref.tile_sums(x_codes, w_codes, p).double().abs()).sum(0)
        effects.append(c)
    if case.bias is not None:
        mag += case.bias.abs()
    eff = torch.cat(effects)
    smallest = torch.where(eff > 0, eff, torch.full_like(eff, math.inf)).amin(0)  # [N]
    quarter_code = 0.25 * unit * smallest  # inf: no PE of the column contributes
    rounding = (24 + 4 * tr) * 2.0 ** -52 * mag + 1e-300
    strict = bool((rounding <= quarter_code).all())
    tol = torch.where(torch.isfinite(quarter_code), quarter_code, torch.zeros_like(quarter_code))
    tol = torch.maximum(tol.expand_as(rounding), rounding)
    return (tol, strict, unit * smallest) if with_code else (tol, strict)


def compare_to_oracle(case: ApiCase, y: torch.Tensor, y_ref: torch.Tensor, tol: torch.Tensor, what: str) -> None:
    assert y.dtype == y_ref.dtype == case.x.dtype, (y.dtype, y_ref.dtype)
    assert y.shape == y_ref.shape, (tuple(y.shape), tuple(y_ref.shape))
    got, want = _gemm_layout(case, y), _gemm_layout(case, y_ref)
    bad = ~((got - want).abs() <= tol)  # NaN or inf in one of them is bad too
    if bad.any():
        m, n = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} outputs differ from the reference by more than the tolerance; "
            f"first at GEMM (m={m}, n={n}): got {got[m, n].item()!r}, reference {want[m, n].item()!r}, "
            f"|diff| {abs(got[m, n] - want[m, n]).item():.6g} > tol {tol[m, n].item():.6g}")


API_BACKENDS = [("cpu", isa) for isa in ISA_FLAGS] + [("reference", None), ("triton", None)]


def _api_skip_reason(backend: str, isa):
    if backend == "cpu":
        return _isa_skip_reason(isa)
    if backend not in available_backends():
        return f"backend {backend!r} not available"
    if backend == "triton":
        from xma2_ops.backends import dispatch
        if "cpu" not in dispatch._BACKENDS["triton"].supported_devices:
            return "Triton runs on CUDA tensors only here (TRITON_INTERPRET was not set before Triton loaded)"
    return None


def _make_api_test(kind: str, backend: str, isa, n: int, seed_: int):
    reason = _api_skip_reason(backend, isa)
    light = backend == "triton"
    what = f"xbar_{kind}(backend={backend!r}" + (f", XMA2_CPU_ISA={isa})" if isa else ")")

    @pytest.mark.skipif(reason is not None, reason=reason or "")
    @examples(n)
    @seed(fuzz_seed(seed_))
    @given(case=api_cases(kind, light=light))
    def test(case: ApiCase):
        y_ref = _oracle(case)
        y = _run_with_isa(isa, lambda: _call(case, backend))
        tol, strict = output_tolerance(case)
        event("tolerance: 1/4 of one ADC code" if strict else
              "tolerance: float64 rounding bound (one code is below it somewhere)")
        note(f"strict={strict}, max tol {tol.max().item():.3g}")
        compare_to_oracle(case, y, y_ref, tol, what)

    name = f"test_{kind}_{backend}" + (f"_{isa}" if isa else "") + "_matches_reference"
    test.__name__ = name
    return name, test


# (backend, isa): examples per kind (linear and conv each)
API_EXAMPLES = {("cpu", "scalar"): 80, ("cpu", "avx2"): 80, ("cpu", "avx512"): 80, ("cpu", "amx"): 80,
                ("reference", None): 25, ("triton", None): 15}
for _i, (_kind, (_backend, _isa)) in enumerate((k, b) for k in ("linear", "conv") for b in API_BACKENDS):
    _name, _test = _make_api_test(_kind, _backend, _isa, API_EXAMPLES[(_backend, _isa)], 300 + _i)
    globals()[_name] = _test
del _i, _kind, _backend, _isa, _name, _test


@examples(40)
@seed(fuzz_seed(399))
@given(case=st.sampled_from(["linear", "conv"]).flatmap(api_cases))
def test_tolerance_catches_one_wrong_code(case: ApiCase):
    """The comparison above fails when one output is off by the change of one ADC code (in the
    lowest slice of the row tile with the smallest coefficient of its column)."""
    y_ref = _oracle(case)
    tol, strict, one_code = output_tolerance(case, with_code=True)
    columns = torch.isfinite(one_code).nonzero().flatten().tolist()
    event(f"strict={strict}, contributing columns: {bool(columns)}")
    if not strict or not columns:
        return
    col = columns[len(columns) // 2]
    bumped = _gemm_layout(case, y_ref).clone()
    row = bumped.shape[0] // 2
    bumped[row, col] += one_code[col]
    if case.kind == "linear":
        y_bad = bumped.reshape(y_ref.shape)
    else:
        b, n, ho, wo = y_ref.shape
        y_bad = bumped.reshape(b, ho, wo, n).permute(0, 3, 1, 2)
    assert torch.equal(_gemm_layout(case, y_bad), bumped)  # the layout round trip is right
    with pytest.raises(AssertionError, match="differ from the reference"):
        compare_to_oracle(case, y_bad, y_ref, tol, "bumped")
