"""BYOC for npu16: integer ops become instruction streams run by the simulator.

``offload(mod)`` lowers every integer-op function it can (codegen/npu16/lower.py) and
marks it for ``waps_npu16``; the rest stay on the host (llvm) with the reason recorded.
``relax.transform.RunCodegen`` then calls ``relax.ext.waps_npu16``, which returns one C
source module: the simulator (targets/npu16/npu16_sim.h), and per op its encoded stream,
tiled weights and channel table as constant arrays, and an ``extern "C"`` tvm-ffi entry
that binds the op's tensors and runs the stream. ``export_library`` compiles it in.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tvm
from tvm import relax

from codegen.npu16.lower import NotOnNpu, NpuOp, lower_op

CODEGEN = "waps_npu16"
SIM = Path(__file__).resolve().parents[2] / "targets" / "npu16" / "npu16_sim.h"
_PRELUDE = r'''
#include <tvm/ffi/c_api.h>
#include <dlpack/dlpack.h>
#include <stdint.h>
static inline void* waps_ptr(const TVMFFIAny* a) {
  DLTensor* t = a->type_index == kTVMFFIDLTensorPtr ? (DLTensor*)a->v_ptr : TVMFFITensorGetDLTensorPtr(a->v_obj);
  return (char*)t->data + t->byte_offset;
}
'''
_LOWERED: dict[str, NpuOp] = {}


def _symbol(name: str) -> str:
    return "waps_npu16_" + "".join(c if c.isalnum() else "_" for c in name)


def placement(mod: tvm.IRModule) -> list[dict]:
    """Where each integer op runs: [{op, kind, layer, target, reason, stream}] in program order."""
    from relay_passes.program import parse
    prog = parse(mod)
    out = []
    for op in prog.ops:
        shapes = [prog.shape_of(i) for i in op.inputs]
        dtypes = [prog.dtype_of(i) for i in op.inputs]
        try:
            low = lower_op(op.kind, op.attrs, shapes, dtypes, op.params)
            out.append({"op": op.name, "kind": op.kind, "layer": op.attrs.get("layer", ""), "target": "npu16",
                        "reason": "", "lowered": low})
        except NotOnNpu as e:
            out.append({"op": op.name, "kind": op.kind, "layer": op.attrs.get("layer", ""), "target": "llvm",
                        "reason": str(e), "lowered": None})
    return out


def offload(mod: tvm.IRModule) -> tuple[tvm.IRModule, list[dict]]:
    _register()
    where = placement(mod)
    updates = {}
    for row in where:
        if row["target"] != "npu16":
            continue
        gv = mod.get_global_var(row["op"])
        sym = _symbol(row["op"])
        _LOWERED[sym] = row["lowered"]
        updates[gv] = mod[gv].with_attr("Codegen", CODEGEN).with_attr("global_symbol", sym)
    for gv, fn in updates.items():
        mod[gv] = fn
    return relax.transform.RunCodegen()(mod), where


def _register() -> None:
    if tvm.get_global_func(f"relax.ext.{CODEGEN}", allow_missing=True) is None:
        tvm.register_global_func(f"relax.ext.{CODEGEN}", _codegen)


def _codegen(functions, options, constant_names):
    create = tvm.get_global_func("runtime.CSourceModuleCreate")
    parts = [_PRELUDE, SIM.read_text()]
    symbols = []
    for fn in functions:
        sym = str(fn.attrs["global_symbol"])
        symbols.append(sym)
        parts.append(_entry(fn, sym, _LOWERED[sym]))
    return [create("\n".join(parts), "cc", symbols, [])]


def _carray(name: str, arr: np.ndarray, ctype: str) -> str:
    flat = arr.ravel()
    return f"static const {ctype} {name}[{max(flat.size, 1)}] = {{{','.join(str(int(v)) for v in flat) or '0'}}};"


def _entry(fn: relax.Function, sym: str, low: NpuOp) -> str:
    a = json.loads(str(fn.attrs["waps.attrs"]))
    pnames = [str(p) for p in fn.attrs["waps.params"]]
    n_in = int(a["n_inputs"])
    arg = {k: f"&args[{n_in + i}]" for i, k in enumerate(pnames)}
    decl = [_carray(f"{sym}_prog", low.words, "uint32_t")]
    bind = ["npu16_bufs b; memset(&b, 0, sizeof(b));", "b.x = waps_ptr(&args[0]);",
            "b.out = waps_ptr(&args[num_args - 1]);"]
    if n_in > 1:
        bind.append("b.x2 = waps_ptr(&args[1]);")
    if low.tiles is not None:
        decl.append(_carray(f"{sym}_tiles", low.tiles, "int8_t"))
        bind.append(f"b.tiles = {sym}_tiles;")
    if low.table is not None:
        decl.append(_carray(f"{sym}_table", low.table, "int32_t"))
        bind.append(f"b.table = {sym}_table;")
    for k in ("bias", "mult", "shift", "index"):
        if k in arg:
            bind.append(f"b.{k} = (const int32_t*)waps_ptr({arg[k]});")
    body = "\n  ".join(bind)
    return ("\n".join(decl) + f"\nstatic npu16_counters {sym}_counters;\n"
            f'extern "C" TVM_FFI_DLL_EXPORT int __tvm_ffi_{sym}(void* self, const TVMFFIAny* args, '
            f"int32_t num_args, TVMFFIAny* result) {{\n  {body}\n"
            f"  int rc = npu16_execute({sym}_prog, &b, &{sym}_counters);\n"
            f"  result->type_index = kTVMFFINone;\n  result->v_int64 = 0;\n  return rc;\n}}\n")
