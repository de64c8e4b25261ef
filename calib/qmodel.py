"""The fake-quant model: executes a fused Graph with quantized layers.

One module serves calibration (soft rounding, soft groups, learned steps) and
evaluation of a finished artifact (hard codes). With ``quant`` off it is the
BN-folded float model, the reconstruction target.

A quantized conv/linear computes (eq. 9-11, real arithmetic):
    y = γ^z ⊙ (conv(x ⊙ γ^y, s_w·w̄) + b) + φ^z,  then the fused ReLU/ReLU6,
    then the output activation quantizer.
x ⊙ γ^y scales each input unit; it equals Σ_p γ_p Σ_{i∈G_p} w̄·x̄ since conv is linear
(computed with γ^y and γ^z folded into the weights, see QuantLayer.preact).
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from calib.config import CalibConfig
from calib.graph import PARAM_OPS, QUANT_OPS, Graph, Node
from calib.product_groups import ProductGroups
from calib.quantizers import FLOAT_BITS, ActQuantizer, init_weight_scale
from calib.rounding import AdaRound, nearest_codes


def key(name: str) -> str:
    """Module-dict key for a node name."""
    return re.sub(r"[^0-9A-Za-z_]", "_", name)


def apply_act(y: torch.Tensor, act: str | None) -> torch.Tensor:
    if act == "relu":
        return F.relu(y)
    if act == "relu6":
        return y.clamp(0, 6)
    return y


def act_then_quant(y: torch.Tensor, act: str | None, q: ActQuantizer, quant: bool) -> torch.Tensor:
    """``q(apply_act(y, act))`` (or the activation alone when ``quant`` is off). A ReLU
    before a quantizer that absorbs it (ActQuantizer.absorbs_relu) is skipped: the same
    values and gradients, one full-size pass less each way."""
    if quant and q.absorbs(act):
        return q(y)
    y = apply_act(y, act)
    return q(y) if quant else y


class QuantLayer(nn.Module):
    """A conv2d or linear with quantized weights, optional WAPS groups and γ^z/φ^z."""

    def __init__(self, node: Node, wbits: int, out_bits: int, unit_size: int,
                 gammas: list[float] | None, group_prob: str = "softmax"):
        super().__init__()
        self.op, self.attrs, self.wbits = node.op, dict(node.attrs), wbits
        w, b = node.params["weight"], node.params["bias"]
        self.register_buffer("weight", w.clone())
        self.register_buffer("bias", b.clone())
        known = node.params.get("w_scale")     # an artifact's scale: no search needed
        self.register_buffer("w_scale", known.to(torch.float32).clone() if known is not None else init_weight_scale(w, wbits))
        self.register_buffer("w_codes", nearest_codes(w, self.w_scale, wbits))
        self.rounding: AdaRound | None = None
        m = w.shape[0]
        self.gamma_z = nn.Parameter(torch.ones(m), requires_grad=False)
        self.phi_z = nn.Parameter(torch.zeros(m), requires_grad=False)
        self.unit_size = unit_size
        in_features = w.shape[1] * (node.attrs.get("groups", 1) if node.op == "conv2d" else 1)
        self.units = in_features // unit_size
        self.groups = ProductGroups(self.units, gammas, group_prob) if gammas else None
        self.out_quant = ActQuantizer(out_bits)
        self.quant = True

    @property
    def in_channels(self) -> int:
        return self.units * self.unit_size

    def start_rounding(self) -> None:
        self.rounding = AdaRound(self.weight, self.w_scale, self.wbits)

    @torch.no_grad()
    def freeze(self) -> None:
        """Fix soft rounding into integer codes (AdaRound is dropped afterwards)."""
        if self.rounding is not None:
            self.rounding.hard = True
            self.w_codes.copy_(self.rounding.codes())
            self.rounding = None

    def begin_step(self, beta: float | None = None) -> None:
        """One reconstruction step starts: soft rounding and soft groups (with their
        regularisers at ``beta`` where given, see AdaRound.begin_step) computed once for it."""
        if self.rounding is not None and not self.rounding.hard:
            self.rounding.begin_step(beta)
        if self.groups is not None and not self.groups.hard:
            self.groups.begin_step(beta)

    def end_step(self) -> None:
        if self.rounding is not None:
            self.rounding.end_step()
        if self.groups is not None:
            self.groups.end_step()

    def qweight(self) -> torch.Tensor:
        if self.rounding is not None:
            return self.rounding()
        return self.w_codes * self.w_scale.reshape((-1,) + (1,) * (self.weight.dim() - 1))

    def gamma_y(self) -> torch.Tensor | None:
        if self.groups is None:
            return None
        g = self.groups.gamma_y()
        return g.repeat_interleave(self.unit_size) if self.unit_size > 1 else g

    def linear_part(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, reduced: bool = False) -> torch.Tensor:
        """conv2d/linear in float32; under autocast (reconstruct's bf16 lever) the product
        runs in the reduced type and the result returns to float32 for the quantizers,
        or stays reduced where ``reduced`` (the output quantizer reads it as it is)."""
        if self.op == "conv2d":
            a = self.attrs
            y = F.conv2d(x, w, b, a["stride"], a["padding"], a["dilation"], a["groups"])
        else:
            y = F.linear(x, w, b)
        return y if reduced else y.float()

    def preact(self, x: torch.Tensor, affine: bool = True, reduced: bool = False) -> torch.Tensor:
        """Output before the activation and output quantizer; ``affine`` applies γ^z/φ^z;
        ``reduced``: see ``linear_part``.

        γ^y (per input unit) and γ^z (per output channel) are folded into the small
        weight tensor rather than applied to activations: conv(x⊙γ^y, w) = conv(x, w⊙γ^y),
        so WAPS adds no full-size tensor operation to an iteration."""
        if not self.quant:
            return self.linear_part(x, self.weight, self.bias, reduced)
        w, b = self.qweight(), self.bias
        gy = self.gamma_y()
        if gy is not None:
            w = w * self._input_scale(gy)
        if affine:
            gz = self.gamma_z.reshape((-1,) + (1,) * (w.dim() - 1))
            w, b = w * gz, self.gamma_z * b + self.phi_z
        return self.linear_part(x, w, b, reduced)

    def _input_scale(self, gy: torch.Tensor) -> torch.Tensor:
        """γ^y [fan_in] laid out like the weight: [1, c, 1, 1], or per conv group
        [m, c/groups, 1, 1] (output channel k reads the inputs of its group), or [1, c]."""
        if self.op == "linear":
            return gy.reshape(1, -1)
        m, cg = self.weight.shape[:2]
        groups = self.attrs["groups"]
        if groups == 1:
            return gy.reshape(1, -1, 1, 1)
        return gy.reshape(groups, cg).repeat_interleave(m // groups, dim=0).reshape(m, cg, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.attrs["act"]
        reduced = self.quant and self.out_quant.reads_reduced(act)
        return act_then_quant(self.preact(x, reduced=reduced), act, self.out_quant, self.quant)


class QuantOp(nn.Module):
    """A parameter-free op with its own output quantizer (add, mul, cat, elementwise,
    avg/adaptive pooling): computes the op in float exactly as torch, then quantizes."""

    def __init__(self, node: Node, out_bits: int):
        super().__init__()
        self.node = node
        self.act = node.attrs.get("act")
        self.out_quant = ActQuantizer(out_bits)
        self.quant = True
        if node.op == "constant":            # a buffer, so that it moves with the model's device
            self.register_buffer("value", node.params["value"].detach().float()[None].clone())

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        if self.node.op == "constant":
            y = self.value
            return self.out_quant(y) if self.quant else y
        return act_then_quant(compute(self.node, list(xs)), self.act, self.out_quant, self.quant)


QuantAdd = QuantOp  # the residual add is one QuantOp among others


def _elementwise(attrs: dict, x: torch.Tensor) -> torch.Tensor:
    fn = attrs["fn"]
    if fn == "hardswish":
        return F.hardswish(x)
    if fn == "hardsigmoid":
        return F.hardsigmoid(x)
    if fn == "sigmoid":
        return torch.sigmoid(x)
    if fn == "silu":
        return F.silu(x)
    if fn == "gelu":
        return F.gelu(x, approximate=attrs.get("approximate", "none"))
    if fn == "tanh":
        return torch.tanh(x)
    if fn == "leaky_relu":
        return F.leaky_relu(x, attrs["negative_slope"])
    if fn == "elu":
        return torch.ops.aten.elu(x, attrs["alpha"], attrs["scale"], attrs["input_scale"])
    if fn == "mish":
        return F.mish(x)
    if fn == "softplus":
        return F.softplus(x, attrs["beta"], attrs["threshold"])
    if fn == "hardtanh":
        return F.hardtanh(x, attrs["min_val"], attrs["max_val"])
    raise AssertionError(f"no executor for elementwise fn {fn}")


ELEMENTWISE_FNS = ("hardswish", "hardsigmoid", "sigmoid", "silu", "gelu", "tanh", "leaky_relu", "elu", "mish",
                   "softplus", "hardtanh")


def _matmul(a: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The graph's per-head matmul (calib/graph.py) of [N, G·K, *pos] by [N, ·, *pos_b], times alpha."""
    g, n = a["heads"], x.shape[0]
    xa = x.reshape(n, g, x.shape[1] // g, -1)                        # [N, G, K, P]
    yb = y.reshape(n, g, y.shape[1] // g, -1)                        # [N, G, D, L]
    if a["contract"] == "channels":
        out = torch.einsum("ngdp,ngdj->ngjp", xa, yb)                 # [N, G, L, P]
    else:
        out = torch.einsum("ngjp,ngdj->ngdp", xa, yb)                 # [N, G, D, P]
    return (out.float() * a["alpha"]).reshape(n, -1, *x.shape[2:])   # float32 after a bf16 autocast


def compute(node: Node, xs: list[torch.Tensor]) -> torch.Tensor:
    """The float value of a parameter-free node, exactly as torch computes it."""
    a, x = node.attrs, xs[0] if xs else None
    op = node.op
    if op == "add":
        return x + xs[1]
    if op == "mul":
        return x * xs[1]
    if op == "cat":                          # a constant part (batch 1) joins every sample
        n = max(v.shape[0] for v in xs)
        return torch.cat([v.expand(n, *v.shape[1:]) for v in xs], a.get("axis", 1))
    if op == "matmul":
        return _matmul(a, x, xs[1])
    if op == "softmax":
        g = a["groups"]
        return x.reshape(x.shape[0], g, x.shape[1] // g, *x.shape[2:]).softmax(2).reshape(x.shape)
    if op == "constant":
        return node.params["value"][None].float()
    if op == "reshape":
        return x.reshape(x.shape[0], *node.shape)
    if op == "crop":
        top, left, h, w = a["box"]
        return x[:, :, top:top + h, left:left + w]
    if op == "elementwise":
        return _elementwise(a, x)
    if op == "gather":
        return x[:, a["index"]]
    if op == "pad":
        top, left, bottom, right = a["pads"]
        return F.pad(x, [left, right, top, bottom], value=a["value"])
    if op == "max_pool2d":
        return F.max_pool2d(x, a["kernel"], a["stride"], a["padding"], a.get("dilation", [1, 1]),
                            a.get("ceil_mode", False))
    if op == "avg_pool2d":
        return F.avg_pool2d(x, a["kernel"], a["stride"], a["padding"], a.get("ceil_mode", False),
                            a.get("count_include_pad", True), a.get("divisor_override"))
    if op == "adaptive_avg_pool2d":
        return F.adaptive_avg_pool2d(x, a["output_size"])
    if op == "global_avg_pool":
        return x.mean((2, 3), keepdim=True)
    if op in ("upsample_nearest2d", "upsample_bilinear2d"):    # the ATen call torch.export recorded
        size, scales = (None, a["scales"]) if a.get("scales") else (a["size"], None)
        if op == "upsample_nearest2d":
            return torch.ops.aten.upsample_nearest2d.vec(x, size, scales)
        return torch.ops.aten.upsample_bilinear2d.vec(x, size, bool(a["align_corners"]), scales)
    if op == "flatten":
        return x.flatten(1)
    if op == "layer_norm":                   # over the channels, as torch over a channels-last view
        p = node.params
        return F.layer_norm(x.movedim(1, -1), (x.shape[1],), p["weight"].to(x), p["bias"].to(x),
                            a["eps"]).movedim(-1, 1)
    if op == "relu":
        return F.relu(x)
    if op == "relu6":
        return x.clamp(0, 6)
    raise AssertionError(f"no executor for {op}")


def layer_roles(graph: Graph) -> tuple[set[str], set[str]]:
    """(first, last): layers reading the graph input / producing the graph output
    through parameter-free nodes only."""
    users = graph.consumers()

    def walk(start: list[str], step) -> set[str]:
        found, stack, seen = set(), list(start), set()
        while stack:
            v = stack.pop()
            if v in seen:
                continue
            seen.add(v)
            if graph[v].op in PARAM_OPS:
                found.add(v)
            else:
                stack.extend(step(v))
        return found

    first = walk(users[graph.input.name], lambda v: users[v])
    last = walk(list(graph.outputs), lambda v: graph[v].inputs)
    return first, last


def unit_size(graph: Graph, node: Node) -> int:
    """Input features per product-group unit: H·W for a linear after a flatten of C×H×W."""
    if node.op != "linear":
        return 1
    src = graph[node.inputs[0]]
    if src.op == "flatten":
        pre = graph[src.inputs[0]].shape
        if len(pre) == 3:
            return pre[1] * pre[2]
    return 1


def output_bits(graph: Graph, cfg: CalibConfig, last: set[str]) -> dict[str, int]:
    """Code width of every quantization point (the input and every QUANT_OPS output).

    The graph output is a last layer's value (first_last_bits); a tensor read only by
    residual adds gets residual_bits; attention's points (the outputs of matmul and softmax and
    the tensors matmuls read: Q, K, V, scores, probabilities, context) get attn_bits when set;
    every other point gets abits."""
    if cfg.abits == FLOAT_BITS:
        return {n.name: FLOAT_BITS for n in graph if n.op in (*QUANT_OPS, "input")}
    users = graph.consumers()
    bits = {}
    for n in graph:
        if n.op == "input" or n.name in last:
            bits[n.name] = cfg.first_last_bits
        elif n.op in QUANT_OPS:
            readers = users[n.name]
            only_add = readers and all(graph[u].op == "add" for u in readers)
            bits[n.name] = cfg.residual_bits if only_add else cfg.abits
    if cfg.attn_bits is not None:
        attention = {n.name for n in graph if n.op in ("matmul", "softmax")}
        attention |= {code_source(graph, i) for n in graph if n.op == "matmul" for i in n.inputs}
        for name in attention & bits.keys() - last:
            bits[name] = cfg.attn_bits
    return bits


def code_source(graph: Graph, value: str) -> str:
    """The quantization point whose codes ``value`` carries: itself, or the producer found
    through parameter-free nodes without a quantizer of their own (relu, pooling, pad, …);
    the graph input's name when it reaches the input."""
    while graph[value].op not in QUANT_OPS and graph[value].op != "input":
        value = graph[value].inputs[0]
    return value


def cat_classes(graph: Graph, bits: dict[str, int]) -> list[list[str]]:
    """Quantization points that share one quantizer under ``cat_quant="shared"``: every cat
    with the points whose codes it joins, closed transitively (a DenseNet block is one class).
    A joined value of another code width, or the graph input, keeps its own quantizer (the
    cat rescales it). Classes of two or more members, each in graph order."""
    parent: dict[str, str] = {}

    def find(a: str) -> str:
        while parent.setdefault(a, a) != a:
            a = parent[a]
        return a

    for n in graph:
        if n.op != "cat":
            continue
        for v in n.inputs:
            src = code_source(graph, v)
            if graph[src].op != "input" and bits[src] == bits[n.name]:
                parent[find(src)] = find(n.name)
    classes: dict[str, list[str]] = {}
    for n in graph:
        if n.name in parent:
            classes.setdefault(find(n.name), []).append(n.name)
    return [c for c in classes.values() if len(c) > 1]


def takes_groups(graph: Graph, node: Node, cfg: CalibConfig) -> bool:
    """Whether conv/linear ``node`` learns WAPS groups: a WAPS method, not depthwise, and more
    input units than one tile."""
    units = node.params["weight"].shape[1] * node.attrs.get("groups", 1) // unit_size(graph, node)
    return cfg.uses_waps and not node.is_depthwise and units > cfg.tile


def layer_gammas(graph: Graph, node: Node, cfg: CalibConfig) -> tuple[float, ...]:
    """γ^G of ``node``: the per-layer choice (cfg.layer_gammas, e.g. from a group search),
    else cfg.gammas; (1.0,) when it takes no groups."""
    if not takes_groups(graph, node, cfg):
        return (1.0,)
    return tuple(cfg.layer_gammas.get(node.name, cfg.gammas))


class QuantModel(nn.Module):
    """Fake-quant executor of a fused graph."""

    def __init__(self, graph: Graph, cfg: CalibConfig):
        super().__init__()
        self.graph = graph
        first, last = layer_roles(graph)
        self.first, self.last = first, last
        bits = output_bits(graph, cfg, last)
        self.input_quant = ActQuantizer(bits[graph.input.name])
        self.ops = nn.ModuleDict()
        for n in graph:
            if n.op in PARAM_OPS:
                wb = cfg.first_last_bits if n.name in first | last else cfg.wbits
                gammas = layer_gammas(graph, n, cfg)
                self.ops[key(n.name)] = QuantLayer(n, wb, bits[n.name], unit_size(graph, n),
                                                   list(gammas) if len(gammas) > 1 else None, cfg.group_prob)
            elif n.op in QUANT_OPS:
                self.ops[key(n.name)] = QuantOp(n, bits[n.name])
        # "shared": one quantizer object per class, so fake quantization, export and the
        # compiled cat (then an exact move of codes) all see the same scale
        self.tied = cat_classes(graph, bits) if cfg.cat_quant == "shared" else []
        for members in self.tied:
            shared = self.ops[key(members[-1])].out_quant
            shared.range_fixed = True
            for m in members:
                self.ops[key(m)].out_quant = shared

    def layer(self, name: str) -> QuantLayer | QuantOp:
        return self.ops[key(name)]

    def set_groups(self, gammas: dict[str, tuple[float, ...]], prob: str) -> None:
        """Give the named layers fresh WAPS groups over their γ^G ((1.0,): no groups)."""
        for name, gs in gammas.items():
            layer = self.layer(name)
            layer.groups = ProductGroups(layer.units, list(gs), prob).to(layer.weight.device) if len(gs) > 1 else None

    def quant_points(self) -> dict[str, "QuantLayer | QuantOp"]:
        """Every node with its own output quantizer, in graph order."""
        return {n.name: self.ops[key(n.name)] for n in self.graph if n.op in QUANT_OPS}

    def quant_layers(self) -> dict[str, QuantLayer]:
        return {n.name: self.ops[key(n.name)] for n in self.graph if n.op in PARAM_OPS}

    def set_quant(self, on: bool) -> None:
        self.input_quant.enabled = on and self.input_quant.bits < FLOAT_BITS
        for m in self.ops.values():
            m.quant = on

    def run(self, names: tuple[str, ...] | list[str], env: dict[str, torch.Tensor],
            keep: set[str] | None = None) -> dict[str, torch.Tensor]:
        """Evaluate ``names`` in order reading/writing ``env``; returns env.

        ``keep``: the values wanted afterwards; every other value is dropped from ``env``
        right after its last reader among ``names`` (for no-grad evaluation of large
        chunks, where a block's intermediates would otherwise all live until its end)."""
        last = {}
        if keep is not None:
            for name in names:
                for i in self.graph[name].inputs:
                    last[i] = name
        for name in names:
            n = self.graph[name]
            if n.op in PARAM_OPS:
                env[name] = self.ops[key(name)](env[n.inputs[0]])
            elif n.op in QUANT_OPS:
                env[name] = self.ops[key(name)](*(env[i] for i in n.inputs))
            else:
                env[name] = compute(n, [env[i] for i in n.inputs])
            if keep is not None:
                for i in dict.fromkeys(n.inputs):
                    if last[i] == name and i not in keep:
                        env.pop(i, None)
        return env

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The model's output, or the tuple of its outputs when it returns several."""
        env = {self.graph.input.name: self.input_quant(x)}
        names = [n.name for n in self.graph if n.op != "input"]
        out = self.run(names, env)
        return out[self.graph.output] if len(self.graph.outputs) == 1 else tuple(out[o] for o in self.graph.outputs)
