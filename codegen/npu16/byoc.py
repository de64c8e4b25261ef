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

from codegen.byoc_source import entry_function, register, symbol
from codegen.byoc_source import offload as byoc_offload
from codegen.npu16.lower import NotOnNpu, NpuOp, lower_op
from targets.c_source import inline_source

CODEGEN = "waps_npu16"
SIM = Path(__file__).resolve().parents[2] / "targets" / "npu16" / "npu16_sim.h"
_LOWERED: dict[str, NpuOp] = {}


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
    register(CODEGEN, lambda: inline_source(SIM), lambda fn, sym: _entry(fn, sym, _LOWERED[sym]))
    where = placement(mod)
    names = {}
    for row in where:
        if row["target"] == "npu16":
            names[row["op"]] = symbol("waps_npu16_", row["op"])
            _LOWERED[names[row["op"]]] = row["lowered"]
    return byoc_offload(mod, CODEGEN, names), where


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
    bind.append(f"int rc = npu16_execute({sym}_prog, &b, &{sym}_counters);")
    return "\n".join(decl) + f"\nstatic npu16_counters {sym}_counters;\n" + entry_function(sym, bind, "rc")
