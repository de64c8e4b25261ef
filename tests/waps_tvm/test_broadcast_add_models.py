"""Residual adds with a broadcast operand end to end: x + F.adaptive_avg_pool2d(x, 1) (the pool's
int32 sums added directly), the same with the pool first, a per-position [N, 1, H, W] and a
per-sample [N, 1, 1, 1] operand. calibrate → lower_artifact → the NumPy reference, within 1 code of
the fake-quant model at every quantization point, and bit-exact on fast llvm, C and npu16 with
the add on the NPU."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from relay_passes import reference
from waps_tvm.compiler import lower_artifact
from waps_tvm.oracle import layer_agreement


class PoolAdd(nn.Module):
    """conv → (x + pool(x)) or (pool(x) + x) → conv."""

    def __init__(self, pool_first: bool):
        super().__init__()
        self.pool_first = pool_first
        self.a, self.b = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        p = F.adaptive_avg_pool2d(y, 1)
        return self.b(p + y if self.pool_first else y + p)


class MapAdd(nn.Module):
    """conv → x + one map [N, 1, H, W] (``per_sample``: its mean, [N, 1, 1, 1]) → conv."""

    def __init__(self, per_sample: bool):
        super().__init__()
        self.per_sample = per_sample
        self.a, self.m, self.b = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 1, 1), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        m = self.m(y)
        if self.per_sample:
            m = self.m(F.adaptive_avg_pool2d(y, 1))       # a 1×1 conv of the pooled map: [N, 1, 1, 1]
        return self.b(m + y)


MODELS = {"x+pool": lambda: PoolAdd(False), "pool+x": lambda: PoolAdd(True),
          "position": lambda: MapAdd(False), "sample": lambda: MapAdd(True)}
SHAPES = {"x+pool": (8, 1, 1), "pool+x": (8, 1, 1), "position": (1, 6, 5), "sample": (1, 1, 1)}


def _calibrated(name: str, bits: int = 4):
    """calibrate → .waps file (its graph checks) → loaded artifact."""
    import tempfile
    from pathlib import Path
    from calib.artifact import load, save
    from tests.compile_helpers import calibrated
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        return load(save(calibrated(MODELS[name](), (1, 6, 5), wbits=bits, abits=bits, iters=1, samples=8),
                         Path(d) / "m.waps"))


def _broadcast_add(art):
    adds = [n for n in art.graph if n.op == "add"]
    assert len(adds) == 1
    shapes = {tuple(art.graph[i].shape) for i in adds[0].inputs}
    return adds[0], shapes


@pytest.mark.parametrize("name", sorted(MODELS))
def test_broadcast_add_within_one_code_of_fake_quant(name):
    art = _calibrated(name)
    _, shapes = _broadcast_add(art)
    assert shapes == {(8, 6, 5), SHAPES[name]}, shapes
    x = np.random.default_rng(1).normal(size=(8, 1, 6, 5)).astype("float32")
    lowered = lower_artifact(art, 8, "split")
    add = next(o for o in lowered.program.ops if o.kind == "add")
    sa, sb = (lowered.program.shape_of(i) for i in add.inputs)
    assert tuple(sa) == (8, 8, 6, 5) and tuple(sb) == (8, *SHAPES[name])     # the broadcast operand second
    if name in ("x+pool", "pool+x"):
        assert lowered.program.dtype_of(add.inputs[1]) == "int32"            # the pool's sums, not requantized
    out = reference.run(lowered.program, x)
    assert out[1].shape == (8, 4, 6, 5)
    rows = layer_agreement(art, x)
    assert "add" in {r.kind for r in rows}
    assert all(r.max_diff <= 1 for r in rows), rows


@pytest.mark.parametrize("name", ["x+pool", "pool+x", "position"])
def test_broadcast_add_bit_exact_on_every_backend(name):
    """Fast llvm (NHWC convs around the NCHW add), C and npu16 (the add on the NPU) equal the reference."""
    from tests.compile_helpers import assert_bit_exact_on_backends
    x = np.random.default_rng(2).normal(size=(2, 1, 6, 5)).astype("float32")
    assert_bit_exact_on_backends(_calibrated(name), x, npu_kinds=("add",))


def test_broadcast_operand_first_in_the_artifact_is_swapped_to_second():
    """capture puts the broadcast operand second; an artifact with it first (a + b = b + a)
    lowers to the same program: the operands swap with their scales."""
    art = _calibrated("pool+x")
    x = np.random.default_rng(3).normal(size=(2, 1, 6, 5)).astype("float32")
    want = reference.run(lower_artifact(art, 2, "split").program, x)
    add, _ = _broadcast_add(art)
    add.inputs = add.inputs[::-1]
    assert tuple(art.graph[add.inputs[0]].shape) == (8, 1, 1)
    got = reference.run(lower_artifact(art, 2, "split").program, x)
    np.testing.assert_array_equal(got[1], want[1])


def test_adds_that_stay_refused():
    """Two pooled (int32) operands, a pooled full-size operand, and shapes that do not broadcast."""
    from calib.errors import UnsupportedOpError
    from codegen.npu16.lower import NotOnNpu, lower_op
    from relay_passes.quantize import AddQuant, ProgramBuilder, TensorCodes, Value
    from waps_tvm.frontend import _broadcast_operand
    wide, narrow = TensorCodes(0.01 / 30, 128 * 30, 255 * 30), TensorCodes(0.01, 128, 255)
    ad = AddQuant("add", None, TensorCodes(0.02, 100, 255))
    with pytest.raises(UnsupportedOpError, match="pooled"):
        ProgramBuilder((1, 4, 3, 3), narrow).residual_add(ad, Value("a", wide), Value("b", narrow), True)
    from relay_passes.attrs import AddAttrs
    attrs = AddAttrs(za=0, zb=0, ka=1, kb=1, t=1, z_out=0, lo=0, hi=255)
    with pytest.raises(NotOnNpu, match="int32"):
        lower_op("add", attrs, [(1, 4, 3, 3), (1, 4, 3, 3)], ["uint8", "int32"], {})
    art = _calibrated("position")
    add, _ = _broadcast_add(art)
    art.graph[add.inputs[1]].shape = (1, 6, 1)                      # [1, H, 1]: not a supported broadcast
    with pytest.raises(UnsupportedOpError, match="broadcasts either operand"):
        _broadcast_operand(art, add, either=True)


def test_npu16_estimator_equals_the_simulator_on_broadcast_adds(tmp_path):
    """Every broadcast mode of the add's conformance example (per channel, pooled int32 sums,
    per position, per sample): the simulator's output is the reference's and each counter is
    the estimator's (b read once, 4 bytes a value when wide)."""
    import zlib
    from relay_passes.program import emit
    from relay_passes.opset import KINDS
    from targets.npu16.params import NPU16
    from targets.npu16.report import estimate
    from tests.compile_helpers import npu16_simulator
    from tests.targets.test_npu16_new_ops import simulate
    lib = npu16_simulator(tmp_path)
    seen = set()
    for seed in range(18):
        rng = np.random.default_rng(zlib.crc32(b"add") + seed)
        prog = KINDS["add"].example(rng)
        emit(prog)
        op = prog["op"]
        sb, db = prog.shape_of(op.inputs[1]), prog.dtype_of(op.inputs[1])
        seen.add((tuple(sb), db))
        x = rng.normal(0, 1.5, prog.input_shape).astype(np.float32)
        env = reference.run(prog, x, keep=True)
        npu = NPU16(dma_bytes_per_cycle=int(rng.integers(1, 9)), epilogue_width=int(rng.integers(1, 9)))
        out, counted = simulate(lib, prog, op, env, npu)
        np.testing.assert_array_equal(out, env[op.name])
        assert estimate(prog, op, npu).counters() == counted
    assert {((2, 5, 1, 1), "int32"), ((2, 5, 1, 1), "uint8"), ((2, 1, 6, 6), "uint8"), ((2, 1, 1, 1), "uint8"),
            ((2, 5, 6, 6), "uint8")} <= seen, seen
