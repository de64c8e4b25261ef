"""npu16 runs pad, dilated max_pool2d, avg_pool2d, concat, table, mul, resize, matmul, softmax
and layer_norm bit-exactly against the NumPy reference, and the estimator (targets/npu16/report.estimate) equals every counter the
simulator reports, on random small cases and random machines (hypothesis): epilogue widths,
units with their own cycles per value, a weight port, single or double buffering, the row
unit's stage, a 1 KiB activation SRAM (stripes)."""
import ctypes

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codegen.npu16.lower import NotOnNpu, lower_op
from relay_passes import reference
from targets.npu16.isa import COUNTERS
from targets.npu16.params import NPU16
from targets.npu16.report import estimate
from tests.codegen.new_op_cases import KINDS, case


@pytest.fixture(scope="module")
def simulator(tmp_path_factory):
    from tests.compile_helpers import npu16_simulator
    return npu16_simulator(tmp_path_factory.mktemp("sim_new"))


def _p(a):
    return a.ctypes.data_as(ctypes.c_void_p)


def simulate(lib, prog, op, env, npu):
    """Lower ``op`` for ``npu`` and run it on its reference inputs → (output codes, counters); in
    a chain of ``prog`` (codegen/npu16/cascade.py) with the KEEP registers the compiler sets."""
    from codegen.npu16.cascade import keeps_of, with_keep
    ins = [np.ascontiguousarray(env[i]) for i in op.inputs]
    low = lower_op(op.kind, op.attrs, [prog.shape_of(i) for i in op.inputs], [prog.dtype_of(i) for i in op.inputs],
                   op.params, npu)
    if keep := keeps_of(prog, npu).get(op.name):
        low = with_keep(low, tuple(keep["inputs"]), keep["output"])
    xs = (ctypes.c_void_p * len(ins))(*[a.ctypes.data for a in ins])
    out = np.zeros(op.shape, np.uint8)
    cnt = np.zeros(len(COUNTERS), np.int64)
    z8, z32 = np.zeros(1, np.int8), np.zeros(1, np.int32)
    table = low.table if low.table is not None else z32
    lut = low.lut if low.lut is not None else np.zeros(1, np.uint8)
    mult = np.ascontiguousarray(op.params.get("mult", z32), np.int32)
    shift = np.ascontiguousarray(op.params.get("shift", z32), np.int32)
    rc = lib.run_ops(_p(np.ascontiguousarray(low.words)), xs, len(ins), _p(out), _p(z8), _p(table), _p(lut),
                     _p(z32), _p(mult), _p(shift), _p(cnt))
    assert rc == 0
    return out, dict(zip(COUNTERS, (int(v) for v in cnt)))


_per_value = st.sampled_from([0.0, 0.0, 0.125, 0.75, 1.0, 2.5])
_machines = st.builds(NPU16, tile=st.sampled_from([8, 16]), arrays=st.integers(1, 4),
                      dma_bytes_per_cycle=st.integers(1, 32), epilogue_width=st.integers(1, 16),
                      weight_bytes_per_cycle=st.sampled_from([0, 1, 4]), double_buffer=st.booleans(),
                      add_cycles_per_value=_per_value, mul_cycles_per_value=_per_value,
                      pool_cycles_per_value=_per_value, lut_cycles_per_value=_per_value,
                      row_cycles_per_value=_per_value, row_cycles=st.sampled_from([1, 64, 300]),
                      sram_act_kib=st.sampled_from([1, 512]))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(KINDS), seed=st.integers(0, 2**16), npu=_machines)
def test_npu16_equals_reference_and_estimator(simulator, kind, seed, npu):
    prog, op, x = case(kind, seed)
    env = reference.run(prog, x, keep=True)
    try:
        out, counted = simulate(simulator, prog, op, env, npu)
    except NotOnNpu as e:               # a 1 KiB activation SRAM can be too small (a matmul's operand)
        assert npu.sram_act_kib == 1 and "activation SRAM" in str(e), e
        return
    np.testing.assert_array_equal(out, env[op.name])
    est = estimate(prog, op, npu)
    assert est.counters() == counted


@pytest.mark.parametrize("kind", KINDS)
def test_npu16_cases_cover_the_outputs(simulator, kind):
    """Fixed seeds through the default machine; the outputs vary (no clamp swallows a bug)."""
    seen = set()
    for seed in range(6):
        prog, op, x = case(kind, seed)
        env = reference.run(prog, x, keep=True)
        out, counted = simulate(simulator, prog, op, env, NPU16())
        np.testing.assert_array_equal(out, env[op.name], err_msg=f"{kind} seed {seed}")
        assert counted["cycles"] > 0
        seen.update(np.unique(out).tolist())
    assert len(seen) > 8


def test_concat_costs_one_command_per_input(simulator):
    """Two inputs: cycles are the sum of each command's max(dma, epilogue), not the max of sums."""
    for seed in range(40):
        prog, op, x = case("concat", seed)
        if len(op.inputs) >= 2:
            break
    npu = NPU16(dma_bytes_per_cycle=1, epilogue_width=1)
    env = reference.run(prog, x, keep=True)
    _, counted = simulate(simulator, prog, op, env, npu)
    sizes = [env[i].size for i in op.inputs]
    assert counted["cycles"] == sum(2 * s for s in sizes) and counted["epilogue_values"] == sum(sizes)


def test_mul_rejects_a_partial_broadcast():
    with pytest.raises(NotOnNpu, match="broadcasts"):
        lower_op("mul", {"za": 0, "zb": 0, "mult": 2**30, "shift": 0, "z_out": 0, "lo": 0, "hi": 255},
                 [(1, 4, 3, 3), (1, 1, 3, 3)], ["uint8", "uint8"], {})


def test_int32_codes_stay_on_the_host():
    with pytest.raises(NotOnNpu, match="int32"):
        lower_op("table", {}, [(1, 4)], ["int32"], {"table": np.zeros(16, np.uint8)})


def test_units_with_their_own_throughput(simulator):
    """cycles_per_value gives the add unit Vela's Ethos-U55-256 rate (0.75 cycles per output):
    ⌈values·192/256⌉ epilogue cycles instead of ⌈values/lanes⌉, in the simulator and the model."""
    from relay_passes.program import Op
    from tests.codegen.new_op_cases import _gather, _program
    shape = (1, 3, 5, 7)
    from relay_passes.attrs import AddAttrs
    attrs = AddAttrs(za=1, zb=2, ka=1 << 20, kb=3 << 19, t=21, z_out=4, lo=0, hi=255)
    op = Op("add", "op", ["q", "g"], attrs, shape=shape)
    prog = _program(shape, [_gather("g", "q", [2, 0, 1], shape), op])
    x = np.random.default_rng(0).integers(0, 256, shape).astype(np.float32)
    env = reference.run(prog, x, keep=True)
    values = int(np.prod(op.shape))
    for npu, want in ((NPU16(epilogue_width=8), -(-values // 8)), (NPU16(add_cycles_per_value=0.75), -(-values * 3 // 4))):
        _, counted = simulate(simulator, prog, op, env, npu)
        assert counted["epilogue_cycles"] == want == estimate(prog, op, npu).epilogue_cycles


def test_matmul_tiles_and_stripes(simulator):
    """MATMUL over heads whose K and M span several tiles (partial last ones), on 8- and 16-wide
    arrays and a 1 KiB activation SRAM (512 B usable, double-buffered) that holds a head's
    stationary operand and only a few positions: bit-exact, several stripes per head, MACs and
    array steps of G GEMMs, and every counter equal to the estimator."""
    from codegen.npu16.lower import matmul_gemm
    striped = multi_tile = 0
    for seed in range(60):
        prog, op, x = case("matmul", seed)
        env = reference.run(prog, x, keep=True)
        n, g, k, m, p = matmul_gemm(op.attrs, [prog.shape_of(i) for i in op.inputs])
        for npu in (NPU16(tile=8, arrays=3), NPU16(sram_act_kib=1)):
            if npu.sram_act_kib == 1 and k * m + k + m > 512:
                with pytest.raises(NotOnNpu, match="activation SRAM"):
                    lower_op(op.kind, op.attrs, [prog.shape_of(i) for i in op.inputs], ["uint8"] * 2, {}, npu)
                continue
            out, counted = simulate(simulator, prog, op, env, npu)
            np.testing.assert_array_equal(out, env[op.name], err_msg=f"seed {seed}")
            assert counted == estimate(prog, op, npu).counters()
            t = npu.tile
            assert counted["macs"] == n * g * p * m * k
            assert counted["array_steps"] == n * g * p * -(-m // t) * -(-k // t)
            # every input byte once: moved, or saved where a chain keeps b (its max pool) in SRAM
            assert counted["dma_weight_bytes"] == 0
            assert counted["dma_in_bytes"] + counted["dma_saved_bytes"] == n * g * k * (p + m)
            striped += counted["stripes"] > n * g
            multi_tile += k > t and m > t
    assert striped >= 5 and multi_tile >= 2, (striped, multi_tile)
