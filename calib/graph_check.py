"""Attribute checks for the ops of the calib → compiler graph vocabulary.

One function per op family, each raising ArtifactError with the node's name: a
.waps file whose graph the compiler would misread is refused at load time.
"""
from __future__ import annotations

import math
from typing import Any

from calib.errors import ArtifactError
from calib.graph import OPS, Node, add_broadcast_ok

ELEMENTWISE_PARAMS = {  # fn → required float/str attrs besides "fn"
    "hardswish": (), "hardsigmoid": (), "sigmoid": (), "silu": (), "tanh": (), "mish": (),
    "gelu": ("approximate",), "leaky_relu": ("negative_slope",), "elu": ("alpha", "scale", "input_scale"),
    "softplus": ("beta", "threshold"), "hardtanh": ("min_val", "max_val"),
}


def _ints(v: Any, n: int, lo: int) -> bool:
    return isinstance(v, list) and len(v) == n and all(isinstance(x, int) and not isinstance(x, bool) and x >= lo
                                                       for x in v)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_node(n: Node, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """Raise ArtifactError if ``n``'s op is unknown or its attrs/inputs break the vocabulary."""
    a = n.attrs

    def bad(what: str) -> ArtifactError:
        return ArtifactError(f"{where}: node '{n.name}' ({n.op}) {what}")

    if n.op not in OPS or n.op == "batch_norm":
        raise bad("is not an op of the graph vocabulary")
    if n.op in ("max_pool2d", "avg_pool2d"):
        if not (_ints(a.get("kernel"), 2, 1) and _ints(a.get("stride"), 2, 1) and _ints(a.get("padding"), 2, 0)):
            raise bad("needs kernel/stride ≥ 1 and padding ≥ 0 pairs")
        if not _ints(a.get("dilation", [1, 1]), 2, 1) or not isinstance(a.get("ceil_mode", False), bool):
            raise bad("has an invalid dilation or ceil_mode")
        if not isinstance(a.get("count_include_pad", True), bool):
            raise bad("has an invalid count_include_pad")
        div = a.get("divisor_override")
        if div is not None and not (isinstance(div, int) and div > 0):
            raise bad("has an invalid divisor_override")
    elif n.op == "adaptive_avg_pool2d":
        if not _ints(a.get("output_size"), 2, 1):
            raise bad("needs output_size [oh, ow] ≥ 1")
    elif n.op in ("upsample_nearest2d", "upsample_bilinear2d"):
        sc = a.get("scales")
        if not _ints(a.get("size"), 2, 1) or not (sc is None or (isinstance(sc, list) and len(sc) == 2 and
                                                                  all(_finite(v) and v > 0 for v in sc))):
            raise bad("needs size [oh, ow] ≥ 1 and scales None or two positive numbers")
        if n.op == "upsample_bilinear2d" and not isinstance(a.get("align_corners"), bool):
            raise bad("needs a boolean align_corners")
    elif n.op == "pad":
        if not _ints(a.get("pads"), 4, 0) or not _finite(a.get("value")):
            raise bad("needs pads [top, left, bottom, right] ≥ 0 and a finite value")
    elif n.op == "gather":
        idx = a.get("index")
        c = shapes[n.inputs[0]][0] if shapes.get(n.inputs[0]) else None
        if not _ints(idx, len(idx) if isinstance(idx, list) else -1, 0) or not idx or \
                (c is not None and max(idx) >= c):
            raise bad("needs a non-empty index of input channels")
    elif n.op == "layer_norm":
        if not _finite(a.get("eps")) or a["eps"] < 0:
            raise bad("needs a finite eps ≥ 0")
    elif n.op == "cat":
        if a.get("axis") not in (1, 2) or len(n.inputs) < 2:
            raise bad("needs axis 1 or 2 and two or more inputs")
    elif n.op == "matmul":
        g = a.get("heads")
        if len(n.inputs) != 2 or not (isinstance(g, int) and g >= 1) or a.get("contract") not in \
                ("channels", "positions") or not _finite(a.get("alpha")):
            raise bad("needs two inputs, heads ≥ 1, contract 'channels' or 'positions' and a finite alpha")
        sa, sb = shapes.get(n.inputs[0]), shapes.get(n.inputs[1])
        if sa and sb and (sa[0] % g or sb[0] % g):
            raise bad(f"has inputs of {sa[0]} and {sb[0]} channels, not {g} heads")
    elif n.op == "softmax":
        g, sx = a.get("groups"), shapes.get(n.inputs[0]) if n.inputs else None
        if not (isinstance(g, int) and g >= 1) or (sx and sx[0] % g):
            raise bad("needs groups ≥ 1 dividing the channels")
    elif n.op == "constant":
        if n.inputs or len(n.shape) != 3:
            raise bad("needs no inputs and a [C, H, W] shape")
    elif n.op == "reshape":
        sx = shapes.get(n.inputs[0]) if n.inputs else None
        if len(n.shape) != 3 or (sx and (sx[0] != n.shape[0] or math.prod(sx) != math.prod(n.shape))):
            raise bad("needs a [C, H, W] shape of the input's channels and size")
    elif n.op == "crop":
        box, sx = a.get("box"), shapes.get(n.inputs[0]) if n.inputs else None
        if not _ints(box, 4, 0) or box[2] < 1 or box[3] < 1 or \
                (sx and (len(sx) != 3 or box[0] + box[2] > sx[1] or box[1] + box[3] > sx[2])):
            raise bad("needs a box [top, left, height, width] inside the input's positions")
    elif n.op == "elementwise":
        fn = a.get("fn")
        if fn not in ELEMENTWISE_PARAMS:
            raise bad(f"has unknown fn {fn!r}")
        for p in ELEMENTWISE_PARAMS[fn]:
            ok = isinstance(a.get(p), str) if p == "approximate" else _finite(a.get(p))
            if not ok:
                raise bad(f"lacks a valid {p}")
    elif n.op in ("add", "mul"):
        if len(n.inputs) != 2:
            raise bad("needs two inputs")
        sa, sb = shapes.get(n.inputs[0]), shapes.get(n.inputs[1])
        if sa and sb and not (sa == sb or (len(sa) == 3 and sb == (sa[0], 1, 1)) or
                              (n.op == "add" and (add_broadcast_ok(sa, sb) or add_broadcast_ok(sb, sa)))):
            raise bad(f"cannot broadcast {sb} against {sa}")
