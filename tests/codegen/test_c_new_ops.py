"""The portable C kernels of pad, dilated max_pool2d, avg_pool2d, concat, table and mul,
bit-exact against the NumPy reference on random small programs (emit_c → gcc → ctypes)."""
import numpy as np
import pytest

from codegen.c.emit import build_shared, emit_c, run_shared
from relay_passes import reference
from tests.codegen.new_op_cases import KINDS, case

SEEDS = range(8)


@pytest.mark.parametrize("kind", KINDS)
def test_c_kernel_equals_reference(kind, tmp_path):
    seen_outputs = set()
    for seed in SEEDS:
        prog, op, x = case(kind, seed)
        assert f"waps_{'lookup' if kind == 'table' else kind}" in emit_c(prog)
        lib = build_shared(prog, tmp_path / f"m{seed}.so")
        deq, codes = run_shared(lib, prog, x)
        ref = reference.run(prog, x)
        np.testing.assert_array_equal(codes, ref[1], err_msg=f"{kind} seed {seed}")
        np.testing.assert_array_equal(deq, ref[0])
        seen_outputs.update(np.unique(codes).tolist())
    assert len(seen_outputs) > 8                     # the cases do not collapse onto a clamp
