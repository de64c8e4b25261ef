"""Scheduled CPU kernels of the ``fast`` form: one TIR PrimFunc per integer op, multi-threaded,
vectorized and, where the target has AVX-512 VNNI, tensorized with ``vpdpbusd``.

TVM's default llvm pipeline leaves every Relax op as a naive single-threaded loop nest;
these kernels are the untuned default schedules (meta-schedule can tune them further).
The numbers they compute are exactly those of relay_passes/reference.py; only the layout
changes: activations are NHWC between these kernels (relay_passes/program.py converts at
the edges), and each kernel packs what it needs:

conv2d (ungrouped, uint8 codes in)
    ``pack``: x [N, H, W, C] → [N, H+2ph, W+2pw, C4] padded with z_in (C4 = C rounded
    up to 4; padded channels meet zero weights; skipped when there is nothing to pad).
    Weights are packed at compile time to [M16/16, C4/4, KH, KW, 16, 4] int8 (M16 = M rounded up to 16). Each WAPS group p (a
    contiguous channel run whose ends are multiples of 4) accumulates acc_p over its
    [c0/4, c1/4) block of the reduction in int32: the inner 16×4 u8·s8 dot product is one
    ``vpdpbusd`` on x86 with VNNI (``dot``="vnni"), plain vectorized code otherwise. The
    epilogue — z-correction, shift-add merge with L fractional bits, int64 requantization,
    clamp — runs on each register tile right after it is accumulated (compute_at) and
    stores [N, OH, OW, M16].
depthwise conv2d (conv_groups = C = M)
    int32 MACs vectorized over 16 channels, read through the padding; a WAPS depthwise layer
    has one group per channel, so σ and n become per-channel tables in the same epilogue.
expansion + depthwise (expand_depthwise; codegen/cpu_fusion.py, opt-in)
    a pointwise stride-1 conv and the depthwise conv that alone reads it, in one kernel:
    parallel tasks (row bands × channel chunks) each expand the rows they read and
    convolve them while they are in cache.
add, max_pool2d, quantize, gather
    one loop nest each, parallel over the outer axes, vectorized along the inner one (a
    gather's channel loop is unrolled instead).

A layer whose shape does not fit (grouped convs, int32 inputs, group ends not on a multiple
of 4) keeps the split/reference body of relay_passes/kernels.py.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import tvm
import tvm.s_tir as s_tir
from tvm import te, topi
from tvm.tirx import const

from calib.numerics import GroupScale, requant_tables
from relay_passes import numeric_tvm as nt
from relay_passes.attrs import AddAttrs

I32, I64 = "int32", "int64"
VNNI = "waps_dot_16x4_u8i8i32_vnni"
# ARM dot product (ARMv8.2-A +dotprod): four ``sdot`` (signed) per 16×4 tile. The codes are
# uint8 in the description and read as int8 by sdot, so it is exact only for codes ≤ 127;
# larger codes are packed as u ^ 0x80 (read as u − 128) and the conv's z-correction takes
# 128·Σw back (see conv_dot).
SDOT = "waps_dot_16x4_u7i8i32_sdot"
DOT_INTRIN = {"vnni": VNNI, "sdot": SDOT}


def _register_dots() -> None:
    """VNNI: TVM 0.27's own 'dot_16x4_vnni' passes <16 x i32> operands, which LLVM 22's
    llvm.x86.avx512.vpdpbusd.512 (<64 x i8>) rejects; this is the same intrinsic, typed right.
    SDOT: the same 16×4 description, as four NEON ``sdot`` on 4-lane quarters of the tile."""
    from tvm.s_tir import TensorIntrin        # not tvm.s_tir.tensor_intrin: importing it parses every
    from tvm.script import tirx as T           # target's intrinsics (about a minute on 2 cores)
    try:
        TensorIntrin.get(VNNI)
        return
    except Exception:  # noqa: BLE001 (not registered yet)
        pass

    @T.prim_func(s_tir=True)
    def desc(a: T.Buffer((4,), "uint8", offset_factor=1), b: T.Buffer((16, 4), "int8", offset_factor=1),
             c: T.Buffer((16,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(c[0:16], a[0:4], b[0:16, 0:4])
            T.writes(c[0:16])
            for i in T.serial(0, 16):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        c[vi] = c[vi] + T.cast(a[vk], "int32") * T.cast(b[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(a: T.Buffer((4,), "uint8", offset_factor=1), b: T.Buffer((16, 4), "int8", offset_factor=1),
             c: T.Buffer((16,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(c[0:16], a[0:4], b[0:16, 0:4])
            T.writes(c[0:16])
            a_i32 = T.reinterpret(a.vload([0], "uint8x4"), dtype="int32")
            a_i8 = T.reinterpret(T.broadcast(a_i32, 16), dtype="int8x64")
            c[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                c.vload([0], dtype="int32x16"), a_i8, b.vload([0, 0], dtype="int8x64"), dtype="int32x16")

    TensorIntrin.register(VNNI, desc, impl)

    @T.prim_func(s_tir=True)
    def sdot_impl(a: T.Buffer((4,), "uint8", offset_factor=1), b: T.Buffer((16, 4), "int8", offset_factor=1),
                  c: T.Buffer((16,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(c[0:16], a[0:4], b[0:16, 0:4])
            T.writes(c[0:16])
            a_i32 = T.reinterpret(a.vload([0], "uint8x4"), dtype="int32")
            a_i8 = T.reinterpret(T.broadcast(a_i32, 4), dtype="int8x16")
            for q in T.unroll(4):
                c[T.ramp(q * 4, 1, 4)] = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"),
                    c.vload([q * 4], dtype="int32x4"), b.vload([q * 4, 0], dtype="int8x16"), a_i8,
                    dtype="int32x4")

    TensorIntrin.register(SDOT, desc, sdot_impl)


TVM_VNNI = "dot_16x4_vnni"


def alias_tvm_vnni() -> None:
    """Make TVM's own intrinsic name 'dot_16x4_vnni' — the one meta-schedule's VNNI rule
    tensorizes with, and that tuning records name — mean the verified implementation above.
    TVM's version does not build with LLVM 22, so without this every VNNI candidate of a
    search fails, and a records folder holding such candidates cannot even be read. Imports
    TVM's x86 intrinsics first (about 20 s), so that their own registration cannot collide."""
    import tvm.s_tir.tensor_intrin.x86  # noqa: F401 (registers TVM's versions)
    from tvm.s_tir import TensorIntrin
    ours = TensorIntrin.get(VNNI)
    TensorIntrin.register(TVM_VNNI, ours.desc, ours.impl, override=True)


def host_dot() -> str:
    """'vnni' when this machine's CPU has AVX-512 VNNI (and TVM's LLVM knows it), else 'none'."""
    try:
        cpu = tvm.target.codegen.llvm_get_system_cpu()
        feats = set(tvm.target.codegen.llvm_get_cpu_features(tvm.target.Target({"kind": "llvm", "mcpu": cpu})))
    except Exception:  # noqa: BLE001
        return "none"
    return "vnni" if "avx512vnni" in feats else "none"


# ---------------------------------------------------------------- which ops fit

def conv_fits(op, in_dtype: str, ranges) -> bool:
    a = op.attrs
    if in_dtype != "uint8":
        return False
    if a.conv_groups == 1 and fold_groups(op) is not None:
        return True                         # one accumulator: where the groups end does not matter
    if ranges is None:
        return False
    if a.conv_groups == 1:
        return all(c0 % 4 == 0 and (c1 % 4 == 0 or c1 == op.params["w"].shape[1]) for c0, c1 in ranges if c1 > c0)
    m, cg = op.params["w"].shape[:2]
    return cg == 1 and a.conv_groups == m             # depthwise


def pack_weights(w: np.ndarray) -> np.ndarray:
    """[M, C, KH, KW] int8 → [M16/16, C4/4, KH, KW, 16, 4] (zero rows/columns pad M and C)."""
    m, c, kh, kw = w.shape
    m16, c4 = round_up(m, 16), round_up(c, 4)
    wp = np.zeros((m16, c4, kh, kw), np.int8)
    wp[:m, :c] = w
    return np.ascontiguousarray(wp.reshape(m16 // 16, 16, c4 // 4, 4, kh, kw).transpose(0, 2, 4, 5, 1, 3))


def pack_depthwise(w: np.ndarray) -> np.ndarray:
    """[C, 1, KH, KW] int8 → [KH, KW, C]."""
    return np.ascontiguousarray(w[:, 0].transpose(1, 2, 0))


def round_up(v: int, k: int) -> int:
    return -(-v // k) * k


def output_hw(h: int, w: int, kernel, padding, stride, dilation=(1, 1)) -> tuple[int, int]:
    """(OH, OW) of a sliding window (floor mode) over an H×W map."""
    (kh, kw), (ph, pw), (sh, sw), (dh, dw) = kernel, padding, stride, dilation
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def epilogue_tables(op, per_channel_groups: bool, pad_to: int | None = None) -> list[np.ndarray]:
    """Flat per-channel constants: bias, M (int32 [M]), 2^(S−1), S (int64 [M]); zero-padded to
    ``pad_to`` channels; for depthwise also σ_k, n_k (int32 [M], channel_groups)."""
    _, rounding, total_shift = requant_tables(op.params["mult"], op.params["shift"])
    out = [op.params["bias"].astype(np.int32), op.params["mult"].astype(np.int32), rounding, total_shift]
    if pad_to:
        out = [np.pad(t, (0, pad_to - t.size)) for t in out]
    if per_channel_groups:
        out += list(channel_groups(op))
    return out


def channel_groups(op) -> tuple[np.ndarray, np.ndarray]:
    """σ_k, n_k (int32 [M]) of a depthwise layer, whose WAPS groups are one per channel."""
    m = op.params["w"].shape[0]
    if "groups" not in op.params:
        return np.zeros(m, np.int32), np.ones(m, np.int32)
    g = op.params["groups"].astype(np.int64)
    sig = np.array([s.sigma for s in op.group_scales], np.int32)
    ns = np.array([s.n for s in op.group_scales], np.int32)
    return sig[g], np.maximum(ns[g], 1)


# ---------------------------------------------------------------- schedules

class _Policy:
    """Where a kernel's schedule comes from. By default: the schedule written here. Under
    ``tuned(database, target)``: the best record of a meta-schedule database (waps-tvm tune)
    for the kernel's unscheduled workload, else the default. Under ``collect()``: the
    default, and each (unscheduled PrimFunc, default Schedule) pair is kept for tuning."""
    database = None
    target = None
    collected: list | None = None


_UNSCHEDULED: dict[int, object] = {}


@contextmanager
def tuned(database, target):
    _Policy.database, _Policy.target = database, target
    try:
        yield
    finally:
        _Policy.database = _Policy.target = None


@contextmanager
def collect():
    _Policy.collected = []
    try:
        yield _Policy.collected
    finally:
        _Policy.collected = None


def _schedule(func):
    sch = s_tir.Schedule(func)
    _UNSCHEDULED[id(sch)] = func
    return sch


def _finish(sch):
    func = _UNSCHEDULED.pop(id(sch))
    if _Policy.database is not None:
        best = _Policy.database.query_schedule(tvm.IRModule({"main": func}), _Policy.target, "main")
        if best is not None:
            return best.mod["main"].with_attr("tirx.is_scheduled", True)
    if _Policy.collected is not None:
        _Policy.collected.append((func, sch))
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _pick_block(ow: int, k16: int, tiles: int) -> tuple[int, int]:
    """(reg_n, oc_blk): at most ``tiles`` 16-lane accumulators (16 of AVX-512's 32 zmm; 6 of
    NEON's 32 q registers, 4 each), fewest loads per dot product; reg_n | OW."""
    best = None
    for ob in (1, 2, 3, 4, 6):
        if k16 % ob:
            continue
        for rn in range(1, min(ow, 16) + 1):
            if ow % rn == 0 and rn * ob <= tiles:
                score = (ob + rn) / (ob * rn)
                if best is None or score < best[0]:
                    best = (score, (rn, ob))
    return best[1]


def _parallel_vectorize(sch, block: str, n_outer: int) -> None:
    loops = sch.get_loops(sch.get_sblock(block))
    if n_outer > 1:
        sch.parallel(sch.fuse(*loops[:n_outer]))
    else:
        sch.parallel(loops[0])
    _vectorize_channels(sch, sch.get_sblock(block))


def _window_value(x, a, c: int, index=None):
    """x[b, i, j, ch] of the NHWC input seen through the padding: z_in outside the image and
    in channels ≥ c; with ``index``, channel ch reads x's channel index[ch]. Indices are
    clamped, so every load is in bounds and the select vectorizes."""
    _, h, w, _ = x.shape
    ph, pw = a.padding
    z = const(a.z_in, "uint8")

    def value(b, i, j, ch):
        cc = tvm.tirx.min(ch, c - 1)
        cc = index[cc] if index is not None else cc
        inside = tvm.tirx.all(i >= ph, i < h + ph, j >= pw, j < w + pw, ch < c)
        ii = tvm.tirx.max(tvm.tirx.min(i - ph, h - 1), 0)
        jj = tvm.tirx.max(tvm.tirx.min(j - pw, w - 1), 0)
        return tvm.tirx.if_then_else(inside, x[b, ii, jj, cc], z)
    return value


def _vectorize_channels(sch, block) -> None:
    """Vectorize a block's innermost (channel) loop in 64-lane pieces when it divides."""
    ch = sch.get_loops(block)[-1]
    extent = int(sch.get(ch).extent)
    if extent > 64 and extent % 64 == 0:
        ch = sch.split(ch, [None, 64])[1]
    sch.vectorize(ch)


def _pack(x, a, c4: int, scale=None, index=None, subsample=(1, 1), flip: bool = False, row_pad: int = 0):
    """NHWC codes → padded [N, Hp, Wp, C4] (channel ch = x[..., index[ch]]·scale[ch] when
    given, ^ 0x80 with ``flip``); the input itself when there is nothing to pad, scale, gather
    or flip. Without padding a ``subsample`` (a pointwise conv's stride) keeps only the pixels
    the conv reads, and ``row_pad`` adds that many copies of the first and last rows above
    and below."""
    n, h, w, c = x.shape
    ph, pw = a.padding
    if ph == pw == 0 and c4 == c and scale is None and index is None and not flip and not row_pad:
        return x
    shape = (n, h + 2 * ph, w + 2 * pw, c4)
    if ph == pw == 0:
        sh, sw = subsample
        shape = (n, (h - 1) // sh + 1 + 2 * row_pad, (w - 1) // sw + 1, c4)

        def value(b, i, j, ch):             # channels past c (zero weight rows) read channel c − 1
            cc = tvm.tirx.min(ch, c - 1) if c4 != c else ch
            ii = tvm.tirx.max(tvm.tirx.min(i - row_pad, shape[1] - 2 * row_pad - 1), 0) if row_pad else i
            return x[b, ii * sh, j * sw, index[cc] if index is not None else cc]
    else:
        value = _window_value(x, a, c, index)
    scaled = value if scale is None else (lambda b, i, j, ch: value(b, i, j, ch) * scale[ch])
    if flip:
        return te.compute(shape, lambda b, i, j, ch: scaled(b, i, j, ch) ^ const(0x80, "uint8"), name="pack")
    return te.compute(shape, scaled, name="pack")


def _requant(op, total, k, M, R, S):
    """The output code of channel k from an int32 ``total`` (numeric_tvm.output_code)."""
    a, narrow = op.attrs, int(op.params["shift"].min()) >= 0
    return nt.output_code(nt.TIR, total, M[k], R[k], S[k], a.z_out, a.lo, a.hi, op.dtype, narrow)


def _epilogue_args(m: int):
    """Placeholders of epilogue_tables' first four: bias, M (int32 [m]), 2^(S−1), S (int64 [m])."""
    return (te.placeholder((m,), I32, "bias"), te.placeholder((m,), I32, "mult"),
            te.placeholder((m,), I64, "round"), te.placeholder((m,), I64, "shift"))


def _group_sum(xp, W, i0, ico, ry, rx, ici, stride, dilation):
    (sh, sw), (dh, dw) = stride, dilation

    def acc(b, ko, i, j, ki):
        return te.sum(xp[b, i * sh + ry * dh, j * sw + rx * dw, (i0 + ico) * 4 + ici].astype(I32)
                      * W[ko, i0 + ico, ry, rx, ki, ici].astype(I32), axis=[ico, ry, rx, ici])
    return acc


def fold_groups(op) -> tuple[str, np.ndarray, int, np.ndarray | None] | None:
    """One accumulator for all WAPS groups of a conv, when that is exact: (side, a_c, s, perm).

    With n_p ≤ L every group's term is linear, (acc_p − corr_p)·K_p with
    K_p = 2^L + σ_p·2^(L−n_p) (numerics.group_factor), and K_p = a_p·2^s for
    s = L − max{n_p : σ_p ≠ 0}. So Σ_p K_p·(acc_p − corr_p) = 2^s·(acc′ − corr′), where acc′
    is the plain conv with every input channel c scaled by a_c = a_{g(c)}: on the weights
    (side 'w') when w·a_c still fits int8, else on the codes (side 'x') when in_qmax·a_c and
    z_in·a_c fit uint8 (A4 codes: 15·17 = 255). None when neither fits, some n_p > L, or the
    scaled u8×s8 sum could leave int32. The groups need not be contiguous any more, so a
    folded gather (``in_index``, a permutation) moves into the weights: ``perm`` is its
    inverse, and channel c of the weights and of a_c is taken from perm[c]."""
    a = op.attrs
    if "groups" not in op.params:
        return None
    scales, frac = op.group_scales, a.frac
    if any(s.sigma and s.n > frac for s in scales):
        return None
    shift = frac - max([s.n for s in scales if s.sigma] or [0])
    ap = nt.group_factors(scales, frac) >> shift
    per_c = ap[op.params["groups"]]
    mass = (np.abs(op.params["w"].astype(np.int64)).sum(axis=(2, 3)) * per_c[None, :]).sum(1)
    if int(mass.max()) * int(a.in_qmax) > 2**31 - 1:
        return None
    w = op.params["w"].astype(np.int64) * per_c[None, :, None, None]
    if w.min() >= -128 and w.max() <= 127:
        side = "w"
    elif max(int(a.in_qmax), int(a.z_in)) * int(per_c.max()) <= 255:
        side = "x"
    else:
        return None
    return side, per_c, shift, _inverse(op.params.get("in_index"))


def _inverse(index) -> np.ndarray | None:
    """The inverse of a channel permutation (None if ``index`` is absent or not one)."""
    if index is None or not np.array_equal(np.sort(index), np.arange(index.size)):
        return None
    return np.argsort(index)


def conv_dot(op, fold) -> tuple[str, bool]:
    """(inner product, flip) of an ungrouped fast conv: the op's ``schedule.dot`` (LegalizeWAPS),
    and for 'sdot' whether its packed codes can exceed 127 (in_qmax or z_in, times a_c on the
    code side of a fold). Then the pack stores u ^ 0x80, which sdot reads as u − 128, so the
    accumulator is acc − 128·Σw and the z-correction adds 128·Σw back (kernels.py): exact.
    A flip needs one accumulator (a fold, or no groups); otherwise the conv gets 'none'."""
    dot = op.schedule.dot
    if dot != "sdot":
        return dot, False
    a = op.attrs
    top = max(int(a.in_qmax), int(a.z_in)) * (int(fold[1].max()) if fold and fold[0] == "x" else 1)
    if top <= 127:
        return dot, False
    return ("sdot", True) if fold is not None or "groups" not in op.params else ("none", False)


@dataclass(frozen=True)
class Residual:
    """A residual add computed in a conv's epilogue (codegen/cpu_fusion.py): the add's
    attributes, which of its operands the conv's output codes are (0: a, 1: b), the other
    operand's dtype and the add's output dtype."""
    attrs: AddAttrs
    conv_operand: int
    dtype: str
    out_dtype: str


@dataclass
class _ConvDef:
    """The TE of an ungrouped fast conv up to its output code: the placeholders in argument
    order (x, w_packed, bias, M, R, S, corr [, x_scale] [, in_index]), the packed input ``xp``
    (``x`` itself when nothing is packed), the per-group accumulators [N, M16/16, OH, OW, 16]
    and ``code(b, i, j, k)``, channel k's output code at an output pixel."""
    args: list
    x: te.Tensor
    xp: te.Tensor
    accs: dict
    code: object
    shape: tuple[int, int, int, int]
    dot: str
    pointwise: bool


@dataclass(frozen=True)
class _Bands:
    """Output rows of a pointwise stride-1 conv computed per band (expand_depthwise): ``pad``
    rows above and below the image (their accumulators read the nearest image row, as the
    pack repeats it; their codes are meant to be replaced), then ``count`` bands of ``rows``
    rows, band t starting at padded row t·step. Accumulators and codes are indexed
    [N, count, ..., rows, OW, ...]: bands overlap by rows − step, and each has its own."""
    count: int
    rows: int
    step: int
    pad: int


def _conv_def(op, in_shape, ranges, fold, bands: _Bands | None = None) -> _ConvDef:
    """With ``bands`` the output rows are banded (_Bands): ``code(b, t, r, j, k)``, ``shape``
    [N, count, rows, OW, M16]."""
    dot, flip = conv_dot(op, fold)
    n, c, h, w_ = in_shape
    m, _, kh, kw = op.params["w"].shape
    a = op.attrs
    (ph, pw), (sh, sw), (dh, dw) = a.padding, a.stride, a.dilation
    oh, ow = output_hw(h, w_, (kh, kw), a.padding, a.stride, a.dilation)
    m16, c4 = round_up(m, 16), round_up(c, 4)
    scales, frac = op.group_scales, a.frac
    if fold is not None:                 # one unscaled group of 2^s-scaled channels
        ranges, scales, frac = [(0, c)], (GroupScale(0, 0),), fold[2]
    g = len(ranges)
    X = te.placeholder((n, h, w_, c), "uint8", "x")
    W = te.placeholder((m16 // 16, c4 // 4, kh, kw, 16, 4), "int8", "w")
    B, M, R, S = _epilogue_args(m16)
    C = te.placeholder((g, m16), I32, "corr")
    extra, scale, index = [], None, None
    if fold is not None and fold[0] == "x":
        scale = te.placeholder((c4,), "uint8", "x_scale")
        extra.append(scale)
    if "in_index" in op.params and (fold is None or fold[3] is None):
        index = te.placeholder((c,), I32, "in_index")
        extra.append(index)
    pointwise = kh == kw == 1 and ph == pw == 0
    xp = _pack(X, a, c4, scale, index, (sh, sw) if pointwise else (1, 1), flip, bands.pad if bands else 0)
    stride = (1, 1) if pointwise and xp is not X else (sh, sw)      # a pointwise pack is subsampled
    accs = {}
    for p, (c0, c1) in enumerate(ranges):
        if c1 == c0:
            continue
        i0, i1 = c0 // 4, -(-c1 // 4)
        ico = te.reduce_axis((0, i1 - i0), f"ico{p}")
        ry, rx = te.reduce_axis((0, kh), f"ry{p}"), te.reduce_axis((0, kw), f"rx{p}")
        ici = te.reduce_axis((0, 4), f"ici{p}")
        body = _group_sum(xp, W, i0, ico, ry, rx, ici, stride, (dh, dw))
        if bands is None:
            accs[p] = te.compute((n, m16 // 16, oh, ow, 16), body, name=f"acc{p}")
        else:
            accs[p] = te.compute((n, bands.count, m16 // 16, bands.rows, ow, 16),
                                 lambda b, t, ko, r, j, ki: body(b, ko, t * bands.step + r, j, ki), name=f"acc{p}")

    def code(b, *pos):
        *rows, j, k = pos
        at = (k // 16, *rows) if bands is None else (rows[0], k // 16, rows[1])
        total = nt.merge_groups(nt.TIR, B[k], {p: acc[(b, *at, j, k % 16)] - C[p, k] for p, acc in accs.items()},
                                scales, frac)
        return _requant(op, total, k, M, R, S)

    shape = (n, oh, ow, m16) if bands is None else (n, bands.count, bands.rows, ow, m16)
    return _ConvDef([X, W, B, M, R, S, C, *extra], X, xp, accs, code, shape, dot, pointwise)


def _split_tile(sch, d: _ConvDef, j_, k_):
    """Split the pixel loop ``j_`` and channel loop ``k_`` of the conv ``d``'s codes into
    register tiles of ``reg_n`` pixels × ``oc_blk`` 16-channel tiles (_pick_block); returns
    (koo, jo, koi, ji, ki), not yet reordered."""
    ow, m16 = (int(sch.get(loop).extent) for loop in (j_, k_))
    reg_n, oc_blk = _pick_block(ow, m16 // 16, 6 if d.dot == "sdot" else 16)
    koo, koi, ki = sch.split(k_, [None, oc_blk, 16])
    jo, ji = sch.split(j_, [None, reg_n])
    return koo, jo, koi, ji, ki


def _schedule_accs(sch, d: _ConvDef) -> None:
    """Each accumulator of ``d``, already computed at its register tile's pixel loop: the
    reduction outermost, the tile's accumulators unrolled, the inner 16×4 product tensorized
    with the dot intrinsic (vectorized where there is none)."""
    for p in d.accs:
        blk = sch.get_sblock(f"acc{p}")
        loops = sch.get_loops(blk)
        # under jo: b, ko, i, j, ki (spatial, extents 1/oc_blk/1/reg_n/16) then ico, ry, rx, ici
        sb, sko, si, sj, ski, rico, rry, rrx, rici = loops[-9:]
        if d.dot in DOT_INTRIN:
            sch.reorder(rico, rry, rrx, sko, sj, ski, rici)
        else:
            sch.reorder(rico, rry, rrx, rici, sko, sj, ski)
            sch.vectorize(ski)
        init = sch.decompose_reduction(blk, rico)
        sch.vectorize(sch.get_loops(init)[-1])
        sch.unroll(sj)
        sch.unroll(sko)
        if d.dot in DOT_INTRIN:
            sch.tensorize(ski, DOT_INTRIN[d.dot])


def conv2d(op, in_shape, ranges, fold: tuple | None = None, residual: Residual | None = None):
    """(PrimFunc, output shape) of an ungrouped conv with contiguous groups; arguments
    (x [N, H, W, C], w_packed, bias, M, R, S, corr[g, M16] [, x_scale [C4] uint8]
    [, in_index [C] int32] [, residual [N, OH, OW, M]]) (tables padded to M16) → out
    [N, OH, OW, M16]. ``in_shape`` is logical (NCHW). With ``fold`` (fold_groups) there is one
    group over all channels, corr has one row, the merge is bias + (acc − corr)·2^s, and side
    'x' scales the codes while packing them; an ``in_index`` param (a folded gather) is
    applied while packing too. The inner product is conv_dot's (a flipped sdot pack stores
    codes ^ 0x80). With ``residual`` (M a multiple of 16) each output code is then added to
    the other operand's code by the add rule (numeric_tvm.residual_add) and ``out`` holds the
    add's codes: the conv's own output is never stored."""
    d = _conv_def(op, in_shape, ranges, fold)
    m = op.params["w"].shape[0]
    extra = []
    if residual is not None:
        if m != d.shape[3]:
            raise ValueError(f"{op.name}: a residual epilogue needs output channels in multiples of 16 (has {m})")
        other = te.placeholder((*d.shape[:3], m), residual.dtype, "residual")
        extra.append(other)

    def epilogue(b, i, j, k):
        code = d.code(b, i, j, k)
        if residual is None:
            return code
        pair = (code, other[b, i, j, k]) if residual.conv_operand == 0 else (other[b, i, j, k], code)
        return nt.residual_add(nt.TIR, *pair, residual.attrs, residual.out_dtype)

    out = te.compute(d.shape, epilogue, name="out")
    sch = _schedule(te.create_prim_func([*d.args, *extra, out]))
    # a pointwise conv packs (scales, gathers) each input row inside the row loop that uses it
    # (one parallel region instead of two); other packs are a parallel pass of their own
    row_pack = d.xp is not d.x and d.pointwise
    if d.xp is not d.x and not row_pack:
        _parallel_vectorize(sch, "pack", 2)
    b_, i_, j_, k_ = sch.get_loops(sch.get_sblock("out"))
    koo, jo, koi, ji, ki = _split_tile(sch, d, j_, k_)
    # rows outermost: threads split the image by rows, never one pixel's channels (two threads
    # writing the halves of the same cache lines made MobileNetV2's 16→96 expansion 1.7× slower)
    sch.reorder(b_, i_, koo, jo, koi, ji, ki)
    rows = sch.fuse(b_, i_) if row_pack else sch.fuse(b_, i_, koo)
    sch.parallel(rows)
    for p in d.accs:
        sch.compute_at(sch.get_sblock(f"acc{p}"), jo, preserve_unit_loops=True)
    if row_pack:
        pack = sch.get_sblock("pack")
        sch.compute_at(pack, rows, preserve_unit_loops=True)
        _vectorize_channels(sch, pack)
    _schedule_accs(sch, d)
    sch.vectorize(ki)
    return _finish(sch), d.shape


def depthwise_factors(op) -> np.ndarray | None:
    """K_k = 2^L + σ_k·2^(L−n_k) (int32 [C]) when every channel's shift is exact (σ_k = 0 or
    n_k ≤ L, numerics.group_factor): the merge is then bias + (acc − corr)·K_k. None otherwise."""
    sig, n = channel_groups(op)
    factors = nt.group_factors([GroupScale(int(g), int(k)) for g, k in zip(sig, n)], op.attrs.frac)
    return None if factors is None else factors.astype(np.int32)


def _window_sum_fits_int16(op) -> bool:
    """Whether every depthwise window sum Σ x·w fits int16: Σ|w| over a channel's window times
    the largest code it can read (in_qmax, or z_in in the padding) is ≤ 32767 (A4 codes and
    W4 weights: 9·8·15 = 1080). Then the MACs run in 16-bit lanes, twice as many per vector
    (used when C is a multiple of 32; 15–20 % faster on MobileNetV2's depthwise layers)."""
    a = op.attrs
    mass = np.abs(op.params["w"].astype(np.int64)).reshape(op.params["w"].shape[0], -1).sum(1)
    return int(mass.max()) * max(int(a.in_qmax), int(a.z_in)) <= 32767


@dataclass
class _DepthwiseDef:
    """The TE of a fast depthwise conv reading the NHWC map ``x`` (its first C channels): the
    placeholders after x in argument order (w [KH, KW, C], bias, M, R, S, corr [1, C], then K_k
    or σ_k, n_k), the output codes ``out`` [N, OH, OW, C] and ``lanes``, the channels one vector
    accumulates (32 int16 lanes where the window sums fit, else 16 int32)."""
    args: list
    out: te.Tensor
    lanes: int


def _depthwise_def(op, x, c: int, in_hw: tuple[int, int] | None = None, read=None) -> _DepthwiseDef:
    """``read(b, i, ry, col, k)``: the input code output row i's window row ry meets at padded
    column ``col`` (default: x seen through the padding, _window_value); ``in_hw``: the input
    map's size (default x's)."""
    n = x.shape[0]
    h, w_ = in_hw or (int(x.shape[1]), int(x.shape[2]))
    kh, kw = op.params["w"].shape[2:]
    a = op.attrs
    (sh, sw), (dh, dw) = a.stride, a.dilation
    oh, ow = output_hw(h, w_, (kh, kw), a.padding, a.stride, a.dilation)
    W = te.placeholder((kh, kw, c), "int8", "w")
    B, M, R, S = _epilogue_args(c)
    C = te.placeholder((1, c), I32, "corr")
    linear = depthwise_factors(op) is not None
    if linear:
        tables = [te.placeholder((c,), I32, "k_factor")]
    else:
        tables = [te.placeholder((c,), I32, "sig"), te.placeholder((c,), I32, "n")]
    if read is None:
        xv = _window_value(x, a, c)
        read = lambda b, i, ry, col, k: xv(b, i * sh + ry * dh, col, k)      # noqa: E731
    ry, rx = te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx")
    acc_dt = "int16" if _lanes(op, c) == 32 else I32                    # 32 lanes fill a zmm
    acc = te.compute((n, oh, ow, c), lambda b, i, j, k: te.sum(
        read(b, i, ry, j * sw + rx * dw, k).astype(acc_dt) * W[ry, rx, k].astype(acc_dt), axis=[ry, rx]),
        name="acc")
    frac = a.frac

    def epilogue(b, i, j, k):
        v = acc[b, i, j, k].astype(I32) - C[0, k]
        if linear:
            return _requant(op, B[k] + v * tables[0][k], k, M, R, S)
        SG, NS = tables
        return _requant(op, B[k] + nt.group_term_by(nt.TIR, v, SG[k], NS[k], frac), k, M, R, S)

    out = te.compute((n, oh, ow, c), epilogue, name="out")
    return _DepthwiseDef([W, B, M, R, S, C, *tables], out, _lanes(op, c))


def _lanes(op, c: int) -> int:
    """The channels one vector of a depthwise conv accumulates: 32 int16 lanes where the
    window sums fit (_window_sum_fits_int16) and C is a multiple of 32, else up to 16 int32."""
    return 32 if c % 32 == 0 and _window_sum_fits_int16(op) else next(v for v in (16, 8, 4, 2, 1) if c % v == 0)


def _tile_depthwise(sch, d: _DepthwiseDef, j_, k_) -> None:
    """Vectorize a depthwise conv over ``lanes`` channels (k_) and ``px`` output pixels (j_)
    that share each weight load; each tile is accumulated in registers (compute_at) and
    requantized in place."""
    px = next(v for v in (8, 4, 2, 1) if int(sch.get(j_).extent) % v == 0)
    ko, ki = sch.split(k_, [None, d.lanes])
    jo, ji = sch.split(j_, [None, px])
    sch.reorder(jo, ko, ji, ki)
    blk = sch.get_sblock("acc")
    sch.compute_at(blk, ko, preserve_unit_loops=True)
    sj, sk, rry, rrx = sch.get_loops(blk)[-4:]
    sch.reorder(rry, rrx, sj, sk)
    sch.unroll(sj)
    sch.vectorize(sk)
    init = sch.decompose_reduction(blk, rry)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.unroll(rry)
    sch.unroll(rrx)
    sch.vectorize(ki)


def depthwise(op, in_shape):
    """(PrimFunc, output shape) of a depthwise conv; arguments (x [N, H, W, C], w [KH, KW, C],
    bias, M, R, S, corr[1, C] (summed over groups), then K_k (depthwise_factors) or σ_k, n_k)
    → [N, OH, OW, C]. The window is read through the padding (no packed copy); each
    16-channel tile of an output pixel is accumulated in registers and requantized in place."""
    n, c, h, w_ = in_shape
    X = te.placeholder((n, h, w_, c), "uint8", "x")
    d = _depthwise_def(op, X, c)
    sch = _schedule(te.create_prim_func([X, *d.args, d.out]))
    b_, i_, j_, k_ = sch.get_loops(sch.get_sblock("out"))
    sch.parallel(sch.fuse(b_, i_))
    _tile_depthwise(sch, d, j_, k_)
    return _finish(sch), tuple(int(v) for v in d.out.shape)


def pool_threads() -> int:
    """The threads TVM's CPU thread pool runs a parallel loop on here: TVM_NUM_THREADS, else
    the cores this process may use."""
    import os
    env = os.environ.get("TVM_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else len(os.sched_getaffinity(0))


CACHE_BUDGET = 256 * 1024        # bytes of expanded map one task of expand_depthwise keeps live


@dataclass(frozen=True)
class Tasks:
    """How expand_depthwise splits its work: ``bands`` row bands of the output × ``chunks``
    channel chunks, each task expanding the rows and channels its band and chunk read."""
    bands: int
    chunks: int


def expand_tasks(n: int, oh: int, w: int, m: int, lanes: int, rows_for, threads: int,
                 budget: int = CACHE_BUDGET) -> Tasks:
    """The split with the least estimated time among those whose expanded rows × W × chunk fit
    ``budget``: rows expanded more than once (each band's halo, ``rows_for(b)`` input rows for
    b output rows), the tasks' imbalance over ``threads``, and a chunk that is not whole cache
    lines (threads would write halves of the same lines of the output) all count against it.
    Chunks are multiples of ``lanes`` and 16 channels; bands divide OH."""
    unit = max(lanes, 16)
    best = None
    for bands in (b for b in range(1, oh + 1) if oh % b == 0):
        rows = rows_for(oh // bands)
        redo = bands * rows / max(rows_for(oh), 1)
        for chunks in (q for q in range(1, m // unit + 1) if m % (q * unit) == 0):
            tasks = n * bands * chunks
            per = -(-tasks // threads) / (tasks / threads)
            shared = 1.1 if chunks > 1 and (m // chunks) % 64 else 1.0
            score = redo * per * shared * (1 + 0.01 * (chunks - 1))
            fits = rows * w * (m // chunks) <= budget
            key = (not fits, score if fits else rows * w * (m // chunks), tasks)
            if best is None or key < best[0]:
                best = (key, Tasks(bands, chunks))
    return best[1]


def _rows_read(dw_op):
    """rows(r): the padded input rows that r consecutive output rows of ``dw_op`` read."""
    (sh, _), (dh, _) = dw_op.attrs.stride, dw_op.attrs.dilation
    kh = dw_op.params["w"].shape[2]
    return lambda out_rows: (out_rows - 1) * sh + dh * (kh - 1) + 1


def default_tasks(conv_op, in_shape, dw_op) -> Tasks:
    """expand_depthwise's split of a pair by default: expand_tasks over pool_threads()."""
    n, _, h, w_ = in_shape
    m = conv_op.params["w"].shape[0]
    a = dw_op.attrs
    oh, _ = output_hw(h, w_, dw_op.params["w"].shape[2:], a.padding, a.stride, a.dilation)
    return expand_tasks(n, oh, w_, m, _lanes(dw_op, m), _rows_read(dw_op), pool_threads())


def expand_depthwise(conv_op, in_shape, ranges, fold, dw_op, tasks: Tasks | None = None):
    """(PrimFunc, output shape) of a pointwise stride-1 fast conv (the expansion) followed by
    the depthwise conv that alone reads it, as one kernel: arguments are the conv's (as
    ``conv2d``'s, without a residual), then the depthwise's after its input (as
    ``depthwise``'s) → the depthwise's codes [N, OH, OW, M] (M, the expansion's output
    channels, a multiple of 16). The codes are those of the two kernels, bit for bit (the same
    definitions); only the schedule changes: each task (expand_tasks: a band of output rows ×
    a chunk of channels, in parallel) expands the rows and channels it reads — its band's
    halo rows in both neighbours — and then runs the depthwise conv on them, so the expanded
    map is consumed from cache, never written whole. ``tasks``: the split (default:
    expand_tasks over this machine's thread pool, pool_threads)."""
    a = dw_op.attrs
    (ph, pw), (sh, _), (dh, _) = a.padding, a.stride, a.dilation
    kh, kw = dw_op.params["w"].shape[2:]
    n, _, h, w_ = in_shape
    m = conv_op.params["w"].shape[0]
    oh, ow = output_hw(h, w_, (kh, kw), a.padding, a.stride, a.dilation)
    rows_for = _rows_read(dw_op)
    tasks = tasks or default_tasks(conv_op, in_shape, dw_op)
    band_rows = oh // tasks.bands
    if tasks.bands == 1:
        # one band: the whole image's rows, read through the padding as by `depthwise`
        d = _conv_def(conv_op, in_shape, ranges, fold)
        expanded = te.compute(d.shape, d.code, name="expanded")
        dw = _depthwise_def(dw_op, expanded, m)
    else:
        # each band expands its own copy of the rows it reads, in padded coordinates (the
        # depthwise's z_in above and below the image, whose accumulators are computed and
        # discarded), so bands share nothing and every region is affine
        d = _conv_def(conv_op, in_shape, ranges, fold, _Bands(tasks.bands, rows_for(band_rows), band_rows * sh, ph))
        z = const(a.z_in, "uint8")

        def expanded_value(b, t, r, j, k):
            row = t * band_rows * sh + r
            return tvm.tirx.if_then_else(tvm.tirx.all(row >= ph, row < h + ph), d.code(b, t, r, j, k), z)

        expanded = te.compute(d.shape, expanded_value, name="expanded")

        def read(b, i, ry, col, k):
            jj = tvm.tirx.max(tvm.tirx.min(col - pw, w_ - 1), 0)
            value = expanded[b, i // band_rows, i % band_rows * sh + ry * dh, jj, k]
            return tvm.tirx.if_then_else(tvm.tirx.all(col >= pw, col < w_ + pw), value, z)

        dw = _depthwise_def(dw_op, d.x, m, (h, w_), read)
    if m % 16 or not d.pointwise or tuple(conv_op.attrs.stride) != (1, 1):
        raise ValueError(f"{conv_op.name}: expand_depthwise needs a pointwise stride-1 conv with output channels "
                         f"in multiples of 16")
    sch = _schedule(te.create_prim_func([*d.args, *dw.args, dw.out]))
    b_, i_, j_, k_ = sch.get_loops(sch.get_sblock("out"))
    band, ii = sch.split(i_, [tasks.bands, None])
    chunk, kk = sch.split(k_, [tasks.chunks, None])
    sch.reorder(b_, band, chunk, ii, j_, kk)
    task = sch.fuse(b_, band, chunk)
    sch.parallel(task)
    _tile_depthwise(sch, dw, j_, kk)
    sch.compute_at(sch.get_sblock("expanded"), task, preserve_unit_loops=True)
    ei_, ej_, ek_ = sch.get_loops(sch.get_sblock("expanded"))[-3:]
    koo, jo, koi, ji, ki = _split_tile(sch, d, ej_, ek_)
    sch.reorder(ei_, koo, jo, koi, ji, ki)
    for p in d.accs:
        sch.compute_at(sch.get_sblock(f"acc{p}"), jo, preserve_unit_loops=True)
    if d.xp is not d.x:
        pack = sch.get_sblock("pack")
        sch.compute_at(pack, ei_, preserve_unit_loops=True)
        _vectorize_channels(sch, pack)
    _schedule_accs(sch, d)
    sch.vectorize(ki)
    return _finish(sch), (n, oh, ow, m)


def elementwise(name: str, tensor_fn, inputs, out_shape, out_dtype: str):
    """A one-loop-nest kernel ``out[idx] = tensor_fn(*inputs)(idx)``, parallel over all but the
    last axis, vectorized along it."""
    out = te.compute(out_shape, tensor_fn, name="out")
    sch = _schedule(te.create_prim_func([*inputs, out]))
    _parallel_vectorize(sch, "out", max(1, len(out_shape) - 1))
    return _finish(sch)


def to_nhwc(name: str, tensor_fn, inputs, out_shape, out_dtype: str):
    """A kernel writing NHWC ``out[b, i, j, k] = tensor_fn(b, i, j, k)`` from NCHW inputs (the
    quantize of the float input): parallel over rows, vectorized along W (contiguous reads),
    channels unrolled."""
    out = te.compute(out_shape, tensor_fn, name="out")
    sch = _schedule(te.create_prim_func([*inputs, out]))
    b_, i_, j_, k_ = sch.get_loops(sch.get_sblock("out"))
    sch.parallel(sch.fuse(b_, i_))
    lanes = next(v for v in (16, 8, 4, 2, 1) if out_shape[2] % v == 0)
    jo, ji = sch.split(j_, [None, lanes])
    sch.reorder(jo, k_, ji)
    sch.unroll(k_)
    sch.vectorize(ji)
    return _finish(sch)


def max_pool(op, in_shape, dtype: str):
    """(PrimFunc, output shape): x [N, H, W, C] → [N, OH, OW, C]; ``in_shape`` is logical."""
    n, c, h, w_ = in_shape
    a = op.attrs
    (kh, kw), (sh, sw), (ph, pw) = a.kernel, a.stride, a.padding
    X = te.placeholder((n, h, w_, c), dtype, "x")
    low = tvm.tirx.min_value(dtype)
    xp = topi.nn.pad(X, [0, ph, pw, 0], [0, ph, pw, 0], pad_value=low, name="xpad")
    oh, ow = output_hw(h, w_, (kh, kw), a.padding, a.stride, a.rates)
    ry, rx = te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx")
    out = te.compute((n, oh, ow, c), lambda b, i, j, k: te.max(xp[b, i * sh + ry, j * sw + rx, k], axis=[ry, rx]),
                     name="out")
    sch = _schedule(te.create_prim_func([X, out]))
    if ph or pw:
        sch.compute_inline(sch.get_sblock("xpad"))
    blk = sch.get_sblock("out")
    b_, i_, j_, k_, rry, rrx = sch.get_loops(blk)
    sch.parallel(sch.fuse(b_, i_))
    sch.reorder(rry, rrx, k_)
    sch.vectorize(k_)
    init = sch.decompose_reduction(blk, rry)
    sch.vectorize(sch.get_loops(init)[-1])
    return _finish(sch), (n, oh, ow, c)


def gather(in_shape, dtype: str, j: int):
    """(PrimFunc, output shape): out[b, i, j, k] = x[b, i, j, index[k]] on NHWC maps
    (``in_shape`` logical, ``j`` output channels: a permutation or a selection); parallel
    over rows, the channel loop unrolled when short."""
    n, c, h, w_ = in_shape
    X = te.placeholder((n, h, w_, c), dtype, "x")
    index = te.placeholder((j,), I32, "index")
    out = te.compute((n, h, w_, j), lambda b, i, jj, k: X[b, i, jj, index[k]], name="out")
    sch = _schedule(te.create_prim_func([X, index, out]))
    b_, i_, j_, k_ = sch.get_loops(sch.get_sblock("out"))
    sch.parallel(sch.fuse(b_, i_))
    if j <= 64:
        sch.unroll(k_)
    return _finish(sch), (n, h, w_, j)


def _dot(X, W, c0, r):
    return lambda i, j: te.sum(X[i, c0 + r].astype(I32) * W[c0 + r, j].astype(I32), axis=r)


def linear(op, in_shape, in_dtype: str, ranges):
    """(PrimFunc, output shape) of a linear layer with contiguous groups; arguments
    (x [N, C], wT [C, M16] int8, bias, M, R, S, corr [g, M16]) → [N, M16] (M rounded up to 16,
    tables zero-padded). Vectorized over 16 outputs."""
    n, c = in_shape
    m = round_up(op.params["w"].shape[0], 16)
    X = te.placeholder((n, c), in_dtype, "x")
    W = te.placeholder((c, m), "int8", "wt")
    B, M, R, S = _epilogue_args(m)
    C = te.placeholder((len(ranges), m), I32, "corr")
    accs = {}
    for p, (c0, c1) in enumerate(ranges):
        if c1 > c0:
            r = te.reduce_axis((0, c1 - c0), f"r{p}")
            accs[p] = te.compute((n, m), _dot(X, W, c0, r), name=f"acc{p}")
    def epilogue(i, j):
        total = nt.merge_groups(nt.TIR, B[j], {p: acc[i, j] - C[p, j] for p, acc in accs.items()}, op.group_scales,
                                op.attrs.frac)
        return _requant(op, total, j, M, R, S)

    out = te.compute((n, m), epilogue, name="out")
    sch = _schedule(te.create_prim_func([X, W, B, M, R, S, C, out]))
    i_, j_ = sch.get_loops(sch.get_sblock("out"))
    jo, ji = sch.split(j_, [None, 16])
    sch.reorder(jo, i_, ji)
    sch.parallel(jo)
    for p in accs:
        blk = sch.get_sblock(f"acc{p}")
        sch.compute_at(blk, i_, preserve_unit_loops=True)
        si, sj, rr = sch.get_loops(blk)[-3:]
        sch.reorder(rr, sj)
        sch.vectorize(sj)                      # before decompose_reduction (compact dataflow)
        sch.decompose_reduction(blk, rr)
    return _finish(sch), (n, m)


_register_dots()
