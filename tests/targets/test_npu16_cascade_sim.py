"""Cascading on the simulator alone (no TVM build; hypothesis over random chains and machines):
each op of a chain runs with the KEEP_IN/KEEP_OUT registers its chain decides
(codegen/npu16/cascade.keeps_of), its output equals the NumPy reference, every counter equals
the cost model's (report.estimate, which applies cost.cascaded), and the bytes it keeps are
exactly the bytes the same ops move with cascading off."""
import ctypes
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codegen.npu16.cascade import keeps_of, with_keep
from codegen.npu16.lower import NotOnNpu, lower_op
from relay_passes import reference
from targets.npu16.isa import COUNTERS
from targets.npu16.params import NPU16
from targets.npu16.report import estimate
from tests.codegen.test_npu16_cascade import chain_program


@pytest.fixture(scope="module")
def simulator(tmp_path_factory):
    from tests.compile_helpers import npu16_simulator
    return npu16_simulator(tmp_path_factory.mktemp("sim_cascade"))


def _p(a):
    return a.ctypes.data_as(ctypes.c_void_p)


def run_ops(lib, prog, env, npu):
    """Every offloaded op of ``prog`` on the simulator with its chain's KEEP registers, inputs
    from the reference's values ``env`` → {op: counters}; asserts each output equals env's."""
    keeps = keeps_of(prog, npu)
    counted = {}
    for op in prog.ops:
        try:
            low = lower_op(op.kind, op.attrs, [prog.shape_of(i) for i in op.inputs],
                           [prog.dtype_of(i) for i in op.inputs], op.params, npu)
        except NotOnNpu:
            continue
        k = keeps.get(op.name)
        if k:
            low = with_keep(low, tuple(k["inputs"]), k["output"])
        ins = [np.ascontiguousarray(env[i]) for i in op.inputs]
        xs = (ctypes.c_void_p * len(ins))(*[a.ctypes.data for a in ins])
        out = np.zeros(op.shape, np.uint8)
        cnt = np.zeros(len(COUNTERS), np.int64)
        z8, z32 = np.zeros(1, np.int8), np.zeros(1, np.int32)
        arr = {k: np.ascontiguousarray(op.params.get(k, z32), np.int32) for k in ("bias", "mult", "shift")}
        tiles = low.tiles if low.tiles is not None else z8
        table = low.table if low.table is not None else z32
        assert lib.run_ops(_p(np.ascontiguousarray(low.words)), xs, len(ins), _p(out), _p(tiles), _p(table),
                           _p(np.zeros(1, np.uint8)), _p(arr["bias"]), _p(arr["mult"]), _p(arr["shift"]), _p(cnt)) == 0
        np.testing.assert_array_equal(out, env[op.name], err_msg=op.name)
        counted[op.name] = dict(zip(COUNTERS, (int(v) for v in cnt)))
        assert counted[op.name] == estimate(prog, op, npu).counters(), op.name
    return counted


_machines = st.builds(NPU16, tile=st.sampled_from([8, 16]), arrays=st.integers(1, 4),
                      dma_bytes_per_cycle=st.integers(1, 32), weight_bytes_per_cycle=st.sampled_from([0, 0, 2]),
                      double_buffer=st.booleans(), sram_act_kib=st.sampled_from([1, 2, 4, 8, 512]),
                      sram_weight_kib=st.sampled_from([8, 256]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["conv_conv", "inverted", "conv_pool", "attention", "norm"]), seed=st.integers(0, 2**16), npu=_machines)
def test_kept_bytes_are_the_bytes_not_moved(simulator, kind, seed, npu):
    prog = chain_program(kind, seed)
    x = np.random.default_rng(seed).integers(0, 256, prog.input_shape).astype(np.float32)
    env = reference.run(prog, x, keep=True)
    on = run_ops(simulator, prog, env, npu)
    off = run_ops(simulator, prog, env, replace(npu, cascade=False))
    saved = sum(c["dma_saved_bytes"] for c in on.values())
    moved = {k: sum(c["dma_in_bytes"] + c["dma_out_bytes"] for c in v.values()) for k, v in (("on", on), ("off", off))}
    assert moved["on"] == moved["off"] - saved
    assert sum(c["dma_saved_bytes"] for c in off.values()) == 0
    if any(k["output"] for k in keeps_of(prog, npu).values()):
        assert saved > 0 and sum(c["dma_cycles"] for c in on.values()) <= sum(c["dma_cycles"] for c in off.values())
