"""Every registered op kind (relay_passes/opset.py) on every backend, bit-exact against the
NumPy reference on its random small examples: a new kind is checked everywhere by
registering it, without new tests.

aarch64 (the llvm forms cross-compiled for --target aarch64, the fast form with its sdot
kernels) runs under qemu where scripts/aarch64-emulation.sh set it up (fails in CI without
it, skipped elsewhere): every kind's examples in one emulated python, since qemu start-up
costs seconds."""
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
from targets import cpu
from targets.npu16 import report as npu16_report
from tests.emulation_helpers import require
from waps_tvm import emulation
from waps_tvm import inspect as waps_inspect
from waps_tvm.compiler import build, dot_product, metadata, write_library

SEEDS = (0, 1)
BACKENDS = ("llvm-split", "llvm-fused", "llvm-fast", "c", "c-unit", "npu16")   # fused: conv2d/linear only
AARCH64_FORMS = ("split", "fused", "fast")                                        # fused: conv2d/linear only


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


HOST_ON_NPU16 = npu16_lower.HOST_KINDS      # float arithmetic, nothing to compute, codes written per sample


def test_host_kinds_are_the_expected_ones():
    assert HOST_ON_NPU16 == {"quantize", "dequantize", "flatten", "constant", "reshape"}


def test_every_handler_table_covers_the_op_set():
    assert set(reference.OPS) == set(KINDS)
    assert set(kernels.KERNELS) == set(KINDS)
    assert set(c_emit.CALLS) == set(KINDS)
    assert set(c_byoc.ENTRIES) == set(KINDS)
    assert set(c_emit.SHARED_CALLS) <= set(KINDS)            # the kernels the two C tables share
    assert set(npu16_lower.LOWERINGS) == set(KINDS)
    assert set(npu16_report.ESTIMATES) == set(KINDS)
    assert set(npu16_report.HOST_ESTIMATES) == set(HOST_ON_NPU16)
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


def _aarch64_cases() -> list[tuple[str, str]]:
    return [(k, f) for k in sorted(KINDS) for f in AARCH64_FORMS if f != "fused" or KINDS[k].channels is Channels.LAYER]


@pytest.fixture(scope="module")
def aarch64_runs(tmp_path_factory) -> dict:
    """{(kind, form): [(dequantized, codes) of each example] or the exception its build raised}:
    every case of _aarch64_cases cross-compiled for --target aarch64 (the fast form with
    dot_product's inner product, as `waps-tvm compile --target aarch64` builds it), one
    folder per example, all run by one emulated python (emulation.run_many)."""
    require(lambda: cpu.export_cc("aarch64"))
    require(emulation.python)
    target, cc = cpu.resolve("aarch64"), cpu.export_cc("aarch64")
    root = tmp_path_factory.mktemp("aarch64")
    built: dict = {}
    jobs = []
    for kind, form in _aarch64_cases():
        try:
            folders = []
            for i, (prog, x) in enumerate(_examples(kind)):
                lowered = lower(prog, form, dot=dot_product(target) if form == "fast" else "none")
                folder = root / f"{kind}-{form}-{i}"
                folder.mkdir()
                write_library(build(lowered, target), folder, metadata(None, lowered, target, 1, 0.0), cc)
                folders.append((folder, x))
        except Exception as e:  # noqa: BLE001 (reported by that case's test, not by every case)
            built[kind, form] = e
            continue
        built[kind, form] = len(folders)
        jobs += folders
    outs = iter(emulation.run_many(jobs))
    return {case: n if isinstance(n, Exception) else [next(outs)[:2] for _ in range(n)] for case, n in built.items()}


@pytest.mark.slow
@pytest.mark.parametrize("kind, form", _aarch64_cases())
def test_kind_bit_exact_on_aarch64(kind, form, aarch64_runs):
    got = aarch64_runs[kind, form]
    if isinstance(got, Exception):
        raise got
    examples = list(_examples(kind))
    assert len(got) == len(examples)
    for (prog, x), (deq, codes) in zip(examples, got):
        ref = reference.run(prog, x)
        assert codes.dtype == ref[1].dtype and deq.dtype == ref[0].dtype
        np.testing.assert_array_equal(codes, ref[1], err_msg=f"{kind} on aarch64-{form}: codes")
        np.testing.assert_array_equal(deq, ref[0], err_msg=f"{kind} on aarch64-{form}: dequantized")
