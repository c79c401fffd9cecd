"""Hypothesis profiles and strategies of python_tests/test_fuzz.py.

Profiles (registered on import of this module):

- ``ci`` (the default: loaded when no other profile was chosen): deterministic
  (``derandomize=True``: the examples depend only on the test's source, never on a clock or on
  ``hash()``), no deadline, no example database, a few hundred examples per test.
- ``long``: the same, 20 times more examples per test (a nightly fuzzing job).

Choose one with ``python -m pytest python_tests/test_fuzz.py --hypothesis-profile=long``.
Hypothesis' pytest plugin loads that profile in ``pytest_configure``, before test modules are
imported, so the name must be registered by then: ``python_tests/conftest.py`` has to import this
module (``import strategies  # noqa: F401``).  Without that line the same choice is made with the
environment variable ``XMA2_HYPOTHESIS_PROFILE=long``.

Every test asks for ``examples(n)``: n examples under ``ci``, scaled with the loaded profile's
``max_examples`` (``n * max_examples / 100``) under any other.  Each test has a fixed seed
(``fuzz_seed``), offset by the environment variable ``XMA2_FUZZ_SEED`` (default 0) so that a nightly
job can explore new examples and still print everything needed to reproduce a failure (the seed
offset, and ``@reproduce_failure`` blobs: ``print_blob=True``).

Tensors are made by ``torch.Generator`` from a drawn seed (reproducible; a drawn list of floats per
entry would be slow to generate and to shrink); structure that matters (bit widths, clips, shapes,
value patterns, magnitudes) is drawn by Hypothesis itself.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from xma2_ops import XbarConfig
from xma2_ops.config import MAX_ADC_CLIP, GemmParams

# ------------------------------------------------------------------ profiles
CI_BASE = 100  # max_examples of the ci profile; examples(n) scales n by profile.max_examples / CI_BASE

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    database=None,
    max_examples=CI_BASE,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.register_profile("long", parent=settings.get_profile("ci"), max_examples=20 * CI_BASE)

if settings.get_current_profile_name() == "default":  # nothing chosen on the command line
    settings.load_profile(os.environ.get("XMA2_HYPOTHESIS_PROFILE", "ci"))


FUZZ_SEED = int(os.environ.get("XMA2_FUZZ_SEED", "0"))


def fuzz_seed(n: int) -> int:
    """The fixed seed of one test, offset by XMA2_FUZZ_SEED (default 0): a nightly job can explore
    new examples per run (e.g. XMA2_FUZZ_SEED=$GITHUB_RUN_NUMBER) and any run is reproduced by
    setting the same value."""
    return n + 1_000_003 * FUZZ_SEED


def examples(n: int) -> settings:
    """Settings of the loaded profile with n examples under ci, proportionally more under long."""
    current = settings.default
    return settings(current, max_examples=max(1, n * current.max_examples // CI_BASE))


# ------------------------------------------------------------------ crossbar configs
def chunks_of(cfg: XbarConfig, signed: bool) -> int:
    """I = ceil(magnitude bits / dac_bits), computed here from the fields (not from config.py)."""
    bits = cfg.input_bits - 1 if signed else cfg.input_bits
    return -(-bits // cfg.dac_bits)


def slices_of(cfg: XbarConfig) -> int:
    """S = ceil((weight_bits - 1) / cell_bits)."""
    return -(-(cfg.weight_bits - 1) // cfg.cell_bits)


def partial_sums_per_tile(cfg: XbarConfig, signed: bool) -> int:
    """How many analog partial sums (ADC conversions per output) one row tile needs."""
    return (2 if signed else 1) * 2 * chunks_of(cfg, signed) * slices_of(cfg)


@st.composite
def xbar_configs(draw, *, max_weight_bits: int = 16, max_input_bits: int = 16, max_cell_bits: int = 8,
                 max_dac_bits: int = 8, max_rows: int = 256, big_rows: bool = True,
                 signed: Optional[bool] = None, adc_bits=None) -> Tuple[XbarConfig, bool]:
    """(config, input signed): every knob of SPEC 2-3, with the corner cases drawn on purpose.

    rows: 1, small, or 129-256 (with K drawn independently, rows rarely divide K); cell_bits up to
    8 (so often >= the weight magnitude bits), dac_bits up to 8 (often > the input bits); adc_bits
    None or 1-12; adc_clip None (= Pmax), tiny (1-3), below Pmax, exactly Pmax, just above, far
    above, or the largest allowed (2**32)."""
    row_choices = [st.just(1), st.integers(2, min(48, max_rows))]
    if big_rows and max_rows >= 129:
        row_choices.append(st.integers(129, max_rows))
    rows = draw(st.one_of(*row_choices))
    cols = draw(st.one_of(st.just(1), st.integers(2, 24)))
    signed = draw(st.booleans()) if signed is None else signed
    weight_bits = draw(st.integers(2, max_weight_bits))
    input_bits = draw(st.integers(2 if signed else 1, max_input_bits))
    cell_bits = draw(st.integers(1, max_cell_bits))
    dac_bits = draw(st.integers(1, max_dac_bits))
    if adc_bits is None:
        adc_bits = st.one_of(st.none(), st.integers(1, 12))
    adc = draw(adc_bits)
    pmax = rows * (2 ** dac_bits - 1) * (2 ** cell_bits - 1)
    kind = draw(st.sampled_from(["default", "tiny", "below", "pmax", "above", "far", "max"]))
    clip = {
        "default": lambda: None,
        "tiny": lambda: draw(st.integers(1, 3)),
        "below": lambda: draw(st.integers(1, pmax)),
        "pmax": lambda: pmax,
        "above": lambda: min(MAX_ADC_CLIP, pmax + draw(st.integers(1, 2 * pmax))),
        "far": lambda: draw(st.integers(pmax, MAX_ADC_CLIP)),
        "max": lambda: MAX_ADC_CLIP,
    }[kind]()
    cfg = XbarConfig(rows=rows, cols=cols, weight_bits=weight_bits, cell_bits=cell_bits, input_bits=input_bits,
                     dac_bits=dac_bits, adc_bits=adc, adc_clip=clip, input_signed=signed)
    return cfg, signed


# ------------------------------------------------------------------ integer codes of one GEMM
CODE_PATTERNS = ["uniform", "extreme", "sparse", "max", "zero"]


def make_codes(gen: torch.Generator, shape, lo: int, hi: int, pattern: str) -> torch.Tensor:
    """int32 codes in [lo, hi]: uniform; mostly the extremes (saturates the ADC); sparse (as after a
    ReLU); all hi; all zero."""
    if pattern == "zero":
        return torch.zeros(shape, dtype=torch.int32)
    if pattern == "max":
        return torch.full(shape, hi, dtype=torch.int32)
    v = torch.randint(lo, hi + 1, shape, generator=gen, dtype=torch.int32)
    if pattern == "extreme":
        pick = torch.randint(0, 4, shape, generator=gen)
        v = torch.where(pick == 0, torch.full_like(v, lo), torch.where(pick == 1, v, torch.full_like(v, hi)))
    elif pattern == "sparse":
        v = v * (torch.rand(shape, generator=gen) < 0.2)
    return v


@dataclass
class GemmCase:
    config: XbarConfig
    params: GemmParams
    x: torch.Tensor  # [M, K] input codes (int32)
    w: torch.Tensor  # [K, N] weight codes (int32)

    def __repr__(self) -> str:  # what a failing example prints
        return (f"GemmCase({self.config}, signed={self.params.input_signed}, M,K,N={tuple(self.x.shape)}+"
                f"{self.w.shape[1]},\n x={self.x.tolist()},\n w={self.w.tolist()})")


@st.composite
def gemm_cases(draw, *, budget: int, max_m: int = 8, max_n: int = 24, max_k: int = 400,
               py_budget: Optional[int] = None, **config_kw) -> GemmCase:
    """A config and random codes [M, K] x [K, N].  ``budget`` bounds Tr * (partial sums per tile),
    the work of the loop-based reference (K is drawn up to what the budget allows, at least one row
    tile); ``py_budget`` bounds M * N * K * (partial sums per tile), the work of plain Python loops."""
    cfg, signed = draw(xbar_configs(**config_kw))
    per_tile = partial_sums_per_tile(cfg, signed)
    k_max = max(1, min(max_k, cfg.rows * max(1, budget // per_tile)))
    m, n = draw(st.integers(1, max_m)), draw(st.integers(1, max_n))
    if py_budget is not None:
        k_max = min(k_max, max(1, py_budget // (m * n * per_tile)))
    k = draw(st.integers(1, k_max))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 32 - 1)))
    qx = cfg.input_qmax(signed)
    qw = cfg.weight_qmax
    x = make_codes(gen, (m, k), -qx if signed else 0, qx, draw(st.sampled_from(CODE_PATTERNS)))
    w = make_codes(gen, (k, n), -qw, qw, draw(st.sampled_from(CODE_PATTERNS)))
    return GemmCase(cfg, GemmParams.from_config(cfg, signed), x, w)


# ------------------------------------------------------------------ whole-op cases (public API)
@dataclass
class ApiCase:
    kind: str  # "linear" or "conv"
    config: XbarConfig
    x: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    task_weight: Optional[torch.Tensor]
    pe_mask: Optional[torch.Tensor]
    col_scale: Optional[torch.Tensor]
    input_scale: Optional[float]
    weight_scale: object  # None, a float, or a [N] tensor
    task_weight_scale: object
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    note: str = ""

    def common_kwargs(self) -> dict:
        return dict(config=self.config, task_weight=self.task_weight, pe_mask=self.pe_mask,
                    col_scale=self.col_scale, input_scale=self.input_scale, weight_scale=self.weight_scale,
                    task_weight_scale=self.task_weight_scale)

    def __repr__(self) -> str:
        def d(t):
            return None if t is None else (t.tolist() if isinstance(t, torch.Tensor) else t)
        return (f"ApiCase({self.kind}, {self.config}, {self.note}, x{tuple(self.x.shape)}, "
                f"weight{tuple(self.weight.shape)}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation},\n  x={d(self.x)},\n  weight={d(self.weight)},\n  bias={d(self.bias)},"
                f"\n  task_weight={d(self.task_weight)},\n  pe_mask={d(self.pe_mask)},"
                f"\n  col_scale={d(self.col_scale)},"
                f"\n  input_scale={self.input_scale}, weight_scale={d(self.weight_scale)}, "
                f"task_weight_scale={d(self.task_weight_scale)})")


X_MAGNITUDES = [1e-100, 1e-30, 1e-8, 1.0, 1e8, 1e30, 1e100]
W_MAGNITUDES = [1e-30, 1e-3, 1.0, 1e3, 1e30]
SOFT_MASK_VALUES = [0.0, 1.0, 0.25, 0.5, 0.75]


def _tensor_x(draw, gen, shape, signed_pattern: bool, mag: float):
    pattern = draw(st.sampled_from(["normal", "normal", "sparse", "constant", "zeros", "grid"]))
    if pattern == "zeros":
        return torch.zeros(shape, dtype=torch.float64), pattern
    if pattern == "constant":
        x = torch.full(shape, mag * draw(st.sampled_from([1.0, 0.3, 7.0])), dtype=torch.float64)
    elif pattern == "grid":  # values on a grid of half codes: many exact rounding ties
        x = torch.randint(-20, 21, shape, generator=gen).double() / 2 * mag
    else:
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * mag
        if pattern == "sparse":
            x = x * (torch.rand(shape, generator=gen) < 0.3)
    return (x if signed_pattern else x.abs()), pattern


def _tensor_w(draw, gen, shape, mag: float):
    pattern = draw(st.sampled_from(["normal", "normal", "sparse", "zeros", "constant"]))
    if pattern == "zeros":
        return torch.zeros(shape, dtype=torch.float64)
    if pattern == "constant":
        return torch.full(shape, -mag, dtype=torch.float64)
    w = torch.randn(shape, generator=gen, dtype=torch.float64) * mag
    return w * (torch.rand(shape, generator=gen) < 0.3) if pattern == "sparse" else w


def _weight_scale(draw, gen, w: torch.Tensor, qmax: int, mag: float):
    """None (derived), a float, or one positive scale per output column; 0.3-1.5 times the
    derived value, so that some weights clip."""
    kind = draw(st.sampled_from([None, "float", "columns"]))
    if kind is None:
        return None
    amax = w.abs().reshape(w.shape[0], -1).amax(1)
    amax = torch.where(amax > 0, amax, torch.full_like(amax, mag))
    factor = 0.3 + 1.2 * torch.rand(w.shape[0], generator=gen, dtype=torch.float64)
    if kind == "float":
        return float(amax.max() / qmax * factor[0])
    return amax / qmax * factor


@st.composite
def api_cases(draw, kind: str, *, light: bool = False) -> ApiCase:
    """A whole xbar_linear / xbar_conv2d call: config, tensors of huge or tiny magnitude, given or
    derived scales (scalar or per column), task weights with binary or soft pe_mask, col_scale
    (signed, some exactly 0), bias.  ``light``: small bit widths and shapes (Triton's interpreter)."""
    if light:
        cfg, signed = draw(xbar_configs(max_weight_bits=5, max_input_bits=5, max_cell_bits=4, max_dac_bits=4,
                                        max_rows=140, big_rows=draw(st.booleans())))
        budget, max_m, max_n = 24, 6, 10
    else:
        cfg, signed = draw(xbar_configs(max_weight_bits=12, max_input_bits=12))
        budget, max_m, max_n = 400, 12, 30
    # The op decides the sign from x when input_signed is None: keep the drawn decision (and
    # input_bits == 1 only with non-negative inputs).
    cfg_signed = draw(st.sampled_from([None, signed])) if cfg.input_bits >= 2 or not signed else signed
    cfg = dataclasses.replace(cfg, input_signed=cfg_signed)
    negatives = signed if cfg_signed is None else draw(st.booleans())
    per_tile = partial_sums_per_tile(cfg, cfg.input_bits >= 2)  # the signed count bounds the unsigned one
    k_max = max(1, cfg.rows * max(1, budget // per_tile))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    gen = torch.Generator().manual_seed(seed)
    x_mag, w_mag = draw(st.sampled_from(X_MAGNITUDES)), draw(st.sampled_from(W_MAGNITUDES))
    stride = padding = dilation = 1
    if kind == "linear":
        k = draw(st.integers(1, min(k_max, 300)))
        n = draw(st.integers(1, max_n))
        lead = draw(st.sampled_from([(), (1,), (3,), (2, 3), (max_m,)]))
        x_shape, w_shape = lead + (k,), (n, k)
    else:
        kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
        cin = draw(st.integers(1, max(1, min(34, k_max // (kh * kw)))))
        n = draw(st.integers(1, max_n))
        stride, padding, dilation = draw(st.integers(1, 2)), draw(st.integers(0, 1)), draw(st.integers(1, 2))
        h = dilation * (kh - 1) + 1 + draw(st.integers(0, 3))
        wd = dilation * (kw - 1) + 1 + draw(st.integers(0, 3))
        b = draw(st.integers(1, 2))
        x_shape, w_shape = (b, cin, h, wd), (n, cin, kh, kw)
        k = cin * kh * kw
    x, x_pattern = _tensor_x(draw, gen, x_shape, negatives, x_mag)
    weight = _tensor_w(draw, gen, w_shape, w_mag)
    tr, tc = cfg.tiles(k, n)
    mask_kind = draw(st.sampled_from(["none", "zeros", "ones", "binary", "soft"]))
    use_task = mask_kind != "none" or draw(st.booleans())
    task_weight = _tensor_w(draw, gen, w_shape, w_mag * draw(st.sampled_from([0.5, 1.0, 2.0]))) if use_task else None
    pe_mask = None
    if mask_kind == "zeros" or (mask_kind != "none" and task_weight is None):
        pe_mask = torch.zeros(tr, tc, dtype=torch.float64)
    elif mask_kind == "ones":
        pe_mask = torch.ones(tr, tc, dtype=torch.float64)
    elif mask_kind == "binary":
        pe_mask = (torch.rand(tr, tc, generator=gen) < 0.5).double()
    elif mask_kind == "soft":
        pick = torch.randint(0, len(SOFT_MASK_VALUES) + 1, (tr, tc), generator=gen)
        table = torch.tensor(SOFT_MASK_VALUES + [0.5], dtype=torch.float64)
        pe_mask = torch.where(pick == len(SOFT_MASK_VALUES), 0.1 + 0.8 * torch.rand(tr, tc, generator=gen,
                                                                                      dtype=torch.float64),
                              table[pick])
    col_scale = None
    if draw(st.booleans()):  # |alpha| in [0.25, 4] or exactly 0, either sign
        mag_a = 0.25 * 16 ** torch.rand(tr, n, generator=gen, dtype=torch.float64)
        sign = torch.where(torch.rand(tr, n, generator=gen) < 0.3, -1.0, 1.0).double()
        col_scale = mag_a * sign * (torch.rand(tr, n, generator=gen) >= 0.15)
    qx = cfg.input_qmax(signed) if cfg.input_bits >= 2 or not signed else 1
    input_scale = None
    if x_pattern == "grid" and draw(st.booleans()):
        input_scale = x_mag / 2 * draw(st.sampled_from([1, 2, 4]))  # half-code ties land on .5 exactly
    elif draw(st.booleans()):
        amax = float(x.abs().max()) or x_mag
        input_scale = amax / qx * draw(st.sampled_from([0.3, 1.0, 1.7]))
    weight_scale = _weight_scale(draw, gen, weight, cfg.weight_qmax, w_mag)
    # bias on the scale of the output: full-scale input times full-scale weight (scale times Qmax;
    # an all-zero tensor has the derived scale 1)
    x_full = input_scale * qx if input_scale is not None else float(x.abs().max()) or qx
    if weight_scale is not None:
        w_full = float(torch.as_tensor(weight_scale).max()) * cfg.weight_qmax
    else:
        w_full = float(weight.abs().max()) or cfg.weight_qmax
    bias = torch.randn(n, generator=gen, dtype=torch.float64) * x_full * w_full if draw(st.booleans()) else None
    task_weight_scale = (_weight_scale(draw, gen, task_weight, cfg.weight_qmax, w_mag)
                         if task_weight is not None else None)
    return ApiCase(kind, cfg, x, weight, bias, task_weight, pe_mask, col_scale, input_scale, weight_scale,
                   task_weight_scale, stride, padding, dilation,
                   note=f"seed={seed}, x:{x_pattern}*{x_mag:g}, w*{w_mag:g}, mask:{mask_kind}")
