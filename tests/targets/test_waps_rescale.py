"""waps_rescale (targets/waps_numeric.h) equals calib.numerics.rescale on edge values: codes 0 and
255, zero points at both ends, k from 1 to 2^40, t from 1 to 62 (hypothesis)."""
import ctypes

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calib import numerics as nx
from targets.c_source import NUMERIC_H, inline_source
from tests.compile_helpers import compile_c_wrapper

_WRAPPER = r"""
void t_rescale(const uint8_t *x, int count, int64_t z, int64_t k, int t, int64_t *out) {
  for (int i = 0; i < count; ++i) out[i] = waps_rescale(x[i], z, k, t);
}
"""


@pytest.fixture(scope="module")
def clib(tmp_path_factory):
    lib = compile_c_wrapper(inline_source(NUMERIC_H) + _WRAPPER, tmp_path_factory.mktemp("rescale"))
    lib.t_rescale.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
                              ctypes.c_void_p]
    return lib


def _c_rescale(lib, x: np.ndarray, z: int, k: int, t: int) -> np.ndarray:
    x = np.ascontiguousarray(x, np.uint8)
    out = np.zeros(x.size, np.int64)
    lib.t_rescale(x.ctypes.data, x.size, z, k, t, out.ctypes.data)
    return out


_CODES = np.array([0, 1, 2, 127, 128, 129, 254, 255], np.uint8)


@settings(max_examples=300, deadline=None)
@given(z=st.sampled_from([0, 1, 128, 254, 255]) | st.integers(0, 255),
       k=st.sampled_from([1, 2, 3, 2**31 - 1, 2**31, 2**40]) | st.integers(1, 2**40),
       t=st.integers(1, 62), extra=st.lists(st.integers(0, 255), max_size=8))
def test_waps_rescale_equals_numpy(clib, z, k, t, extra):
    x = np.concatenate([_CODES, np.array(extra, np.uint8)])
    np.testing.assert_array_equal(_c_rescale(clib, x, z, k, t), nx.rescale(x, z, k, t))


def test_rescale_rounds_half_up_below_zero(clib):
    # (x − z)·k = −3, t = 1: −1.5 rounds up to −1 (a truncating shift would give −2 after the +1)
    assert _c_rescale(clib, np.array([0], np.uint8), 3, 1, 1)[0] == nx.rescale(np.array([0]), 3, 1, 1)[0] == -1
    assert _c_rescale(clib, np.array([0], np.uint8), 5, 1, 1)[0] == -2
