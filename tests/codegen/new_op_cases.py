"""Random small programs around one op of the new kinds (pad, dilated max_pool2d, avg_pool2d,
concat, table, mul, resize, matmul, softmax, layer_norm), built by hand (shapes and dtypes filled in, no Relax): quantize (scale 1,
zero 0, so integer inputs are their own codes) → helper ops making the op's inputs (gathers,
a global max pool for a broadcast operand) → the op → dequantize.

``case(kind, seed)`` → (program, the op, float32 input). Backends are held to
relay_passes.reference.run on them.
"""
from __future__ import annotations

import numpy as np

from calib.numerics import layer_norm_constants, softmax_constants
from relay_passes.attrs import (AvgPoolAttrs, ConcatAttrs, DequantizeAttrs, LayerNormAttrs, MatmulAttrs, MaxPoolAttrs,
                                MulAttrs, PadAttrs, QuantizeAttrs, ResizeAttrs, SoftmaxAttrs, SumPoolAttrs)
from relay_passes.program import INPUT, Op, Program

KINDS = ("pad", "max_pool2d", "avg_pool2d", "concat", "table", "mul", "resize", "matmul", "softmax", "layer_norm")


def _clamp_range(rng) -> tuple[int, int]:
    lo, hi = sorted(int(v) for v in rng.integers(0, 256, 2))
    return (lo, hi) if rng.random() < 0.6 else (0, 255)


def _mult(rng) -> int:
    return int(rng.integers(2**30, 2**31))


def _program(input_shape, ops: list[Op], qmax: int = 255) -> Program:
    q = Op("quantize", "q", [INPUT], QuantizeAttrs(scale=1.0, zero_point=0.0, qmax=qmax), shape=tuple(input_shape))
    last = ops[-1]
    dq = Op("dequantize", "dq", [last.name], DequantizeAttrs(scale=0.5, zero_point=3.0), shape=last.shape,
            dtype="float32")
    return Program(tuple(input_shape), [q, *ops, dq], ["dq", last.name])


def _gather(name: str, src: str, index, shape) -> Op:
    index = np.asarray(index, np.int32)
    return Op("gather", name, [src], params={"index": index}, shape=(shape[0], index.size, *shape[2:]))


def case(kind: str, seed: int):
    rng = np.random.default_rng([seed, KINDS.index(kind)])
    n = int(rng.integers(1, 3))
    qmax = 255
    if kind == "pad":
        c, h, w = (int(v) for v in rng.integers(1, 7, 3))
        pads = [int(v) for v in rng.integers(0, 4, 4)]
        top, left, bottom, right = pads
        op = Op("pad", "op", ["q"], PadAttrs(pads=pads, value=int(rng.integers(0, 256))),
                shape=(n, c, h + top + bottom, w + left + right))
        shape, ops = (n, c, h, w), [op]
    elif kind == "max_pool2d":
        c = int(rng.integers(1, 4))
        kh, kw = (int(v) for v in rng.integers(1, 4, 2))
        dh, dw = (int(v) for v in rng.integers(1, 4, 2)) if rng.random() < 0.8 else (1, 1)
        sh, sw = (int(v) for v in rng.integers(1, 4, 2))
        ph, pw = int(rng.integers(0, kh // 2 + 1)), int(rng.integers(0, kw // 2 + 1))
        h = int(rng.integers(max(1, dh * (kh - 1) + 1 - 2 * ph), 9))
        w = int(rng.integers(max(1, dw * (kw - 1) + 1 - 2 * pw), 9))
        oh, ow = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        attrs = MaxPoolAttrs(kernel=[kh, kw], stride=[sh, sw], padding=[ph, pw], dilation=[dh, dw])
        shape, ops = (n, c, h, w), [Op("max_pool2d", "op", ["q"], attrs, shape=(n, c, oh, ow))]
    elif kind == "avg_pool2d":
        c, h, w = int(rng.integers(1, 4)), int(rng.integers(1, 8)), int(rng.integers(1, 8))
        oh, ow = int(rng.integers(1, 5)), int(rng.integers(1, 5))
        h0 = rng.integers(0, h, oh)
        h1 = np.minimum(h0 + rng.integers(0 if rng.random() < 0.2 else 1, h + 1, oh), h)
        w0 = rng.integers(0, w, ow)
        w1 = np.minimum(w0 + rng.integers(1, w + 1, ow), w)
        d = int(rng.integers(1, 5))
        params = {"h0": h0.astype(np.int32), "h1": h1.astype(np.int32), "w0": w0.astype(np.int32),
                  "w1": w1.astype(np.int32), "rq": rng.integers(0, d, (oh, ow)).astype(np.int32),
                  "mult": rng.integers(2**30, 2**31, d).astype(np.int32),
                  "shift": rng.integers(-3, 8, d).astype(np.int32)}
        lo, hi = _clamp_range(rng)
        attrs = AvgPoolAttrs(z_in=int(rng.integers(0, 256)), z_out=int(rng.integers(0, 256)), lo=lo, hi=hi)
        shape, ops = (n, c, h, w), [Op("avg_pool2d", "op", ["q"], attrs, params, shape=(n, c, oh, ow))]
    elif kind == "concat":
        k = int(rng.integers(1, 5))
        c_total = 6
        spatial = () if rng.random() < 0.3 else tuple(int(v) for v in rng.integers(1, 5, 2))
        shape = (n, c_total, *spatial)
        ops = [_gather(f"g{i}", "q", rng.integers(0, c_total, int(rng.integers(1, 5))), shape) for i in range(k)]
        t = int(rng.integers(1, 41))
        # extreme scale ratios: k up to 2^40 (|(x − z)·k| < 2^48), or tiny against a large t
        ks = [int(rng.choice([1, 2**t, 2**31 - 1, 2**40, int(rng.integers(1, 2**20)), 3 * 2**(t - 1)]))
              for _ in range(k)]
        lo, hi = _clamp_range(rng)
        attrs = ConcatAttrs(zs=[int(v) for v in rng.integers(0, 256, k)], ks=ks, t=t,
                            z_out=int(rng.integers(0, 256)), lo=lo, hi=hi)
        c_out = sum(o.shape[1] for o in ops)
        ops.append(Op("concat", "op", [o.name for o in ops], attrs, shape=(n, c_out, *spatial)))
    elif kind == "table":
        bits = int(rng.integers(2, 9))
        qmax = 2**bits - 1
        spatial = () if rng.random() < 0.3 else tuple(int(v) for v in rng.integers(1, 6, 2))
        shape = (n, int(rng.integers(1, 5)), *spatial)
        table = rng.integers(0, 256, 2**bits).astype(np.uint8)
        ops = [Op("table", "op", ["q"], params={"table": table}, shape=shape)]
    elif kind == "mul":
        c = int(rng.integers(1, 5))
        form = rng.choice(["same", "broadcast", "2d"])
        if form == "2d":
            shape = (n, c)
            b = _gather("b", "q", rng.permutation(c), shape)
        else:
            h, w = (int(v) for v in rng.integers(1, 6, 2))
            shape = (n, c, h, w)
            if form == "same":
                b = _gather("b", "q", rng.permutation(c), shape)
            else:
                b = Op("max_pool2d", "b", ["q"], MaxPoolAttrs(kernel=[h, w], stride=[1, 1], padding=[0, 0]),
                       shape=(n, c, 1, 1))
        lo, hi = _clamp_range(rng)
        attrs = MulAttrs(za=int(rng.integers(0, 256)), zb=int(rng.integers(0, 256)), mult=_mult(rng),
                         shift=int(rng.integers(0, 17)), z_out=int(rng.integers(0, 256)), lo=lo, hi=hi)
        ops = [b, Op("mul", "op", ["q", "b"], attrs, shape=shape)]
    elif kind == "resize":
        c, h, w = (int(v) for v in rng.integers(1, 6, 3))
        oh, ow = (int(v) for v in rng.integers(1, 9, 2))
        frac = int(rng.choice([0, 7, 10, 11]))        # 11: the largest with |acc| ≤ 2^22·255 in int32
        params = {"y0": rng.integers(0, h, oh), "y1": rng.integers(0, h, oh), "wy": rng.integers(0, 2**frac + 1, oh),
                  "x0": rng.integers(0, w, ow), "x1": rng.integers(0, w, ow), "wx": rng.integers(0, 2**frac + 1, ow)}
        lo, hi = _clamp_range(rng)
        attrs = ResizeAttrs(mode="bilinear" if frac else "nearest", frac=frac, z_in=int(rng.integers(0, 256)),
                            z_out=int(rng.integers(0, 256)), mult=_mult(rng),
                            shift=int(rng.integers(-1, 2 * frac + 2)), lo=lo, hi=hi)
        shape = (n, c, h, w)
        ops = [Op("resize", "op", ["q"], attrs, {k: v.astype(np.int32) for k, v in params.items()},
                  shape=(n, c, oh, ow))]
    elif kind == "matmul":
        # heads of K and M up to 3·16: several input and output tiles of the array, partial last ones
        g, contract = int(rng.integers(1, 4)), str(rng.choice(["channels", "positions"]))
        h, w = int(rng.integers(1, 7)), int(rng.integers(1, 9))
        kh, kw = int(rng.integers(1, h + 1)), int(rng.integers(1, w + 1))
        hb, wb = h // kh, w // kw
        d, l = int(rng.integers(1, 41)), hb * wb
        k = d if contract == "channels" else l
        shape = (n, 5, h, w)
        bs = _gather("bs", "q", rng.integers(0, 5, g * d), shape)
        b = Op("max_pool2d", "b", ["bs"], MaxPoolAttrs(kernel=[kh, kw], stride=[kh, kw], padding=[0, 0]),
               shape=(n, g * d, hb, wb))
        a = _gather("a", "q", rng.integers(0, 5, g * k), shape)
        lo, hi = _clamp_range(rng)
        attrs = MatmulAttrs(heads=g, contract=contract, za=int(rng.integers(0, 256)), zb=int(rng.integers(0, 256)),
                            mult=_mult(rng), shift=int(6 + np.log2(k) / 2 + rng.integers(0, 3)),
                            z_out=int(rng.integers(0, 256)), lo=lo, hi=hi)
        m = l if contract == "channels" else d
        ops = [bs, b, a, Op("matmul", "op", ["a", "b"], attrs, shape=(n, g * m, h, w))]
    elif kind == "softmax":
        # heads of 1..40 keys at 1..30 positions; A2–A8 codes in (the table has 2^A entries)
        bits = int(rng.integers(2, 9))
        qmax = 2**bits - 1
        g, keys = int(rng.integers(1, 4)), int(rng.integers(1, 41))
        spatial = () if rng.random() < 0.2 else (int(rng.integers(1, 6)), int(rng.integers(1, 7)))
        shape = (n, g * keys, *spatial)
        k = softmax_constants(float(rng.uniform(0.005, 0.5)), qmax, 1 / float(rng.choice([15, 255])))
        lo, hi = _clamp_range(rng)
        attrs = SoftmaxAttrs(groups=g, mult=k.r, frac=k.k, z_out=int(rng.integers(0, 30)), lo=lo, hi=hi)
        ops = [Op("softmax", "op", ["q"], attrs, {"exp": k.table}, shape=shape)]
    elif kind == "layer_norm":
        # 1..80 channels (c = 1: zero variance, only e keeps the root positive) of uint8 codes, or of a sum pool's int32 sums
        c = int(rng.integers(1, 81))
        h, w = int(rng.integers(1, 6)), int(rng.integers(1, 7))
        shape = (n, c, h, w)
        wide = rng.random() < 0.3
        in_scale, in_qmax = (0.02 / (h * w), 255 * h * w) if wide else (0.02, 255)
        nc = layer_norm_constants(rng.normal(1, 0.5, c), rng.normal(0, 0.5, c), float(rng.choice([1e-5, 0.0])),
                                  in_scale, in_qmax, float(rng.uniform(0.01, 0.1)))
        lo, hi = _clamp_range(rng)
        attrs = LayerNormAttrs(prec=nc.p, eps=nc.e, frac=nc.k, z_out=int(rng.integers(0, 256)), lo=lo, hi=hi)
        ops = [Op("layer_norm", "op", ["q"], attrs, {"g": nc.g, "b": nc.b}, shape=shape)]
        if wide:
            ops = [Op("sum_pool2d", "sums", ["q"], SumPoolAttrs(kernel=(h, w), stride=(1, 1), padding=(0, 0), z_in=0),
                      shape=(n, c, 1, 1), dtype="int32"),
                   Op("layer_norm", "op", ["sums"], attrs, {"g": nc.g, "b": nc.b}, shape=(n, c, 1, 1))]
    else:
        raise ValueError(kind)
    x = rng.integers(0, qmax + 1, shape).astype(np.float32)
    prog = _program(shape, ops, qmax)
    return prog, prog["op"], x
