"""Every registered op kind (relay_passes/opset.py) on every backend, bit-exact against the
NumPy reference on its random small examples: a new kind is checked everywhere by
registering it, without new tests."""
import zlib

import numpy as np
import pytest
import tvm

from codegen.c import byoc as c_byoc
from codegen.c import emit as c_emit
from codegen.c.emit import build_shared, run_shared
from codegen.npu16 import lower as npu16_lower
from relay_passes import kernels, reference
from relay_passes.opset import KINDS, Channels
from relay_passes.pipeline import lower
from targets.npu16 import report as npu16_report
from waps_tvm import inspect as waps_inspect
from waps_tvm.compiler import build

SEEDS = (0, 1)
BACKENDS = ("llvm-split", "llvm-fused", "llvm-fast", "c", "c-unit", "npu16")   # fused: conv2d/linear only


def _examples(kind: str):
    for seed in SEEDS:
        rng = np.random.default_rng(zlib.crc32(kind.encode()) + seed)
        prog = KINDS[kind].example(rng)
        x = rng.normal(0, 1.5, prog.input_shape).astype(np.float32)
        yield prog, x


def _run(prog, x, backend: str, lib) -> list[np.ndarray]:
    if backend == "c-unit":                 # a fresh path per build: dlopen returns a loaded path's old library
        lowered = lower(prog, "split")
        return list(run_shared(build_shared(lowered.program, lib), lowered.program, x))
    form, target = ("split", backend) if "-" not in backend else (backend.split("-")[1], "llvm")
    lowered = lower(prog, form)
    vm = tvm.runtime.vm.VirtualMachine(build(lowered, target), tvm.cpu())
    if target == "npu16":                   # the op under test ran on the NPU unless it is host-only
        kind = prog["op"].kind if any(o.name == "op" for o in prog.ops) else "quantize"
        rows = [r for r in lowered.placement if r["op"] == "op"]
        assert kind in HOST_ON_NPU16 or rows[0]["target"] == "npu16", rows
    out = vm["main"](tvm.runtime.tensor(x))
    return [out[0].numpy(), out[1].numpy()]


HOST_ON_NPU16 = {"quantize", "dequantize", "flatten"}     # float arithmetic, or nothing to compute


def test_every_handler_table_covers_the_op_set():
    assert set(reference.OPS) == set(KINDS)
    assert set(kernels._BODIES) == set(KINDS)
    assert set(c_emit.CALLS) == set(KINDS)
    assert set(c_byoc.ENTRIES) == set(KINDS)
    assert set(c_emit.SHARED_CALLS) <= set(KINDS)            # the kernels the two C tables share
    assert set(npu16_lower.LOWERINGS) == set(KINDS)
    assert set(npu16_report.ESTIMATES) == set(KINDS)
    assert set(waps_inspect.RENDER) == set(KINDS)


@pytest.mark.parametrize("kind, backend", [(k, b) for k in sorted(KINDS) for b in BACKENDS
                                            if b != "llvm-fused" or KINDS[k].channels is Channels.LAYER])
def test_kind_bit_exact_on_backend(kind, backend, tmp_path):
    for i, (prog, x) in enumerate(_examples(kind)):
        assert any(op.kind == kind for op in prog.ops)
        ref = reference.run(prog, x)
        got = _run(prog, x, backend, tmp_path / f"model{i}.so")
        np.testing.assert_array_equal(got[1], ref[1], err_msg=f"{kind} on {backend}: codes")
        np.testing.assert_array_equal(got[0], ref[0], err_msg=f"{kind} on {backend}: dequantized")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_kind_renders_as_onnx(kind):
    from waps_tvm.inspect import to_onnx
    for prog, _ in _examples(kind):
        model = to_onnx(lower(prog, "split").program, "llvm")         # onnx.checker runs inside
        assert len(model.graph.node) >= len(prog.ops)
