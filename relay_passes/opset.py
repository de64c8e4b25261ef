"""The op set of the integer program: every kind declared once, with how it treats channels
and a random small case that the conformance test runs on every backend.

A kind's attributes are one frozen dataclass (``OpKind.attrs``, relay_passes/attrs.py: what
the op computes, apart from its tensors and its Schedule). Its meaning is its NumPy reference
(relay_passes/reference.py); each backend has one
table from kind to handler (reference.OPS, kernels.KERNELS, codegen/c/emit.CALLS,
codegen/c/byoc.ENTRIES, codegen/npu16/lower.LOWERINGS, targets/npu16/report.ESTIMATES,
waps_tvm/inspect.RENDER). A question about a kind ("is it a layer with weights?") is asked
of its declaration here (``is_layer``), never by listing kind names.
tests/relay_passes/test_op_conformance.py checks that every table covers ``KINDS`` and runs
each kind's ``example`` on every backend against the reference, so a new kind is tested
everywhere by registering it here.

Channel rules (what PermuteChannels may do across an op):
    LAYER        conv2d/linear: emits its output channels in any order (rows permuted)
    CHANNELWISE  output channel c depends only on input channel c of each input: an order
                 of the output is the order of its inputs (one class)
    PINNED       mixes or selects channels (concat, gather), reads floats, or makes channels
                 of its own (constant): its inputs and output keep the identity order
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum
from typing import Callable

import numpy as np

from calib.numerics import GroupScale, code_table, layer_norm_constants, quantize_multiplier, softmax_constants
from relay_passes.attrs import (AddAttrs, Attrs, AvgPoolAttrs, ConcatAttrs, ConstantAttrs, ConvAttrs, CropAttrs,
                                DequantizeAttrs, FlattenAttrs, GatherAttrs, LayerNormAttrs, LinearAttrs, MatmulAttrs,
                                MaxPoolAttrs, MulAttrs, PadAttrs, QuantizeAttrs, ReshapeAttrs, ResizeAttrs,
                                SoftmaxAttrs, SumPoolAttrs, TableAttrs)
from relay_passes.program import INPUT, Op, Program
from relay_passes.resize import resize_op


class Channels(Enum):
    LAYER = "layer"
    CHANNELWISE = "channelwise"
    PINNED = "pinned"


@dataclass(frozen=True)
class OpKind:
    name: str
    attrs: type[Attrs]         # its attributes' dataclass (Op.attrs)
    channels: Channels
    example: Callable[[np.random.Generator], Program]     # a random small program using the kind


# ---------------------------------------------------------------- example programs

def _program(shape, ops: list[Op], out: str, z_out: int = 0, scale: float = 0.05) -> Program:
    """quantize → ops → dequantize of ``out``; the first op reads the quantize ``q``."""
    q = Op("quantize", "q", [INPUT], QuantizeAttrs(scale=0.02, zero_point=128, qmax=255))
    deq = Op("dequantize", "deq", [out], DequantizeAttrs(scale=scale, zero_point=z_out), dtype="float32")
    return Program(tuple(shape), [q, *ops, deq], ["deq", out])


def _requant(rng, real: float, m: int) -> tuple[np.ndarray, np.ndarray]:
    mult, shift = quantize_multiplier(real * rng.uniform(0.5, 1.5, m))
    return mult.astype(np.int32), shift.astype(np.int32)


def _layer_params(rng, m: int, fan: int, wshape, n_groups: int) -> tuple[dict, dict]:
    w = rng.integers(-8, 8, wshape).astype(np.int8)
    mult, shift = _requant(rng, 0.5 / (fan * 8), m)
    params = {"w": w, "bias": rng.integers(-500, 500, m).astype(np.int32), "mult": mult, "shift": shift}
    attrs = dict(z_in=128, z_out=int(rng.integers(0, 256)), lo=0, hi=255, in_qmax=255, frac=4, layer="example")
    if n_groups > 1:
        params["groups"] = rng.integers(0, n_groups, fan).astype(np.int8)
        drawn = [(int(rng.integers(-1, 2)), int(rng.integers(1, 6))) for _ in range(n_groups)]
        attrs["group_scales"] = tuple(GroupScale(s, n if s else 0) for s, n in drawn)
    return attrs, params


def _conv2d(rng) -> Program:
    c = int(rng.choice([3, 8, 20]))
    depthwise = rng.random() < 0.3
    m, cg, g = (c, 1, c) if depthwise else (int(rng.integers(4, 24)), c, 1)
    k = int(rng.choice([1, 3]))
    attrs, params = _layer_params(rng, m, c, (m, cg, k, k), 1 if depthwise or c < 8 else int(rng.integers(1, 4)))
    attrs = ConvAttrs(**attrs, stride=(int(rng.integers(1, 3)),) * 2, padding=(k // 2, k // 2), dilation=(1, 1),
                      conv_groups=g)
    extra = int(rng.integers(0, 3))           # read through a gather: a permutation (extra = 0) or a selection
    index = rng.permutation(c + extra)[:c].astype(np.int32)
    gather = Op("gather", "pick", ["q"], GatherAttrs(), {"index": index})
    return _program((2, c + extra, 9, 7), [gather, Op("conv2d", "op", ["pick"], attrs, params)], "op", attrs.z_out)


def _linear(rng) -> Program:
    f, m = int(rng.integers(8, 40)), int(rng.integers(3, 20))
    attrs, params = _layer_params(rng, m, f, (m, f), int(rng.integers(1, 4)))
    attrs = LinearAttrs(**attrs)
    flat = Op("flatten", "flat", ["q"])
    return _program((2, f, 1, 1), [flat, Op("linear", "op", ["flat"], attrs, params)], "op", attrs.z_out)


def _add(rng) -> Program:
    """Equal shapes, or a broadcast second operand: one value per channel (a global max pool, or
    the int32 sums of a global sum pool), per position or per sample (max pools over channels)."""
    ka, kb = (int(v) for v in rng.integers(1 << 20, 1 << 23, 2))
    attrs = AddAttrs(za=128, zb=128, ka=ka, kb=kb, t=22, z_out=100, lo=100, hi=255)
    mode = ["same", "channel", "channel_sums", "position", "sample"][int(rng.integers(0, 5))]
    if mode == "same":
        ops = [Op("max_pool2d", "b", ["q"], MaxPoolAttrs(kernel=(3, 3), stride=(1, 1), padding=(1, 1)))]
        return _program((2, 5, 6, 6), [*ops, Op("add", "op", ["q", "b"], attrs)], "op", 100)
    if mode == "channel_sums":               # 36 codes summed: kb carries the 1/36
        attrs = replace(attrs, zb=128 * 36, kb=kb // 36)
        ops = [Op("sum_pool2d", "b", ["q"], SumPoolAttrs(kernel=(6, 6), stride=(1, 1), padding=(0, 0), z_in=128),
                  dtype="int32")]
    elif mode == "channel":
        ops = [Op("max_pool2d", "b", ["q"], MaxPoolAttrs(kernel=(6, 6), stride=(6, 6), padding=(0, 0)))]
    else:                                    # max over channels: gather one channel, or pool it to one value
        ops = [Op("gather", "b", ["q"], GatherAttrs(), {"index": np.array([int(rng.integers(0, 5))], np.int32)})]
        if mode == "sample":
            ops.append(Op("max_pool2d", "b1", ["b"], MaxPoolAttrs(kernel=(6, 6), stride=(6, 6), padding=(0, 0))))
    return _program((2, 5, 6, 6), [*ops, Op("add", "op", ["q", ops[-1].name], attrs)], "op", 100)


def _max_pool2d(rng) -> Program:
    k = int(rng.integers(2, 4))
    d = int(rng.integers(1, 3))
    attrs = MaxPoolAttrs(kernel=(k, k), stride=(int(rng.integers(1, 3)),) * 2, padding=(k // 2, 0), dilation=(d, 1))
    return _program((2, 3, 9, 8), [Op("max_pool2d", "op", ["q"], attrs)], "op", 128)


def _sum_pool2d(rng) -> Program:
    attrs = SumPoolAttrs(kernel=(3, 2), stride=(2, 1), padding=(1, 0), z_in=128)
    return _program((2, 3, 7, 6), [Op("sum_pool2d", "op", ["q"], attrs, dtype="int32")], "op", 128 * 6, 0.02 / 6)


def _avg_pool2d(rng) -> Program:
    """Adaptive-pooling windows: overlapping, of varying size, one divisor per distinct count."""
    h, w, oh, ow = 7, 5, int(rng.integers(1, 5)), int(rng.integers(1, 7))
    h0 = (np.arange(oh) * h) // oh
    h1 = -((-(np.arange(oh) + 1) * h) // oh)
    w0 = (np.arange(ow) * w) // ow
    w1 = -((-(np.arange(ow) + 1) * w) // ow)
    counts = (h1 - h0)[:, None] * (w1 - w0)[None, :]
    distinct, rq = np.unique(counts, return_inverse=True)
    mult, shift = quantize_multiplier(0.02 / (0.03 * distinct))
    params = {"h0": h0.astype(np.int32), "h1": h1.astype(np.int32), "w0": w0.astype(np.int32),
              "w1": w1.astype(np.int32), "rq": rq.reshape(oh, ow).astype(np.int32),
              "mult": mult.astype(np.int32), "shift": shift.astype(np.int32)}
    attrs = AvgPoolAttrs(z_in=128, z_out=120, lo=0, hi=255)
    return _program((2, 3, h, w), [Op("avg_pool2d", "op", ["q"], attrs, params)], "op", 120, 0.03)


def _pad(rng) -> Program:
    pads = [int(v) for v in rng.integers(0, 3, 4)]
    return _program((1, 2, 4, 5), [Op("pad", "op", ["q"], PadAttrs(pads=pads, value=128))], "op", 128)


def _concat(rng) -> Program:
    """Three concats in a chain, along the channels, rows and columns in a drawn order, each of
    two or three inputs of different sizes along its axis: max pools of the previous result that
    keep the map (then a channel selection, axis 1) or shrink the axis by 2i."""
    ops, src, c = [], "q", 3
    for stage, axis in enumerate(int(v) for v in rng.permutation([1, 2, 3])):
        k = int(rng.integers(2, 4))
        parts = []
        for i in range(k):
            kernel, padding = [((2 * i + 1,) * 2, (i, i)), ((2 * i + 1, 1), (0, 0)),
                               ((1, 2 * i + 1), (0, 0))][axis - 1]
            ops.append(Op("max_pool2d", f"b{stage}{i}", [src], MaxPoolAttrs(kernel=kernel, stride=(1, 1),
                                                                             padding=padding)))
            if axis == 1:
                index = rng.permutation(c)[:int(rng.integers(1, c + 1))].astype(np.int32)
                ops.append(Op("gather", f"g{stage}{i}", [f"b{stage}{i}"], GatherAttrs(), {"index": index}))
            parts.append(ops[-1].name)
        if axis == 1:
            c = sum(o.params["index"].size for o in ops if o.name in parts)
        ks = [int(v) for v in rng.integers(1 << 14, 1 << 17, k)]
        zs = [int(v) for v in rng.integers(40, 200, k)]
        src = "op" if stage == 2 else f"c{stage}"
        ops.append(Op("concat", src, parts, ConcatAttrs(zs=zs, ks=ks, t=16, z_out=60, lo=0, hi=255, axis=axis)))
    return _program((2, 3, 5, 5), ops, "op", 60)


def _constant(rng) -> Program:
    """Codes drawn at random: a ViT's position embedding added to a map, then a class token
    concatenated before its rows; or returned as they are (the program's output is a constant)."""
    c, h, w = 3, int(rng.integers(1, 5)), int(rng.integers(1, 5))
    if rng.random() < 0.4:
        codes = rng.integers(0, 256, (c, h, w)).astype(np.uint8)
        return _program((2, c, h, w), [Op("constant", "op", ["q"], ConstantAttrs(), {"codes": codes})], "op", 128)
    ka, kb = (int(v) for v in rng.integers(1 << 20, 1 << 23, 2))
    ks = [int(v) for v in rng.integers(1 << 14, 1 << 17, 2)]
    ops = [Op("constant", "pos", ["q"], ConstantAttrs(), {"codes": rng.integers(0, 256, (c, h, w)).astype(np.uint8)}),
           Op("add", "sum", ["q", "pos"], AddAttrs(za=128, zb=int(rng.integers(0, 256)), ka=ka, kb=kb, t=22,
                                                   z_out=100, lo=0, hi=255)),
           Op("constant", "token", ["sum"], ConstantAttrs(),
              {"codes": rng.integers(0, 256, (c, 1, w)).astype(np.uint8)}),
           Op("concat", "op", ["token", "sum"], ConcatAttrs(zs=(int(rng.integers(0, 256)), 100), ks=ks, t=16,
                                                           z_out=60, lo=0, hi=255, axis=2))]
    return _program((2, c, h, w), ops, "op", 60)


def _reshape(rng) -> Program:
    """Three reshapes in a drawn order, to H·W × 1, 1 × H·W and a drawn factorisation, each
    followed by a 3×3 max pool that reads the new layout."""
    h, w = int(rng.integers(2, 5)), int(rng.integers(1, 5))
    hw = h * w
    divisors = [d for d in range(1, hw + 1) if hw % d == 0]
    a = int(rng.choice(divisors))
    targets = [(hw, 1), (1, hw), (a, hw // a)]
    ops, src = [], "q"
    for i, j in enumerate(rng.permutation(3)):
        last = i == 2
        ops.append(Op("reshape", "op" if last else f"r{i}", [src], ReshapeAttrs(shape=(3, *targets[j]))))
        if not last:
            ops.append(Op("max_pool2d", f"p{i}", [f"r{i}"], MaxPoolAttrs(kernel=(3, 3), stride=(1, 1),
                                                                       padding=(1, 1))))
            src = f"p{i}"
    return _program((2, 3, h, w), ops, "op", 128)


def _crop(rng) -> Program:
    """The full map, a 3×3 max pool of it, a drawn box of that, and a 1×1 box of the box."""
    h, w = 6, 5
    top, left = int(rng.integers(0, h)), int(rng.integers(0, w))
    bh, bw = int(rng.integers(1, h - top + 1)), int(rng.integers(1, w - left + 1))
    ops = [Op("crop", "full", ["q"], CropAttrs(top=0, left=0, height=h, width=w)),
           Op("max_pool2d", "pool", ["full"], MaxPoolAttrs(kernel=(3, 3), stride=(1, 1), padding=(1, 1))),
           Op("crop", "box", ["pool"], CropAttrs(top=top, left=left, height=bh, width=bw)),
           Op("crop", "op", ["box"], CropAttrs(top=int(rng.integers(0, bh)), left=int(rng.integers(0, bw)),
                                                height=1, width=1))]
    return _program((2, 3, h, w), ops, "op", 128)


def _table(rng) -> Program:
    fn = [lambda x: x * np.clip(x + 3, 0, 6) / 6, lambda x: 1 / (1 + np.exp(-x)), np.tanh][int(rng.integers(0, 3))]
    table = code_table(fn, 0.02, 128, 255, 0.01, 40, 255)
    return _program((2, 3, 4, 4), [Op("table", "op", ["q"], TableAttrs(), {"table": table})], "op", 40, 0.01)


def _layer_norm(rng) -> Program:
    """Over the channels of a map, of the int32 sums of its global pool (a ConvNeXt head norms
    them) and of features after a flatten; one channel is a zero variance everywhere (only e
    keeps the root positive)."""
    c = int(rng.choice([1, 3, 16, 40]))

    def norm(name, src, in_scale, in_qmax, z_out):
        nc = layer_norm_constants(rng.normal(1, 0.5, c), rng.normal(0, 0.5, c),
                                  float(rng.choice([1e-5, 1e-6, 0.0])), in_scale, in_qmax, 0.03)
        attrs = LayerNormAttrs(prec=nc.p, eps=nc.e, frac=nc.k, z_out=z_out, lo=0, hi=255)
        return Op("layer_norm", name, [src], attrs, {"g": nc.g, "b": nc.b})

    z_out = int(rng.integers(100, 156))
    ops = [norm("map", "q", 0.02, 255, 128),
           Op("sum_pool2d", "sums", ["map"], SumPoolAttrs(kernel=(5, 4), stride=(1, 1), padding=(0, 0), z_in=128),
              dtype="int32"),
           norm("pooled", "sums", 0.03 / 20, 255 * 20, 120),
           Op("sum_pool2d", "one", ["pooled"], SumPoolAttrs(kernel=(1, 1), stride=(1, 1), padding=(0, 0), z_in=120),
              dtype="int32"),                # int32 sums of one code each: wide by dtype, not by range
           norm("pooled1", "one", 0.03, 255, 125), Op("flatten", "flat", ["pooled1"]),
           norm("op", "flat", 0.03, 255, z_out)]
    return _program((2, c, 5, 4), ops, "op", z_out, 0.03)


def _softmax(rng) -> Program:
    """Over the channels of a map (attention scores: keys as channels, queries as positions) in
    one group or one per head; an A4 softmax of an A8 one's output; ties for the maximum (a
    channel drawn twice)."""
    heads = int(rng.choice([1, 2, 3]))
    keys = int(rng.choice([1, 5, 17]))
    k8 = softmax_constants(0.02, 255, 1 / 255)
    k4 = softmax_constants(1 / 255, 255, 1 / 15)
    ops = [Op("gather", "dup", ["q"], GatherAttrs(), {"index": np.repeat(np.arange(heads * keys // 2 + 1),
                                                                         2)[:heads * keys].astype(np.int32)}),
           Op("softmax", "probs", ["dup"], SoftmaxAttrs(groups=heads, mult=k8.r, frac=k8.k, z_out=0, lo=0, hi=255),
              {"exp": k8.table}),
           Op("softmax", "op", ["probs"], SoftmaxAttrs(groups=heads, mult=k4.r, frac=k4.k, z_out=0, lo=0, hi=15),
              {"exp": k4.table})]
    return _program((2, heads * keys, 3, 2), ops, "op", 0, 1 / 15)


def _matmul(rng) -> Program:
    """Attention in G heads: scores = Q·Kᵀ (contract "channels": q's positions against k's
    L = 2·3 pooled positions, L ≠ P = 4·6), then probs·V (contract "positions") of the scores
    themselves or of their per-head softmax; Q, K, V are channel selections of q (V with its
    own head size) and K, V are max-pooled to L positions (V's zero point near its pooled codes)."""
    heads = int(rng.choice([1, 2, 3]))
    d, dv = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    c = 8

    def pick(name, count):
        return Op("gather", name, ["q"], GatherAttrs(), {"index": rng.integers(0, c, count).astype(np.int32)})

    def pool(name, src):
        return Op("max_pool2d", name, [src], MaxPoolAttrs(kernel=(3, 2), stride=(2, 2), padding=(1, 0)))

    def requant(real):
        mult, shift = quantize_multiplier(np.array([real]))
        return {"mult": int(mult[0]), "shift": int(shift[0])}

    zs = int(rng.integers(100, 156))
    scores = MatmulAttrs(heads=heads, contract="channels", za=128, zb=128, z_out=zs, lo=0, hi=255,
                         **requant(rng.uniform(0.5, 2) / (240 * np.sqrt(d))))
    ops = [pick("qs", heads * d), pick("ks", heads * d), pool("kp", "ks"), pick("vs", heads * dv), pool("vp", "vs"),
           Op("matmul", "scores", ["qs", "kp"], scores)]
    if rng.random() < 0.5:
        k8 = softmax_constants(0.05, 255, 1 / 255)
        ops.append(Op("softmax", "probs", ["scores"], SoftmaxAttrs(groups=heads, mult=k8.r, frac=k8.k, z_out=0,
                                                                   lo=0, hi=255), {"exp": k8.table}))
        za, real = 0, 1 / 255
    else:
        za, real = zs, 1 / (40 * 6)
    z_out = int(rng.integers(100, 156))
    out = MatmulAttrs(heads=heads, contract="positions", za=za, zb=int(rng.integers(170, 230)), z_out=z_out,
                      lo=0, hi=255, **requant(real * rng.uniform(0.5, 2)))
    ops.append(Op("matmul", "op", [ops[-1].name, "vp"], out))
    return _program((2, c, 4, 6), ops, "op", z_out, 0.02)


def _mul(rng) -> Program:
    mult, shift = quantize_multiplier(np.array([0.02 * 0.02 / 0.01 * rng.uniform(0.5, 2)]))
    gate = Op("max_pool2d", "gate", ["q"], MaxPoolAttrs(kernel=(4, 4), stride=(4, 4), padding=(0, 0)))
    attrs = MulAttrs(za=128, zb=int(rng.integers(0, 256)), mult=int(mult[0]), shift=int(shift[0]), z_out=128, lo=0,
                     hi=255)
    return _program((2, 3, 4, 4), [gate, Op("mul", "op", ["q", "gate"], attrs)], "op", 128, 0.01)


def _resize(rng) -> Program:
    """A nearest resize then a bilinear one: up or down, by size or by a non-integer scale."""
    def target(hw):
        if rng.random() < 0.5:
            sf = float(rng.choice([0.5, 0.7, 1.5, 1.7, 2.0, 2.5, 3.0]))
            return tuple(max(1, int(np.floor(n * sf))) for n in hw), (sf, sf)
        return tuple(int(v) for v in rng.integers(1, 12, 2)), None
    hw = (int(rng.integers(2, 8)), int(rng.integers(2, 8)))
    mid, sc = target(hw)
    near = resize_op("near", "q", hw, mid, "nearest", False, sc, 0.02, 128, 0.02, 128)
    out, sc2 = target(mid)
    z_out = int(rng.integers(60, 200))
    op = resize_op("op", "near", mid, out, "bilinear", bool(rng.integers(0, 2)), sc2, 0.02, 128,
                   0.02 * rng.uniform(0.6, 1.5), z_out)
    return _program((2, 3, *hw), [near, op], "op", z_out, 0.02)


def _flatten(rng) -> Program:
    return _program((2, 3, 2, 2), [Op("flatten", "op", ["q"])], "op", 128)


def _gather(rng) -> Program:
    index = rng.permutation(6)[: int(rng.integers(1, 7))].astype(np.int32)
    return _program((2, 6, 3, 2), [Op("gather", "op", ["q"], GatherAttrs(), {"index": index})], "op", 128)


def _quantize(rng) -> Program:
    return _program((2, 3, 3, 3), [], "q", 128, 0.02)


KINDS: dict[str, OpKind] = {k.name: k for k in [
    OpKind("quantize", QuantizeAttrs, Channels.PINNED, _quantize),
    OpKind("dequantize", DequantizeAttrs, Channels.PINNED, _quantize),
    OpKind("conv2d", ConvAttrs, Channels.LAYER, _conv2d),
    OpKind("linear", LinearAttrs, Channels.LAYER, _linear),
    OpKind("add", AddAttrs, Channels.CHANNELWISE, _add),
    OpKind("mul", MulAttrs, Channels.CHANNELWISE, _mul),
    OpKind("max_pool2d", MaxPoolAttrs, Channels.CHANNELWISE, _max_pool2d),
    OpKind("sum_pool2d", SumPoolAttrs, Channels.CHANNELWISE, _sum_pool2d),
    OpKind("avg_pool2d", AvgPoolAttrs, Channels.CHANNELWISE, _avg_pool2d),
    OpKind("pad", PadAttrs, Channels.CHANNELWISE, _pad),
    OpKind("table", TableAttrs, Channels.CHANNELWISE, _table),
    OpKind("resize", ResizeAttrs, Channels.CHANNELWISE, _resize),
    OpKind("flatten", FlattenAttrs, Channels.CHANNELWISE, _flatten),
    OpKind("concat", ConcatAttrs, Channels.PINNED, _concat),
    OpKind("layer_norm", LayerNormAttrs, Channels.PINNED, _layer_norm),
    OpKind("softmax", SoftmaxAttrs, Channels.PINNED, _softmax),
    OpKind("matmul", MatmulAttrs, Channels.PINNED, _matmul),
    OpKind("gather", GatherAttrs, Channels.PINNED, _gather),
    OpKind("constant", ConstantAttrs, Channels.PINNED, _constant),
    OpKind("reshape", ReshapeAttrs, Channels.CHANNELWISE, _reshape),
    OpKind("crop", CropAttrs, Channels.CHANNELWISE, _crop),
]}


def kind(name: str) -> OpKind:
    if name not in KINDS:
        raise KeyError(f"unknown integer op kind {name!r}")
    return KINDS[name]


def is_layer(op: Op) -> bool:
    """A layer with weights (conv2d, linear): WAPS groups, int32 accumulator, requant epilogue."""
    return kind(op.kind).channels is Channels.LAYER
