"""``waps-tvm inspect``: look at what the compiler did.

The compiler writes (with ``--dump-ir``) the Relax text of each pipeline stage under
``out/ir/`` and, always, ``out/graph.onnx``: the lowered integer program as an ONNX graph
in the custom domain ``ai.waps``, so netron shows it richly. Each WAPS layer appears as its
parts — one ``GroupConv`` per group (its channel slice, shift σ·2^−n as attributes), the
``ShiftAdd`` merge (σ_p, n_p, fractional bits) and the ``Requant`` epilogue (multiplier and
shift initializers, zero point, clamps) — beside ``Gather``, ``Add``, ``Mul``, ``Concat``,
``Pad``, the ``Table`` of an elementwise function, pooling and the float
``Quantize``/``Dequantize`` at the edges. Every node carries ``target``: where it runs
(llvm, c, or npu16 / host for npu16 builds).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

DOMAIN = "ai.waps"
STAGES = ("quantized", "permuted", "legalized", "partitioned", "final")   # plus any extra pass's name


def to_onnx(program, target: str, placement: list[dict] | None = None):
    """ONNX ModelProto of ``program`` (relay_passes.program.Program)."""
    import onnx
    from onnx import TensorProto, helper

    where = {p["op"]: p["target"] for p in (placement or [])}
    dtype = {"uint8": TensorProto.UINT8, "int32": TensorProto.INT32, "float32": TensorProto.FLOAT}
    g = _Graph()
    x_name = "input"
    for op in program.ops:
        runs_on = where.get(op.name, target)
        ins = [x_name if i == "input" else i for i in op.inputs]
        RENDER.get(op.kind, _generic(op.kind))(g, op, ins, runs_on)
        g.infos.append(helper.make_tensor_value_info(op.name, dtype[op.dtype], list(op.shape)))
    graph = helper.make_graph(
        g.nodes, "waps_program",
        [helper.make_tensor_value_info(x_name, TensorProto.FLOAT, list(program.input_shape))],
        [helper.make_tensor_value_info(n, dtype[program[n].dtype], list(program[n].shape)) for n in program.outputs],
        initializer=g.inits, value_info=[v for v in g.infos if v.name not in program.outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)],
                              producer_name="waps-tvm")
    onnx.checker.check_model(model)
    return model


class _Graph:
    """The nodes, initializers and value infos of the graph being built."""

    def __init__(self):
        self.nodes, self.inits, self.infos = [], [], []

    def init(self, name: str, arr: np.ndarray) -> str:
        from onnx import numpy_helper
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def node(self, op_type: str, inputs, outputs, name: str, runs_on: str, **attrs):
        from onnx import helper
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, domain=DOMAIN, target=runs_on,
                                           **{k: v for k, v in attrs.items() if v is not None}))


def _layer(op_type: str, conv: bool):
    """A conv2d/linear as one ``op_type`` node per WAPS group (``GroupConv`` when grouped),
    the ``ShiftAdd`` merge and the ``Requant`` epilogue."""
    def render(g: _Graph, op, ins, runs_on):
        from relay_passes.kernels import group_ranges
        a = op.attrs
        layer = a.layer or None
        w = op.params["w"]
        scales = op.group_scales
        groups = op.params.get("groups")
        ranges = group_ranges(groups, op.n_groups) if groups is not None else [(0, w.shape[1] * a.conv_groups)]
        parts = []
        for p, (c0, c1) in enumerate(ranges if ranges is not None else [(None, None)] * op.n_groups):
            out = f"{op.name}/acc{p}"
            extra = {}
            if conv:
                extra = dict(strides=a.stride, pads=[a.padding[0], a.padding[1]] * 2,
                             dilations=a.dilation, group=a.conv_groups)
            chans = dict(channel_begin=c0, channel_end=c1) if c0 is not None else dict(masked=1)
            g.node("GroupConv" if groups is not None else op_type,
                   [ins[0], g.init(f"{op.name}/w", w) if p == 0 else f"{op.name}/w"], [out], f"{op.name}/conv{p}",
                   runs_on, z_in=a.z_in, group_index=p, gamma_sigma=scales[p].sigma, gamma_shift=scales[p].n,
                   form=op.schedule.form, layer=layer, **chans, **extra)
            parts.append(out)
        merged = f"{op.name}/acc"
        g.node("ShiftAdd", parts + [g.init(f"{op.name}/bias", op.params["bias"])], [merged], f"{op.name}/shift_add",
               runs_on, sigma=[s.sigma for s in scales], shifts=[s.n for s in scales], frac_bits=a.frac)
        g.node("Requant", [merged, g.init(f"{op.name}/mult", op.params["mult"]),
                           g.init(f"{op.name}/shift", op.params["shift"])], [op.name], f"{op.name}/requant",
               runs_on, z_out=a.z_out, lo=a.lo, hi=a.hi, rounding="half_up")
    return render


def _gather(g: _Graph, op, ins, runs_on):
    g.node("Gather", [ins[0], g.init(f"{op.name}/index", op.params["index"])], [op.name], op.name, runs_on, axis=1)


def _add(g: _Graph, op, ins, runs_on):
    a = op.attrs
    g.node("Add", ins, [op.name], op.name, runs_on, **{k: int(getattr(a, k)) for k in ("za", "zb", "ka", "kb", "t",
                                                                             "z_out", "lo", "hi")},
           layer=a.layer or None)


def _pool(op_type: str):
    def render(g: _Graph, op, ins, runs_on):
        a = op.attrs
        g.node(op_type, ins, [op.name], op.name, runs_on, kernel_shape=a.kernel, strides=a.stride,
               pads=[a.padding[0], a.padding[1]] * 2, z_in=getattr(a, "z_in", None))   # a max pool has none
    return render


def _float_edge(op_type: str, qmax: bool):
    """Quantize (with its ``qmax``) or Dequantize: scale and zero point as attributes."""
    def render(g: _Graph, op, ins, runs_on):
        a = op.attrs
        g.node(op_type, ins, [op.name], op.name, runs_on, scale=float(a.scale),
               zero_point=int(a.zero_point), **({"qmax": int(a.qmax)} if qmax else {}))
    return render


def _flatten(g: _Graph, op, ins, runs_on):
    g.node("Flatten", ins, [op.name], op.name, runs_on, axis=1)


def _generic(op_type: str):
    """Its params as initializers, its attrs as attributes."""
    def render(g: _Graph, op, ins, runs_on):
        params = [g.init(f"{op.name}/{k}", v) for k, v in sorted(op.params.items())]
        g.node(op_type, ins + params, [op.name], op.name, runs_on,
               **{k: v for k, v in op.attrs.to_json().items() if _attr_ok(v)})
    return render


# kind → its ONNX node(s) (every kind of relay_passes/opset.py; any other: ``_generic`` under its own name)
RENDER = {
    "conv2d": _layer("Conv", conv=True), "linear": _layer("MatMul", conv=False), "gather": _gather, "add": _add,
    "max_pool2d": _pool("MaxPool"), "sum_pool2d": _pool("SumPool"), "quantize": _float_edge("Quantize", qmax=True),
    "dequantize": _float_edge("Dequantize", qmax=False), "flatten": _flatten, "pad": _generic("Pad"),
    "avg_pool2d": _generic("AvgPool"), "concat": _generic("Concat"), "table": _generic("Table"), "mul": _generic("Mul"),
    "resize": _generic("Resize"), "layer_norm": _generic("LayerNorm"),
    "matmul": _generic("MatMulCodes"),
    "softmax": _generic("Softmax"),
    "constant": _generic("Constant"),
    "reshape": _generic("Reshape"),
    "crop": _generic("Crop")}


def _attr_ok(v) -> bool:
    """An attribute ONNX can hold: a number, a string or a flat list of numbers."""
    if isinstance(v, (int, float, str)):
        return True
    return isinstance(v, list) and all(isinstance(e, (int, float)) for e in v)


def stage_text(folder: Path, stage: str) -> str:
    from calib.errors import ConfigError
    path = Path(folder) / "ir" / f"{stage}.py"
    if not path.is_file() and stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r} (choose from {', '.join(STAGES)}, or a pass of yours)")
    if not path.is_file():
        have = sorted(p.stem for p in (Path(folder) / "ir").glob("*.py")) if (Path(folder) / "ir").is_dir() else []
        hint = f"stages here: {', '.join(have)}" if have else "compile with --dump-ir to keep the stages"
        raise ConfigError(f"{folder}: no '{stage}' stage ({hint})")
    return path.read_text()
