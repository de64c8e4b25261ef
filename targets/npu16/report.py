"""Per-op npu16 costs of a compiled program (what ``waps-tvm report`` shows).

Conv/linear/depthwise layers use the cost model of targets/npu16/cost.py, which the
simulator's counters equal (tests/codegen/test_npu16_byoc.py); element-wise ops (add,
pooling) go through the 8-wide epilogue unit, gathers through DMA. Each conv/linear also
gets its cost without WAPS groups (the same layer, one group) for the overhead column.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from targets.npu16.cost import LayerShape, layer_cost
from targets.npu16.params import NPU16


def _layer_shape(op, in_shape, out_shape) -> LayerShape:
    w = op.params["w"]
    a = op.attrs
    if op.kind == "linear":
        m, c = w.shape
        kh = kw = oh = ow = h = wd = 1
        g = 1
    else:
        m, cg, kh, kw = w.shape
        g = a["conv_groups"]
        c = cg * g
        _, _, oh, ow = out_shape
        h, wd = in_shape[2], in_shape[3]
    sizes, scaled = (), ()
    if "groups" in op.params:
        labels = op.params["groups"]
        sizes = tuple(int((labels == p).sum()) for p in range(len(a["sigma"])))
        scaled = tuple(bool(s) for s in a["sigma"])
    return LayerShape(op.name, c, m, oh, ow, kh, kw, g, sizes, scaled, h, wd,
                      wbits=8, abits_in=8, abits_out=8)   # npu16 stores int8 weights and codes


def op_costs(program, placement: list[dict], npu: NPU16) -> list[dict]:
    where = {p["op"]: p for p in placement}
    rows = []
    for op in program.ops:
        place = where.get(op.name, {"target": "llvm", "reason": ""})
        row = {"op": op.name, "kind": op.kind, "layer": op.attrs.get("layer", ""), "target": place["target"],
               "reason": place.get("reason", ""), "shape": list(op.shape)}
        in_shape = program.shape_of(op.inputs[0]) if op.inputs else ()
        if place["target"] == "npu16" and op.kind in ("conv2d", "linear"):
            shape = _layer_shape(op, in_shape, op.shape)
            cost = layer_cost(shape, npu)
            plain = layer_cost(replace(shape, group_sizes=(), scaled=()), npu)
            row.update(macs=cost.macs, int_ops=cost.base_ops + cost.waps_ops, shift_ops=cost.shifts,
                       compute=cost.compute_cycles + cost.waps_cycles, dma=cost.dma_cycles,
                       epilogue=cost.epilogue_cycles, cycles=cost.cycles, cycles_no_groups=plain.cycles,
                       groups=list(shape.group_sizes))
        elif place["target"] == "npu16":
            n_out = int(np.prod(op.shape))
            taps = int(np.prod(op.attrs.get("kernel", [1, 1]))) if "pool" in op.kind else 1
            elem = 1 if program.dtype_of(op.inputs[0]) == "uint8" else 4
            moved = n_out * elem * (2 if op.kind == "gather" else 1) + int(np.prod(in_shape)) * elem
            epi = 0 if op.kind == "gather" else -(-n_out * taps // npu.epilogue_width)
            dma = -(-moved // npu.dma_bytes_per_cycle)
            row.update(macs=0, int_ops=n_out * taps if op.kind != "gather" else 0, shift_ops=0, compute=0,
                       dma=dma, epilogue=epi, cycles=max(dma, epi), cycles_no_groups=max(dma, epi), groups=[])
        rows.append(row)
    return rows


def totals(rows: list[dict]) -> dict:
    npu = [r for r in rows if r["target"] == "npu16"]
    keys = ("macs", "int_ops", "shift_ops", "compute", "dma", "epilogue", "cycles", "cycles_no_groups")
    t = {k: int(sum(r[k] for r in npu)) for k in keys}
    t["gathers"] = sum(1 for r in rows if r["kind"] == "gather")
    t["waps_overhead_pct"] = 100.0 * (t["cycles"] - t["cycles_no_groups"]) / max(t["cycles_no_groups"], 1)
    t["host_ops"] = [r["op"] for r in rows if r["target"] != "npu16"]
    return t
