"""The C and npu16 BYOC entries of the new op kinds, compiled with g++ and called through their
tvm-ffi calling convention on DLTensor arguments (inputs, params in waps.params order, output),
bit-exact against the reference. The Relax op functions are built by hand with the attributes
relay_passes.program.emit gives them (a placeholder body: only the signature and attrs matter)."""
import ctypes
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tvm_ffi
from tvm import relax

from codegen.byoc_source import PRELUDE
from relay_passes import reference
from relay_passes.program import encode_attrs
from targets.c_source import inline_source
from tests.codegen.new_op_cases import KINDS, case

FFI = Path(tvm_ffi.__file__).resolve().parent


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32),
                ("ndim", ctypes.c_int32), ("code", ctypes.c_uint8), ("bits", ctypes.c_uint8),
                ("lanes", ctypes.c_uint16), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("byte_offset", ctypes.c_uint64)]


class _Any(ctypes.Structure):
    _fields_ = [("type_index", ctypes.c_int32), ("zero_padding", ctypes.c_uint32), ("v_ptr", ctypes.c_void_p)]


K_DLTENSOR_PTR = 7          # kTVMFFIDLTensorPtr (tvm/ffi/c_api.h)


def _function(prog, op):
    """The op as a Relax function: inputs, then its params (sorted names) → its output."""
    pnames = sorted(op.params)
    args = [relax.Var(f"x{i}", relax.TensorType(prog.shape_of(i_), prog.dtype_of(i_))) for i, i_ in enumerate(op.inputs)]
    args += [relax.Var(k, relax.TensorType(op.params[k].shape, str(op.params[k].dtype))) for k in pnames]
    bb = relax.BlockBuilder()
    with bb.function("f", args):
        bb.emit_func_output(bb.emit(relax.op.zeros(op.shape, op.dtype)))
    fn = bb.get()["f"]
    return (fn.with_attr("waps.kind", op.kind).with_attr("waps.attrs", encode_attrs(op))
            .with_attr("waps.params", pnames)), pnames


def _compile_and_call(source: str, sym: str, arrays: list[np.ndarray], out: np.ndarray, tmp: Path) -> int:
    (tmp / f"{sym}.cc").write_text(source)
    r = subprocess.run(["g++", "-O1", "-shared", "-fPIC", f"-I{FFI / 'include'}", str(tmp / f"{sym}.cc"),
                        f"-L{FFI / 'lib'}", "-ltvm_ffi", f"-Wl,-rpath,{FFI / 'lib'}", "-o", str(tmp / f"{sym}.so")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    lib = ctypes.CDLL(str(tmp / f"{sym}.so"))
    keep, anys = [], (_Any * (len(arrays) + 1))()
    for i, a in enumerate([*arrays, out]):
        shape = np.array(a.shape, np.int64)
        kind = {"u": 1, "i": 0}[a.dtype.kind]
        t = _DLTensor(a.ctypes.data, 1, 0, a.ndim, kind, a.dtype.itemsize * 8, 1, shape.ctypes.data, None, 0)
        keep += [shape, t]
        anys[i] = _Any(K_DLTENSOR_PTR, 0, ctypes.addressof(t))
    result = _Any()
    return getattr(lib, f"__tvm_ffi_{sym}")(None, anys, len(arrays) + 1, ctypes.byref(result))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", ["c", "npu16"])
def test_byoc_entry_equals_reference(kind, backend, tmp_path):
    for seed in range(2):
        prog, op, x = case(kind, seed)
        env = reference.run(prog, x, keep=True)
        fn, pnames = _function(prog, op)
        sym = f"t_{kind}_{seed}"
        if backend == "c":
            from codegen.c.byoc import _entry
            from codegen.c.emit import KERNELS
            source = PRELUDE + inline_source(KERNELS) + _entry(fn, sym)
        else:
            from codegen.npu16.byoc import SIM, _entry
            from codegen.npu16.lower import lower_op
            from targets.npu16.isa import c_header
            low = lower_op(op.kind, op.attrs, [prog.shape_of(i) for i in op.inputs],
                           [prog.dtype_of(i) for i in op.inputs], op.params)
            source = PRELUDE + c_header() + inline_source(SIM) + _entry(fn, sym, low)
        arrays = [np.ascontiguousarray(env[i]) for i in op.inputs] + [np.ascontiguousarray(op.params[k]) for k in pnames]
        out = np.zeros(op.shape, np.uint8)
        assert _compile_and_call(source, sym, arrays, out, tmp_path) == 0
        np.testing.assert_array_equal(out, env[op.name], err_msg=f"{backend} {kind} seed {seed}")
