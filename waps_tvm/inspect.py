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
    from onnx import TensorProto, helper, numpy_helper

    from relay_passes.kernels import group_ranges
    where = {p["op"]: p["target"] for p in (placement or [])}
    dtype = {"uint8": TensorProto.UINT8, "int32": TensorProto.INT32, "float32": TensorProto.FLOAT}
    nodes, inits, infos = [], [], []

    def init(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def value(name: str, shape, dt: str):
        infos.append(helper.make_tensor_value_info(name, dtype[dt], list(shape)))

    def node(op_type: str, inputs, outputs, name: str, runs_on: str, **attrs):
        nodes.append(helper.make_node(op_type, inputs, outputs, name=name, domain=DOMAIN, target=runs_on,
                                      **{k: v for k, v in attrs.items() if v is not None}))

    x_name = "input"
    for op in program.ops:
        runs_on = where.get(op.name, target)
        ins = [x_name if i == "input" else i for i in op.inputs]
        a = op.attrs
        layer = a.get("layer") or None
        if op.kind in ("conv2d", "linear"):
            w = op.params["w"]
            sig, ns = a.get("sigma", [0]), a.get("n", [0])
            groups = op.params.get("groups")
            ranges = group_ranges(groups, len(sig)) if groups is not None else [(0, w.shape[1] * a.get("conv_groups", 1))]
            parts = []
            for p, (c0, c1) in enumerate(ranges if ranges is not None else [(None, None)] * len(sig)):
                out = f"{op.name}/acc{p}"
                extra = {}
                if op.kind == "conv2d":
                    extra = dict(strides=a["stride"], pads=[a["padding"][0], a["padding"][1]] * 2,
                                 dilations=a["dilation"], group=a["conv_groups"])
                chans = dict(channel_begin=c0, channel_end=c1) if c0 is not None else dict(masked=1)
                node("GroupConv" if groups is not None else ("Conv" if op.kind == "conv2d" else "MatMul"),
                     [ins[0], init(f"{op.name}/w", w) if p == 0 else f"{op.name}/w"], [out], f"{op.name}/conv{p}",
                     runs_on, z_in=a["z_in"], group_index=p, gamma_sigma=int(sig[p]), gamma_shift=int(ns[p]),
                     form=a.get("form"), layer=layer, **chans, **extra)
                parts.append(out)
            merged = f"{op.name}/acc"
            node("ShiftAdd", parts + [init(f"{op.name}/bias", op.params["bias"])], [merged], f"{op.name}/shift_add",
                 runs_on, sigma=[int(s) for s in sig], shifts=[int(n) for n in ns], frac_bits=a.get("frac", 0))
            node("Requant", [merged, init(f"{op.name}/mult", op.params["mult"]),
                             init(f"{op.name}/shift", op.params["shift"])], [op.name], f"{op.name}/requant",
                 runs_on, z_out=a["z_out"], lo=a["lo"], hi=a["hi"], rounding="half_up")
        elif op.kind == "gather":
            node("Gather", [ins[0], init(f"{op.name}/index", op.params["index"])], [op.name], op.name, runs_on, axis=1)
        elif op.kind == "add":
            node("Add", ins, [op.name], op.name, runs_on, **{k: int(a[k]) for k in ("za", "zb", "ka", "kb", "t",
                                                                                   "z_out", "lo", "hi")}, layer=layer)
        elif op.kind in ("max_pool2d", "sum_pool2d"):
            node("MaxPool" if op.kind == "max_pool2d" else "SumPool", ins, [op.name], op.name, runs_on,
                 kernel_shape=a["kernel"], strides=a["stride"], pads=[a["padding"][0], a["padding"][1]] * 2,
                 z_in=a.get("z_in"))
        elif op.kind in ("quantize", "dequantize"):
            node(op.kind.capitalize(), ins, [op.name], op.name, runs_on, scale=float(a["scale"]),
                 zero_point=int(a["zero_point"]), **({"qmax": int(a["qmax"])} if op.kind == "quantize" else {}))
        elif op.kind == "flatten":
            node("Flatten", ins, [op.name], op.name, runs_on, axis=1)
        else:                                   # every other kind: its params as initializers, attrs as attributes
            params = [init(f"{op.name}/{k}", v) for k, v in sorted(op.params.items())]
            node(_ONNX_TYPE.get(op.kind, op.kind), ins + params, [op.name], op.name, runs_on,
                 **{k: v for k, v in a.items() if k not in ("n_inputs", "layout", "form") and _attr_ok(v)})
        value(op.name, op.shape, op.dtype)
    graph = helper.make_graph(
        nodes, "waps_program",
        [helper.make_tensor_value_info(x_name, TensorProto.FLOAT, list(program.input_shape))],
        [helper.make_tensor_value_info(n, dtype[program[n].dtype], list(program[n].shape)) for n in program.outputs],
        initializer=inits, value_info=[v for v in infos if v.name not in program.outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)],
                              producer_name="waps-tvm")
    onnx.checker.check_model(model)
    return model


_ONNX_TYPE = {"pad": "Pad", "avg_pool2d": "AvgPool", "concat": "Concat", "table": "Table", "mul": "Mul"}


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
