"""Relax bodies of the integer operations (what each Program op lowers to).

The meaning of every op is defined in relay_passes/reference.py; this module only
chooses how TVM computes it. A conv2d/linear with WAPS groups has three forms:

    reference  one full-width integer conv per group with the other groups' weights
               masked to zero (valid for any channel order; g× the MACs)
    split      one conv per group over a contiguous channel slice (needs contiguous
               groups: relay_passes/permute.py), then the shift-add merge
    fused      one TIR kernel (TE, scheduled) that accumulates every group's partial
               sum for an output element in one pass over its input window, then
               merges, requantizes and clamps in the same loop nest

Zero points: activations are codes x̄ (uint8, or int32 for pooled sums). The conv
reads x̄ padded with z_in and subtracts z_in·Σw per group afterwards (exact: every
window element is a code or a z_in pad), so the MAC itself is u8×s8.
Requantization is int64: (acc·M + 2^(S−1)) >> S with S = 31 + shift (round half up).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import tvm
from tvm import relax, te, topi
import tvm.s_tir as s_tir

from calib.numerics import requant_tables
from relay_passes import fast_kernels as fast
from relay_passes import numeric_tvm as nt
from relay_passes.opset import is_layer
from relay_passes.program import Op, encode_attrs, input_layout, param_order, physical

I32, I64 = "int32", "int64"


def group_ranges(groups: np.ndarray, n_groups: int) -> list[tuple[int, int]] | None:
    """[start, end) of each group's channels when each group is one contiguous run
    (an empty group gives (0, 0)); None when some group is split."""
    out = []
    for p in range(n_groups):
        idx = np.flatnonzero(groups == p)
        if idx.size == 0:
            out.append((0, 0))
        elif idx[-1] - idx[0] + 1 != idx.size:
            return None
        else:
            out.append((int(idx[0]), int(idx[-1]) + 1))
    return out


def layer_ranges(op: Op) -> list[tuple[int, int]] | None:
    """group_ranges of a layer's input channels; one range over all of w's columns when ungrouped."""
    if "groups" not in op.params:
        return [(0, op.params["w"].shape[1])]
    return group_ranges(op.params["groups"], op.n_groups)


def requant_constants(op: Op, ndim: int) -> list[np.ndarray]:
    """M, rounding 2^(S−1) and S as int64 arrays broadcastable over [N, m, ...]."""
    shape = (1, op.params["mult"].size) + (1,) * (ndim - 2)
    return [t.reshape(shape) for t in requant_tables(op.params["mult"], op.params["shift"])]


def _signature(op: Op, in_types):
    """(input vars, param vars by name, derived vars, derived arrays) of ``op``'s function."""
    xs = [relax.Var(f"x{i}", relax.TensorType(physical(s, input_layout(op)), d)) for i, (s, d) in enumerate(in_types)]
    pvars = {k: relax.Var(k, relax.TensorType(op.params[k].shape, str(op.params[k].dtype))) for k in param_order(op)}
    derived_np = _derived(op, in_types)
    dvars = [relax.Var(f"d{i}", relax.TensorType(v.shape, str(v.dtype))) for i, v in enumerate(derived_np)]
    return xs, pvars, dvars, derived_np


def build(op: Op, in_types: list[tuple[tuple[int, ...], str]], add_prim):
    """→ (private relax.Function, derived constants appended to the call). ``add_prim(func,
    name)`` adds a TIR PrimFunc to the module being built and returns its GlobalVar."""
    lb = relax.BlockBuilder()
    xs, pvars, dvars, derived_np = _signature(op, in_types)
    # waps.name keeps two ops with equal bodies (e.g. two gathers by the same index) distinct:
    # BlockBuilder.add_func returns the existing GlobalVar for a structurally equal function
    attrs = {"waps.kind": op.kind, "waps.name": op.name, "waps.attrs": encode_attrs(op),
             "waps.params": param_order(op)}
    with lb.function(op.name, xs + list(pvars.values()) + dvars, attrs=attrs, private=True):
        with lb.dataflow():
            out = KERNELS[op.kind].body(lb, op, xs, pvars, dvars, in_types, add_prim)
            out = lb.emit_output(out)
        lb.emit_func_output(out)
    return lb.get()[op.name], derived_np


def build_conv_add(conv: Op, add: Op, conv_operand: int, in_types, other_type, add_prim) -> relax.Function:
    """The fast conv ``conv`` (its ``plan`` 'conv') with the residual add ``add`` computed in its
    epilogue (codegen/cpu_fusion.py): a private relax.Function taking the conv's arguments
    (inputs, params, derived constants, as ``build`` orders them) and then the add's other
    operand (``other_type``: its logical shape and dtype, NHWC), returning the add's output.
    ``conv_operand``: which operand of the add the conv's output is."""
    lb = relax.BlockBuilder()
    xs, pvars, dvars, _ = _signature(conv, in_types)
    other = relax.Var("residual", relax.TensorType(physical(other_type[0], "NHWC"), other_type[1]))
    residual = fast.Residual(add.attrs, conv_operand, other_type[1], add.dtype)
    name = f"{conv.name}__{add.name}"
    with lb.function(name, xs + list(pvars.values()) + dvars + [other], private=True):
        with lb.dataflow():
            out = _conv2d_fast(lb, conv, xs, pvars, dvars, in_types, add_prim, "conv", (residual, other))
            out = lb.emit_output(out)
        lb.emit_func_output(out)
    return lb.get()[name]


def build_expand_depthwise(conv: Op, dw: Op, in_types, dw_in_types, add_prim) -> relax.Function:
    """The pointwise fast conv ``conv`` and the fast depthwise conv ``dw`` that alone reads it as
    one kernel (fast_kernels.expand_depthwise; codegen/cpu_fusion.py): a private
    relax.Function taking the conv's arguments (inputs, params, derived constants, as
    ``build`` orders them) and then the depthwise's after its input, returning the depthwise's
    output."""
    lb = relax.BlockBuilder()
    xs, pvars, dvars, _ = _signature(conv, in_types)
    _, dw_params, dw_derived, _ = _signature(dw, dw_in_types)
    name = f"{conv.name}__{dw.name}"
    with lb.function(name, xs + list(pvars.values()) + dvars + list(dw_params.values()) + dw_derived, private=True):
        with lb.dataflow():
            fold = fast.fold_groups(conv)
            func, shape = fast.expand_depthwise(conv, in_types[0][0], layer_ranges(conv), fold, dw)
            index = [pvars["in_index"]] if "in_index" in conv.params and (fold is None or fold[3] is None) else []
            out = _call_fast(lb, dw, add_prim, func, [xs[0], *dvars, *index, *dw_derived], shape, f"{name}_kernel")
            out = lb.emit_output(out)
        lb.emit_func_output(out)
    return lb.get()[name]


def _c(value, dtype: str) -> relax.Expr:
    """A constant of exactly ``dtype`` (relax.const narrows int64 to int32 by default)."""
    return relax.const(np.asarray(value, dtype=dtype), dtype)


# ---------------------------------------------------------------- derived constants

def fast_plan(op: Op, in_types) -> str | None:
    """Which fast_kernels body a ``fast``-form op gets (None: the split/reference body):
    its kind's ``Kernel.plan``."""
    plan = KERNELS[op.kind].plan
    return plan(op, in_types) if op.schedule.form == "fast" and plan is not None else None


def has_fast_body(op: Op) -> bool:
    """The kind has a fast-form (NHWC) body in relay_passes/fast_kernels.py for some shapes."""
    return KERNELS[op.kind].plan is not None


def choose_layout(op: Op, in_types, in_layouts: list[str]) -> str:
    """The layout of a fast-form op (relay_passes/program.py): NHWC for a fast body over 4-D
    maps (the fast kernels are written for it), and for a layout-free op (``Kernel.reads_nhwc``)
    whose input already is NHWC; NCHW for everything else."""
    if fast_plan(op, in_types) is not None and len(in_types[0][0]) == 4:
        return "NHWC"
    if not in_layouts or in_layouts[0] != "NHWC" or len(in_types[0][0]) != 4:
        return "NCHW"
    reads = KERNELS[op.kind].reads_nhwc
    return "NHWC" if reads is not None and reads(op, in_types[0][0]) else "NCHW"


def _plan_layer(op: Op, in_types) -> str | None:
    ranges = layer_ranges(op)
    if not op.attrs.spatial:
        return "linear" if ranges is not None else None
    if op.attrs.conv_groups > 1:
        ranges = ranges or [(0, 0)]                        # depthwise: any channel order
    if fast.conv_fits(op, in_types[0][1], ranges):
        return "conv" if op.attrs.conv_groups == 1 else "depthwise"
    return None


def _plan_quantize(op: Op, in_types) -> str:
    return "quantize"


def _plan_max_pool(op: Op, in_types) -> str | None:
    return "max_pool2d" if op.attrs.rates == (1, 1) else None


def _plan_add(op: Op, in_types) -> str | None:
    same = tuple(in_types[0][0]) == tuple(in_types[1][0])
    return "add" if same else None                   # a broadcast operand: the Relax body broadcasts


def _any_map(op: Op, shape) -> bool:
    return True


def _global_sum(op: Op, shape) -> bool:
    return tuple(op.attrs.kernel) == tuple(shape[2:]) and not any(op.attrs.padding)


def _flat_1x1(op: Op, shape) -> bool:
    return shape[2] == shape[3] == 1


def _derived(op: Op, in_types) -> list[np.ndarray]:
    plan = fast_plan(op, in_types)
    if plan == "conv":
        m16 = fast.round_up(op.params["w"].shape[0], 16)
        fold = fast.fold_groups(op)
        w, extra = op.params["w"], []
        if fold is None:
            corr = _corrections(op)
        else:                                   # one accumulator: channel c scaled by a_c
            side, a_c, _, perm = fold
            if perm is not None:                # the folded gather moves into the weights
                w, a_c = w[:, perm], a_c[perm]
            scaled = w.astype(np.int64) * a_c[None, :, None, None]
            corr = int(op.attrs.z_in) * scaled.reshape(w.shape[0], -1).sum(1)[None, :]
            if side == "w":
                w = scaled.astype(np.int8)
            else:
                extra = [np.pad(a_c, (0, fast.round_up(a_c.size, 4) - a_c.size)).astype(np.uint8)]
        if fast.conv_dot(op, fold)[1]:           # codes packed as u ^ 0x80: sdot sums w·(u − 128)
            corr = corr - 128 * w.reshape(w.shape[0], -1).astype(np.int64).sum(1)[None, :]
        corr = corr.astype(np.int32)
        return [fast.pack_weights(w), *fast.epilogue_tables(op, False, m16),
                np.pad(corr, ((0, 0), (0, m16 - corr.shape[1]))), *extra]
    if plan == "depthwise":
        corr = _corrections(op).sum(0, keepdims=True).astype(np.int32)
        k = fast.depthwise_factors(op)
        tables = fast.epilogue_tables(op, k is None)            # σ_k, n_k only where K_k does not apply
        return [fast.pack_depthwise(op.params["w"]), *tables[:4], corr, *([k] if k is not None else tables[4:])]
    if plan == "linear":
        m = op.params["w"].shape[0]
        m16 = fast.round_up(m, 16)
        wt = np.pad(op.params["w"].T, ((0, 0), (0, m16 - m)))
        corr = np.pad(_corrections(op).astype(np.int32), ((0, 0), (0, m16 - m)))
        return [np.ascontiguousarray(wt), *fast.epilogue_tables(op, False, m16), corr]
    if is_layer(op):
        consts = requant_constants(op, op.params["w"].ndim)     # over [N, m, OH, OW] (conv) or [N, m]
        consts.append(_corrections(op).astype(np.int32))        # [g, m]
        if not op.attrs.spatial or _conv_form(op, in_types) == "reference":
            consts.append(_group_masks(op))                       # [g, fan_in] int8
        return consts
    return []


def _group_masks(op: Op) -> np.ndarray:
    """[g, fan_in] int8: 1 where an input channel (feature) belongs to group p."""
    w = op.params["w"]
    fan = w.shape[1] * op.attrs.conv_groups
    if "groups" not in op.params:
        return np.ones((1, fan), np.int8)
    g = op.params["groups"]
    return np.stack([(g == p).astype(np.int8) for p in range(op.n_groups)])


def _masked_weights(op: Op) -> list[np.ndarray]:
    """Per group: w with the other groups' input channels zeroed, [m, cg, kh, kw] or [m, f]."""
    w = op.params["w"]
    if "groups" not in op.params:
        return [w]
    g = op.params["groups"]
    out = []
    for p in range(op.n_groups):
        if op.attrs.spatial:
            m, cg = w.shape[:2]
            cgroups = op.attrs.conv_groups
            per_out = g.reshape(cgroups, cg).repeat(m // cgroups, axis=0)     # [m, cg]
            out.append(w * (per_out == p)[:, :, None, None].astype(np.int8))
        else:
            out.append(w * (g == p)[None, :].astype(np.int8))
    return out


def _corrections(op: Op) -> np.ndarray:
    """z_in·Σ w_p[k] for each group p and output k (int64 [g, m])."""
    z = int(op.attrs.z_in)
    return np.stack([z * wp.reshape(wp.shape[0], -1).astype(np.int64).sum(1) for wp in _masked_weights(op)])


# ---------------------------------------------------------------- bodies

def _quantize(lb, op, xs, P, D, in_types, add_prim):
    a = op.attrs
    if fast_plan(op, in_types):
        X = te.placeholder(in_types[0][0], "float32", "x")
        nhwc = op.schedule.layout == "NHWC"

        def q(*i):
            v = X(i[0], i[3], i[1], i[2]) if nhwc else X(*i)              # NHWC out from the NCHW input
            v = te.floor(v / tvm.tirx.const(a.scale, "float32") + tvm.tirx.const(0.5, "float32"))
            v = v + tvm.tirx.const(a.zero_point, "float32")
            v = tvm.tirx.max(tvm.tirx.min(v, tvm.tirx.const(a.qmax, "float32")), tvm.tirx.const(0, "float32"))
            return v.astype(op.dtype)
        shape = physical(in_types[0][0], op.schedule.layout)
        kernel = fast.to_nhwc if nhwc else fast.elementwise
        return _call_fast(lb, op, add_prim, kernel("q", q, [X], shape, op.dtype), xs, shape)
    x = relax.op.divide(xs[0], _c(a.scale, "float32"))
    q = relax.op.floor(relax.op.add(x, _c(0.5, "float32")))
    q = relax.op.add(q, _c(a.zero_point, "float32"))
    q = relax.op.clip(q, 0, a.qmax)
    return lb.emit(relax.op.astype(q, op.dtype))


def _dequantize(lb, op, xs, P, D, in_types, add_prim):
    a = op.attrs
    x = relax.op.subtract(relax.op.astype(xs[0], "float32"), _c(a.zero_point, "float32"))
    return lb.emit(relax.op.multiply(x, _c(a.scale, "float32")))


def _merge_requant(lb, op, accs: list, P, D):
    """Σ_p group_term(acc_p − corr_p) + bias → output code, as Relax ops (numeric_tvm)."""
    a = op.attrs
    ar = nt.RelaxArith(lb)
    shape = (1, op.params["w"].shape[0]) + (1,) * (op.params["w"].ndim - 2)
    M, R, S, corr = D[0], D[1], D[2], D[3]

    def corrected(p, acc):
        c = lb.emit(relax.op.reshape(lb.emit(relax.op.strided_slice(corr, [0], [p], [p + 1])), shape))
        return ar.sub(acc, c)
    total = nt.merge_groups(ar, lb.emit(relax.op.reshape(P["bias"], shape)),
                            {p: corrected(p, acc) for p, acc in enumerate(accs)}, op.group_scales, a.frac)
    return nt.output_code(ar, total, M, R, S, a.z_out, a.lo, a.hi, op.dtype)


def _conv_input(lb, op, x, in_dtype):
    a = op.attrs
    ph, pw = a.padding
    if ph or pw:
        x = lb.emit(relax.op.nn.pad(x, [0, 0, 0, 0, ph, ph, pw, pw], pad_value=float(a.z_in)))
    return x


def _conv(lb, x, w, op, in_dtype):
    a = op.attrs
    if in_dtype != "uint8":
        w = lb.emit(relax.op.astype(w, in_dtype))
    return lb.emit(relax.op.nn.conv2d(x, w, strides=a.stride, padding=0, dilation=a.dilation,
                                      groups=a.conv_groups, out_dtype=I32))


def _conv_form(op: Op, in_types) -> str:
    """The body a conv2d gets: fast's conv/depthwise kernels, else split or fused over contiguous
    groups of an ungrouped conv, else the masked reference (also for 'plain' layers)."""
    form = op.schedule.form
    if form == "fast":
        plan = fast_plan(op, in_types)
        if plan:
            return plan
        form = "split"                                   # a shape the fast kernels do not take
    if form in ("split", "fused") and "groups" in op.params:
        ranges = group_ranges(op.params["groups"], op.n_groups)
        if ranges is None or op.attrs.conv_groups != 1:
            return "reference"
    return form


def _conv2d(lb, op, xs, P, D, in_types, add_prim):
    form = _conv_form(op, in_types)
    if form in ("conv", "depthwise"):
        return _conv2d_fast(lb, op, xs, P, D, in_types, add_prim, form)
    if "in_index" in op.params:                           # a gather folded into this conv
        axis = 3 if op.schedule.layout == "NHWC" else 1
        xs = [lb.emit(relax.op.take(xs[0], P["in_index"], axis=axis)), *xs[1:]]
    if form == "fused" and "groups" in op.params:
        return _conv2d_fused(lb, op, xs, P, D, in_types, add_prim)
    in_dtype = in_types[0][1]
    x = _conv_input(lb, op, xs[0], in_dtype)
    g = op.n_groups
    if g == 1:
        accs = [_conv(lb, x, P["w"], op, in_dtype)]
    elif form in ("split", "fused"):                     # _conv_form: contiguous groups, ungrouped conv
        accs = []
        for c0, c1 in group_ranges(op.params["groups"], g):
            if c1 == c0:
                accs.append(_c(0, I32))
                continue
            xp = lb.emit(relax.op.strided_slice(x, [1], [c0], [c1]))
            wp = lb.emit(relax.op.strided_slice(P["w"], [1], [c0], [c1]))
            accs.append(_conv(lb, xp, wp, op, in_dtype))
    else:                                                       # reference: masked weights
        mask = D[4]
        accs = []
        for p in range(g):
            mp = lb.emit(relax.op.strided_slice(mask, [0], [p], [p + 1]))
            if op.attrs.conv_groups > 1:
                m, cg = op.params["w"].shape[:2]
                cgroups = op.attrs.conv_groups
                mp = lb.emit(relax.op.reshape(mp, (cgroups, 1, cg)))
                mp = lb.emit(relax.op.repeat(mp, m // cgroups, axis=1))
                mp = lb.emit(relax.op.reshape(mp, (m, cg, 1, 1)))
            else:
                mp = lb.emit(relax.op.reshape(mp, (1, -1, 1, 1)))
            wp = lb.emit(relax.op.multiply(P["w"], mp))
            accs.append(_conv(lb, x, wp, op, in_dtype))
    return _merge_requant(lb, op, accs, P, D)


def _linear(lb, op, xs, P, D, in_types, add_prim):
    ranges = layer_ranges(op)
    if fast_plan(op, in_types):
        func, shape = fast.linear(op, in_types[0][0], in_types[0][1], ranges)
        out = _call_fast(lb, op, add_prim, func, [xs[0], *D], shape)
        m = op.params["w"].shape[0]
        return out if shape[1] == m else lb.emit(relax.op.strided_slice(out, [1], [0], [m]))
    x = lb.emit(relax.op.astype(xs[0], I32))
    mask = D[4]
    form = op.schedule.form
    accs = []
    for p in range(op.n_groups):
        if form in ("split", "fused", "fast") and ranges is not None:
            c0, c1 = ranges[p]
            if c1 == c0:
                accs.append(_c(0, I32))
                continue
            xp = lb.emit(relax.op.strided_slice(x, [1], [c0], [c1]))
            wp = lb.emit(relax.op.strided_slice(P["w"], [1], [c0], [c1]))
        else:
            xp = x
            wp = lb.emit(relax.op.multiply(P["w"], lb.emit(relax.op.strided_slice(mask, [0], [p], [p + 1]))))
        wt = lb.emit(relax.op.permute_dims(lb.emit(relax.op.astype(wp, I32)), [1, 0]))
        accs.append(lb.emit(relax.op.matmul(xp, wt, out_dtype=I32)))
    return _merge_requant(lb, op, accs, P, D)


def _add(lb, op, xs, P, D, in_types, add_prim):
    a = op.attrs
    if fast_plan(op, in_types):
        shape = physical(in_types[0][0], op.schedule.layout)
        A = te.placeholder(shape, in_types[0][1], "a")
        B = te.placeholder(shape, in_types[1][1], "b")

        def add(*i):
            return nt.residual_add(nt.TIR, A(*i), B(*i), a, op.dtype)
        return _call_fast(lb, op, add_prim, fast.elementwise("add", add, [A, B], shape, op.dtype), xs, shape)
    return nt.residual_add(nt.RelaxArith(lb), xs[0], xs[1], a, op.dtype)


def _max_pool2d(lb, op, xs, P, D, in_types, add_prim):
    a = op.attrs
    if fast_plan(op, in_types):
        func, shape = fast.max_pool(op, in_types[0][0], in_types[0][1])
        return _call_fast(lb, op, add_prim, func, xs, shape)
    ph, pw = a.padding
    return lb.emit(relax.op.nn.max_pool2d(xs[0], a.kernel, a.stride, padding=[ph, pw, ph, pw],
                                          dilation=a.rates))


def _avg_pool2d(lb, op, xs, P, D, in_types, add_prim):
    """One TE kernel for every form: window bounds and requant tables read per output element."""
    a, p = op.attrs, op.params
    (n, c, h, w), dtype = in_types[0]
    oh, ow, d = p["h0"].size, p["w0"].size, p["mult"].size
    kh, kw = int((p["h1"] - p["h0"]).max()), int((p["w1"] - p["w0"]).max())
    X = te.placeholder((n, c, h, w), dtype, "x")
    H0, H1 = te.placeholder((oh,), I32, "h0"), te.placeholder((oh,), I32, "h1")
    W0, W1 = te.placeholder((ow,), I32, "w0"), te.placeholder((ow,), I32, "w1")
    RQ = te.placeholder((oh, ow), I32, "rq")
    Mq, Rq, Sq = (te.placeholder((d,), I64, nm) for nm in ("mult", "round", "shift"))
    ry, rx = te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx")
    zero = tvm.tirx.const(0, I32)

    def window(b, k, i, j):
        inside = tvm.tirx.all(H0[i] + ry < H1[i], W0[j] + rx < W1[j])
        y, x = tvm.tirx.min(H0[i] + ry, h - 1), tvm.tirx.min(W0[j] + rx, w - 1)
        v = X[b, k, y, x].astype(I32) - tvm.tirx.const(a.z_in, I32)
        return te.sum(tvm.tirx.if_then_else(inside, v, zero), axis=[ry, rx])
    sums = te.compute((n, c, oh, ow), window, name="sums")
    out = te.compute((n, c, oh, ow), lambda b, k, i, j: nt.output_code(
        nt.TIR, sums[b, k, i, j], Mq[RQ[i, j]], Rq[RQ[i, j]], Sq[RQ[i, j]], a.z_out, a.lo, a.hi, op.dtype),
        name="out")
    func = te.create_prim_func([X, H0, H1, W0, W1, RQ, Mq, Rq, Sq, out])
    tables = [_c(t, I64) for t in requant_tables(p["mult"], p["shift"])]
    return _call_fast(lb, op, add_prim, func, [xs[0], P["h0"], P["h1"], P["w0"], P["w1"], P["rq"], *tables],
                      (n, c, oh, ow))


def _resize(lb, op, xs, P, D, in_types, add_prim):
    """One TE kernel: per output element four table-indexed taps weighed in int32
    (|acc| ≤ 2^(2F)·255), then the scalar requantization."""
    a, p = op.attrs, op.params
    (n, c, h, w), dtype = in_types[0]
    oh, ow = p["y0"].size, p["x0"].size
    X = te.placeholder((n, c, h, w), dtype, "x")
    Y0, Y1, WY = (te.placeholder((oh,), I32, k) for k in ("y0", "y1", "wy"))
    X0, X1, WX = (te.placeholder((ow,), I32, k) for k in ("x0", "x1", "wx"))
    one, z_in = tvm.tirx.const(1 << a.frac, I32), tvm.tirx.const(a.z_in, I32)
    M, R, S = (tvm.tirx.const(int(t), I64) for t in requant_tables(np.array(a.mult), np.array(a.shift)))

    def code(b, k, i, j):
        def row(y):
            v0, v1 = (X[b, k, y, xj].astype(I32) - z_in for xj in (X0[j], X1[j]))
            return WX[j] * v0 + (one - WX[j]) * v1
        acc = WY[i] * row(Y0[i]) + (one - WY[i]) * row(Y1[i])
        return nt.output_code(nt.TIR, acc, M, R, S, a.z_out, a.lo, a.hi, op.dtype)
    out = te.compute((n, c, oh, ow), code, name="out")
    func = te.create_prim_func([X, Y0, Y1, WY, X0, X1, WX, out])
    return _call_fast(lb, op, add_prim, func, [xs[0], *(P[k] for k in ("y0", "y1", "wy", "x0", "x1", "wx"))],
                      (n, c, oh, ow))


def _layer_norm(lb, op, xs, P, D, in_types, add_prim):
    """One TE kernel over [N, C, ...]: per position the int64 sum and sum of squares over the
    channels and the exact root (nt.isqrt), then each channel's rounded quotient."""
    a = op.attrs
    shape, dtype = in_types[0]
    c = shape[1]
    X = te.placeholder(shape, dtype, "x")
    G, B = te.placeholder((c,), I32, "g"), te.placeholder((c,), I32, "b")
    rest = shape[:1] + shape[2:]

    def at(pos, ch):                                     # x[n, ch, ...] as int64 from a position (n, ...)
        return X[(pos[0], ch, *pos[1:])].astype(I64)

    rs = te.reduce_axis((0, c), "rs")
    total = te.compute(rest, lambda *pos: te.sum(at(pos, rs), axis=rs), name="total")
    rq = te.reduce_axis((0, c), "rq")
    cc = tvm.tirx.const(c, I64)
    squares = te.compute(rest, lambda *pos: te.sum((cc * at(pos, rq) - total[pos]) * (cc * at(pos, rq) - total[pos]),
                                                   axis=rq), name="squares")
    root = te.compute(rest, lambda *pos: nt.isqrt(tvm.tirx.floordiv(squares[pos] * tvm.tirx.const(1 << 2 * a.prec, I64),
                                                                      cc) + tvm.tirx.const(a.eps, I64)), name="root")

    def code(n, ch, *sp):
        pos = (n, *sp)
        y = cc * at(pos, ch) - total[pos]
        return nt.layer_norm_code(y, root[pos], G[ch], B[ch], a.prec, a.frac, a.z_out, a.lo, a.hi, op.dtype)
    out = te.compute(shape, code, name="out")
    func = te.create_prim_func([X, G, B, out])
    return _call_fast(lb, op, add_prim, func, [xs[0], P["g"], P["b"]], shape)


def _softmax(lb, op, xs, P, D, in_types, add_prim):
    """One TE kernel over [N, C, ...] in G groups: per (group, position) the max code and the int64
    sum of the exp table at max − x̄, then each channel's rounded quotient (nt.softmax_code)."""
    a = op.attrs
    shape, dtype = in_types[0]
    size = shape[1] // a.groups
    X = te.placeholder(shape, dtype, "x")
    T = te.placeholder(op.params["exp"].shape, I32, "exp")
    rest = (shape[0], a.groups, *shape[2:])

    def at(pos, j):                                      # x[n, g·size + j, ...] as int32 from (n, g, ...)
        return X[(pos[0], pos[1] * size + j, *pos[2:])].astype(I32)

    rm = te.reduce_axis((0, size), "rm")
    top = te.compute(rest, lambda *pos: te.max(at(pos, rm), axis=rm), name="top")
    rs = te.reduce_axis((0, size), "rs")
    total = te.compute(rest, lambda *pos: te.sum(T[top[pos] - at(pos, rs)].astype(I64), axis=rs), name="total")

    def code(n, ch, *sp):
        pos = (n, ch // size, *sp)
        e = T[top[pos] - X[(n, ch, *sp)].astype(I32)].astype(I64)
        return nt.softmax_code(e, total[pos], a.mult, a.frac, a.z_out, a.lo, a.hi, op.dtype)
    out = te.compute(shape, code, name="out")
    func = te.create_prim_func([X, T, out])
    return _call_fast(lb, op, add_prim, func, [xs[0], P["exp"]], shape)


def _matmul(lb, op, xs, P, D, in_types, add_prim):
    """One TE kernel for every form (NCHW): the int32 sum over D channels ("channels") or L
    positions ("positions") of (a − za)·(b − zb) per output element, then the scalar requant."""
    a = op.attrs
    (n, ca, ha, wa), da = in_types[0]
    (_, cb, hb, wb), db = in_types[1]
    g, size = a.heads, cb // a.heads                     # size: D, b's channels per head
    span = hb * wb if a.contract == "channels" else size  # L or D: output channels per head
    A, B = te.placeholder((n, ca, ha, wa), da, "a"), te.placeholder((n, cb, hb, wb), db, "b")
    za, zb = tvm.tirx.const(a.za, I32), tvm.tirx.const(a.zb, I32)
    M, R, S = (tvm.tirx.const(int(t), I64) for t in requant_tables(np.array(a.mult), np.array(a.shift)))

    def term(b_, ach, bch, j, i, k):                     # (a[ach, i, k] − za)·(b[bch, j] − zb), int32
        return (A[b_, ach, i, k].astype(I32) - za) * (B[b_, bch, j // wb, j % wb].astype(I32) - zb)

    if a.contract == "channels":
        r = te.reduce_axis((0, size), "rd")
        acc = te.compute((n, g * span, ha, wa), lambda b_, c, i, k: te.sum(
            term(b_, c // span * size + r, c // span * size + r, c % span, i, k), axis=r), name="acc")
    else:
        r = te.reduce_axis((0, hb * wb), "rj")
        acc = te.compute((n, g * span, ha, wa), lambda b_, c, i, k: te.sum(
            term(b_, c // span * hb * wb + r, c, r, i, k), axis=r), name="acc")
    out = te.compute(acc.shape, lambda *i: nt.output_code(nt.TIR, acc[i], M, R, S, a.z_out, a.lo, a.hi, op.dtype),
                     name="out")
    func = te.create_prim_func([A, B, out])
    return _call_fast(lb, op, add_prim, func, xs[:2], (n, g * span, ha, wa))


def _pad(lb, op, xs, P, D, in_types, add_prim):
    top, left, bottom, right = op.attrs.pads
    return lb.emit(relax.op.nn.pad(xs[0], [0, 0, 0, 0, top, bottom, left, right], pad_value=float(op.attrs.value)))


def _concat(lb, op, xs, P, D, in_types, add_prim):
    a = op.attrs
    ar = nt.RelaxArith(lb)
    parts = [nt.clamp_code(ar, nt.rescale(ar, x, z, k, a.t), a.z_out, a.lo, a.hi, op.dtype)
             for x, z, k in zip(xs, a.zs, a.ks)]
    return lb.emit(relax.op.concat(parts, axis=a.axis))


def _table(lb, op, xs, P, D, in_types, add_prim):
    return lb.emit(relax.op.take(P["table"], lb.emit(relax.op.astype(xs[0], I32)), axis=0))


def _mul(lb, op, xs, P, D, in_types, add_prim):
    a = op.attrs
    ar = nt.RelaxArith(lb)
    prod = ar.mul(ar.sub(ar.cast(xs[0], I32), ar.const(a.za, I32)), ar.sub(ar.cast(xs[1], I32), ar.const(a.zb, I32)))
    M, R, S = (_c(t, I64) for t in requant_tables(np.array(a.mult), np.array(a.shift)))
    return nt.output_code(ar, prod, M, R, S, a.z_out, a.lo, a.hi, op.dtype)


def _sum_pool2d(lb, op, xs, P, D, in_types, add_prim):
    a = op.attrs
    (n, c, h, w), dtype = in_types[0]
    ph, pw = a.padding
    if tuple(a.kernel) == (h, w) and ph == 0 and pw == 0:
        axes = [1, 2] if op.schedule.layout == "NHWC" else [2, 3]
        return lb.emit(relax.op.sum(relax.op.astype(xs[0], I32), axis=axes, keepdims=True))
    x = xs[0]
    if ph or pw:
        x = lb.emit(relax.op.nn.pad(x, [0, 0, 0, 0, ph, ph, pw, pw], pad_value=float(a.z_in)))
    kh, kw = a.kernel
    ones = np.ones((c, 1, kh, kw), np.int8 if dtype == "uint8" else np.int32)
    ones = relax.const(ones, str(ones.dtype))
    return lb.emit(relax.op.nn.conv2d(x, ones, strides=a.stride, groups=c, out_dtype=I32))


def _flatten(lb, op, xs, P, D, in_types, add_prim):
    shape = in_types[0][0]
    return lb.emit(relax.op.reshape(xs[0], (shape[0], int(np.prod(shape[1:])))))


def _gather(lb, op, xs, P, D, in_types, add_prim):
    if op.schedule.layout == "NHWC":                     # only in the fast form
        func, shape = fast.gather(in_types[0][0], in_types[0][1], op.params["index"].size)
        return _call_fast(lb, op, add_prim, func, [xs[0], P["index"]], shape)
    return lb.emit(relax.op.take(xs[0], P["index"], axis=1))


def _constant(lb, op, xs, P, D, in_types, add_prim):
    """The codes [C, H, W] repeated over the input's batch (transposed first when NHWC)."""
    codes = P["codes"]
    if op.schedule.layout == "NHWC":
        codes = lb.emit(relax.op.permute_dims(codes, [1, 2, 0]))
    shape = physical((in_types[0][0][0], *op.params["codes"].shape), op.schedule.layout)
    return lb.emit(relax.op.broadcast_to(lb.emit(relax.op.expand_dims(codes, 0)), shape))


def _reshape(lb, op, xs, P, D, in_types, add_prim):
    return lb.emit(relax.op.reshape(xs[0], (in_types[0][0][0], *op.attrs.shape)))


def _crop(lb, op, xs, P, D, in_types, add_prim):
    a = op.attrs
    axes = [1, 2] if op.schedule.layout == "NHWC" else [2, 3]
    return lb.emit(relax.op.strided_slice(xs[0], axes, [a.top, a.left], [a.top + a.height, a.left + a.width]))


# ---------------------------------------------------------------- fast form (fast_kernels.py)

def _call_fast(lb, op, add_prim, func, args, shape, name: str | None = None, dtype: str | None = None):
    name = name or f"{op.name}_kernel"
    gv = add_prim(func.with_attr("global_symbol", name), name)
    return lb.emit(relax.call_tir(gv, list(args), relax.TensorType(tuple(shape), dtype or op.dtype)))


def _conv2d_fast(lb, op, xs, P, D, in_types, add_prim, plan, residual=None):
    """``residual``: (fast.Residual, the other operand's relax var) of a fused add (build_conv_add)."""
    if plan == "depthwise":
        func, shape = fast.depthwise(op, in_types[0][0])
        return _call_fast(lb, op, add_prim, func, [xs[0], *D], shape)
    ranges = layer_ranges(op)
    fold = fast.fold_groups(op)
    func, shape = fast.conv2d(op, in_types[0][0], ranges, fold, residual and residual[0])
    index = [P["in_index"]] if "in_index" in op.params and (fold is None or fold[3] is None) else []
    other = [residual[1]] if residual else []
    name, dtype = (f"{op.name}_add_kernel", residual[0].out_dtype) if residual else (f"{op.name}_kernel", op.dtype)
    out = _call_fast(lb, op, add_prim, func, [xs[0], *D, *index, *other], shape, name, dtype)
    m = op.params["w"].shape[0]
    if shape[3] != m:                                    # output channels were padded to 16
        out = lb.emit(relax.op.strided_slice(out, [3], [0], [m]))
    return out


# ---------------------------------------------------------------- fused TIR kernel

def _group_acc(xp, W, p, c0, c1, shape, kernel, stride, dilation):
    """acc_p[b, k, i, j] = Σ_{c∈[c0,c1)} Σ_kernel xpad·w, int32 (TE)."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    rc = te.reduce_axis((0, c1 - c0), f"rc{p}")
    ry = te.reduce_axis((0, kh), f"ry{p}")
    rx = te.reduce_axis((0, kw), f"rx{p}")
    return te.compute(
        shape,
        lambda b, k, i, j: te.sum(
            xp[b, c0 + rc, i * sh + ry * dh, j * sw + rx * dw].astype(I32) * W[k, c0 + rc, ry, rx].astype(I32),
            axis=[rc, ry, rx]),
        name=f"acc{p}")


def _conv2d_fused(lb, op, xs, P, D, in_types, add_prim):
    (n, c, h, w_), in_dtype = in_types[0]
    wt = op.params["w"]
    m, cg, kh, kw = wt.shape
    a = op.attrs
    ranges = group_ranges(op.params["groups"], op.n_groups)      # contiguous: _conv_form
    (ph, pw), (sh, sw), (dh, dw) = a.padding, a.stride, a.dilation
    oh, ow = fast.output_hw(h, w_, (kh, kw), a.padding, a.stride, a.dilation)

    X = te.placeholder((n, c, h, w_), in_dtype, "x")
    W = te.placeholder((m, cg, kh, kw), "int8", "w")
    B = te.placeholder((m,), I32, "bias")
    Mq = te.placeholder((1, m, 1, 1), I64, "mult")
    Rq = te.placeholder((1, m, 1, 1), I64, "round")
    Sq = te.placeholder((1, m, 1, 1), I64, "shift")
    C = te.placeholder((len(ranges), m), I32, "corr")
    xp = topi.nn.pad(X, [0, 0, ph, pw], [0, 0, ph, pw], pad_value=tvm.tirx.const(a.z_in, in_dtype), name="xpad")
    accs = []
    for p, (c0, c1) in enumerate(ranges):
        if c1 == c0:
            accs.append(None)
            continue
        accs.append(_group_acc(xp, W, p, c0, c1, (n, m, oh, ow), (kh, kw), (sh, sw), (dh, dw)))

    def epilogue(b, k, i, j):
        total = nt.merge_groups(nt.TIR, B[k], {p: acc[b, k, i, j] - C[p, k] for p, acc in enumerate(accs)
                                               if acc is not None}, op.group_scales, a.frac)
        return nt.output_code(nt.TIR, total, Mq[0, k, 0, 0], Rq[0, k, 0, 0], Sq[0, k, 0, 0], a.z_out, a.lo,
                              a.hi, op.dtype)

    out = te.compute((n, m, oh, ow), epilogue, name="out")
    func = te.create_prim_func([X, W, B, Mq, Rq, Sq, C, out])
    sch = s_tir.Schedule(func)
    loops = sch.get_loops(sch.get_sblock("out"))
    for p, acc in enumerate(accs):
        if acc is not None:
            sch.compute_at(sch.get_sblock(f"acc{p}"), loops[-1])
    try:
        sch.compute_inline(sch.get_sblock("xpad"))
    except Exception:  # noqa: BLE001 (no pad block when padding is zero)
        pass
    kname = f"{op.name}_kernel"
    gv = add_prim(sch.mod["main"].with_attr("global_symbol", kname), kname)
    return lb.emit(relax.call_tir(gv, [xs[0], P["w"], P["bias"], D[0], D[1], D[2], D[3]],
                                  relax.TensorType((n, m, oh, ow), op.dtype)))


@dataclass(frozen=True)
class Kernel:
    """How TVM computes one kind. ``body(lb, op, xs, params, derived, in_types, add_prim)`` emits its
    Relax; ``plan(op, in_types)`` names the fast_kernels body a fast-form op gets (None: none for
    these shapes; a kind without ``plan`` has none); ``reads_nhwc(op, logical_in_shape)``: the op
    is layout-free for this shape and keeps an NHWC input NHWC (a kind without it: never)."""
    body: Callable
    plan: Callable[[Op, list], str | None] | None = None
    reads_nhwc: Callable[[Op, tuple], bool] | None = None


KERNELS: dict[str, Kernel] = {
    "quantize": Kernel(_quantize, plan=_plan_quantize),
    "dequantize": Kernel(_dequantize, reads_nhwc=_any_map),
    "conv2d": Kernel(_conv2d, plan=_plan_layer),
    "linear": Kernel(_linear, plan=_plan_layer),
    "add": Kernel(_add, plan=_plan_add),
    "max_pool2d": Kernel(_max_pool2d, plan=_plan_max_pool),
    "sum_pool2d": Kernel(_sum_pool2d, reads_nhwc=_global_sum),
    "flatten": Kernel(_flatten, reads_nhwc=_flat_1x1),
    "gather": Kernel(_gather, reads_nhwc=_any_map),
    "avg_pool2d": Kernel(_avg_pool2d),
    "pad": Kernel(_pad),
    "concat": Kernel(_concat),
    "table": Kernel(_table),
    "mul": Kernel(_mul),
    "layer_norm": Kernel(_layer_norm),
    "softmax": Kernel(_softmax),
    "matmul": Kernel(_matmul),
    "resize": Kernel(_resize),
    "constant": Kernel(_constant, reads_nhwc=_any_map),
    "reshape": Kernel(_reshape),
    "crop": Kernel(_crop, reads_nhwc=_any_map),
}
