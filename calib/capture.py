"""Capture a PyTorch model as a :class:`calib.graph.Graph` through ``torch.export``.

One importer serves nn.Modules and saved ``.pt2`` programs: both become an
ExportedProgram whose ATen graph is mapped op by op. Anything we cannot quantize
is collected and reported together, by module path, in one UnsupportedOpError.
"""
from __future__ import annotations

import math
import operator

import torch
from torch.export import ExportedProgram

from calib.errors import ModelError, UnsupportedOpError
from calib.graph import Graph, Node

aten = torch.ops.aten

_IDENTITY = {aten.dropout.default, aten.dropout_.default, aten.contiguous.default,
             aten.clone.default, aten.alias.default, aten.detach.default}
_RELU = {aten.relu.default, aten.relu_.default}
_HARDTANH = {aten.hardtanh.default, aten.hardtanh_.default}
_ADD = {aten.add.Tensor, aten.add_.Tensor}
_RESHAPE = {aten.view.default, aten.reshape.default, aten._unsafe_view.default,
            aten.flatten.using_ints}


def export_module(model: torch.nn.Module, input_shape: tuple[int, ...]) -> ExportedProgram:
    """Export ``model`` in eval mode for one sample of shape ``input_shape`` (C, H, W)."""
    model = model.eval()
    example = torch.zeros((1, *input_shape))
    try:
        return torch.export.export(model, (example,))
    except Exception as exc:  # torch raises many types; the message is what matters
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"torch.export failed for input {tuple(input_shape)}: {first}") from exc


def capture(program: ExportedProgram) -> Graph:
    """Map an ExportedProgram with one image input (N×C×H×W) to a Graph."""
    sig = program.graph_signature
    state = dict(program.state_dict)
    state.update(getattr(program, "constants", {}) or {})
    lifted = {**sig.inputs_to_parameters, **sig.inputs_to_buffers,
              **getattr(sig, "inputs_to_lifted_tensor_constants", {})}
    user_inputs = list(sig.user_inputs)
    if len(user_inputs) != 1:
        raise ModelError(f"the model must take exactly one tensor input, it takes {len(user_inputs)}")

    tensors: dict[str, torch.Tensor] = {}  # fx name → constant tensor (params, buffers)
    alias: dict[str, str] = {}             # fx name → graph value it is an alias of
    nodes: list[Node] = []
    unsupported: list[str] = []
    output = None

    def value(arg) -> str:
        return alias.get(arg.name, arg.name)

    def const(arg) -> torch.Tensor | None:
        if arg is None:
            return None
        if arg.name not in tensors:
            raise ModelError(f"{arg.name}: expected a constant parameter, found a computed tensor")
        return tensors[arg.name].detach().float()

    for fx in program.graph.nodes:
        if fx.op == "placeholder":
            if fx.name in lifted:
                tensors[fx.name] = state[lifted[fx.name]]
            else:
                shape = tuple(int(d) for d in fx.meta["val"].shape)
                if len(shape) != 4:
                    raise ModelError(f"the model input must be N×C×H×W, got shape {shape}")
                nodes.append(Node(fx.name, "input", [], {"shape": list(shape[1:])}, shape=shape[1:]))
            continue
        if fx.op == "output":
            outs = fx.args[0]
            if len(outs) != 1:
                raise ModelError(f"the model must return one tensor, it returns {len(outs)}")
            output = value(outs[0])
            continue
        if fx.op != "call_function":
            unsupported.append(f"{fx.op} {fx.target}")
            continue
        source = _source(fx)
        shape = tuple(int(d) for d in fx.meta["val"].shape[1:]) if hasattr(fx.meta.get("val"), "shape") else ()
        t, a = fx.target, fx.args
        if t in _IDENTITY or t is operator.getitem and _is_first_of_tuple(fx):
            alias[fx.name] = value(a[0])
            continue
        node = None
        if t is aten.conv2d.default:
            stride, padding, dilation, groups = (list(a[3]) if len(a) > 3 else [1, 1],
                                                 a[4] if len(a) > 4 else [0, 0],
                                                 list(a[5]) if len(a) > 5 else [1, 1],
                                                 int(a[6]) if len(a) > 6 else 1)
            if isinstance(padding, str):
                unsupported.append(f"{source or fx.name}: conv2d padding='{padding}'")
                continue
            w = const(a[1])
            b = const(a[2]) if len(a) > 2 and a[2] is not None else torch.zeros(w.shape[0])
            node = Node(fx.name, "conv2d", [value(a[0])],
                        {"stride": _pair(stride), "padding": _pair(padding),
                         "dilation": _pair(dilation), "groups": groups, "act": None},
                        {"weight": w, "bias": b}, source, shape)
        elif t is aten.linear.default:
            w = const(a[1])
            b = const(a[2]) if len(a) > 2 and a[2] is not None else torch.zeros(w.shape[0])
            node = Node(fx.name, "linear", [value(a[0])], {"act": None}, {"weight": w, "bias": b}, source, shape)
        elif t is aten.batch_norm.default or t is aten._native_batch_norm_legit_no_training.default:
            w, b, mean, var = (const(a[1]), const(a[2]), const(a[3]), const(a[4]))
            eps = float(a[7] if t is aten.batch_norm.default else a[6])
            c = mean.shape[0]
            node = Node(fx.name, "batch_norm", [value(a[0])], {"eps": eps},
                        {"weight": w if w is not None else torch.ones(c),
                         "bias": b if b is not None else torch.zeros(c), "mean": mean, "var": var},
                        source, shape)
        elif t in _RELU:
            node = Node(fx.name, "relu", [value(a[0])], {}, {}, source, shape)
        elif t in _HARDTANH and tuple(float(v) for v in a[1:3]) == (0.0, 6.0):
            node = Node(fx.name, "relu6", [value(a[0])], {}, {}, source, shape)
        elif t in _ADD and len(a) == 2 and all(hasattr(v, "name") for v in a) and fx.kwargs.get("alpha", 1) == 1:
            node = Node(fx.name, "add", [value(a[0]), value(a[1])], {"act": None}, {}, source, shape)
        elif t is aten.max_pool2d.default or t is aten.avg_pool2d.default:
            op = "max_pool2d" if t is aten.max_pool2d.default else "avg_pool2d"
            kernel = _pair(a[1])
            stride = _pair(a[2]) if len(a) > 2 and a[2] else kernel
            padding = _pair(a[3]) if len(a) > 3 else [0, 0]
            extra = list(a[4:])
            ok = (op == "max_pool2d" and extra in ([], [[1, 1]], [1], [[1, 1], False])) or \
                 (op == "avg_pool2d" and (extra in ([], [False]) or extra[:2] == [False, True]))
            if not ok:
                unsupported.append(f"{source or fx.name}: {op} with dilation/ceil_mode/divisor {extra}")
                continue
            node = Node(fx.name, op, [value(a[0])], {"kernel": kernel, "stride": stride, "padding": padding},
                        {}, source, shape)
        elif t is aten.adaptive_avg_pool2d.default and tuple(_pair(a[1])) == (1, 1):
            node = Node(fx.name, "global_avg_pool", [value(a[0])], {}, {}, source, shape)
        elif t is aten.mean.dim and sorted(int(d) % 4 for d in a[1]) == [2, 3]:
            keep = bool(a[2]) if len(a) > 2 else False
            node = Node(fx.name, "global_avg_pool", [value(a[0])], {}, {}, source,
                        shape if keep else (*shape, 1, 1))
            if not keep:  # N×C: the flatten that follows a keepdim pool
                nodes.append(node)
                node = Node(fx.name + "_flat", "flatten", [fx.name], {}, {}, source, shape)
                alias[fx.name] = node.name
        elif t in _RESHAPE and _is_flatten(fx):
            node = Node(fx.name, "flatten", [value(a[0])], {}, {}, source, shape)
        else:
            unsupported.append(f"{source or fx.name}: {_op_name(fx)}")
            continue
        nodes.append(node)

    if unsupported:
        raise UnsupportedOpError("unsupported layers: " + "; ".join(dict.fromkeys(unsupported)))
    if output is None:
        raise ModelError("the exported program has no output")
    return _prune(Graph(nodes, output))


def _prune(graph: Graph) -> Graph:
    """Drop nodes whose value never reaches the output (e.g. max-pool indices)."""
    live, stack = set(), [graph.output]
    while stack:
        name = stack.pop()
        if name not in live:
            live.add(name)
            stack.extend(graph[name].inputs)
    return graph.replace([n for n in graph.nodes if n.name in live])


def _pair(v) -> list[int]:
    if isinstance(v, int):
        return [v, v]
    v = [int(x) for x in v]
    return v * 2 if len(v) == 1 else v


def _is_first_of_tuple(fx) -> bool:
    return fx.args[1] == 0


def _is_flatten(fx) -> bool:
    """A reshape from N×C×H×W to N×(C·H·W), whatever spelling the model used."""
    src = fx.args[0].meta.get("val")
    out = fx.meta.get("val")
    if src is None or out is None or src.dim() < 2 or out.dim() != 2:
        return False
    return int(out.shape[0]) == int(src.shape[0]) and int(out.shape[1]) == math.prod(int(d) for d in src.shape[1:])


def _source(fx) -> str:
    stack = fx.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return list(stack.values())[-1][0]


def _op_name(fx) -> str:
    name = getattr(fx.target, "__name__", str(fx.target))
    return name.replace(".default", "")
