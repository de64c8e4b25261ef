"""The NumPy integer reference: a plain interpreter of a Program, the oracle for every
backend (llvm, C, npu16 must equal it bit for bit).

It reads each op's kind, attributes and primary tensors (never the Relax body), and
computes the numeric contract directly (docs/numeric-contract.md):

quantize     x float32 → clip(floor(x/s + 0.5) + z, 0, qmax), float32 arithmetic
dequantize   codes → (code − z)·s, float32 arithmetic
conv2d       acc_p[k] = (Σ_{i∈G_p ∩ convgroup(k)} Σ_kernel w[k,i,·]·(x[i,·] − z_in)) << L, zero
linear         padding in the real domain (pad code z_in), L = attribute ``frac`` (fractional
             accumulator bits); acc = Σ_p (acc_p + σ_p·shift(acc_p, n_p)) + bias;
             out = clip(requant(acc, M, s) + z_out, lo, hi); a conv with an ``in_index``
             param (a gather folded in by LegalizeWAPS, fast form) reads x[:, in_index]
add          clip(((a − za)·ka + (b − zb)·kb + 2^(t−1)) >> t + z_out, lo, hi)
             b is a's shape or broadcast: [N, C, 1, 1], [N, 1, H, W] or [N, 1, 1, 1], uint8 or
             int32 (a global sum pool's sums)
max_pool2d   window max of codes (padding never wins; ``dilation`` attribute, default 1)
sum_pool2d   window sum of codes, padding counted as z_in (int32 "wide" codes)
avg_pool2d   box average with its own rounding: output row i reads input rows [h0_i, h1_i), column
             j columns [w0_j, w1_j) (params, windows clipped to the input), then
             clip(requant(Σ(x − z_in), mult[rq[i,j]], shift[rq[i,j]]) + z_out, lo, hi); the divisor
             (window count or kernel area) is folded into mult/shift, so one op covers
             count_include_pad either way, ceil_mode, adaptive pooling and spatial means
pad          [N, C, H, W] → [N, C, H+top+bottom, W+left+right] filled with ``value`` (a code)
concat       along ``axis`` (1 channels, 2 rows, 3 columns; the other axes equal); input i
             becomes clip(rescale(x_i, z_i, k_i, t) + z_out, lo, hi)
layer_norm   over the channels (axis 1): calib/numerics.layer_norm_codes with params g, b and
             attributes prec (p), eps (e), frac (k): integer sum, sum of squares, exact ⌊√⌋
softmax      over the channels in ``groups`` groups: calib/numerics.softmax_codes (exp table of
             max − x, int64 sum, rounded quotient)
matmul       a [N, Ca, Ha, Wa], b [N, Cb, Hb, Wb] in ``heads`` G, P = Ha·Wa, L = Hb·Wb:
             "channels" (Ca = Cb = G·D): acc[g·L + j, p] = Σ_d (a[g·D + d, p] − za)·(b[g·D + d, j] − zb);
             "positions" (Ca = G·L, Cb = G·D): acc[g·D + d, p] = Σ_j (a[g·L + j, p] − za)·(b[g·D + d, j] − zb);
             out [N, G·L or G·D, Ha, Wa] = clip(requant(acc, mult, shift) + z_out, lo, hi), int32 sum
table        table[x]: an elementwise function of codes (calib/numerics.code_table)
mul          clip(requant((a − za)·(b − zb), mult, shift) + z_out, lo, hi); b is a's shape or
             [N, C, 1, 1] (broadcast over H, W)
resize       output (i, j) = clamp(requant(Σ_{a,b∈{0,1}} wy_a[i]·wx_b[j]·(x[ya[i], xb[j]] − z_in), mult,
             shift) + z_out, lo, hi) with rows y0/y1, weights wy_0 = wy, wy_1 = 2^F − wy (F = attr
             ``frac``), columns likewise (params, relay_passes/resize.py: torch's source indices);
             int32 sum, |acc| ≤ 2^(2F)·255. Bilinear: F = 10, mult/shift fold s_in/(s_out·2^(2F)).
             Nearest: F = 0, y1 = y0, wy = 1, mult/shift = 1 exactly, z_out = z_in: a gather of codes
flatten      [N, C, H, W] → [N, C·H·W];  gather: channels x[:, index]
constant     params codes [C, H, W] repeated over the batch of its input (only N is read)
reshape      [N, C, H, W] → [N, C, H', W']: each channel's H·W positions re-laid row-major
crop         x[:, :, top:top + height, left:left + width]
with shift(a, n) = (a + 2^(n−1)) >> n and requant(a, M, s) = (a·M + 2^(30+s)) >> (31+s), each
rule taken from calib/numerics.py (the NumPy definition of the contract).
Accumulations run in float64 BLAS, exact because every sum stays far below 2^53.
"""
from __future__ import annotations

import numpy as np

from calib.numerics import (INT32_MAX, INT32_MIN, add_rescale, apply_table, clamp, layer_norm_codes,
                            merge_groups, output_codes, requantize, rescale, softmax_codes)
from relay_passes.program import INPUT, Op, Program


class AccumulatorOverflow(ArithmeticError):
    pass


def run(program: Program, x: np.ndarray, keep: bool = False) -> list[np.ndarray] | dict[str, np.ndarray]:
    """Execute ``program`` on float32 input ``x``; returns its outputs (or every value with keep)."""
    env: dict[str, np.ndarray] = {INPUT: np.asarray(x, np.float32)}
    for op in program.ops:
        env[op.name] = OPS[op.kind](op, *[env[i] for i in op.inputs])
    return env if keep else [env[n] for n in program.outputs]


def _quantize(op: Op, x):
    a = op.attrs
    q = np.floor(x / np.float32(a.scale) + np.float32(0.5)) + np.float32(a.zero_point)
    return np.clip(q, 0, a.qmax).astype(op.dtype)


def _dequantize(op: Op, x):
    a = op.attrs
    return (x.astype(np.float32) - np.float32(a.zero_point)) * np.float32(a.scale)


def _windows(x: np.ndarray, kernel, stride, dilation, padding, pad_value: int) -> np.ndarray:
    """[N, C, OH, OW, kh, kw] int64 view of the padded input's sliding windows."""
    ph, pw = padding
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=pad_value)
    kh, kw = kernel
    dh, dw = dilation
    win = np.lib.stride_tricks.sliding_window_view(xp, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
    return win[:, :, ::stride[0], ::stride[1], ::dh, ::dw]


def _group_accumulators(op: Op, x: np.ndarray) -> list[np.ndarray]:
    """acc_p as int64 [N, m, OH, OW] (conv) or [N, m] (linear), one per group."""
    w = op.params["w"].astype(np.float64)
    a = op.attrs
    n_groups = op.n_groups
    groups = op.params.get("groups")
    if not a.spatial:
        xz = (x.astype(np.int64) - a.z_in).astype(np.float64)
        out = []
        for p in range(n_groups):
            sel = np.ones(w.shape[1], bool) if groups is None else groups == p
            out.append(np.rint(xz[:, sel] @ w[:, sel].T).astype(np.int64))
        return out
    m, cg, kh, kw = w.shape
    cgroups = a.conv_groups
    xz = x.astype(np.int64) - a.z_in                       # real-zero padding below
    win = _windows(xz, (kh, kw), a.stride, a.dilation, a.padding, 0).astype(np.float64)
    n, c, oh, ow = win.shape[:4]
    mg = m // cgroups
    out = []
    for p in range(n_groups):
        acc = np.empty((n, m, oh, ow), np.int64)
        for gi in range(cgroups):
            chans = np.arange(gi * cg, (gi + 1) * cg)
            sel = np.ones(cg, bool) if groups is None else groups[chans] == p
            wg = w[gi * mg:(gi + 1) * mg][:, sel]                       # [mg, c_sel, kh, kw]
            xg = win[:, chans[sel]]                                     # [N, c_sel, OH, OW, kh, kw]
            acc[:, gi * mg:(gi + 1) * mg] = np.rint(
                np.einsum("ncyxij,kcij->nkyx", xg, wg, optimize=True)).astype(np.int64)
        out.append(acc)
    return out


def _layer(op: Op, x):
    a = op.attrs
    if "in_index" in op.params:
        x = np.take(x, op.params["in_index"], axis=1)
    accs = _group_accumulators(op, x)
    total = merge_groups(accs, op.group_scales, a.frac)
    bshape = (1, -1) + (1,) * (total.ndim - 2)
    total = total + op.params["bias"].astype(np.int64).reshape(bshape)
    if total.min(initial=0) < INT32_MIN or total.max(initial=0) > INT32_MAX:
        raise AccumulatorOverflow(f"{op.name}: accumulator left int32")
    y = output_codes(total, op.params["mult"].reshape(bshape), op.params["shift"].reshape(bshape),
                     a.z_out, a.lo, a.hi)
    return y.astype(op.dtype)


def _add(op: Op, a_, b_):
    a = op.attrs
    t = add_rescale(a_, a.za, a.ka, b_, a.zb, a.kb, a.t)
    return clamp(t + a.z_out, a.lo, a.hi).astype(op.dtype)


def _max_pool2d(op: Op, x):
    a = op.attrs
    win = _windows(x, a.kernel, a.stride, a.rates, a.padding, np.iinfo(np.int64).min)
    return win.max(axis=(4, 5)).astype(op.dtype)


def _avg_pool2d(op: Op, x):
    a, p = op.attrs, op.params
    xz = x.astype(np.int64) - a.z_in
    rows = np.stack([xz[:, :, h0:h1].sum(2) for h0, h1 in zip(p["h0"], p["h1"])], 2)       # [N, C, OH, W]
    sums = np.stack([rows[..., w0:w1].sum(3) for w0, w1 in zip(p["w0"], p["w1"])], 3)      # [N, C, OH, OW]
    rq = p["rq"]
    y = output_codes(sums, p["mult"][rq], p["shift"][rq], a.z_out, a.lo, a.hi)
    return y.astype(op.dtype)


def _pad(op: Op, x):
    top, left, bottom, right = op.attrs.pads
    return np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=op.attrs.value).astype(op.dtype)


def _concat(op: Op, *xs):
    a = op.attrs
    parts = [clamp(rescale(x, z, k, a.t) + a.z_out, a.lo, a.hi) for x, z, k in zip(xs, a.zs, a.ks)]
    return np.concatenate(parts, axis=a.axis).astype(op.dtype)


def _table(op: Op, x):
    return apply_table(op.params["table"], x).astype(op.dtype)


def _layer_norm(op: Op, x):
    a = op.attrs
    return layer_norm_codes(x, op.params["g"], op.params["b"], a.prec, a.eps, a.frac, a.z_out, a.lo,
                            a.hi).astype(op.dtype)


def _softmax(op: Op, x):
    a = op.attrs
    return softmax_codes(x, op.params["exp"], a.groups, a.mult, a.frac, a.z_out, a.lo, a.hi).astype(op.dtype)


def _matmul(op: Op, a_, b_):
    a = op.attrs
    n, g, (ha, wa) = a_.shape[0], a.heads, a_.shape[2:]
    x = a_.astype(np.int64).reshape(n, g, a_.shape[1] // g, ha * wa) - a.za        # [N, G, D or L, P]
    y = b_.astype(np.int64).reshape(n, g, b_.shape[1] // g, -1) - a.zb             # [N, G, D, L]
    acc = np.einsum("ngdp,ngdl->nglp" if a.contract == "channels" else "nglp,ngdl->ngdp", x, y)
    return output_codes(acc.reshape(n, -1, ha, wa), a.mult, a.shift, a.z_out, a.lo, a.hi).astype(op.dtype)


def _mul(op: Op, a_, b_):
    a = op.attrs
    prod = (a_.astype(np.int64) - a.za) * (b_.astype(np.int64) - a.zb)
    return clamp(requantize(prod, a.mult, a.shift) + a.z_out, a.lo, a.hi).astype(op.dtype)


def _resize(op: Op, x):
    a, p = op.attrs, op.params
    one = 1 << a.frac
    xz = x.astype(np.int64) - a.z_in
    wy = np.stack([p["wy"], one - p["wy"]]).astype(np.int64)          # [2, OH]
    wx = np.stack([p["wx"], one - p["wx"]]).astype(np.int64)          # [2, OW]
    acc = np.zeros(x.shape[:2] + (p["y0"].size, p["x0"].size), np.int64)
    for ys, wya in zip((p["y0"], p["y1"]), wy):
        rows = xz[:, :, ys]                                           # [N, C, OH, W]
        for xs, wxb in zip((p["x0"], p["x1"]), wx):
            acc += wya[:, None] * wxb[None, :] * rows[..., xs]
    return output_codes(acc, a.mult, a.shift, a.z_out, a.lo, a.hi).astype(op.dtype)


def _sum_pool2d(op: Op, x):
    a = op.attrs
    win = _windows(x, a.kernel, a.stride, (1, 1), a.padding, a.z_in)
    return win.sum(axis=(4, 5)).astype(op.dtype)


def _flatten(op: Op, x):
    return x.reshape(x.shape[0], -1)


def _gather(op: Op, x):
    return np.take(x, op.params["index"], axis=1)


def _constant(op: Op, x):
    codes = op.params["codes"]
    return np.broadcast_to(codes, (x.shape[0], *codes.shape)).astype(op.dtype)


def _reshape(op: Op, x):
    return x.reshape(x.shape[0], *op.attrs.shape)


def _crop(op: Op, x):
    a = op.attrs
    return x[:, :, a.top:a.top + a.height, a.left:a.left + a.width].copy()


OPS = {"quantize": _quantize, "dequantize": _dequantize, "conv2d": _layer, "linear": _layer,
       "add": _add, "max_pool2d": _max_pool2d, "sum_pool2d": _sum_pool2d, "flatten": _flatten,
       "gather": _gather, "avg_pool2d": _avg_pool2d, "pad": _pad, "concat": _concat, "table": _table,
       "mul": _mul, "resize": _resize, "layer_norm": _layer_norm,
       "matmul": _matmul,
       "softmax": _softmax,
       "constant": _constant,
       "reshape": _reshape,
       "crop": _crop}
