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

from calib import layout
from calib.errors import ModelError, UnsupportedOpError
from calib.graph import Graph, Node, add_broadcast_ok

aten = torch.ops.aten

_IDENTITY = {aten.dropout.default, aten.dropout_.default, aten.contiguous.default,
             aten.clone.default, aten.alias.default, aten.detach.default, aten.feature_dropout.default,
             aten.lift_fresh_copy.default}
_RELU = {aten.relu.default, aten.relu_.default}
_HARDTANH = {aten.hardtanh.default, aten.hardtanh_.default}
_ADD = {aten.add.Tensor, aten.add_.Tensor}
_MUL = {aten.mul.Tensor, aten.mul_.Tensor}
_SUB = {aten.sub.Tensor, aten.sub_.Tensor}
_DIV = {aten.div.Tensor, aten.div_.Tensor}
_MATMUL = {aten.matmul.default, aten.bmm.default}
_SOFTMAX = {aten._softmax.default, aten.softmax.int}
_PAD = {aten.pad.default, aten.constant_pad_nd.default}
_MAXPOOL = {aten.max_pool2d.default, aten.max_pool2d_with_indices.default}
# F.interpolate / nn.Upsample: graph op → its ATen overloads (.vec from F.interpolate, .default decomposed)
_UPSAMPLE = {aten.upsample_nearest2d.vec: "upsample_nearest2d", aten.upsample_nearest2d.default: "upsample_nearest2d",
             aten.upsample_bilinear2d.vec: "upsample_bilinear2d",
             aten.upsample_bilinear2d.default: "upsample_bilinear2d"}
# pure data movement: replayed on an index tensor (calib/layout.py)
_LAYOUT = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
           aten.unflatten.int, aten.transpose.int, aten.permute.default, aten.narrow.default,
           aten.slice.Tensor, aten.select.int, aten.squeeze.dim, aten.squeeze.dims, aten.unsqueeze.default,
           aten.index_select.default}
_SPLIT = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.tensor_split.sections,
          aten.unbind.int}
# op → (fn name, the schema arguments that become attrs): computed as lookup tables by the compiler
_ELEMENTWISE = {
    aten.hardswish.default: ("hardswish", ()), aten.hardswish_.default: ("hardswish", ()),
    aten.hardsigmoid.default: ("hardsigmoid", ()), aten.hardsigmoid_.default: ("hardsigmoid", ()),
    aten.sigmoid.default: ("sigmoid", ()), aten.sigmoid_.default: ("sigmoid", ()),
    aten.silu.default: ("silu", ()), aten.silu_.default: ("silu", ()),
    aten.gelu.default: ("gelu", ("approximate",)),
    aten.tanh.default: ("tanh", ()), aten.tanh_.default: ("tanh", ()),
    aten.leaky_relu.default: ("leaky_relu", ("negative_slope",)),
    aten.leaky_relu_.default: ("leaky_relu", ("negative_slope",)),
    aten.elu.default: ("elu", ("alpha", "scale", "input_scale")),
    aten.elu_.default: ("elu", ("alpha", "scale", "input_scale")),
    aten.mish.default: ("mish", ()), aten.mish_.default: ("mish", ()),
    aten.softplus.default: ("softplus", ("beta", "threshold")),
}


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
    """Map an ExportedProgram with one image input (N×C×H×W) to a Graph (ops: calib/graph.py)."""
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
    pending: dict[str, layout.Pending | tuple[layout.Pending, ...]] = {}  # unresolved layout chains
    nodes: list[Node] = []
    shapes: dict[str, tuple[int, ...]] = {}
    unsupported: list[str] = []
    refused: set[str] = set()               # fx values not captured (reported once, in ``unsupported``)
    outputs: list[str] | None = None

    def add(node: Node) -> None:
        nodes.append(node)
        shapes[node.name] = tuple(node.shape)

    def value(arg) -> str:
        """The graph value an fx argument denotes; a pending layout chain is
        materialised here (as gather and/or flatten nodes) when something reads it."""
        name = alias.get(arg.name, arg.name)
        if name in refused:                 # already reported: its readers are refused with it
            raise _Refused(None)
        if name not in pending:
            return name
        p = pending.pop(name)
        if isinstance(p, tuple):
            raise _Refused(f"{arg.name}: a tuple of tensors read as one tensor")
        r = layout.resolve(p, shapes[p.base])
        if r is None:
            crop = _cropped(p, name, _source(arg), shapes, add)
            if crop is not None:
                p, r = crop, layout.resolve(crop, shapes[crop.base])
        if r is None:
            raise _Refused(f"{_source(arg) or arg.name}: view/reshape/permute chain that is not a channel "
                           f"gather or flatten (result shape {tuple(p.index.shape[1:])})")
        cur, src = p.base, _source(arg)
        if r.gather is not None:
            out = name + ("_gather" if r.flatten else "")
            add(Node(out, "gather", [cur], {"index": r.gather}, {}, src, (len(r.gather), *shapes[cur][1:])))
            cur = out
        if r.flatten:
            add(Node(name, "flatten", [cur], {}, {}, src, (math.prod(shapes[cur]),)))
            cur = name
        alias[name] = cur
        return cur

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
                add(Node(fx.name, "input", [], {"shape": list(shape[1:])}, shape=shape[1:]))
            continue
        if fx.op == "output":                # the returned tensors, flattened in the model's order
            named = [(o, s) for o, s in zip(fx.args[0], _output_labels(program, len(fx.args[0]))) if o is not None]
            if not named:
                raise ModelError("the model returns no tensor")
            outs, labels = [o for o, _ in named], [s for _, s in named]
            outputs = []
            for o in outs:
                if not hasattr(o, "name"):
                    raise ModelError(f"the model returns a non-tensor value {o!r}")
                try:
                    outputs.append(value(o))
                except _Refused as e:
                    unsupported += [str(e)] if e.args[0] else []
            continue
        if fx.op != "call_function":
            unsupported.append(f"{fx.op} {fx.target}")
            continue
        if _folds(fx, tensors):              # arithmetic on parameters and buffers only: done now
            tensors[fx.name] = _evaluate(fx, tensors)
            continue
        source = _source(fx)
        try:
            node = _map(fx, source, value, const, alias, pending, shapes, add)
        except _Refused as e:
            unsupported += [str(e)] if e.args[0] else []
            refused.add(fx.name)
            continue
        if node is not None:
            add(node)

    if unsupported:
        raise UnsupportedOpError("unsupported layers: " + "; ".join(dict.fromkeys(unsupported)))
    if outputs is None:
        raise ModelError("the exported program has no output")
    if len(outputs) == 1 or len(set(labels)) != len(labels) or not all(labels):
        labels = []                          # one tensor, or labels that would not name each output
    return _prune(Graph(nodes, tuple(outputs), tuple(labels)))


class _Refused(Exception):
    """One fx node we cannot map; its message names the place (collected, not raised)."""


def _arguments(fx) -> dict:
    """The op's arguments by schema name, defaults filled in (export elides them)."""
    schema = getattr(fx.target, "_schema", None)
    if schema is None:
        return {}
    out = {}
    for i, a in enumerate(schema.arguments):
        if i < len(fx.args):
            out[a.name] = fx.args[i]
        elif a.name in fx.kwargs:
            out[a.name] = fx.kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
    return out


def _output_labels(program: ExportedProgram, n: int) -> list[str]:
    """The name of each of the ``n`` returned leaves in the model's output structure: dict keys
    and sequence indices joined by dots ("pool", "feats.1"); "" where there is none."""
    import re

    from torch.utils import _pytree as pytree
    try:
        spec = program.call_spec.out_spec
        tree = pytree.tree_unflatten(list(range(n)), spec)
        paths = [pytree.keystr(p) for p, _ in pytree.tree_flatten_with_path(tree)[0]]
    except Exception:  # noqa: BLE001 (an output structure pytree cannot walk: no labels)
        return [""] * n
    keys = [".".join(a or b for a, b in re.findall(r"\['([^']*)'\]|\[(\d+)\]", p)) for p in paths]
    return keys if len(keys) == n else [""] * n


def _folds(fx, tensors: dict) -> bool:
    """An fx call whose tensor inputs are all constants (parameters, buffers, folded values),
    e.g. a frozen batch norm's w·rsqrt(var + eps) and b − mean·scale."""
    ins = fx.all_input_nodes
    return bool(ins) and all(i.name in tensors for i in ins) and hasattr(fx.meta.get("val"), "shape")


def _evaluate(fx, tensors: dict) -> torch.Tensor:
    """The value of a ``_folds`` call, computed with torch on the constants."""
    def sub(v):
        if isinstance(v, torch.fx.Node):
            return tensors[v.name]
        if isinstance(v, (list, tuple)):
            return type(v)(sub(x) for x in v)
        return v
    with torch.no_grad():
        return fx.target(*sub(fx.args), **{k: sub(v) for k, v in fx.kwargs.items()}).detach()


def _channel_affine(fx, value, const, shapes, source, shape) -> Node | None:
    """``x * c``, ``x + c`` or ``x − c`` with a constant ``c`` of one value per channel (or one in
    all: [C, 1, 1] / [1, C, 1, 1], a one-element tensor or a number) as a ``batch_norm`` node with mean 0, var 1,
    eps 0 — exactly x·w + b — which fold_bn folds into the conv before it (a frozen batch norm,
    a layer scale). None when the call is not of that form."""
    a = fx.args
    if len(a) != 2 or fx.kwargs.get("alpha", 1) != 1:
        return None
    number = [isinstance(v, (int, float)) and not isinstance(v, bool) for v in a]
    consts = [i for i, v in enumerate(a) if number[i] or (_is_tensor(v) and _constant_or_none(const, v) is not None)]
    if len(consts) != 1 or not _is_tensor(a[1 - consts[0]]) or (fx.target in _SUB and consts[0] != 1):
        return None
    c = torch.tensor(float(a[consts[0]])) if number[consts[0]] else const(a[consts[0]])
    x = value(a[1 - consts[0]])
    xs = shapes[x]
    if len(xs) != 3:
        return None
    if c.numel() != 1:                       # else one value for all: any shape broadcasts
        lead, (ch, h, w) = c.shape[:-3], c.shape[-3:] if c.dim() >= 3 else (0, 0, 0)
        if c.dim() < 3 or c.dim() > 4 or any(d != 1 for d in lead) or (h, w) != (1, 1) or ch != xs[0]:
            return None                      # broadcasts along H or W, or over the batch
    v = c.reshape(-1).float().expand(xs[0]).clone()
    ones, zeros = torch.ones(xs[0]), torch.zeros(xs[0])
    w, b = (v, zeros) if fx.target in _MUL else (ones, -v if fx.target in _SUB else v)
    return Node(fx.name, "batch_norm", [x], {"eps": 0.0}, {"weight": w, "bias": b, "mean": zeros, "var": ones},
                source, shape)


def _constant_or_none(const, arg):
    """The constant ``arg`` denotes, or None for a computed tensor."""
    try:
        return const(arg)
    except ModelError:
        return None


def _is_tensor(v) -> bool:
    return hasattr(v, "name") and hasattr(v.meta.get("val"), "shape")


def _unresolved(arg, alias, pending, shapes) -> layout.Pending | None:
    """The layout chain ``arg`` denotes when it is no gather or flatten (channels last, tokens):
    an op that commutes with data movement runs on its base and passes the chain on."""
    if not _is_tensor(arg):
        return None
    p = pending.get(alias.get(arg.name, arg.name))
    if isinstance(p, layout.Pending) and layout.resolve(p, shapes[p.base]) is None:
        return p
    return None


def _channels_last_input(fx, arg, features: int, where: str, value, alias, pending, shapes, add
                         ) -> tuple[str, tuple[int, ...] | None]:
    """The value a channels-last op (linear, layer norm over the last axis) reads, and the leading
    axes of the chain it came through (None: a plain [N, F] value). A chain showing a map channels
    last (calib/layout.channels_last) is read as its base, through a channel gather if it selects."""
    p = _unresolved(arg, alias, pending, shapes)
    if p is None:
        x = value(arg)
        if tuple(shapes[x]) != (features,):
            raise _Refused(f"{where}: {_op_name(fx)} over the last axis of a {tuple(shapes[x])} tensor")
        return x, None
    r = layout.channels_last(p, shapes[p.base])
    if r is None:                            # a token select or spatial slice first: crop the base
        p = _cropped(p, fx.name, _source(fx), shapes, add) or p
        r = layout.channels_last(p, shapes[p.base])
    base_shape = shapes[p.base]
    if r is None or p.index.shape[-1] != features:
        raise _Refused(f"{where}: {_op_name(fx)} of a view that is not channels last "
                       f"(shape {tuple(p.index.shape[1:])})")
    x = p.base
    if r.gather is not None:
        x = f"{fx.name}_gather"
        add(Node(x, "gather", [p.base], {"index": r.gather}, {}, _source(fx), (len(r.gather), *base_shape[1:])))
    return x, tuple(int(d) for d in p.index.shape[:-1])


def _cropped(p: layout.Pending, name: str, source: str, shapes, add) -> layout.Pending | None:
    """``p`` re-indexed onto a crop node of its base when it reads one box of the base's positions
    (calib/layout.crop_box); None when it does not."""
    found = layout.crop_box(p, shapes[p.base])
    if found is None:
        return None
    (top, left, h, w), q = found
    crop = f"{name}_crop"
    if crop not in shapes:
        add(Node(crop, "crop", [p.base], {"box": [top, left, h, w]}, {}, source, (shapes[p.base][0], h, w)))
    return layout.Pending(crop, q.index)


def _show(fx, chain: layout.Pending, alias, pending) -> None:
    """fx's tensor is ``chain`` over a graph node of the same name (the node holds the NCHW map, the
    tensor a channels-last view of it): the tensor gets its own name, so that readers of the node
    (a later permute back resolves to it) never see the view."""
    view = f"{fx.name}:view"
    pending[view] = chain
    alias[fx.name] = view


def _lifted(fx, op: str, ins: list, attrs: dict, source: str, alias, pending, shapes) -> Node | None:
    """``op`` computed on the bases of channels-last chains, the chain passed on to its result:
    an elementwise function of one chain, or an add/mul of two equal chains. None when an input
    is no such chain (the op reads plain values)."""
    chains = [_unresolved(v, alias, pending, shapes) for v in ins]
    if any(c is None for c in chains) or any(not torch.equal(c.index, chains[0].index) or
                                             shapes[c.base] != shapes[chains[0].base] for c in chains):
        return None
    _show(fx, layout.Pending(fx.name, chains[0].index), alias, pending)
    return Node(fx.name, op, [c.base for c in chains], attrs, {}, source, tuple(shapes[chains[0].base]))


def _map(fx, source, value, const, alias, pending, shapes, add) -> Node | None:
    """The Node for one fx call (None when it only aliases or extends a layout chain)."""
    t, a = fx.target, fx.args
    shape = tuple(int(d) for d in fx.meta["val"].shape[1:]) if hasattr(fx.meta.get("val"), "shape") else ()
    where = source or fx.name
    if t in _IDENTITY:
        alias[fx.name] = alias.get(a[0].name, a[0].name)
        return None
    if t is operator.getitem:
        src = alias.get(a[0].name, a[0].name)
        if src in pending and isinstance(pending[src], tuple):
            pending[fx.name] = pending[src][a[1]]  # a piece of a split: an alias of that piece
            return None
        if a[1] == 0:  # first result of a tuple op (max_pool2d_with_indices)
            alias[fx.name] = src
            return None
        raise _Refused(f"{where}: getitem {a[1]} of {_op_name(a[0])}")
    if t in _LAYOUT or t in _SPLIT:
        src = alias.get(a[0].name, a[0].name)
        if src not in pending and src not in shapes:
            raise _Refused(f"{where}: {_op_name(fx)} of a constant")
        p = pending[src] if src in pending else layout.start(src, shapes[src])
        if isinstance(p, tuple):
            raise _Refused(f"{where}: {_op_name(fx)} of a tuple")
        try:
            out = t(p.index, *a[1:], **fx.kwargs)
        except Exception as exc:  # the op refused the index tensor: not a pure layout op here
            raise _Refused(f"{where}: {_op_name(fx)} ({type(exc).__name__})") from None
        # contiguous copies: the chain's values are what matters, and a later view must work
        pending[fx.name] = tuple(layout.Pending(p.base, o.contiguous()) for o in out) if t in _SPLIT \
            else layout.Pending(p.base, out.contiguous())
        return None
    if t is aten.conv2d.default:
        args = _arguments(fx)
        padding = args["padding"]
        if isinstance(padding, str):
            raise _Refused(f"{where}: conv2d padding='{padding}'")
        w = const(a[1])
        b = const(args["bias"]) if args.get("bias") is not None else torch.zeros(w.shape[0])
        return Node(fx.name, "conv2d", [value(a[0])],
                    {"stride": _pair(args["stride"]), "padding": _pair(padding),
                     "dilation": _pair(args["dilation"]), "groups": int(args["groups"]), "act": None},
                    {"weight": w, "bias": b}, source, shape)
    if t is aten.linear.default:
        w = const(a[1])
        b = const(a[2]) if len(a) > 2 and a[2] is not None else torch.zeros(w.shape[0])
        if _unresolved(a[0], alias, pending, shapes) is None:
            return Node(fx.name, "linear", [value(a[0])], {"act": None}, {"weight": w, "bias": b}, source, shape)
        # over the channels of a channels-last view: a 1×1 conv of its base (a linear of a [C] base)
        x, lead = _channels_last_input(fx, a[0], w.shape[1], where, value, alias, pending, shapes, add)
        out_shape = (w.shape[0], *shapes[x][1:])
        _show(fx, layout.channels_last_view(fx.name, out_shape, lead), alias, pending)
        if len(out_shape) == 1:
            return Node(fx.name, "linear", [x], {"act": None}, {"weight": w, "bias": b}, source, out_shape)
        return Node(fx.name, "conv2d", [x], {"stride": [1, 1], "padding": [0, 0], "dilation": [1, 1], "groups": 1,
                                             "act": None}, {"weight": w.reshape(*w.shape, 1, 1), "bias": b}, source,
                    out_shape)
    if t is aten.batch_norm.default or t is aten._native_batch_norm_legit_no_training.default:
        w, b, mean, var = (const(a[1]), const(a[2]), const(a[3]), const(a[4]))
        eps = float(a[7] if t is aten.batch_norm.default else a[6])
        c = mean.shape[0]
        return Node(fx.name, "batch_norm", [value(a[0])], {"eps": eps},
                    {"weight": w if w is not None else torch.ones(c),
                     "bias": b if b is not None else torch.zeros(c), "mean": mean, "var": var},
                    source, shape)
    if t is aten.scaled_dot_product_attention.default:
        _attention(fx, _arguments(fx), where, source, alias, pending, shapes, add)
        return None
    if t in _MATMUL:                         # q @ kᵀ (channels) or p @ v (positions), per head
        ops = [_operand(fx, v, role, where, alias, pending, shapes, add) for v, role in zip(a, "ab")]
        contract = "positions" if ops[1][1].tokens_first else "channels"
        out_shape = _matmul_node(fx, fx.name, ops[0], ops[1], contract, 1.0, where, source, shapes, add)
        _show(fx, layout.token_view(fx.name, out_shape, tuple(int(d) for d in fx.meta["val"].shape)), alias, pending)
        return None
    if t in _SOFTMAX:
        return _softmax(fx, a[0], int(a[1]), where, source, alias, pending, shapes)
    unary = _unary(fx)
    if unary is not None:
        op, attrs = unary
        lifted = _lifted(fx, op, [a[0]], attrs, source, alias, pending, shapes)
        return lifted or Node(fx.name, op, [value(a[0])], attrs, {}, source, shape)
    if t is aten.layer_norm.default:
        args = _arguments(fx)
        norm = [int(v) for v in args["normalized_shape"]]
        if len(norm) != 1:
            raise _Refused(f"{where}: layer_norm over {len(norm)} axes")
        x, lead = _channels_last_input(fx, a[0], norm[0], where, value, alias, pending, shapes, add)
        w = const(args["weight"]) if args.get("weight") is not None else torch.ones(norm[0])
        b = const(args["bias"]) if args.get("bias") is not None else torch.zeros(norm[0])
        out_shape = tuple(shapes[x])
        if lead is not None:
            _show(fx, layout.channels_last_view(fx.name, out_shape, lead), alias, pending)
        return Node(fx.name, "layer_norm", [x], {"eps": float(args["eps"])}, {"weight": w, "bias": b}, source,
                    out_shape)
    if t in _ADD or t in _MUL or t in _SUB or t in _DIV:
        chained = _with_constant(fx, where, source, const, alias, pending, shapes, add, plain=False)
        if chained is not None:
            return chained
        folded = _channel_affine(fx, value, const, shapes, source, shape) if t not in _DIV else None
        if folded is not None:
            return folded
        chained = _with_constant(fx, where, source, const, alias, pending, shapes, add, plain=True)
        if chained is not None:
            return chained
    if t in _ADD or t in _MUL:
        op = "add" if t in _ADD else "mul"
        if len(a) != 2 or not all(_is_tensor(v) for v in a) or fx.kwargs.get("alpha", 1) != 1:
            raise _Refused(f"{where}: {op} with a scalar or scaled operand")
        lifted = _lifted(fx, op, list(a), {"act": None} if op == "add" else {}, source, alias, pending, shapes)
        if lifted is not None:
            return lifted
        if any(_constant_or_none(const, v) is not None for v in a):
            raise _Refused(f"{where}: {op} with a constant that is not one value per channel")
        x, y = value(a[0]), value(a[1])
        if math.prod(shapes[y]) > math.prod(shapes[x]):  # the broadcast operand goes second
            x, y = y, x
        if not _broadcastable(shapes[x], shapes[y], op):
            raise _Refused(f"{where}: {op} of shapes {shapes[x]} and {shapes[y]}")
        return Node(fx.name, op, [x, y], {"act": None} if op == "add" else {}, {}, source, shape)
    if t is aten.cat.default:
        args = _arguments(fx)
        ins = list(args["tensors"])
        rank = len(shape) + 1
        if any(_unresolved(v, alias, pending, shapes) is not None or _constant_or_none(const, v) is not None
               for v in ins):
            return _token_cat(fx, ins, int(args["dim"]) % rank, where, source, const, alias, pending, shapes, add)
        if int(args["dim"]) % rank != 1 or rank not in (2, 4):
            raise _Refused(f"{where}: cat on dim {args['dim']} of a {rank}-D tensor")
        names = [value(v) for v in ins]
        if len(names) == 1:
            alias[fx.name] = names[0]
            return None
        return Node(fx.name, "cat", names, {"axis": 1}, {}, source, shape)
    if t in _PAD:
        args = _arguments(fx)
        pad, mode = [int(p) for p in args["pad"]], args.get("mode", "constant")
        val = args.get("value")
        if mode != "constant" or len(pad) not in (2, 4) or any(p < 0 for p in pad):
            raise _Refused(f"{where}: pad {pad} mode {mode}")
        left, right, top, bottom = (pad + [0, 0])[:4]
        return Node(fx.name, "pad", [value(a[0])],
                    {"pads": [top, left, bottom, right], "value": float(val or 0.0)}, {}, source, shape)
    if t in _MAXPOOL:
        args = _arguments(fx)
        kernel = _pair(args["kernel_size"])
        return Node(fx.name, "max_pool2d", [value(a[0])],
                    {"kernel": kernel, "stride": _pair(args["stride"]) if args["stride"] else kernel,
                     "padding": _pair(args["padding"]), "dilation": _pair(args["dilation"]),
                     "ceil_mode": bool(args["ceil_mode"])}, {}, source, shape)
    if t in _UPSAMPLE:
        return Node(fx.name, _UPSAMPLE[t], [value(a[0])], _upsample_attrs(t, _arguments(fx), shape), {}, source, shape)
    if t is aten.avg_pool2d.default:
        args = _arguments(fx)
        kernel = _pair(args["kernel_size"])
        div = args.get("divisor_override")
        return Node(fx.name, "avg_pool2d", [value(a[0])],
                    {"kernel": kernel, "stride": _pair(args["stride"]) if args["stride"] else kernel,
                     "padding": _pair(args["padding"]), "ceil_mode": bool(args["ceil_mode"]),
                     "count_include_pad": bool(args["count_include_pad"]),
                     "divisor_override": int(div) if div is not None else None}, {}, source, shape)
    if t is aten.adaptive_avg_pool2d.default:
        size = _pair(a[1])
        if size == [1, 1]:
            return Node(fx.name, "global_avg_pool", [value(a[0])], {}, {}, source, shape)
        return Node(fx.name, "adaptive_avg_pool2d", [value(a[0])], {"output_size": size}, {}, source, shape)
    if t is aten.mean.dim and _unresolved(a[0], alias, pending, shapes) is not None:
        return _token_mean(fx, a, where, source, alias, pending, shapes, add)
    if t is aten.mean.dim and sorted(int(d) % 4 for d in a[1]) == [2, 3] and len(shape) + 1 in (2, 4):
        keep = bool(a[2]) if len(a) > 2 else False
        node = Node(fx.name, "global_avg_pool", [value(a[0])], {}, {}, source,
                    shape if keep else (*shape, 1, 1))
        if keep:
            return node
        add(node)  # N×C: the flatten that follows a keepdim pool
        alias[fx.name] = fx.name + "_flat"
        return Node(fx.name + "_flat", "flatten", [fx.name], {}, {}, source, shape)
    raise _Refused(f"{where}: {_op_name(fx)}")


def _operand(fx, arg, role: str, where: str, alias, pending, shapes, add) -> tuple[str, layout.TokenMatrix]:
    """An attention operand (Q, K, V, probabilities): the graph value holding its channels, gathered
    in head order, and how the tensor reads it (calib/layout.token_matrix)."""
    if not _is_tensor(arg):
        raise _Refused(f"{where}: {_op_name(fx)} of a non-tensor")
    src = alias.get(arg.name, arg.name)
    p = pending.get(src) or (layout.start(src, shapes[src]) if src in shapes else None)
    if p is None or isinstance(p, tuple):
        raise _Refused(f"{where}: {_op_name(fx)} of a constant or a tuple")
    m = layout.token_matrix(p, shapes[p.base])
    if m is None:
        raise _Refused(f"{where}: {_op_name(fx)} of a view that is not per-head tokens × features "
                       f"(shape {tuple(p.index.shape)})")
    if m.gather is None:
        return p.base, m
    x = f"{fx.name}_{role}"
    add(Node(x, "gather", [p.base], {"index": m.gather}, {}, _source(fx), (len(m.gather), *shapes[p.base][1:])))
    return x, m


def _matmul_node(fx, name: str, a: tuple[str, layout.TokenMatrix], b: tuple[str, layout.TokenMatrix],
                 contract: str, alpha: float, where: str, source: str, shapes, add) -> tuple[int, ...]:
    """A per-head product of two operands as a ``matmul`` node over a's positions (graph.py); its
    shape. ``contract``: "channels" (Q·Kᵀ: b read
    as tokens × features, used transposed) or "positions" (P·V: a's columns are b's tokens)."""
    (xa, ma), (xb, mb) = a, b
    ta, fa = (ma.rows, ma.cols) if ma.tokens_first else (ma.cols, ma.rows)
    tb, fb = (mb.rows, mb.cols) if mb.tokens_first else (mb.cols, mb.rows)
    ok = ma.tokens_first and ma.groups == mb.groups and (fa == fb if contract == "channels" else fa == tb)
    if not ok:
        raise _Refused(f"{where}: {_op_name(fx)} of per-head operands that do not multiply "
                       f"({ma.groups}×{ma.rows}×{ma.cols} by {mb.groups}×{mb.rows}×{mb.cols})")
    n_out = tb if contract == "channels" else fb
    out_shape = (ma.groups * n_out, *shapes[xa][1:])
    add(Node(name, "matmul", [xa, xb], {"heads": ma.groups, "contract": contract, "alpha": float(alpha)}, {},
             source, out_shape))
    return out_shape


def _attention(fx, args: dict, where: str, source: str, alias, pending, shapes, add) -> None:
    """scaled_dot_product_attention(q, k, v) as matmul (scores, scaled) → softmax per head → matmul."""
    if args.get("attn_mask") is not None or float(args.get("dropout_p") or 0.0) != 0.0 or \
            args.get("is_causal") or args.get("enable_gqa"):
        raise _Refused(f"{where}: scaled_dot_product_attention with a mask, dropout, causal or grouped heads")
    q, k, v = (_operand(fx, args[n], n[0], where, alias, pending, shapes, add) for n in ("query", "key", "value"))
    d = q[1].cols
    scale = args.get("scale")
    scores, probs = f"{fx.name}_scores", f"{fx.name}_probs"
    _matmul_node(fx, scores, q, k, "channels", 1.0 / math.sqrt(d) if scale is None else float(scale), where,
                 source, shapes, add)
    add(Node(probs, "softmax", [scores], {"groups": q[1].groups}, {}, source, shapes[scores]))
    m = layout.TokenMatrix(q[1].groups, q[1].rows, k[1].rows, True, None)
    _matmul_node(fx, fx.name, (probs, m), v, "positions", 1.0, where, source, shapes, add)
    _show(fx, layout.token_view(fx.name, shapes[fx.name], tuple(int(d) for d in fx.meta["val"].shape)),
          alias, pending)


def _softmax(fx, arg, dim: int, where: str, source: str, alias, pending, shapes) -> Node:
    """Softmax over the last axis of per-head scores (a matmul's view), or over the channels of a
    plain value: a ``softmax`` node over contiguous channel groups."""
    rank = len(fx.meta["val"].shape)
    p = _unresolved(arg, alias, pending, shapes)
    if p is None:
        x = alias.get(arg.name, arg.name)
        if x not in shapes or dim % rank != 1 or x in pending:
            raise _Refused(f"{where}: softmax over dim {dim} of a {rank}-D tensor")
        return Node(fx.name, "softmax", [x], {"groups": 1}, {}, source, tuple(shapes[x]))
    m = layout.token_matrix(p, shapes[p.base])
    if dim % rank != rank - 1 or m is None or not m.tokens_first or m.gather is not None:
        raise _Refused(f"{where}: softmax over dim {dim} of a view that is not per-head scores")
    _show(fx, layout.Pending(fx.name, p.index), alias, pending)
    return Node(fx.name, "softmax", [p.base], {"groups": m.groups}, {}, source, tuple(shapes[p.base]))


def _with_constant(fx, where: str, source: str, const, alias, pending, shapes, add, plain: bool) -> Node | None:
    """``x ∘ c`` (add, sub, mul, div) of a tensor and a number or constant tensor, on x's base when x
    is a view (``plain``: x a plain map). A number or one value per channel is a ``batch_norm`` node
    (x·w + b per channel, folded into the producer where one allows); any other constant becomes a
    ``constant`` node (a position embedding) in the base's layout and an add or mul of two maps.
    None when the call is not of that form."""
    a, t = fx.args, fx.target
    if len(a) != 2 or fx.kwargs.get("alpha", 1) != 1 or fx.kwargs.get("rounding_mode") is not None:
        return None
    number = [isinstance(v, (int, float)) and not isinstance(v, bool) for v in a]
    c_at = [i for i in (0, 1) if number[i] or (_is_tensor(a[i]) and _constant_or_none(const, a[i]) is not None)]
    if len(c_at) != 1 or c_at[0] != 1 and (t in _SUB or t in _DIV) or not _is_tensor(a[1 - c_at[0]]):
        return None
    x = a[1 - c_at[0]]
    p = _unresolved(x, alias, pending, shapes)
    if plain:
        name = alias.get(x.name, x.name)
        if p is not None or name in pending or name not in shapes or len(shapes[name]) != 3:
            return None
        p = layout.start(name, shapes[name])
    elif p is None:
        return None
    base = tuple(shapes[p.base])
    view = tuple(int(d) for d in fx.meta["val"].shape)
    if tuple(p.index.shape) != view or not torch.equal(p.index.reshape(-1).sort().values,
                                                       torch.arange(p.index.numel())):
        raise _Refused(f"{where}: {_op_name(fx)} with a constant on a view that does not show each value once")
    c = torch.tensor(float(a[c_at[0]])) if number[c_at[0]] else const(a[c_at[0]])
    on_base = torch.empty(p.index.numel())
    on_base[p.index.reshape(-1)] = c.expand(view).reshape(-1).float()
    on_base = on_base.reshape(base)
    if t in _SUB:
        on_base = -on_base
    if t in _DIV:
        on_base = 1.0 / on_base
    if not plain:
        _show(fx, layout.Pending(fx.name, p.index), alias, pending)
    per_channel = on_base.reshape(base[0], -1)
    if torch.equal(per_channel, per_channel[:, :1].expand_as(per_channel)):
        v, ones, zeros = per_channel[:, 0].clone(), torch.ones(base[0]), torch.zeros(base[0])
        w, b = (v, zeros) if t in _MUL or t in _DIV else (ones, v)
        return Node(fx.name, "batch_norm", [p.base], {"eps": 0.0},
                    {"weight": w, "bias": b, "mean": zeros, "var": ones}, source, base)
    if t in _DIV:
        raise _Refused(f"{where}: division by a constant that is not one value per channel")
    k = f"{fx.name}_const"
    add(Node(k, "constant", [], {}, {"value": on_base}, source, base))
    op = "mul" if t in _MUL else "add"
    return Node(fx.name, op, [p.base, k], {} if op == "mul" else {"act": None}, {}, source, base)


def _token_mean(fx, a, where: str, source: str, alias, pending, shapes, add) -> None:
    """The mean over all tokens of a channels-last view (keepdim or not): a global_avg_pool of its
    base, shown as the view's shape (1 for each reduced axis, or without them)."""
    p = _unresolved(a[0], alias, pending, shapes)
    view_in = tuple(p.index.shape)
    dims = sorted({int(d) % len(view_in) for d in a[1]})
    r = layout.channels_last(p, shapes[p.base])
    kept = [d for i, d in enumerate(view_in[:-1]) if i not in dims]
    if r is None or r.gather is not None or len(view_in) - 1 in dims or any(d != 1 for d in kept):
        raise _Refused(f"{where}: mean over dims {dims} of a {view_in} view (not over all its tokens)")
    c = shapes[p.base][0]
    add(Node(fx.name, "global_avg_pool", [p.base], {}, {}, source, (c, 1, 1)))
    view = tuple(int(d) for d in fx.meta["val"].shape)
    _show(fx, layout.Pending(fx.name, torch.arange(c, dtype=torch.int64).reshape(view)), alias, pending)


def _token_cat(fx, ins: list, dim: int, where: str, source: str, const, alias, pending, shapes, add) -> Node:
    """``cat`` of channels-last views and constants along their tokens (a class token before a
    patch sequence): each part's base laid out as [C, T_i, 1] (a ``reshape`` of a map, a
    ``constant`` node), joined by a ``cat`` on axis 2, the result shown channels last."""
    view = tuple(int(d) for d in fx.meta["val"].shape)
    if dim == len(view) - 1 or any(d != 1 for d in view[:dim]):
        raise _Refused(f"{where}: cat on dim {dim} of a {view} view (not a run of tokens)")
    feats = view[-1]
    parts = []
    for i, v in enumerate(ins):
        c = _constant_or_none(const, v) if _is_tensor(v) else None
        if c is not None:
            tokens = c.reshape(-1, feats).T.contiguous()                        # [C, T_i]
            name = f"{fx.name}_const{i}"
            add(Node(name, "constant", [], {}, {"value": tokens.reshape(feats, -1, 1)}, source,
                     (feats, tokens.shape[1], 1)))
            parts.append(name)
            continue
        p = _unresolved(v, alias, pending, shapes)
        if p is None:
            raise _Refused(f"{where}: cat of a plain tensor with channels-last views")
        x, _ = _channels_last_input(fx, v, feats, where, None, alias, pending, shapes, add)
        t = math.prod(shapes[x][1:])
        if tuple(shapes[x][1:]) != (t, 1):
            flat = f"{fx.name}_tokens{i}"
            add(Node(flat, "reshape", [x], {}, {}, source, (feats, t, 1)))
            x = flat
        parts.append(x)
    total = sum(shapes[x][1] for x in parts)
    out_shape = (feats, total, 1)
    _show(fx, layout.channels_last_view(fx.name, out_shape, view[:-1]), alias, pending)
    return Node(fx.name, "cat", parts, {"axis": 2}, {}, source, out_shape)


def _unary(fx) -> tuple[str, dict] | None:
    """(graph op, attrs) of an elementwise function of one tensor (relu, relu6, hardtanh, the
    _ELEMENTWISE table); None for any other call."""
    t = fx.target
    if t in _RELU:
        return "relu", {}
    if t in _HARDTANH:
        lo, hi = (float(v) for v in (_arguments(fx)["min_val"], _arguments(fx)["max_val"]))
        if (lo, hi) == (0.0, 6.0):
            return "relu6", {}
        return "elementwise", {"fn": "hardtanh", "min_val": lo, "max_val": hi}
    if t in _ELEMENTWISE:
        fn, params = _ELEMENTWISE[t]
        args = _arguments(fx)
        return "elementwise", {"fn": fn, **{k: _json_scalar(args[k]) for k in params}}
    return None


def _upsample_attrs(t, args: dict, shape) -> dict:
    """size [oh, ow] (the output's), scales [sh, sw] as torch was given them (None: from the
    sizes; torch's source indices differ), align_corners (bilinear only)."""
    if "scale_factors" in args:
        sc = args["scale_factors"]
    else:
        sc = None if args.get("scales_h") is None else [args["scales_h"], args["scales_w"]]
    attrs = {"size": [int(shape[1]), int(shape[2])], "scales": None if sc is None else [float(v) for v in sc]}
    if "align_corners" in args:
        attrs["align_corners"] = bool(args["align_corners"])
    return attrs


def _broadcastable(a: tuple[int, ...], b: tuple[int, ...], op: str) -> bool:
    """Equal shapes, or a per-channel (C,1,1) operand against (C,H,W); an add also takes a
    per-position (1,H,W) or per-sample (1,1,1) operand (graph.add_broadcast_ok)."""
    return a == b or (len(a) == 3 and b in ((a[0], 1, 1),)) or (op == "add" and add_broadcast_ok(a, b))


def _json_scalar(v):
    return v if isinstance(v, (str, bool)) or v is None else float(v)


def _prune(graph: Graph) -> Graph:
    """Drop nodes whose value never reaches an output (e.g. max-pool indices)."""
    live, stack = set(), list(graph.outputs)
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


def _source(fx) -> str:
    stack = fx.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return list(stack.values())[-1][0]


def _op_name(fx) -> str:
    name = getattr(fx.target, "__name__", str(fx.target))
    return name.replace(".default", "")
