"""Per-op npu16 costs of a compiled program (what ``waps-tvm report`` shows).

The counts of an op come from the simulator's counters read out of the compiled module
after a run (targets/npu16/counters.py) when given, else from the analytical estimator
(targets/npu16/cost.py), which tests hold equal to the counters. Each conv/linear also
gets the estimated cycles of the same layer without WAPS groups (one group) for the
overhead column. An op the NPU cannot run (a host kind) gets its host time instead
(targets/npu16/host_cost.py: ``host_query``), in its own ``host`` fields.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Callable

import numpy as np

from relay_passes.opset import is_layer
from targets.npu16.cost import (LayerCost, LayerShape, add_cost, avg_pool_cost, concat_cost, gather_cost, layer_cost,
                                lut_cost, matmul_cost, mul_cost, pad_cost, pool_cost, resize_cost, row_cost)
from targets.npu16.first_layer import runs_im2col
from targets.npu16.host_cost import (AVG_POOL_OUT_OPS, ELEMENT_OPS, LAYER_GROUP_OPS, LAYER_OUT_OPS, MAC_OPS,
                                     MATMUL_OUT_OPS, POOL_OUT_OPS, host_row)
from targets.npu16.params import DEFAULT, NPU16


def layer_shape(op, in_shape, in_dtype: str, npu: NPU16) -> LayerShape:
    """The cost model's view of a conv/linear op of the integer program, exactly as lowered on ``npu``."""
    w = op.params["w"]
    a = op.attrs
    if not a.spatial:
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


@dataclass(frozen=True)
class CostQuery:
    """One op's call of a cost.py function, JSON-able (``report.json`` keeps it), so a compiled
    model can be re-costed for another machine without recompiling: ``fn`` names the function
    (``COSTS``), ``args`` its arguments apart from the machine. A layer's first-layer mode is
    decided again for the machine it is costed on (first_layer.runs_im2col). ``keep``: the op is
    in a chain (codegen/npu16/cascade.py) and {"inputs": [input indices], "output": bool}
    stay in the activation SRAM as compiled (not decided again for another machine; ignored on
    one with ``cascade`` false, where every op runs alone)."""
    fn: str
    args: dict
    keep: dict | None = None

    def cost(self, npu: NPU16) -> LayerCost:
        est = COSTS[self.fn](**self.args, npu=npu)
        if not self.keep or not npu.cascade:          # re-costed for a machine without cascading: alone
            return est
        from codegen.npu16.cascade import cascaded_cost
        return cascaded_cost(est, self.input_bytes(est), tuple(self.keep["inputs"]), bool(self.keep["output"]), npu)

    def input_bytes(self, est: LayerCost) -> list[int]:
        """Activation DMA bytes of each input as the op moves them (chainable kinds)."""
        if self.fn not in _CHAIN_INPUT_BYTES:
            raise ValueError(f"an npu16 {self.fn} is never in a chain")
        return _CHAIN_INPUT_BYTES[self.fn](self.args, est)

    def to_json(self) -> dict:
        return {"fn": self.fn, "args": self.args, **({"keep": self.keep} if self.keep else {})}

    @classmethod
    def from_json(cls, d: dict) -> "CostQuery":
        if not isinstance(d, dict) or d.get("fn") not in COSTS or not isinstance(d.get("args"), dict):
            raise ValueError(f"not an npu16 cost query: {d!r:.80}")
        return cls(d["fn"], d["args"], d.get("keep"))


# cost function of a chainable op → (its query's args, its estimate) → DMA bytes of each input
_CHAIN_INPUT_BYTES = {
    "layer": lambda args, est: [est.bytes["input"]],
    "add": lambda args, est: [args["in_elems"], args.get("b_bytes", args["in_elems"])],
    "pool": lambda args, est: [args["in_elems"]],
    "matmul": lambda args, est: [args["n"] * args["heads"] * args["k"] * args["positions"],      # a, then b
                                 args["n"] * args["heads"] * args["k"] * args["m"]],
    "row": lambda args, est: [est.bytes["input"]],
}


def _tuples(v):
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def _layer_query_cost(npu: NPU16, **args) -> LayerCost:
    """A layer query's cost: its LayerShape (JSON lists back to tuples) in the first-layer mode
    ``npu`` runs it in."""
    shape = LayerShape(**{k: _tuples(v) for k, v in args.items()})
    shape = replace(shape, im2col=runs_im2col(npu, c=shape.c, conv_groups=shape.conv_groups, kh=shape.kh,
                                              kw=shape.kw, waps_groups=bool(shape.group_sizes)))
    return layer_cost(shape, npu)


# a query's ``fn`` → its cost function (keyword arguments: the query's args and ``npu``)
COSTS: dict[str, Callable[..., LayerCost]] = {
    "layer": _layer_query_cost, "add": add_cost, "pool": pool_cost, "gather": gather_cost, "pad": pad_cost,
    "avg_pool": avg_pool_cost, "concat": concat_cost, "lut": lut_cost, "mul": mul_cost, "resize": resize_cost,
    "matmul": matmul_cost, "row": row_cost}


def query(program, op, npu: NPU16, keep: dict | None = None) -> CostQuery:
    """The cost query of one offloaded op of ``program``; ``keep``: what of it a chain keeps in
    SRAM ({"inputs", "output"}; default: as the offload decides it, cascade.keeps_of)."""
    if op.kind not in ESTIMATES:
        raise ValueError(f"no npu16 cost for {op.kind}")
    in_shape = tuple(program.shape_of(op.inputs[0]))
    q = ESTIMATES[op.kind](program, op, in_shape, program.dtype_of(op.inputs[0]), npu)
    if keep is None and npu.cascade:
        from codegen.npu16.cascade import keeps_of
        keep = keeps_of(program, npu).get(op.name)
    return replace(q, keep=keep) if keep and (keep["inputs"] or keep["output"]) else q


def estimate(program, op, npu: NPU16) -> LayerCost:
    """The estimator's counts for one offloaded op (what its counters will say)."""
    return query(program, op, npu).cost(npu)


def _host(program, op, in_shape, in_dtype, npu) -> CostQuery:
    raise ValueError(f"no npu16 cost for {op.kind}: it runs on the host")


def _layer(program, op, in_shape, in_dtype, npu) -> CostQuery:
    return CostQuery("layer", asdict(layer_shape(op, in_shape, in_dtype, npu)))


def _add(program, op, in_shape, in_dtype, npu) -> CostQuery:
    sb = program.shape_of(op.inputs[1])
    args = {"name": op.name, "in_elems": int(np.prod(in_shape)), "out_elems": int(np.prod(op.shape))}
    if tuple(sb) != tuple(in_shape):
        args["b_bytes"] = int(np.prod(sb)) * (4 if program.dtype_of(op.inputs[1]) != "uint8" else 1)
    return CostQuery("add", args)


def _pool(out_bytes: int):
    """A max (uint8 out) or sum (int32 out) pool: one epilogue value per window tap."""
    def cost(program, op, in_shape, in_dtype, npu) -> CostQuery:
        return CostQuery("pool", {"name": op.name, "in_elems": int(np.prod(in_shape)),
                                  "out_elems": int(np.prod(op.shape)), "taps": int(np.prod(op.attrs.kernel)),
                                  "out_bytes": out_bytes})
    return cost


def _gather(program, op, in_shape, in_dtype, npu) -> CostQuery:
    return CostQuery("gather", {"name": op.name, "out_elems": int(np.prod(op.shape)),
                                "elem_bytes": 1 if in_dtype == "uint8" else 4})


def _pad(program, op, in_shape, in_dtype, npu) -> CostQuery:
    return CostQuery("pad", {"name": op.name, "in_elems": int(np.prod(in_shape)), "out_elems": int(np.prod(op.shape))})


def _avg_pool2d(program, op, in_shape, in_dtype, npu) -> CostQuery:
    p = op.params
    rows = np.maximum(np.asarray(p["h1"], np.int64) - p["h0"], 0).sum()
    cols = np.maximum(np.asarray(p["w1"], np.int64) - p["w0"], 0).sum()
    return CostQuery("avg_pool", {"name": op.name, "planes": int(in_shape[0] * in_shape[1]),
                                  "in_elems": int(np.prod(in_shape)), "oh": int(p["h0"].size), "ow": int(p["w0"].size),
                                  "taps": int(rows * cols), "requants": int(p["mult"].size)})


def _concat(program, op, in_shape, in_dtype, npu) -> CostQuery:
    return CostQuery("concat", {"name": op.name, "part_elems": [int(np.prod(program.shape_of(i))) for i in op.inputs]})


def _table(program, op, in_shape, in_dtype, npu) -> CostQuery:
    return CostQuery("lut", {"name": op.name, "elems": int(np.prod(in_shape)), "table_size": int(op.params["table"].size)})


def _mul(program, op, in_shape, in_dtype, npu) -> CostQuery:
    return CostQuery("mul", {"name": op.name, "elems": int(np.prod(in_shape)),
                             "b_elems": int(np.prod(program.shape_of(op.inputs[1])))})


def _resize(program, op, in_shape, in_dtype, npu) -> CostQuery:
    return CostQuery("resize", {"name": op.name, "planes": int(in_shape[0] * in_shape[1]), "w": int(in_shape[3]),
                                "oh": int(op.params["y0"].size), "ow": int(op.params["x0"].size),
                                "bilinear": bool(op.attrs.frac > 0)})


def _matmul(program, op, in_shape, in_dtype, npu) -> CostQuery:
    """Lowered as one MATMUL command (codegen/npu16/lower._matmul)."""
    from codegen.npu16.lower import matmul_gemm
    n, g, k, m, p = matmul_gemm(op.attrs, [in_shape, program.shape_of(op.inputs[1])])
    return CostQuery("matmul", {"name": op.name, "n": n, "heads": g, "k": k, "m": m, "positions": p})


def _row(groups: Callable, table_bytes: Callable):
    """A softmax or layer norm: one SOFTMAX / LAYERNORM command on the row unit; ``groups(op)``
    rows per position, ``table_bytes(op, in_shape)`` of constants over the weight port."""
    def query(program, op, in_shape, in_dtype, npu) -> CostQuery:
        return CostQuery("row", {"name": op.name, "kind": op.kind, "n": int(in_shape[0]), "channels": int(in_shape[1]),
                                 "positions": int(np.prod(in_shape[2:])), "groups": groups(op),
                                 "in_bytes": _itemsize(in_dtype), "table_bytes": table_bytes(op, in_shape)})
    return query


_softmax_row = _row(lambda op: op.attrs.groups, lambda op, shape: 4 * int(op.params["exp"].size))
_layer_norm_row = _row(lambda op: 1, lambda op, shape: 8 * int(shape[1]))


def _crop(program, op, in_shape, in_dtype, npu) -> CostQuery:
    """Lowered as a nearest RESIZE over the box (codegen/npu16/lower._crop)."""
    return CostQuery("resize", {"name": op.name, "planes": int(in_shape[0] * in_shape[1]), "w": int(in_shape[3]),
                                "oh": int(op.attrs.height), "ow": int(op.attrs.width), "bilinear": False})


# kind → its npu16 cost query (every kind of relay_passes/opset.py; the host kinds have none)
ESTIMATES: dict[str, Callable[..., CostQuery]] = {
    "matmul": _matmul,
    "quantize": _host, "dequantize": _host, "flatten": _host, "layer_norm": _layer_norm_row, "softmax": _softmax_row, "conv2d": _layer, "linear": _layer, "add": _add,
    "max_pool2d": _pool(1), "sum_pool2d": _pool(4), "gather": _gather, "pad": _pad, "avg_pool2d": _avg_pool2d,
    "concat": _concat, "table": _table, "mul": _mul, "resize": _resize,
    "constant": _host,
    "reshape": _host,
    "crop": _crop}


def _itemsize(dtype: str) -> int:
    return int(np.dtype(dtype).itemsize)


def _host_shape(program, op) -> tuple[str | None, tuple, int, int, int]:
    """(source, input shape, elements, input and output bytes per element) of a host op."""
    src = op.inputs[0] if op.inputs else None
    shape = tuple(program.shape_of(src)) if src is not None else tuple(op.shape)
    in_b = _itemsize(program.dtype_of(src)) if src is not None else 1
    return src, shape, int(np.prod(shape)), in_b, _itemsize(op.dtype)


def _softmax_on_host(a: dict) -> tuple[str, dict]:
    return "softmax", {"elems": a["n"] * a["channels"] * a["positions"], "rows": a["n"] * a["groups"] * a["positions"],
                       "in_bytes": a["in_bytes"], "out_bytes": 1, "table_entries": a["table_bytes"] // 4}


def _layer_norm_on_host(a: dict) -> tuple[str, dict]:
    return "layer_norm", {"elems": a["n"] * a["channels"] * a["positions"], "positions": a["n"] * a["positions"],
                          "channels": a["channels"], "in_bytes": a["in_bytes"], "out_bytes": 1}


_ROW_ON_HOST = {"softmax": _softmax_on_host, "layer_norm": _layer_norm_on_host}     # row query's kind → host query


def row_host_query(args: dict) -> tuple[str, dict]:
    """The host query (host_cost.HOST_COSTS) of a softmax or layer norm from its row-unit cost
    query's args (``_row``): what it costs where a machine runs it on the host."""
    return _ROW_ON_HOST[args["kind"]](args)


def _kernel(kind: str, ops: int, read: int, write: int, note: str = "") -> tuple[str, dict]:
    return "kernel", {"kind": kind, "ops": int(ops), "read_bytes": int(read), "write_bytes": int(write), "note": note}


def _layer_on_host(a: dict) -> tuple[str, dict]:
    s = LayerShape(**{k: _tuples(v) for k, v in a.items()})
    groups = max(len(s.group_sizes), 1)
    h, w = s.h or s.oh, s.w or s.ow
    ops = MAC_OPS * s.macs + s.outputs * (LAYER_OUT_OPS + LAYER_GROUP_OPS * (groups - 1))
    weights = s.m * (s.c // s.conv_groups) * s.kh * s.kw + 12 * s.m          # int8 w; bias, mult, shift int32
    return _kernel("layer", ops, s.n * s.c * h * w * (s.abits_in // 8) + weights, s.outputs)


def _matmul_on_host(a: dict) -> tuple[str, dict]:
    n, g, k, m, p = a["n"], a["heads"], a["k"], a["m"], a["positions"]
    return _kernel("matmul", MAC_OPS * n * g * p * m * k + MATMUL_OUT_OPS * n * g * m * p, n * g * k * (p + m),
                   n * g * m * p)


def _resize_on_host(a: dict) -> tuple[str, dict]:
    outs = a["planes"] * a["oh"] * a["ow"]
    if a["bilinear"]:
        return _kernel("resize", ELEMENT_OPS["bilinear"] * outs, a["planes"] * a["oh"] * 2 * a["w"], outs)
    return _kernel("resize", 0, outs, outs, "a copy (nearest)")


# npu16 cost query fn → its op's host work from the same arguments (host_cost.py's counts), for
# an op of an offloadable kind that runs on the host (does not fit, int32 codes, no row unit)
HOST_FROM_NPU: dict[str, Callable[[dict], tuple[str, dict]]] = {
    "layer": _layer_on_host,
    "matmul": _matmul_on_host,
    "add": lambda a: _kernel("add", ELEMENT_OPS["add"] * a["out_elems"],
                             a["in_elems"] + a.get("b_bytes", a["in_elems"]), a["out_elems"]),
    "mul": lambda a: _kernel("mul", ELEMENT_OPS["mul"] * a["elems"], a["elems"] + a["b_elems"], a["elems"]),
    "lut": lambda a: _kernel("lut", ELEMENT_OPS["lut"] * a["elems"], a["elems"] + a["table_size"], a["elems"]),
    "pool": lambda a: _kernel("pool", (a["taps"] + POOL_OUT_OPS) * a["out_elems"], a["in_elems"],
                              a["out_elems"] * a["out_bytes"]),
    "avg_pool": lambda a: _kernel("avg_pool", a["planes"] * (a["taps"] + AVG_POOL_OUT_OPS * a["oh"] * a["ow"]),
                                  a["in_elems"], a["planes"] * a["oh"] * a["ow"]),
    "concat": lambda a: _kernel("concat", ELEMENT_OPS["concat"] * sum(a["part_elems"]), sum(a["part_elems"]),
                                sum(a["part_elems"])),
    "gather": lambda a: _kernel("gather", 0, a["out_elems"] * a["elem_bytes"], a["out_elems"] * a["elem_bytes"],
                                "a copy"),
    "pad": lambda a: _kernel("pad", 0, a["in_elems"], a["out_elems"], "a copy"),
    "resize": _resize_on_host,
    "row": lambda a: row_host_query(a),
}


def _host_elementwise(fn: str):
    def query(program, op) -> tuple[str, dict]:
        _, _, elems, in_b, out_b = _host_shape(program, op)
        return fn, {"elems": elems, "in_bytes": in_b, "out_bytes": out_b}
    return query


def _host_view(program, op) -> tuple[str, dict]:
    """A reshape of the logical (NCHW) order is a view unless the input is physically NHWC."""
    from relay_passes.program import INPUT
    src, shape, elems, in_b, _ = _host_shape(program, op)
    layout = "NCHW" if src in (None, INPUT) else program[src].schedule.layout
    trivial = len(shape) != 4 or shape[1] == 1 or shape[2] * shape[3] == 1
    return "view", {"elems": elems, "elem_bytes": in_b, "contiguous": layout == "NCHW" or trivial}


def _host_constant(program, op) -> tuple[str, dict]:
    return "constant", {"elems": int(np.prod(op.shape)), "elem_bytes": _itemsize(op.dtype)}


# host kind (codegen/npu16/lower.HOST_KINDS) → its host_cost.HOST_COSTS query; every other kind
# that falls back gets its host query from its npu16 cost query (HOST_FROM_NPU)
HOST_ESTIMATES: dict[str, Callable[..., tuple[str, dict]]] = {
    "quantize": _host_elementwise("quantize"),
    "dequantize": _host_elementwise("dequantize"), "flatten": _host_view, "reshape": _host_view,
    "constant": _host_constant}


def host_query(program, op) -> tuple[str, dict]:
    """(fn, args) of host_cost.HOST_COSTS for an op on the host: a host kind's own query, or,
    for a kind the NPU runs (an op that fell back: it does not fit the SRAM, int32 codes, ...),
    its host work from its npu16 cost query's arguments (``HOST_FROM_NPU``)."""
    estimate = HOST_ESTIMATES.get(op.kind)
    if estimate is not None:
        return estimate(program, op)
    in_shape = tuple(program.shape_of(op.inputs[0]))
    q = ESTIMATES[op.kind](program, op, in_shape, program.dtype_of(op.inputs[0]), DEFAULT)
    return HOST_FROM_NPU[q.fn](q.args)


def op_costs(program, placement: list[dict], npu: NPU16, counters: dict[str, dict] | None = None) -> list[dict]:
    """One row per op; ``counters``: {op name: simulator counters} of the offloaded ops. A host
    op gets ``host`` (host_cost.host_row on ``npu.host``)."""
    where = {p["op"]: p for p in placement}
    rows = []
    for op in program.ops:
        place = where.get(op.name, {"target": "llvm", "reason": ""})
        row = {"op": op.name, "kind": op.kind, "layer": op.attrs.layer or "", "target": place["target"],
               "reason": place.get("reason", ""), "shape": list(op.shape)}
        if place["target"] == "npu16":
            q = query(program, op, npu, {"inputs": place.get("keep_in", []), "output": place.get("keep_out", False)})
            plain = None
            if is_layer(op):
                shape = LayerShape(**{k: _tuples(v) for k, v in q.args.items()})
                plain = CostQuery("layer", asdict(replace(shape, group_sizes=(), scaled=(), conv_group_sizes=())))
            row.update(cost_row(q, npu, counters[op.name] if counters is not None else None, plain))
        else:
            row["host"] = host_row(*host_query(program, op), npu.host)
        rows.append(row)
    return rows


def cost_row(q: CostQuery, npu: NPU16, counted: dict | None = None, plain: CostQuery | None = None) -> dict:
    """The report's npu16 columns of one op (Vela-style): MACs and integer ops; cycles split into
    compute (array + WAPS), WAPS, DMA and epilogue with the bounding unit; MAC utilisation of
    the op's cycles; SRAM peak per buffer; bytes read (weights among them) and written off
    chip; time at the clock. From the simulator's ``counted`` counters when given (the SRAM
    peaks and the bound always from the estimate, which tests hold equal to the counters),
    else from the estimate. ``plain``: the same layer without WAPS groups (overhead column).
    An op of a chain (``q.keep``) also gets what cascading saved against running it alone:
    DMA bytes (counter dma_saved_bytes), DMA cycles and cycles."""
    est = q.cost(npu)
    cnt = counted if counted is not None else est.counters()
    alone = CostQuery(q.fn, q.args).cost(npu) if q.keep else est      # the op as its own partition
    if q.fn in ("layer", "matmul"):
        int_ops = 2 * cnt["macs"] + cnt["shifts"] + cnt["adds"]
        groups = list(q.args.get("group_sizes") or [])
    else:
        int_ops, groups = cnt["epilogue_values"], []
    peak = npu.tile * npu.tile * npu.arrays
    return {"macs": cnt["macs"], "int_ops": int_ops, "shift_ops": cnt["shifts"],
            "compute": cnt["compute_cycles"] + cnt["waps_cycles"], "waps": cnt["waps_cycles"],
            "dma": cnt["dma_cycles"], "epilogue": cnt["epilogue_cycles"], "cycles": cnt["cycles"],
            "bound": est.bound, "utilisation": cnt["macs"] / max(cnt["cycles"] * peak, 1),
            "sram": dict(est.sram) or {"weights": 0, "activations": 0},
            "offchip_read": cnt["dma_in_bytes"], "offchip_write": cnt["dma_out_bytes"],
            "weight_bytes": cnt["dma_weight_bytes"], "time_us": cnt["cycles"] / npu.clock_mhz,
            "cycles_no_groups": plain.cost(npu).cycles if plain else est.cycles, "groups": groups,
            "dma_saved_bytes": cnt.get("dma_saved_bytes", 0), "dma_saved_cycles": alone.dma_cycles - cnt["dma_cycles"],
            "cycles_saved": alone.cycles - cnt["cycles"],
            "counted": counted is not None, "counters": cnt, "query": q.to_json(),
            "query_no_groups": plain.to_json() if plain else None}
