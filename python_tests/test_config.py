"""xma2_ops/config.py: the derived integer rules that kernels rely on."""
from __future__ import annotations

import numpy as np
import pytest

from xma2_ops.config import adc_multiply_shift


def _adc_by_division(p: np.ndarray, levels: int, clip: int) -> np.ndarray:
    """SPEC 3 written out: clamp(floor((2 P n + clip) / (2 clip)), 0, n)."""
    return np.minimum((2 * p * levels + clip) // (2 * clip), levels)


def _cases():
    rng = np.random.default_rng(7)
    cases = [(255, 384, 384), (255, 1, 384), (1, 1, 1), (15, 7, 9), (255, 10_000, 2 ** 20 - 1),
             ((1 << 24) - 1, 1 << 20, 40), (1, (1 << 32) - 1, 64)]
    for _ in range(60):
        pmax = int(rng.integers(1, 1 << int(rng.integers(1, 21))))
        clip = int(rng.integers(1, 1 << int(rng.integers(1, 33))))
        levels = int(rng.integers(1, min(clip, (1 << 24) - 1) + 1))
        cases.append((levels, clip, pmax))
    return cases


@pytest.mark.parametrize("levels, clip, pmax", _cases())
def test_adc_multiply_shift_is_the_division_for_every_partial_sum(levels, clip, pmax):
    ms = adc_multiply_shift(levels, clip, pmax)
    n_max = 2 * pmax * levels + clip
    if ms is None:
        # Refused only where the 32-bit form cannot hold: mult ~ 2^shift / (2 clip) reaches 2^31 only for
        # clip = 1 or a numerator of 2^30 and more.
        assert n_max >= 1 << 30 or clip == 1
        return
    mult, shift = ms
    assert shift >= 32 and 0 < mult < 1 << 31 and n_max < 1 << 31
    p = np.arange(pmax + 1, dtype=np.int64)
    num = 2 * p * levels + clip
    # umulhi(num, mult) >> (shift - 32), as the Triton kernel computes it
    got = np.minimum(((num.astype(np.uint64) * np.uint64(mult)) >> np.uint64(32)).astype(np.int64) >> (shift - 32),
                     levels)
    np.testing.assert_array_equal(got, _adc_by_division(p, levels, clip))


def test_adc_multiply_shift_covers_most_cases():
    assert sum(adc_multiply_shift(*c) is not None for c in _cases()) >= 40


def test_adc_multiply_shift_refuses_what_does_not_fit():
    assert adc_multiply_shift(0, 384, 384) is None  # the ideal ADC has no division
    assert adc_multiply_shift((1 << 24) - 1, 1 << 32, 1 << 20) is None  # 2 P n + clip >= 2^31
    assert adc_multiply_shift(255, 384, 384) == (5592406, 32)  # the default config: ceil(2^32 / 768)
