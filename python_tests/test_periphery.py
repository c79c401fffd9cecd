"""SPEC section 8 (periphery conventions): every field combination against an independent formulation
written from section 8 alone (Python integers and exact fractions, one output element at a time), the
backends against the reference bit for bit, CrossSim 3.2's golden outputs, the cancellation of g0
under differential sensing, refusals, gradients, torch.compile."""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import random
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import xma2_ops
from xma2_ops import quant
from xma2_ops import DeviceModel, XbarConfig
from xma2_ops.backends import reference as ref
from xma2_ops.config import PERIPHERY_FIELDS, PERIPHERY_PRESETS, GemmParams, row_tile_sizes

from helpers import cpu_isas
from strategies import examples, fuzz_seed

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden"


# ------------------------------------------------------------------ the independent formulation
def _round_code(q: Fraction, n: int, half_even: bool) -> int:
    """clamp(floor(q), 0, n); a tie (q an integer) with an odd code goes one down under half_even."""
    code = min(max(q.numerator // q.denominator, 0), n)
    if half_even and q.denominator == 1 and code % 2 == 1 and 0 < q <= n:
        code -= 1
    return code


def oracle_t(x: list, w: list, cfg: XbarConfig, signed: bool, k_tiles: list, frac: int = 0,
             g: list = None) -> list:
    """T[r][m][n] as exact Fractions from SPEC 8 alone.  x [M][K] ints, w [K][N] ints; with ``g``
    (g[q][j][k][n], fixed-point conductances in units of 2^-frac) the cells replace the weight slices."""
    db, cb = cfg.dac_bits, cfg.cell_bits
    xb = cfg.input_bits - 1 if signed else cfg.input_bits
    chunks = -(-xb // db)
    slices = -(-(cfg.weight_bits - 1) // cb)
    sm = signed and cfg.signed_inputs == "sign_magnitude"
    diff = cfg.sensing == "differential"
    analog = cfg.input_accumulation == "analog"
    adc_signed = diff or sm
    m_total, n_total = len(x), len(g[0][0][0]) if g is not None else len(w[0])

    def x_pol(v: int, p: int) -> int:  # x^p, or the signed value itself under sign_magnitude
        if sm or not signed:
            return v
        return max(v, 0) if p == 0 else max(-v, 0)

    def c(v: int, i: int) -> int:  # the chunk of SPEC 8.1
        mag = (abs(v) >> (i * db)) & ((1 << db) - 1)
        return mag if v >= 0 else -mag

    def cell(q: int, j: int, k: int, n: int) -> int:
        if g is not None:
            return g[q][j][k][n]
        wq = max(w[k][n], 0) if q == 0 else max(-w[k][n], 0)
        return ((wq >> (j * cb)) & ((1 << cb) - 1)) << frac

    out = []
    k0 = 0
    for rows in k_tiles:
        ks = range(k0, k0 + rows)
        k0 += rows
        if cfg.adc_clip is not None:
            clip = cfg.adc_clip
        else:
            rr = rows if cfg.adc_range == "tile_rows" else cfg.rows
            clip = rr * ((1 << cb) - 1) * ((1 << (xb if analog else db)) - 1)
        if cfg.adc_bits is not None:
            n_lv = min(2 ** cfg.adc_bits - 2, 2 * clip) if adc_signed else min(2 ** cfg.adc_bits - 1, clip)
            lo, hi = (-clip, clip) if adc_signed else (0, clip)
        tile = [[Fraction(0)] * n_total for _ in range(m_total)]
        for m in range(m_total):
            for n in range(n_total):
                total = Fraction(0)
                for p in ([0] if (sm or not signed) else [0, 1]):
                    for j in range(slices):
                        for qs in ([(0, 1), (1, -1)],) if diff else ([(0, 1)], [(1, -1)]):
                            for is_ in ([list(range(chunks))] if analog else [[i] for i in range(chunks)]):
                                v = 0
                                for q, sq in qs:
                                    for i in is_:
                                        pv = sum(c(x_pol(x[m][k], p), i) * cell(q, j, k, n) for k in ks)
                                        v += (sq if diff else 1) * (2 ** (i * db) if analog else 1) * pv
                                if cfg.adc_bits is None:
                                    vhat = Fraction(v, 2 ** frac)
                                else:
                                    vf = Fraction(v, 2 ** frac)
                                    q_ = (2 * (vf - lo) * n_lv + (hi - lo)) / (2 * (hi - lo))
                                    code = _round_code(q_, n_lv, cfg.adc_rounding == "half_even")
                                    vhat = lo + Fraction(code * (hi - lo), n_lv)
                                sign = (1 if p == 0 else -1) * (1 if diff else qs[0][1])
                                shift = j * cb + (0 if analog else is_[0] * db)
                                total += sign * 2 ** shift * vhat
                tile[m][n] = total
        out.append(tile)
    return out


def _as_fractions(t_int: torch.Tensor, p: GemmParams, k: int, frac: int = 0) -> list:
    """T_int times the exact step of its tile ((hi - lo) / n, or 2^-F for the ideal ADC)."""
    out = []
    for r, rows in enumerate(p.tile_rows(k)):
        levels, clip = p.tile_adc(rows)
        step = Fraction(1, 2 ** frac) if levels == 0 else Fraction((2 if p.adc_signed else 1) * clip, levels)
        assert float(step) == p.tile_steps(k, frac)[r]
        out.append([[Fraction(int(v)) * step for v in row] for row in t_int[r].tolist()])
    return out


_FIELD_COMBOS = list(itertools.product(*PERIPHERY_FIELDS.values()))


@st.composite
def periphery_cases(draw):
    combo = draw(st.sampled_from(_FIELD_COMBOS))
    fields = dict(zip(PERIPHERY_FIELDS, combo))
    rows = draw(st.integers(1, 9))
    k = draw(st.integers(1, 3 * rows))
    if fields["row_split"] == "even":
        tr = -(-k // rows)
        size = round(k / tr) if k % tr else k // tr
        if k - (tr - 1) * size > rows:
            fields["row_split"] = "fixed"
    input_bits = draw(st.integers(2, 6))
    cfg = XbarConfig(rows=rows, cols=draw(st.integers(1, 4)), weight_bits=draw(st.integers(2, 7)),
                     cell_bits=draw(st.integers(1, 3)), input_bits=input_bits, dac_bits=draw(st.integers(1, 3)),
                     adc_bits=draw(st.one_of(st.none(), st.integers(2, 7))),
                     adc_clip=draw(st.one_of(st.none(), st.integers(1, 60))), **fields)
    signed = draw(st.booleans())
    m, n = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    return cfg, signed, m, k, n, draw(st.integers(0, 2 ** 31 - 1))


def _codes(seed: int, cfg: XbarConfig, signed: bool, m: int, k: int, n: int):
    gen = torch.Generator().manual_seed(seed)
    qx = cfg.input_qmax(signed)
    qw = cfg.weight_qmax
    x = torch.randint(-qx if signed else 0, qx + 1, (m, k), generator=gen)
    w = torch.randint(-qw, qw + 1, (k, n), generator=gen)
    return x, w


@examples(150)
@given(periphery_cases())
def test_reference_matches_the_section8_formulation(case):
    cfg, signed, m, k, n, seed = case
    x, w = _codes(seed, cfg, signed, m, k, n)
    p = GemmParams.from_config(cfg, signed)
    got = _as_fractions(ref.tile_sums(x, w, p), p, k)
    want = oracle_t(x.tolist(), w.tolist(), cfg, signed, list(row_tile_sizes(k, cfg.rows, cfg.row_split)))
    assert got == want, (cfg, signed)


@examples(40)
@given(periphery_cases())
def test_cells_reference_matches_the_section8_formulation(case):
    cfg, signed, m, k, n, seed = case
    frac = seed % 4
    x, _ = _codes(seed, cfg, signed, m, k, n)
    s = cfg.weight_slices
    gen = torch.Generator().manual_seed(seed + 1)
    gq = torch.randint(0, ((1 << cfg.cell_bits) + 1) << frac, (2, s, k, n), generator=gen)
    p = GemmParams.from_config(cfg, signed)
    got = _as_fractions(ref.cell_tile_sums(x, gq, p, frac), p, k, frac)
    want = oracle_t(x.tolist(), None, cfg, signed, list(row_tile_sizes(k, cfg.rows, cfg.row_split)), frac,
                    gq.tolist())
    assert got == want, (cfg, signed, frac)


@examples(120)
@given(periphery_cases())
def test_engine_gives_the_reference_bits(case):
    """periphery.py (what cpu/triton/cuda run) == the reference loops, codes and cells, int64 exact."""
    from xma2_ops.backends import periphery
    cfg, signed, m, k, n, seed = case
    x, w = _codes(seed, cfg, signed, m, k, n)
    p = GemmParams.from_config(cfg, signed)
    assert torch.equal(periphery.tile_sums(x.to(torch.int32), w.to(torch.int32), p), ref.tile_sums(x, w, p))
    frac = seed % 5
    gen = torch.Generator().manual_seed(seed + 7)
    gq = torch.randint(0, ((1 << cfg.cell_bits) + 2) << frac, (2, cfg.weight_slices, k, n), generator=gen)
    assert torch.equal(periphery.cell_tile_sums(x, gq.to(torch.int32), p, frac), ref.cell_tile_sums(x, gq, p, frac))


def _backends():
    names = [b for b in ("cpu", "triton") if b in xma2_ops.available_backends()]
    return names


def _masked_conv_case(gen, cfg: XbarConfig, signed: bool = True):
    """x [2, 3, 6, 6] (non-negative unless signed), w [8, 3, 3, 3] and the xbar_conv2d keywords of a conv
    with task weights and fractional masks (config, task_weight, pe_mask, col_scale, padding=1), float64."""
    x = torch.randn(2, 3, 6, 6, generator=gen, dtype=torch.float64)
    x = x if signed else x.abs()
    w = torch.randn(8, 3, 3, 3, generator=gen, dtype=torch.float64)
    wt = torch.randn(8, 3, 3, 3, generator=gen, dtype=torch.float64)
    tr, tc = cfg.tiles(27, 8)
    mask = torch.rand(tr, tc, generator=gen, dtype=torch.float64)
    alpha = torch.rand(tr, 8, generator=gen, dtype=torch.float64) + 0.5
    return x, w, dict(config=cfg, task_weight=wt, pe_mask=mask, col_scale=alpha, padding=1)


@pytest.mark.parametrize("combo", _FIELD_COMBOS[::3] + [_FIELD_COMBOS[-1]])
def test_layers_give_the_same_bits_on_every_backend(combo):
    """xbar_conv2d with task weights and fractional masks: cpu (and triton in the interpreter) == reference."""
    fields = dict(zip(PERIPHERY_FIELDS, combo))
    gen = torch.Generator().manual_seed(sum(i * (2 ** n) for n, i in enumerate(map(len, combo))))
    cfg = XbarConfig(rows=20, cols=6, weight_bits=6, cell_bits=2, input_bits=5, dac_bits=2, adc_bits=5, **fields)
    x, w, kw = _masked_conv_case(gen, cfg)
    want = xma2_ops.xbar_conv2d(x, w, backend="reference", **kw)
    oracle = ref.xbar_conv2d_reference(x, w, **kw)
    torch.testing.assert_close(want, oracle, rtol=1e-12, atol=1e-12)
    for be in _backends():
        assert torch.equal(xma2_ops.xbar_conv2d(x, w, backend=be, **kw), want), be


# ------------------------------------------------------------------ CrossSim 3.2
def _golden_cases():
    meta = json.loads((GOLDEN / "crosssim_section8.json").read_text())
    return meta["cases"]


@pytest.mark.skipif(not (GOLDEN / "crosssim_section8.json").exists(), reason="shared/golden is not beside the checkout")
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_crosssim_golden_outputs(backend):
    data = np.load(GOLDEN / "crosssim_section8.npz")
    cases = _golden_cases()
    assert len(cases) == 21
    for c in cases:
        cfg = XbarConfig(**c["config"])
        w = torch.tensor(data[c["w_codes"]], dtype=torch.float64) * c["weight_scale"]
        x = torch.tensor(data[c["x_codes"]], dtype=torch.float64) * c["input_scale"]
        y = xma2_ops.xbar_linear(x, w, config=cfg, input_scale=c["input_scale"], weight_scale=c["weight_scale"],
                                 backend=backend)
        want = torch.tensor(data[c["y"]])
        # float64 rounding only: one ADC code is worth >= 1e-5 here
        torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12, msg=c["name"])


def test_crosssim_preset():
    cfg = XbarConfig.conventions("crosssim", rows=64)
    assert (cfg.sensing, cfg.input_accumulation, cfg.signed_inputs, cfg.adc_rounding, cfg.row_split,
            cfg.adc_range) == ("differential", "analog", "sign_magnitude", "half_even", "even", "tile_rows")
    assert cfg.rows == 64
    assert XbarConfig.conventions("xma2") == XbarConfig()
    assert XbarConfig().periphery == 0
    with pytest.raises(ValueError, match="conventions"):
        XbarConfig.conventions("isaac")


# ------------------------------------------------------------------ device: g0 cancels under differential sensing
@pytest.mark.parametrize("signed_inputs", ["two_pass", "sign_magnitude"])
def test_differential_sensing_cancels_g0(signed_inputs):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(5, 300, generator=gen)
    w = torch.randn(9, 300, generator=gen)
    base = XbarConfig(rows=128, cols=4, sensing="differential", signed_inputs=signed_inputs)  # a lossy ADC
    ideal = xma2_ops.xbar_linear(x, w, config=base)
    for on_off in (2.0, 10.0, 1000.0):
        dev = DeviceModel(on_off=on_off, seed=3)
        assert not dev.ideal
        got = xma2_ops.xbar_linear(x, w, config=dataclasses.replace(base, device=dev))
        assert torch.equal(got, ideal), on_off
    # per-polarity sensing does not cancel it (each polarity's g0 is converted on its own)
    per_pol = dataclasses.replace(base, sensing="per_polarity")
    assert not torch.equal(xma2_ops.xbar_linear(x, w, config=dataclasses.replace(per_pol, device=DeviceModel(on_off=2.0))),
                           xma2_ops.xbar_linear(x, w, config=per_pol))


# ------------------------------------------------------------------ refusals
def test_even_split_that_overfills_the_last_tile_is_refused():
    assert row_tile_sizes(576, 128, "even") == (115, 115, 115, 115, 116)
    assert row_tile_sizes(300, 128, "even") == (100, 100, 100)
    assert row_tile_sizes(10, 4, "even") == (3, 3, 4)
    # K = 7, R = 4: Tr = 2, round_half_even(3.5) = 4 and 3: fine; K = 9, R = 5: 2 tiles of 4 and 5: fine
    assert row_tile_sizes(7, 4, "even") == (4, 3)
    # K = 13, R = 4: Tr = 4, round(3.25) = 3, last 13 - 9 = 4 <= 4; K = 11, R = 2: Tr = 6, round(1.83) = 2, last 1
    cfg = XbarConfig(rows=4, row_split="even", weight_bits=None, input_bits=None, adc_bits=None)
    # K = 6, R = 4? Tr = 2, 3 + 3.  Overfill: K = 18, R = 5: Tr = 4, round(4.5) = 4 (even), last 6 > 5
    with pytest.raises(ValueError, match=r"row_split.*K = 18.*R = 5"):
        row_tile_sizes(18, 5, "even")
    bad = XbarConfig(rows=5, row_split="even")
    with pytest.raises(ValueError, match=r"row_split.*K = 18"):
        xma2_ops.xbar_linear(torch.randn(2, 18), torch.randn(3, 18), config=bad)
    with pytest.raises(ValueError, match=r"row_split.*K = 18"):
        xma2_ops.xbar_linear(torch.randn(2, 18), torch.randn(3, 18),
                             config=dataclasses.replace(bad, weight_bits=None, input_bits=None, adc_bits=None))
    assert cfg.row_layout(6) == (3, 3)


@pytest.mark.parametrize("kw, field", [
    (dict(sensing="diff"), "sensing"),
    (dict(input_accumulation=1), "input_accumulation"),
    (dict(signed_inputs="twos_complement"), "signed_inputs"),
    (dict(adc_rounding="nearest"), "adc_rounding"),
    (dict(row_split=None), "row_split"),
    (dict(adc_range="tile"), "adc_range"),
    (dict(sensing="differential", adc_bits=1), "adc_bits"),
    (dict(signed_inputs="sign_magnitude", adc_bits=1), "adc_bits"),
    (dict(input_accumulation="analog", rows=1 << 16, input_bits=16, cell_bits=8), "input_accumulation"),
])
def test_bad_periphery_fields_are_refused(kw, field):
    with pytest.raises((TypeError, ValueError), match=f"XbarConfig.{field}"):
        XbarConfig(**kw)


def test_one_bit_adc_is_unsigned_only():
    """adc_bits = 1 is an unsigned 1-bit comparator; with sign_magnitude it is allowed for unsigned inputs
    (their V is never negative), and refused wherever a signed ADC could be needed."""
    XbarConfig(signed_inputs="sign_magnitude", adc_bits=1, input_signed=False)
    XbarConfig(input_accumulation="analog", adc_bits=1)


# ------------------------------------------------------------------ gradients, modules, torch.compile
@pytest.mark.parametrize("preset", ["crosssim", "mixed"])
def test_coefficient_gradients_are_the_tile_sums(preset):
    cfg = (XbarConfig.conventions("crosssim", rows=16, cols=4, adc_bits=6) if preset == "crosssim" else
           XbarConfig(rows=16, cols=4, adc_bits=6, sensing="differential", adc_rounding="half_even"))
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 40, generator=gen, dtype=torch.float64)
    w = torch.randn(7, 40, generator=gen, dtype=torch.float64)
    tr, tc = cfg.tiles(40, 7)
    wt = torch.randn(7, 40, generator=gen, dtype=torch.float64)
    mask = (torch.rand(tr, tc, generator=gen, dtype=torch.float64) * 0.5).requires_grad_()
    alpha = (torch.rand(tr, 7, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    gy = torch.randn(6, 7, generator=gen, dtype=torch.float64)
    grads = {}
    for be in ["cpu", "reference"]:
        y = xma2_ops.xbar_linear(x, w, config=cfg, task_weight=wt, pe_mask=mask, col_scale=alpha, backend=be)
        grads[be] = torch.autograd.grad(y, (mask, alpha), gy)
    # dL/dalpha[r, n] = (1 - m) s_x s_w step_r sum_m gy T_int[r, m, n] (SPEC 5): from the reference's T
    signed = True
    p = GemmParams.from_config(cfg, signed)
    s_x = x.abs().max() / cfg.input_qmax(signed)
    s_w = w.abs().max() / cfg.weight_qmax
    x_int = quant.quantize_input(x, s_x, cfg.input_bits, signed)
    w_int = quant.quantize_weight(w, s_w, cfg.weight_bits).T
    t = ref.tile_sums(x_int, w_int, p).double() * torch.tensor(p.tile_steps(40), dtype=torch.float64)[:, None, None]
    m_col = quant.column_tiles(mask.detach(), 7, cfg.cols)
    want_alpha = (1 - m_col) * s_x * s_w * torch.einsum("rmn,mn->rn", t, gy)
    for be, (g_mask, g_alpha) in grads.items():
        torch.testing.assert_close(g_alpha, want_alpha, rtol=1e-12, atol=1e-12, msg=be)
    torch.testing.assert_close(grads["cpu"][0], grads["reference"][0], rtol=1e-12, atol=1e-12)


def test_module_trains_and_compiles_with_crosssim_conventions():
    torch.manual_seed(0)
    cfg = XbarConfig.conventions("crosssim", rows=32, cols=8)
    layer = xma2_ops.XbarConv2d(3, 8, 3, padding=1, config=cfg)
    x = torch.randn(2, 3, 8, 8)
    y = layer(x)
    y.square().mean().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    layer.eval()
    with torch.no_grad():
        eager = layer(x)
        compiled = torch.compile(layer, fullgraph=True, backend="eager")(x)
    assert torch.equal(compiled, eager)


def test_periphery_does_not_change_the_default_path():
    """The defaults of section 8 are sections 2-3: same GemmParams as before and the C++ kernel runs."""
    cfg = XbarConfig(rows=128, cols=4)
    p = GemmParams.from_config(cfg, True)
    assert p.periphery == 0 and p.adc_levels == 255 and p.adc_clip == cfg.pmax == 384
    assert xma2_ops.backends.backend_for("cpu", torch.device("cpu"), p)[0].name == "cpu"
    # the C++ CPU kernels compute the even split (and every other convention but analog accumulation over more
    # than 8 bits) themselves
    q = GemmParams.from_config(dataclasses.replace(cfg, row_split="even"), True)
    assert xma2_ops.backends.backend_for("cpu", torch.device("cpu"), q)[0].name == "cpu"


# ------------------------------------------------------------------ ADC calibration sees what a conversion sees
@pytest.mark.parametrize("fields", [dict(sensing="differential"), dict(input_accumulation="analog"),
                                    dict(signed_inputs="sign_magnitude", sensing="differential"),
                                    dict(row_split="even", rows=24)])
def test_calibrate_adc_uses_the_values_one_conversion_sees(fields):
    """percentile=100 gives max |V| over every conversion, V computed here by brute force from SPEC 8.1."""
    torch.manual_seed(3)
    cfg = XbarConfig(**{"rows": 16, "cols": 8, **fields})
    lin = xma2_ops.XbarLinear(40, 6, bias=False, config=cfg)
    x = torch.randn(12, 40)
    lin.eval()
    lin(x)  # calibrates the input range and sign
    clips = xma2_ops.calibrate_adc(lin, [x], batches=1, method="percentile", percentile=100)
    signed = bool(lin.input_signed)
    s_x = float(lin.input_range) / cfg.input_qmax(signed)
    xi = quant.quantize_input(x.double(), torch.tensor(s_x, dtype=torch.float64), cfg.input_bits, signed).long()
    lin.program()
    w = lin.programmed.codes.long()
    db, cb = cfg.dac_bits, cfg.cell_bits
    xb = cfg.input_magnitude_bits(signed)
    chunks = -(-xb // db)
    sm = signed and cfg.signed_inputs == "sign_magnitude"
    pols = [xi] if (sm or not signed) else [xi.clamp(min=0), (-xi).clamp(min=0)]
    best = 0
    k0 = 0
    for rows in row_tile_sizes(40, cfg.rows, cfg.row_split):
        xs, ws = slice(k0, k0 + rows), slice(k0, k0 + rows)
        k0 += rows
        for xp in pols:
            for j in range(cfg.weight_slices):
                wq = [((w[ws].clamp(min=0) >> (j * cb)) & ((1 << cb) - 1)),
                      (((-w[ws]).clamp(min=0) >> (j * cb)) & ((1 << cb) - 1))]
                cs = [torch.sign(xp[:, xs]) * ((xp[:, xs].abs() >> (i * db)) & ((1 << db) - 1)) for i in range(chunks)]
                p = [[c @ wq[q] for c in cs] for q in range(2)]
                qsets = [[0, 1]] if cfg.sensing == "differential" else [[0], [1]]
                isets = [list(range(chunks))] if cfg.input_accumulation == "analog" else [[i] for i in range(chunks)]
                for qs in qsets:
                    for is_ in isets:
                        v = sum((1 if q == 0 or len(qs) == 1 else -1) * (2 ** (i * db) if len(is_) > 1 else 1) * p[q][i]
                                for q in qs for i in is_)
                        best = max(best, int(v.abs().max()))
    assert clips[""] == best

# ------------------------------------------------------------------ the C++ CPU kernels compute bits 1 | 4 | 8 | 16 | 32
# sensing="differential" (1), signed_inputs="sign_magnitude" (4), adc_rounding="half_even" (8), row_split="even"
# (16) and adc_range="tile_rows" (32) run in the bit-plane kernels themselves (csrc/cpu/xbar_cpu_block.h, the
# tile layout and per-tile ADCs of csrc/cpu/plan.h), on every instruction set, packed or not; analog accumulation
# (2) of at most 8 bits as one DAC chunk (GemmParams.kernel_form).
_KERNEL_FIELDS = {1: ("sensing", "differential"), 2: ("input_accumulation", "analog"),
                  4: ("signed_inputs", "sign_magnitude"), 8: ("adc_rounding", "half_even"), 16: ("row_split", "even"),
                  32: ("adc_range", "tile_rows")}
_KERNEL_BITS = [sum(c) for n in range(4) for c in itertools.combinations((1, 4, 8), n)]  # all 8 combinations
# The tile layout and per-tile ADC range, alone, together, and with the other conventions (63: the crosssim preset).
_SPLIT_BITS = [16, 32, 16 | 32, 1 | 16, 4 | 8 | 32, 1 | 4 | 8 | 16 | 32, 63]


def _kernel_fields(bits: int) -> dict:
    return dict(v for b, v in _KERNEL_FIELDS.items() if bits & b)


_ISAS = cpu_isas()
needs_cpu = pytest.mark.skipif(not _ISAS, reason="C++ extension not built")


@contextlib.contextmanager
def _isa(name: str):
    """XMA2_CPU_ISA=name inside the block (for Hypothesis tests, which cannot take monkeypatch)."""
    old = os.environ.get("XMA2_CPU_ISA")
    os.environ["XMA2_CPU_ISA"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("XMA2_CPU_ISA", None)
        else:
            os.environ["XMA2_CPU_ISA"] = old


def _random_kernel_params(rnd, bits: int, signed: bool, adc: str) -> GemmParams:
    """A config with the periphery ``bits`` and an ADC that is lossy ('lossy': small, coarse, saturating or not,
    with many exact ties), lossless ('lossless': n = hi - lo, clip >= Pmax) or ideal."""
    rows = rnd.choice([1, 3, 7, 16, 31, 33, 64, 70, 128, 150])
    db, cb = rnd.randint(1, 4), rnd.randint(1, 4)
    pmax = rows * (2 ** db - 1) * (2 ** cb - 1)
    if adc == "ideal":
        adc_bits, clip = None, None
    elif adc == "lossless":
        adc_bits, clip = 24, rnd.choice([None, pmax + rnd.randint(0, 50)])
    else:
        adc_bits = rnd.choice([2, 3, 4, 5, 6, 8, 10])
        clip = rnd.choice([None, max(1, pmax // 3), pmax, 2 * pmax, rnd.randint(1, pmax + 5), rnd.randint(1, 12)])
    cfg = XbarConfig(rows=rows, cols=rnd.choice([1, 4, 8, 13]), weight_bits=rnd.randint(2, 8), cell_bits=cb,
                     input_bits=rnd.randint(2, 8), dac_bits=db, adc_bits=adc_bits, adc_clip=clip, input_signed=signed,
                     **_kernel_fields(bits))
    p = GemmParams.from_config(cfg, signed)
    assert p.periphery == bits and (p.kernel_form() == p or adc == "ideal")  # (ideal: the raw op gets the bits anyway)
    if adc == "lossless":
        assert p.adc_identity
    return p


def _kernel_codes(gen, m: int, k: int, n: int, p: GemmParams):
    qx, qw = 2 ** p.x_bits - 1, 2 ** (p.weight_bits - 1) - 1
    x = torch.randint(-qx if p.input_signed else 0, qx + 1, (m, k), generator=gen)
    x = (x * (torch.rand(m, k, generator=gen) < 0.7)).to(torch.int32)  # zeros: all-zero chunks are skipped
    return x, torch.randint(-qw, qw + 1, (k, n), generator=gen, dtype=torch.int32)


@needs_cpu
@pytest.mark.parametrize("bits", _KERNEL_BITS)
def test_cpu_kernel_computes_the_periphery(bits, monkeypatch):
    """xbar_tile_sums / xbar_mvm / xbar_coef_grad and their packed forms with ``periphery=bits``: the reference's
    T_int int64-exact, mvm and the coefficient gradients in the one ordered sum, on every instruction set this
    CPU runs; random configs with lossy, lossless and ideal ADCs, signed and unsigned inputs."""
    rnd = random.Random(1000 + bits)
    gen = torch.Generator().manual_seed(1000 + bits)
    for trial in range(24):
        signed = trial % 2 == 1
        adc = ("lossy", "lossy", "lossy", "lossy", "lossless", "ideal")[trial % 6]
        p = _random_kernel_params(rnd, bits, signed, adc)
        m, k, n = rnd.choice([rnd.randint(1, 40), 130]), rnd.randint(1, 2 * p.rows + 5), rnd.randint(1, 20)
        x, w = _kernel_codes(gen, m, k, n, p)
        wt = _kernel_codes(gen, 1, k, n, p)[1]
        _check_codes_ops(monkeypatch, gen, x, w, wt, p, p.as_args(with_periphery=True), 0, trial)


def _check_codes_ops(monkeypatch, gen, x, w, wt, p: GemmParams, args: tuple, skipped_tile: int, msg) -> None:
    """xbar_tile_sums (int32 and int16 codes) / xbar_mvm with task weights / xbar_coef_grad and the packed forms,
    called with ``args`` on every instruction set, against the reference of ``p``: T_int int64-exact, mvm and the
    coefficient gradients in the one ordered sum; the PE (``skipped_tile``, first columns) has zero base
    coefficients (skipped)."""
    from helpers import ordered_coef_grad, ordered_mvm
    ops = torch.ops.xma2_ops
    want = ref.tile_sums(x, w, p)
    tr, m, n = want.shape
    cb_ = torch.randn(tr, n, generator=gen, dtype=torch.float64)
    ct_ = torch.randn(tr, n, generator=gen, dtype=torch.float64)
    cb_[skipped_tile, : min(n, p.cols)] = 0  # a skipped PE
    want_y = ordered_mvm(x, w, wt, cb_, ct_, p)
    gy = torch.randn(m, n, generator=gen, dtype=torch.float64)
    want_g = ordered_coef_grad(want, gy)
    for isa in _ISAS:
        monkeypatch.setenv("XMA2_CPU_ISA", isa)
        where = (msg, isa, p)
        assert torch.equal(ops.xbar_tile_sums(x, w, *args), want), where
        assert torch.equal(ops.xbar_tile_sums(x.to(torch.int16), w, *args), want), where
        assert torch.equal(ops.xbar_mvm(x, w, wt, cb_, ct_, *args), want_y), where
        assert torch.equal(ops.xbar_coef_grad(x, w, gy, *args), want_g), where
        packed, packed_t = ops.xbar_pack_weights(w, *args), ops.xbar_pack_weights(wt, *args)
        assert torch.equal(ops.xbar_mvm_packed(x, w, packed, wt, packed_t, cb_, ct_, *args), want_y), where
        assert torch.equal(ops.xbar_coef_grad_packed(x, w, packed, gy, *args), want_g), where


def _split_k(rnd, rows: int, split: str) -> int:
    """A K for ``rows``-row tiles: one tile (K <= R), a multiple of R, or several tiles with a short or uneven
    last one; under the even split only a K whose last tile fits R (row_tile_sizes refuses the others)."""
    while True:
        k = rnd.choice([rnd.randint(1, rows), rows * rnd.randint(2, 4), rnd.randint(rows + 1, 4 * rows + 7)])
        try:
            row_tile_sizes(k, rows, split)
            return k
        except ValueError:
            continue


@needs_cpu
@pytest.mark.parametrize("bits", _SPLIT_BITS)
def test_cpu_kernel_computes_the_row_split_and_tile_range(bits, monkeypatch):
    """The even row split (16) and the per-tile ADC range (32) in the C++ kernels: xbar_tile_sums / xbar_mvm with
    task weights and skipped PEs / xbar_coef_grad and their packed forms against the reference, int64-exact, on
    every instruction set; random shapes (K <= R, K a multiple of R, several tiles with a short last one), lossy,
    lossless and ideal ADCs, signed and unsigned inputs, with the other conventions of ``bits`` (analog
    accumulation through GemmParams.kernel_form, as the backend runs it)."""
    rnd = random.Random(2000 + bits)
    gen = torch.Generator().manual_seed(2000 + bits)
    split = "even" if bits & 16 else "fixed"
    for trial in range(14):
        signed = trial % 2 == 1
        adc = ("lossy", "lossy", "lossy", "lossless", "lossy", "ideal", "lossy")[trial % 7]
        rows = rnd.choice([1, 3, 7, 16, 31, 33, 64, 70, 128, 150])
        db, cb = rnd.randint(1, 4), rnd.randint(1, 4)
        adc_bits = {"ideal": None, "lossless": 24}.get(adc, rnd.choice([2, 3, 4, 5, 6, 8, 10]))
        clip = None  # (a given clip is every tile's full scale: adc_range="tile_rows" changes nothing then)
        if not bits & 32 and adc == "lossy":
            pmax = rows * (2 ** db - 1) * (2 ** cb - 1)
            clip = rnd.choice([None, max(1, pmax // 3), rnd.randint(1, pmax + 5)])
        cfg = XbarConfig(rows=rows, cols=rnd.choice([1, 4, 8, 13]), weight_bits=rnd.randint(2, 8), cell_bits=cb,
                         input_bits=rnd.randint(2, 8), dac_bits=db, adc_bits=adc_bits, adc_clip=clip,
                         input_signed=signed, **_kernel_fields(bits))
        p = GemmParams.from_config(cfg, signed)
        assert p.periphery == bits
        kp = p.kernel_form()
        assert kp is not None and kp.periphery in (bits & ~2, 0)  # (0: the ideal ADC on the fixed split)
        m, k, n = rnd.choice([rnd.randint(1, 40), 130]), _split_k(rnd, rows, split), rnd.randint(1, 20)
        x, w = _kernel_codes(gen, m, k, n, p)
        wt = _kernel_codes(gen, 1, k, n, p)[1]
        assert len(ref.tile_sums(x[:1], w, p)) == len(row_tile_sizes(k, rows, split))
        # (the last tile's PE skipped: under tile_rows it has its own ADC)
        _check_codes_ops(monkeypatch, gen, x, w, wt, p, kp.as_args(with_periphery=True), -1, (trial, k))


@needs_cpu
def test_cpu_kernel_row_split_and_tile_range_are_tested_where_they_differ(monkeypatch):
    """Not vacuous: on K = 27 over 20-row tiles the even split (14 + 13 rows) and the per-tile range (the 7-row
    tile's own full scale) each change T_int, and the kernel follows; a weight packed for one split is refused
    under the other (its header names the tile size)."""
    gen = torch.Generator().manual_seed(4)
    base = dict(rows=20, cols=4, weight_bits=6, cell_bits=2, input_bits=6, dac_bits=2, adc_bits=4, input_signed=True)
    p0 = GemmParams.from_config(XbarConfig(**base), True)
    x, w = _kernel_codes(gen, 30, 27, 9, p0)
    t0 = ref.tile_sums(x, w, p0)
    for fields in (dict(row_split="even"), dict(adc_range="tile_rows"), dict(row_split="even", adc_range="tile_rows")):
        p = GemmParams.from_config(XbarConfig(**base, **fields), True)
        want = ref.tile_sums(x, w, p)
        assert not torch.equal(want, t0), fields
        for isa in _ISAS:
            monkeypatch.setenv("XMA2_CPU_ISA", isa)
            assert torch.equal(torch.ops.xma2_ops.xbar_tile_sums(x, w, *p.as_args(with_periphery=True)), want)
    pe = GemmParams.from_config(XbarConfig(**base, row_split="even"), True)
    packed = torch.ops.xma2_ops.xbar_pack_weights(w, *p0.as_args(with_periphery=True))
    coef = torch.ones(2, 9, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="not the packed form"):
        torch.ops.xma2_ops.xbar_mvm_packed(x, w, packed, None, None, coef, None, *pe.as_args(with_periphery=True))


@needs_cpu
@pytest.mark.parametrize("case", ["crosssim", "crosssim_r64", "digital_14bit"])
def test_cpu_kernel_wide_adc_spans(case, monkeypatch):
    """ADCs whose float32 form is not exact (the quarter step 0.25 / span is below float32's rounding of u n /
    span): CrossSim's preset on 128 rows (signed span 2 x 115 x 381 per 115-row tile of the even split) and a
    14-bit ADC over 128 rows of 4-bit chunks and cells.  The vector kernels take the float64 form there (checked
    exact in plan.cpp), the scalar one its integer rule: the reference's bits on every instruction set."""
    gen = torch.Generator().manual_seed(9)
    cfg = {"crosssim": XbarConfig.conventions("crosssim", cols=16),
           "crosssim_r64": XbarConfig.conventions("crosssim", rows=64, cols=16, adc_bits=10),
           "digital_14bit": XbarConfig(rows=128, cols=16, dac_bits=4, cell_bits=4, adc_bits=14)}[case]
    x, w = torch.randn(70, 576, generator=gen) - 0.2, torch.randn(19, 576, generator=gen)
    y = {}
    for isa in _ISAS:
        monkeypatch.setenv("XMA2_CPU_ISA", isa)
        y[isa] = xma2_ops.xbar_linear(x, w, config=cfg, backend="cpu")
    want = xma2_ops.xbar_linear(x, w, config=cfg, backend="reference")
    for isa, got in y.items():
        assert torch.equal(got, want), isa


@needs_cpu
def test_cpu_ops_refuse_a_row_split_or_tile_range_they_cannot_compute():
    """The ops' own checks (csrc/xbar_check.h): an even split whose last tile would exceed R rows (as
    row_tile_sizes refuses it), and a per-tile range with a clip that is not the full scale of R rows."""
    ops = torch.ops.xma2_ops
    p = GemmParams(rows=5, cols=4, input_bits=4, input_signed=False, dac_bits=1, weight_bits=4, cell_bits=1,
                   adc_levels=5, adc_clip=5, periphery=16)
    x, w = torch.ones(2, 18, dtype=torch.int32), torch.ones(18, 3, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"row_split.*K = 18.*R = 5"):
        ops.xbar_tile_sums(x, w, *p.as_args(with_periphery=True))
    with pytest.raises(RuntimeError, match=r"row_split.*K = 18.*R = 5"):
        ops.xbar_pack_weights(w, *p.as_args(with_periphery=True))
    ops.xbar_tile_sums(x[:, :17], w[:17], *p.as_args(with_periphery=True))  # 4 + 4 + 4 + 5: fine
    q = dataclasses.replace(p, periphery=32, adc_clip=6)
    with pytest.raises(RuntimeError, match=r"tile_rows.*adc_clip.*5.*got 6"):
        ops.xbar_tile_sums(x, w, *q.as_args(with_periphery=True))


@needs_cpu
def test_cpu_kernel_half_even_and_signed_adc_are_tested_where_they_differ(monkeypatch):
    """The configs above are not vacuous: with a coarse ADC every one of the three bits changes T_int (ties for
    half_even; V of both polarities for the others), and the kernel follows each."""
    gen = torch.Generator().manual_seed(3)
    base = dict(rows=16, cols=4, weight_bits=6, cell_bits=2, input_bits=6, dac_bits=2, adc_bits=3, adc_clip=14,
                input_signed=True)
    x, w = _kernel_codes(gen, 40, 40, 9, GemmParams.from_config(XbarConfig(**base), True))
    t0 = ref.tile_sums(x, w, GemmParams.from_config(XbarConfig(**base), True))
    for bits in (1, 4, 8):
        p = GemmParams.from_config(XbarConfig(**base, **_kernel_fields(bits)), True)
        want = ref.tile_sums(x, w, p)
        assert not torch.equal(want, t0), bits
        for isa in _ISAS:
            monkeypatch.setenv("XMA2_CPU_ISA", isa)
            assert torch.equal(torch.ops.xma2_ops.xbar_tile_sums(x, w, *p.as_args(with_periphery=True)), want)


@needs_cpu
@examples(150)
@given(periphery_cases())
def test_cpu_backend_gives_the_reference_bits(case):
    """Every field combination: where backend_for runs the cpu kernel (every convention; analog accumulation of
    <= 8 bits reduced to one chunk), its tile sums are the reference's, int64 exact, on every instruction set."""
    cfg, signed, m, k, n, seed = case
    x, w = _codes(seed, cfg, signed, m, k, n)
    p = GemmParams.from_config(cfg, signed)
    be, kp = xma2_ops.backends.backend_for("cpu", torch.device("cpu"), p)
    runs_kernel = not (p.has("input_accumulation") and p.x_bits > 8)
    assert (be.name == "cpu") == runs_kernel, (cfg, signed)
    want = ref.tile_sums(x, w, p)
    for isa in _ISAS:
        with _isa(isa):
            got = be.tile_sums(x.to(torch.int32), w.to(torch.int32), kp)
        assert torch.equal(got, want), (cfg, signed, isa)


@needs_cpu
@pytest.mark.parametrize("bits", _KERNEL_BITS + _SPLIT_BITS)
@pytest.mark.parametrize("signed", [False, True])
def test_cpu_layers_compute_the_periphery_in_the_kernel(bits, signed, monkeypatch):
    """xbar_conv2d / xbar_linear with task weights and fractional masks: backend='cpu' runs its own kernel
    (backend_for names it, and periphery.py is never called) and gives the reference backend's bits, on every
    instruction set.  K = 27 on 20 rows: two row tiles of 20 and 7 (fixed) or 14 and 13 (even), each with
    its own ADC range under tile_rows; xbar_linear: K = 45, three tiles."""
    from xma2_ops.backends import periphery

    cfg = XbarConfig(rows=20, cols=6, weight_bits=6, cell_bits=2, input_bits=5, dac_bits=2, adc_bits=5,
                     input_signed=signed, **_kernel_fields(bits))
    p = GemmParams.from_config(cfg, signed)
    assert p.periphery == bits
    assert xma2_ops.backends.backend_for("cpu", torch.device("cpu"), p) == (
        xma2_ops.backends.get_backend("cpu", torch.device("cpu")), p.kernel_form())
    gen = torch.Generator().manual_seed(bits * 2 + signed)
    x, w, kw = _masked_conv_case(gen, cfg, signed)
    mask, alpha = kw["pe_mask"], kw["col_scale"]
    want = xma2_ops.xbar_conv2d(x, w, backend="reference", **kw)

    def not_here(*args, **kwargs):
        raise AssertionError("periphery.py ran")

    monkeypatch.setattr(periphery, "_tile_sums", not_here)
    for isa in _ISAS:
        monkeypatch.setenv("XMA2_CPU_ISA", isa)
        assert torch.equal(xma2_ops.xbar_conv2d(x, w, backend="cpu", **kw), want), isa
    monkeypatch.delenv("XMA2_CPU_ISA")
    x.requires_grad_()
    mask.requires_grad_()
    alpha.requires_grad_()
    got = xma2_ops.xbar_conv2d(x, w, backend="cpu", **kw)
    assert torch.equal(got, want)
    gy = torch.randn(got.shape, generator=gen, dtype=torch.float64)
    g_cpu = torch.autograd.grad(got, (mask, alpha), gy)  # the coefficient gradients: the kernel too
    monkeypatch.undo()
    g_ref = torch.autograd.grad(xma2_ops.xbar_conv2d(x, w, backend="reference", **kw), (mask, alpha), gy)
    for a, b in zip(g_cpu, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(periphery, "_tile_sums", not_here)
    x = x.detach()
    xl, wl = torch.randn(7, 45, generator=gen), torch.randn(5, 45, generator=gen)
    xl = xl if signed else xl.abs()
    assert torch.equal(xma2_ops.xbar_linear(xl, wl, config=cfg, backend="cpu"),
                       xma2_ops.xbar_linear(xl, wl, config=cfg, backend="reference"))


@needs_cpu
@pytest.mark.parametrize("bits", _KERNEL_BITS + _SPLIT_BITS)
def test_cpu_device_layers_compute_the_periphery_in_the_kernel(bits, monkeypatch):
    """The device model (SPEC 7.2) under every convention the cell ops compute: xbar_conv2d with task weights
    and fractional masks on programmed cells, backend='cpu' runs the cell ops (periphery.py is never called) and
    gives the reference backend's outputs and coefficient gradients, on the AVX2 and the generic cell paths."""
    from xma2_ops.backends import periphery

    signed = bits % 3 != 0
    dev = DeviceModel(on_off=8.0, sigma_abs=0.03, sigma_rel=0.05, saf_low=0.03, saf_high=0.03, nu_mean=0.02,
                      nu_std=0.01, read_time=3600.0, sigma_read=0.02, seed=bits, frac_bits=8)
    cfg = XbarConfig(rows=20, cols=6, weight_bits=6, cell_bits=2, input_bits=5, dac_bits=2, adc_bits=5,
                     input_signed=signed, device=dev, **_kernel_fields(bits))
    p = GemmParams.from_config(cfg, signed)
    assert xma2_ops.backends.backend_for("cpu", torch.device("cpu"), p, cells=True)[0].name == "cpu"
    gen = torch.Generator().manual_seed(7 * bits + signed)
    x, w, kw = _masked_conv_case(gen, cfg, signed)
    mask, alpha = kw["pe_mask"].requires_grad_(), kw["col_scale"].requires_grad_()
    want = xma2_ops.xbar_conv2d(x, w, backend="reference", **kw)
    gy = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    g_ref = torch.autograd.grad(want, (mask, alpha), gy)

    def not_here(*args, **kwargs):
        raise AssertionError("periphery.py ran")

    monkeypatch.setattr(periphery, "_tile_sums", not_here)
    for isa in ("auto", "scalar"):
        monkeypatch.setenv("XMA2_CPU_ISA", isa)
        got = xma2_ops.xbar_conv2d(x, w, backend="cpu", **kw)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        for a, b in zip(torch.autograd.grad(got, (mask, alpha), gy), g_ref):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@needs_cpu
def test_cpu_backend_routes_only_what_its_kernels_compute():
    cpu = torch.device("cpu")
    base = dict(rows=32, cols=8)
    for fields, runs in [(dict(sensing="differential"), "cpu"), (dict(adc_rounding="half_even"), "cpu"),
                         (dict(signed_inputs="sign_magnitude", sensing="differential", adc_rounding="half_even"), "cpu"),
                         (dict(input_accumulation="analog", sensing="differential"), "cpu"),  # 8 bits: one chunk
                         (dict(input_accumulation="analog", input_bits=12), "periphery"),
                         (dict(input_accumulation="analog", input_bits=12, row_split="even"), "periphery"),
                         (dict(row_split="even"), "cpu"), (dict(adc_range="tile_rows"), "cpu"),
                         (dict(sensing="differential", row_split="even"), "cpu"),
                         (PERIPHERY_PRESETS["crosssim"], "cpu")]:
        p = GemmParams.from_config(XbarConfig(**{**base, **fields}), True)
        be, kp = xma2_ops.backends.backend_for("cpu", cpu, p)
        assert be.name == runs, fields
        assert xma2_ops.backends.backend_for("cpu", cpu, p, cells=True)[0].name == runs, fields  # the cell ops too
        if runs == "cpu":
            assert kp.periphery == p.periphery & ~2
    assert xma2_ops.backends.get_backend("cpu", cpu).periphery == 1 | 4 | 8 | 16 | 32
    assert xma2_ops.backends.get_backend("cpu", cpu).cell_periphery == 1 | 4 | 8 | 16 | 32
    if "triton" in xma2_ops.available_backends():
        for fields in (dict(sensing="differential"), dict(row_split="even")):
            p = GemmParams.from_config(XbarConfig(**base, **fields), True)
            assert xma2_ops.backends.backend_for("triton", cpu, p)[0].name == "periphery"


@needs_cpu
def test_programmed_layer_packs_for_the_kernel_periphery():
    """A module under a periphery the kernel computes keeps the packed weights (made once) and gives the
    stateless / reference bits."""
    from helpers import OpLog
    torch.manual_seed(0)
    cfg = XbarConfig(rows=16, cols=4, sensing="differential", signed_inputs="sign_magnitude",
                     adc_rounding="half_even", adc_bits=5)
    layer = xma2_ops.XbarLinear(40, 7, config=cfg)
    x = torch.randn(5, 40)
    layer(x)
    layer.eval()
    counts = []
    for _ in range(2):
        with OpLog() as log:
            y = layer(x)
        counts.append(sum("xbar_pack_weights" in op for op in log.ops))
    assert counts == [1, 0]
    yf = xma2_ops.xbar_linear(x, layer.weight.detach(), config=cfg, backend="cpu")
    assert torch.equal(yf, xma2_ops.xbar_linear(x, layer.weight.detach(), config=cfg, backend="reference"))
    layer.backend = "reference"  # the module's own scales and bias, computed by the reference
    assert torch.equal(y, layer(x))


@needs_cpu
@pytest.mark.parametrize("bad", [2, 64, 128, -1, 1 << 40, 3, 2 | 16, 1 | 64])
def test_cpu_ops_refuse_periphery_bits_they_do_not_compute(bad):
    p = GemmParams(rows=16, cols=8, input_bits=4, input_signed=True, dac_bits=1, weight_bits=4, cell_bits=1,
                   adc_levels=6, adc_clip=16)
    x, w = torch.ones(2, 20, dtype=torch.int32), torch.ones(20, 3, dtype=torch.int32)
    coef = torch.ones(2, 3, dtype=torch.float64)
    ops = torch.ops.xma2_ops
    for call in (lambda: ops.xbar_tile_sums(x, w, *p.as_args(), bad),
                 lambda: ops.xbar_mvm(x, w, None, coef, None, *p.as_args(), bad),
                 lambda: ops.xbar_coef_grad(x, w, torch.ones(2, 3), *p.as_args(), bad),
                 lambda: ops.xbar_pack_weights(w, *p.as_args(), bad)):
        with pytest.raises(RuntimeError, match="periphery"):
            call()
    # a signed ADC needs an even n <= 2 clip
    with pytest.raises(RuntimeError, match="periphery 1.*even adc_levels"):
        ops.xbar_tile_sums(x, w, *dataclasses.replace(p, adc_levels=7).as_args(), 1)
