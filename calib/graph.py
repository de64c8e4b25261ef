"""The layer graph every stage works on: a topologically ordered list of nodes.

A node's output value carries the node's name. Parameters (float tensors) stay on
the node; everything else in a node is JSON-serialisable so the graph can travel
inside a .waps artifact. Ops after capture:

    input                       attrs: shape (C, H, W)
    conv2d  (x)                 params: weight [m, c/groups, kh, kw], bias [m]
                                attrs: stride, padding, dilation, groups, act
    linear  (x)                 params: weight [m, c], bias [m]; attrs: act
    batch_norm (x)              params: mean, var, weight, bias; attrs: eps (folded away)
    relu, relu6 (x)             (fused into the producer where it is the only consumer)
    add     (a, b)              attrs: act
    mul     (a, b)              b equal-shaped or per-channel (C,1,1) against a (C,H,W); attrs: {}
    cat     (x1..xk)            attrs: axis (1: channels of 2-D or 4-D tensors; 2: see below)
    elementwise (x)             attrs: fn ("hardswish", "sigmoid", "silu", "gelu", …) and fn's parameters
    pad     (x)                 attrs: pads [top, left, bottom, right], value (real pad value)
    gather  (x)                 attrs: index (input channels, axis 1): split/chunk/narrow/shuffle
    max_pool2d (x)              attrs: kernel, stride, padding, dilation, ceil_mode
    avg_pool2d (x)              attrs: kernel, stride, padding, ceil_mode, count_include_pad, divisor_override
    adaptive_avg_pool2d (x)     attrs: output_size [oh, ow] (never [1, 1]: that is global_avg_pool)
    global_avg_pool (x)         N×C×H×W → N×C×1×1
    upsample_nearest2d (x)      F.interpolate(mode="nearest"); attrs: size [oh, ow], scales [sh, sw] | None
                                (the output shares the input's quantizer)
    upsample_bilinear2d (x)     mode="bilinear"; attrs: size, scales, align_corners (its own quantizer)
    flatten (x)                 N×C×1×1 or N×C×H×W → N×(C·H·W)
    layer_norm (x)              over the channels (axis 1) of N×C×H×W or N×C (torch's layer norm over
                                the last axis of a channels-last view); params: weight, bias [C] (float,
                                stored in the artifact: NODE_PARAMS); attrs: eps

    matmul  (a, b)              per attention head (attrs heads G, contract, alpha: a float factor,
                                e.g. 1/√d): a [G·K, *pos], b [·, *pos_b] → [G·n, *pos]; contract
                                "channels": out[g·L+j, p] = α·Σ_d a[g·D+d, p]·b[g·D+d, j] (Q·Kᵀ);
                                "positions": out[g·D+d, p] = α·Σ_j a[g·L+j, p]·b[g·D+d, j] (P·V)
    softmax (x)                 over the channels in ``groups`` contiguous groups (one per head)
    constant ()                 params: value [C, H, W] (a class token, a position embedding);
                                broadcast over the batch; its own quantizer
    reshape (x)                 [C, H, W] → [C, H', W'] (``shape``): positions re-laid row-major
    crop    (x)                 attrs: box [top, left, height, width] of the positions (a token select)
    cat     (x1..xk)            attrs: axis 1 (channels) or 2 (positions along H: tokens)

A channels-last linear (over the last axis of a permuted map, or of a transformer's tokens)
is captured as a 1×1 conv2d of the map (calib/layout.channels_last).

Attrs are the calib → compiler interface (issue 13 graph vocabulary): do not rename them.

``act`` is None, "relu" or "relu6": the activation fused into the producer.
``source`` names where the node came from in the user's model (module path).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

PARAM_OPS = ("conv2d", "linear")
OPS = ("input", "conv2d", "linear", "batch_norm", "relu", "relu6", "add", "mul", "cat", "elementwise",
       "pad", "gather", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "global_avg_pool", "flatten",
       "upsample_nearest2d", "upsample_bilinear2d", "layer_norm", "matmul", "softmax", "constant", "reshape",
       "crop")
# ops whose output is a quantization point of its own (an ActQuantizer, art.quant[name])
QUANT_OPS = ("conv2d", "linear", "add", "mul", "cat", "elementwise", "avg_pool2d", "adaptive_avg_pool2d",
             "upsample_bilinear2d", "layer_norm", "matmul", "softmax", "constant")
# float parameters of ops other than the layers, kept as they are (the artifact stores them, the
# compiler derives their integers): op → the names of its params (node_param_shape)
NODE_PARAMS = {"layer_norm": ("weight", "bias"), "constant": ("value",)}


def node_param_shape(node: "Node") -> tuple[int, ...]:
    """The shape of each of ``node``'s NODE_PARAMS: one value per channel, or a constant's whole value."""
    return tuple(node.shape) if node.op == "constant" else tuple(node.shape[:1])


def add_broadcast_ok(full: tuple, part: tuple) -> bool:
    """``part`` broadcasts against ``full`` as an add operand (shapes without the batch): one value
    per channel [C, 1, 1], per position [1, H, W] or per sample [1, 1, 1] of a [C, H, W] tensor."""
    full, part = tuple(full), tuple(part)
    return len(full) == 3 and part != full and part in ((full[0], 1, 1), (1, *full[1:]), (1, 1, 1))


@dataclass
class Node:
    name: str
    op: str
    inputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    source: str = ""
    shape: tuple[int, ...] = ()  # output shape without the batch dimension

    @property
    def is_depthwise(self) -> bool:
        """Depthwise conv: one input channel per group (no product groups apply)."""
        if self.op != "conv2d":
            return False
        return self.params["weight"].shape[1] == 1 and self.attrs["groups"] > 1

    def label(self) -> str:
        return f"{self.name} ({self.source})" if self.source else self.name


@dataclass
class Graph:
    """Nodes in topological order and ``outputs``, the values the model returns in its order
    (a detection backbone returns one per pyramid level; a str is taken as one output);
    ``labels``: the outputs' names in the model's own structure (dict keys and indices, e.g.
    "pool", "feats.1"), one per output, or () where it returns one tensor."""
    nodes: list[Node]
    outputs: tuple[str, ...]
    labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.outputs = (self.outputs,) if isinstance(self.outputs, str) else tuple(self.outputs)
        self.labels = tuple(self.labels)
        if self.labels and len(self.labels) != len(self.outputs):
            raise ValueError(f"{len(self.labels)} output labels for {len(self.outputs)} outputs")
        self._by_name = {n.name: n for n in self.nodes}

    def output_names(self) -> tuple[str, ...]:
        """A name per output: its label, else its value's name."""
        return self.labels or self.outputs

    @property
    def output(self) -> str:
        """The value a single-output model returns (ModelError for a model with several)."""
        if len(self.outputs) != 1:
            from calib.errors import ModelError
            raise ModelError(f"the model returns {len(self.outputs)} tensors; this needs one")
        return self.outputs[0]

    def __getitem__(self, name: str) -> Node:
        return self._by_name[name]

    def __iter__(self):
        return iter(self.nodes)

    @property
    def input(self) -> Node:
        return next(n for n in self.nodes if n.op == "input")

    def consumers(self) -> dict[str, list[str]]:
        """Value name → names of the nodes that read it, in graph order."""
        users: dict[str, list[str]] = {n.name: [] for n in self.nodes}
        for n in self.nodes:
            for i in n.inputs:
                users[i].append(n.name)
        return users

    def layers(self) -> list[Node]:
        return [n for n in self.nodes if n.op in PARAM_OPS]

    def replace(self, nodes: list[Node], outputs: tuple[str, ...] | None = None) -> "Graph":
        """Other nodes (and outputs, renamed by a pass), the same labels."""
        return Graph(nodes, self.outputs if outputs is None else outputs, self.labels)

    def to_json(self) -> list[dict[str, Any]]:
        """Structure only (no parameters): what the artifact stores as its graph."""
        return [{"name": n.name, "op": n.op, "inputs": list(n.inputs), "attrs": n.attrs,
                 "source": n.source, "shape": list(n.shape)} for n in self.nodes]

    @staticmethod
    def from_json(rows: list[dict[str, Any]], outputs: tuple[str, ...] | str, labels=()) -> "Graph":
        nodes = [Node(r["name"], r["op"], list(r["inputs"]), dict(r["attrs"]),
                      {}, r.get("source", ""), tuple(r.get("shape", ()))) for r in rows]
        return Graph(nodes, outputs, tuple(labels))
