"""Per-op npu16 costs of a compiled program (what ``waps-tvm report`` shows).

The counts of an op come from the simulator's counters read out of the compiled module
after a run (targets/npu16/counters.py) when given, else from the analytical estimator
(targets/npu16/cost.py), which tests hold equal to the counters. Each conv/linear also
gets the estimated cycles of the same layer without WAPS groups (one group) for the
overhead column.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np

from relay_passes.opset import is_layer
from targets.npu16.cost import (LayerCost, LayerShape, add_cost, avg_pool_cost, concat_cost, gather_cost, layer_cost,
                                lut_cost, mul_cost, pad_cost, pool_cost, resize_cost)
from targets.npu16.first_layer import runs_im2col
from targets.npu16.params import NPU16


def layer_shape(op, in_shape, in_dtype: str, npu: NPU16) -> LayerShape:
    """The cost model's view of a conv/linear op of the integer program, exactly as lowered on ``npu``."""
    w = op.params["w"]
    a = op.attrs
    if op.kind == "linear":
        m, c = w.shape
        kh = kw = oh = ow = h = wd = g = sh = dh = 1
        ph = 0
    else:
        m, cg, kh, kw = w.shape
        g = a.conv_groups
        c = cg * g
        _, _, oh, ow = op.shape
        h, wd = in_shape[2], in_shape[3]
        sh, ph, dh = a.stride[0], a.padding[0], a.dilation[0]
    sizes, scaled, per_group = (), (), ()
    if "groups" in op.params:
        labels = np.asarray(op.params["groups"])
        n_p = op.n_groups
        sizes = tuple(int((labels == p).sum()) for p in range(n_p))
        scaled = tuple(bool(s.sigma) for s in op.group_scales)
        cg = c // g
        per_group = tuple(tuple(int((labels[i * cg:(i + 1) * cg] == p).sum()) for p in range(n_p)) for i in range(g))
    return LayerShape(op.name, c, m, oh, ow, kh, kw, g, sizes, scaled, h, wd, wbits=8,   # npu16 stores int8
                      abits_in=8 if in_dtype == "uint8" else 32, abits_out=8, n=in_shape[0],
                      conv_group_sizes=per_group if g > 1 else (), sh=sh, ph=ph, dh=dh,
                      im2col=runs_im2col(npu, c=c, conv_groups=g, kh=kh, kw=kw, waps_groups="groups" in op.params))


def estimate(program, op, npu: NPU16) -> LayerCost:
    """The estimator's counts for one offloaded op (what its counters will say)."""
    if op.kind not in ESTIMATES:
        raise ValueError(f"no npu16 cost for {op.kind}")
    in_shape = tuple(program.shape_of(op.inputs[0]))
    return ESTIMATES[op.kind](program, op, in_shape, program.dtype_of(op.inputs[0]), npu)


def _host(program, op, in_shape, in_dtype, npu) -> LayerCost:
    raise ValueError(f"no npu16 cost for {op.kind}: it runs on the host")


def _layer(program, op, in_shape, in_dtype, npu) -> LayerCost:
    return layer_cost(layer_shape(op, in_shape, in_dtype, npu), npu)


def _add(program, op, in_shape, in_dtype, npu) -> LayerCost:
    sb = program.shape_of(op.inputs[1])
    if tuple(sb) == tuple(in_shape):
        return add_cost(op.name, int(np.prod(in_shape)), int(np.prod(op.shape)), npu)
    wide = program.dtype_of(op.inputs[1]) != "uint8"
    return add_cost(op.name, int(np.prod(in_shape)), int(np.prod(op.shape)), npu, int(np.prod(sb)) * (4 if wide else 1))


def _pool(out_bytes: int):
    """A max (uint8 out) or sum (int32 out) pool: one epilogue value per window tap."""
    def cost(program, op, in_shape, in_dtype, npu) -> LayerCost:
        taps = int(np.prod(op.attrs.kernel))
        return pool_cost(op.name, int(np.prod(in_shape)), int(np.prod(op.shape)), taps, out_bytes, npu)
    return cost


def _gather(program, op, in_shape, in_dtype, npu) -> LayerCost:
    return gather_cost(op.name, int(np.prod(op.shape)), 1 if in_dtype == "uint8" else 4, npu)


def _pad(program, op, in_shape, in_dtype, npu) -> LayerCost:
    return pad_cost(op.name, int(np.prod(in_shape)), int(np.prod(op.shape)), npu)


def _avg_pool2d(program, op, in_shape, in_dtype, npu) -> LayerCost:
    p = op.params
    rows = np.maximum(np.asarray(p["h1"], np.int64) - p["h0"], 0).sum()
    cols = np.maximum(np.asarray(p["w1"], np.int64) - p["w0"], 0).sum()
    return avg_pool_cost(op.name, in_shape[0] * in_shape[1], int(np.prod(in_shape)), p["h0"].size, p["w0"].size,
                         int(rows * cols), p["mult"].size, npu)


def _concat(program, op, in_shape, in_dtype, npu) -> LayerCost:
    return concat_cost(op.name, [int(np.prod(program.shape_of(i))) for i in op.inputs], npu)


def _table(program, op, in_shape, in_dtype, npu) -> LayerCost:
    return lut_cost(op.name, int(np.prod(in_shape)), op.params["table"].size, npu)


def _mul(program, op, in_shape, in_dtype, npu) -> LayerCost:
    return mul_cost(op.name, int(np.prod(in_shape)), int(np.prod(program.shape_of(op.inputs[1]))), npu)


def _resize(program, op, in_shape, in_dtype, npu) -> LayerCost:
    return resize_cost(op.name, in_shape[0] * in_shape[1], in_shape[3], op.params["y0"].size, op.params["x0"].size,
                       op.attrs.frac > 0, npu)


# kind → its estimated npu16 cost (every kind of relay_passes/opset.py; the host kinds have none)
ESTIMATES: dict[str, Callable[..., LayerCost]] = {
    "quantize": _host, "dequantize": _host, "flatten": _host, "conv2d": _layer, "linear": _layer, "add": _add,
    "max_pool2d": _pool(1), "sum_pool2d": _pool(4), "gather": _gather, "pad": _pad, "avg_pool2d": _avg_pool2d,
    "concat": _concat, "table": _table, "mul": _mul, "resize": _resize}


def op_costs(program, placement: list[dict], npu: NPU16, counters: dict[str, dict] | None = None) -> list[dict]:
    """One row per op; ``counters``: {op name: simulator counters} of the offloaded ops."""
    where = {p["op"]: p for p in placement}
    rows = []
    for op in program.ops:
        place = where.get(op.name, {"target": "llvm", "reason": ""})
        row = {"op": op.name, "kind": op.kind, "layer": op.attrs.layer or "", "target": place["target"],
               "reason": place.get("reason", ""), "shape": list(op.shape)}
        if place["target"] == "npu16":
            est = estimate(program, op, npu)
            cnt = counters[op.name] if counters is not None else est.counters()
            plain = est.cycles
            groups = []
            if is_layer(op):
                shape = layer_shape(op, program.shape_of(op.inputs[0]), program.dtype_of(op.inputs[0]), npu)
                plain = layer_cost(replace(shape, group_sizes=(), scaled=(), conv_group_sizes=(), im2col=runs_im2col(
                    npu, c=shape.c, conv_groups=shape.conv_groups, kh=shape.kh, kw=shape.kw, waps_groups=False)),
                    npu).cycles
                groups = list(shape.group_sizes)
                int_ops = 2 * cnt["macs"] + cnt["shifts"] + cnt["adds"]
            else:
                int_ops = cnt["epilogue_values"]
            row.update(macs=cnt["macs"], int_ops=int_ops, shift_ops=cnt["shifts"],
                       compute=cnt["compute_cycles"] + cnt["waps_cycles"], waps=cnt["waps_cycles"],
                       dma=cnt["dma_cycles"], epilogue=cnt["epilogue_cycles"], cycles=cnt["cycles"],
                       cycles_no_groups=plain, groups=groups, counted=counters is not None, counters=cnt)
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
