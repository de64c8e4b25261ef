from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from calib.errors import ConfigError
from calib.numerics import (GroupScale, group_scale, merge_groups, quantize_multiplier, requantize,
                            shift_round)


@given(a=st.integers(-2**31, 2**31 - 1), n=st.integers(0, 15))
def test_shift_round_is_round_half_up(a, n):
    got = int(shift_round(np.array([a]), n)[0])
    exact = Fraction(a, 2**n)
    assert got == int(np.floor(exact + Fraction(1, 2)))


@settings(max_examples=300)
@given(acc=st.integers(-2**31, 2**31 - 1), real=st.floats(1e-6, 0.99))
def test_requantize_matches_rational_rounding(acc, real):
    m, s = quantize_multiplier(np.array([real]))
    assert 2**30 <= m[0] < 2**31
    got = int(requantize(np.array([acc]), m, s)[0])
    exact = Fraction(acc) * Fraction(int(m[0])) / Fraction(2) ** (31 + int(s[0]))
    assert got == int(np.floor(exact + Fraction(1, 2)))
    # the multiplier itself is within 2^-31 relative of the real value
    assert abs(m[0] * 2.0 ** (-31 - s[0]) - real) <= real * 2**-30


def test_group_scale_decomposition():
    assert group_scale(1.0) == GroupScale(0, 0)
    assert group_scale(1 - 2**-4) == GroupScale(-1, 4)
    assert group_scale(1 + 2**-2).gamma == 1.25
    with pytest.raises(ConfigError):
        group_scale(1.1)


@given(accs=st.lists(st.integers(-2**20, 2**20), min_size=3, max_size=3))
def test_merge_groups(accs):
    scales = [GroupScale(0, 0), GroupScale(-1, 4), GroupScale(1, 4)]
    got = int(merge_groups([np.array(a) for a in accs], scales))
    want = accs[0] + (accs[1] - int(shift_round(np.array(accs[1]), 4))) + (accs[2] + int(shift_round(np.array(accs[2]), 4)))
    assert got == want
