"""Integer-program op → npu16 instruction stream (+ tiled weights and channel tables).

``lower_op(kind, attrs, shapes, dtypes, params, npu)`` returns an ``NpuOp`` or raises
``NotOnNpu`` with the reason an op stays on the host (llvm): float arithmetic
(quantize/dequantize), pure layout changes (flatten, reshape) and constants, or shapes the array cannot take
(more than MAX_GROUPS WAPS groups, int32 codes into the uint8-only units, a softmax or layer
norm position whose channels do not fit the activation SRAM). Every stream starts with the machine registers of
``npu`` (targets/npu16/params.py; default today's npu16), and weights are tiled for its
array side ``npu.tile``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import numpy as np

from codegen.npu16.tiling import tile_weights, tile_weights_im2col
from relay_passes.fast_kernels import output_hw
from relay_passes.resize import crop_as_resize
from targets.npu16 import memory
from targets.npu16.first_layer import runs_im2col
from targets.npu16.isa import MAX_GROUPS, Instr, Op, Reg, encode, machine_registers, set_
from targets.npu16.params import DEFAULT, NPU16


class NotOnNpu(Exception):
    """The op runs on the host; the message says why."""


@dataclass
class NpuOp:
    stream: list[Instr]
    tiles: np.ndarray | None = None          # int8 (conv: tiled; depthwise: raw [M, KH, KW])
    table: np.ndarray | None = None          # int32 channel table (conv), window table (avg pool), source table (resize)
    lut: np.ndarray | None = None            # uint8 lookup table (table op)
    counts: dict = field(default_factory=dict)
    sram_in: int = 0                         # activation SRAM its stripes use for input rows / output rows
    sram_out: int = 0                        # (memory.StripePlan; 0: the op streams)

    @property
    def words(self) -> np.ndarray:
        return encode(self.stream)


def lower_op(kind: str, a: dict, in_shapes: list[tuple[int, ...]], in_dtypes: list[str],
             params: dict[str, np.ndarray], npu: NPU16 = DEFAULT) -> NpuOp:
    if kind not in LOWERINGS:
        raise NotOnNpu(f"no npu16 lowering for {kind}")
    return LOWERINGS[kind](a, in_shapes, in_dtypes, params, npu)


def _host(reason: str):
    """The lowering of a kind that always runs on the host: NotOnNpu with ``reason``."""
    def lowering(a, in_shapes, in_dtypes, params, npu) -> NpuOp:
        raise NotOnNpu(reason)
    lowering.host_reason = reason
    return lowering


def _conv2d(a, in_shapes, in_dtypes, params, npu) -> NpuOp:
    return _layer(a, in_shapes[0], params["w"], in_dtypes, params, npu)


def _linear(a, in_shapes, in_dtypes, params, npu) -> NpuOp:
    """A 1×1 convolution of an [N, F, 1, 1] map."""
    n, f = in_shapes[0][0], in_shapes[0][1]
    return _layer(a, (n, f, 1, 1), params["w"][:, :, None, None], in_dtypes, params, npu)


def _layer(a, shape, wt, in_dtypes, params, npu) -> NpuOp:
    s: list[Instr] = machine_registers(npu)
    n, c, h, w = shape
    m, cg, kh, kw = wt.shape
    g = a.conv_groups
    scales = a.scales
    groups = params.get("groups")
    if len(scales) > MAX_GROUPS:
        raise NotOnNpu(f"{len(scales)} WAPS groups: the D1/D2 datapath holds at most {MAX_GROUPS}")
    (sh, sw), (ph, pw), (dh, dw) = a.stride, a.padding, a.dilation
    s += _regs({Reg.N: n, Reg.C: c, Reg.H: h, Reg.W: w, Reg.M: m, Reg.KH: kh, Reg.KW: kw, Reg.CONV_GROUPS: g,
                Reg.SH: sh, Reg.SW: sw, Reg.PH: ph, Reg.PW: pw, Reg.DH: dh, Reg.DW: dw, Reg.Z_IN: a.z_in,
                **_clamp_regs(a), Reg.FRAC: a.frac, Reg.IN_WIDE: _wide(in_dtypes)})
    oh, ow = output_hw(h, w, (kh, kw), (ph, pw), (sh, sw), (dh, dw))
    stripes = partial(memory.plan, h=h, oh=oh, ow=ow, kh=kh, sh=sh, ph=ph, dh=dh, tile=npu.tile,
                      in_row_bytes=c * w * (4 if _wide(in_dtypes) else 1), npu=npu)
    if g > 1 and cg == 1 and g == c == m and groups is None:       # (a channel multiplier runs as CONV)
        regs, (a_in, a_out) = _stripe_regs(stripes, out_tiles=-(-c // npu.tile), conv_groups=1,
                                 tile_weight_bytes=npu.tile * kh * kw, weight_bytes=c * kh * kw)
        s += regs
        s.append(Instr(Op.DWCONV))
        s.append(Instr(Op.END))
        return NpuOp(s, tiles=np.ascontiguousarray(wt.reshape(m, kh, kw)), sram_in=a_in, sram_out=a_out)
    im2col = runs_im2col(npu, c=c, conv_groups=g, kh=kh, kw=kw, waps_groups=groups is not None)
    if im2col:             # the rows take (channel, ky, kx): one step per in-tile, no tap loop
        tiles, table, in_tiles = tile_weights_im2col(wt, npu.tile)
    else:
        tiles, table, in_tiles = tile_weights(wt, groups, g, len(scales) if groups is not None else 1, npu.tile)
    p_count = len(in_tiles)
    taps = 1 if im2col else kh * kw
    ot, tile_bytes = -(-(m // g) // npu.tile), taps * int(in_tiles.sum()) * npu.tile ** 2
    regs, (a_in, a_out) = _stripe_regs(stripes, out_tiles=ot, conv_groups=g, tile_weight_bytes=tile_bytes,
                             weight_bytes=g * ot * tile_bytes)
    s += regs
    s += [set_(Reg.IM2COL, int(im2col)), set_(Reg.NGROUPS, p_count)]
    for p in range(p_count):
        s += [set_(Reg.SIGMA0 + p, scales[p].sigma if groups is not None else 0),
              set_(Reg.NSHIFT0 + p, scales[p].n if groups is not None else 0),
              set_(Reg.TILES0 + p, int(in_tiles[p]))]
    s += [Instr(Op.CONV), Instr(Op.END)]
    return NpuOp(s, tiles=tiles, table=table, sram_in=a_in, sram_out=a_out)


def _stripe_regs(stripes, **layer) -> tuple[list[Instr], tuple[int, int]]:
    """The registers of the layer's stripe plan (targets/npu16/memory.py) and the activation
    SRAM it uses (input rows, output rows); NotOnNpu when even the smallest stripe does not fit."""
    try:
        p = stripes(**layer)
    except memory.SramTooSmall as e:
        raise NotOnNpu(str(e)) from None
    return _regs({Reg.STRIPE_ROWS: p.rows, Reg.STRIPE_TILES: p.tiles, Reg.W_RESIDENT: int(p.resident),
                  Reg.STRIPE_ORDER: int(p.weights_first)}), (p.act_in_sram, p.act_sram - p.act_in_sram)


def _wide(in_dtypes: list[str]) -> int:
    """1 when the first input holds int32 codes (after a sum pool), 0 for uint8."""
    return int(in_dtypes[0] != "uint8")


def _add(a, in_shapes, in_dtypes, params, npu) -> NpuOp:
    s = machine_registers(npu)
    sa, sb = (tuple(int(v) for v in x) for x in in_shapes)
    if in_dtypes[0] != "uint8" or (sa == sb and in_dtypes[1] != "uint8"):
        raise NotOnNpu("add of int32 (pooled) codes other than a broadcast second operand")
    if sa != sb:                     # b broadcast: one value per channel, per position or per sample
        s += _regs({Reg.N: sa[0], Reg.C: sa[1], Reg.INNER: _inner(sa), Reg.B_BCAST: 1,
                    Reg.B_C: int(sb[1] == sa[1]), Reg.B_INNER: int(_inner(sb) == _inner(sa)),
                    Reg.B_WIDE: int(in_dtypes[1] != "uint8")})
    s += _regs({Reg.COUNT: int(np.prod(in_shapes[0])), Reg.ZA: a.za, Reg.ZB: a.zb, Reg.KA: a.ka,
                Reg.KB: a.kb, Reg.T: a.t, **_clamp_regs(a)})
    return NpuOp(s + [Instr(Op.ADD), Instr(Op.END)])


def _pool(command: Op, dilated: bool):
    """MAXPOOL (dilation from the attributes) or SUMPOOL (undilated) of uint8 codes."""
    def lowering(a, in_shapes, in_dtypes, params, npu) -> NpuOp:
        s = machine_registers(npu)
        if _wide(in_dtypes):
            raise NotOnNpu("pooling of int32 (pooled) codes")
        n, c, h, w = in_shapes[0]
        (kh, kw), (sh, sw), (ph, pw) = a.kernel, a.stride, a.padding
        dh, dw = a.rates if dilated else (1, 1)
        z_in = getattr(a, "z_in", 0)                     # a sum pool's; a max pool has none
        s += _regs({Reg.N: n, Reg.C: c, Reg.H: h, Reg.W: w, Reg.KH: kh, Reg.KW: kw, Reg.SH: sh, Reg.SW: sw,
                    Reg.PH: ph, Reg.PW: pw, Reg.DH: dh, Reg.DW: dw, Reg.Z_IN: z_in})
        s += [Instr(command), Instr(Op.END)]
        return NpuOp(s)
    return lowering


def _gather(a, in_shapes, in_dtypes, params, npu) -> NpuOp:
    s = machine_registers(npu)
    shape = in_shapes[0]
    s += _regs({Reg.N: shape[0], Reg.C: shape[1], Reg.OUT_CHANNELS: params["index"].size, Reg.INNER: _inner(shape),
                Reg.IN_WIDE: _wide(in_dtypes)})
    return NpuOp(s + [Instr(Op.GATHER), Instr(Op.END)])


def _epilogue(kind: str, unit):
    """A command of the epilogue's units (pad, avg pool, concat, table, mul, resize): uint8 codes only."""
    def lowering(a, in_shapes, in_dtypes, params, npu) -> NpuOp:
        s = machine_registers(npu)
        if any(d != "uint8" for d in in_dtypes):
            raise NotOnNpu(f"{kind} of int32 (pooled) codes: the unit takes uint8 codes")
        return unit(s, a, in_shapes, params)
    return lowering


def _inner(shape) -> int:
    """Elements per (sample, channel): H·W of a map, 1 of a vector."""
    return int(np.prod(shape[2:]))


def _regs(values: dict) -> list[Instr]:
    return [set_(r, int(v)) for r, v in values.items()]


def _clamp_regs(a: dict) -> dict:
    return {Reg.Z_OUT: a.z_out, Reg.LO: a.lo, Reg.HI: a.hi}


def _pad(s, a, in_shapes, params) -> NpuOp:
    n, c, h, w = in_shapes[0]
    top, left, bottom, right = a.pads
    s += _regs({Reg.N: n, Reg.C: c, Reg.H: h, Reg.W: w, Reg.PAD_TOP: top, Reg.PAD_LEFT: left,
                Reg.PAD_BOTTOM: bottom, Reg.PAD_RIGHT: right, Reg.PAD_VALUE: a.value})
    return NpuOp(s + [Instr(Op.PAD), Instr(Op.END)])


def _int32_table(params: dict[str, np.ndarray], keys: tuple[str, ...]) -> np.ndarray:
    """The ``keys`` params, flattened and concatenated into one int32 array (a unit's table)."""
    return np.concatenate([np.asarray(params[k], np.int32).ravel() for k in keys])


def _avg_pool2d(s, a, in_shapes, params) -> NpuOp:
    n, c, h, w = in_shapes[0]
    s += _regs({Reg.N: n, Reg.C: c, Reg.H: h, Reg.W: w, Reg.OH: params["h0"].size, Reg.OW: params["w0"].size,
                Reg.COUNT: params["mult"].size, Reg.Z_IN: a.z_in, **_clamp_regs(a)})
    return NpuOp(s + [Instr(Op.AVGPOOL), Instr(Op.END)], table=_int32_table(params, ("h0", "h1", "w0", "w1", "rq")))


def _resize(s, a, in_shapes, params) -> NpuOp:
    n, c, h, w = in_shapes[0]
    s += _regs({Reg.N: n, Reg.C: c, Reg.H: h, Reg.W: w, Reg.OH: params["y0"].size, Reg.OW: params["x0"].size,
                Reg.FRAC: a.frac, Reg.Z_IN: a.z_in, Reg.MULT: a.mult, Reg.SHIFT: a.shift,
                **_clamp_regs(a)})
    table = _int32_table(params, ("y0", "y1", "wy", "x0", "x1", "wx"))
    return NpuOp(s + [Instr(Op.RESIZE), Instr(Op.END)], table=table)


def _concat(s, a, in_shapes, params) -> NpuOp:
    """One CONCAT command per input: the epilogue streams it through its rescale. Along rows or
    columns the command is the same copy of [outer, extent, inner] blocks (ConcatAttrs.blocks):
    N counts the outer blocks, C the input's extent along the axis."""
    outer, inner, sizes, total = a.blocks(in_shapes)
    s += _regs({Reg.N: outer, Reg.INNER: inner, Reg.OUT_CHANNELS: total, Reg.T: a.t, **_clamp_regs(a)})
    off = 0
    for i, (size, z, k) in enumerate(zip(sizes, a.zs, a.ks)):
        s += _regs({Reg.INPUT_SEL: i, Reg.C: size, Reg.C_OFFSET: off, Reg.ZA: z, Reg.KA: k})
        s.append(Instr(Op.CONCAT))
        off += size
    return NpuOp(s + [Instr(Op.END)])


def _crop(s, a, in_shapes, params) -> NpuOp:
    """The RESIZE command's nearest gather over the box's rows and columns (resize.crop_as_resize):
    DMA only, the codes unchanged."""
    attrs, box = crop_as_resize(a)
    return _resize(s, attrs, in_shapes, box)


def _table(s, a, in_shapes, params) -> NpuOp:
    lut = np.ascontiguousarray(params["table"], np.uint8)
    if lut.size > 256:
        raise NotOnNpu(f"a {lut.size}-entry table: the lookup unit holds 256")
    s += _regs({Reg.COUNT: int(np.prod(in_shapes[0])), Reg.LUT_SIZE: lut.size})
    return NpuOp(s + [Instr(Op.LUT), Instr(Op.END)], lut=lut)


def _mul(s, a, in_shapes, params) -> NpuOp:
    sa, sb = in_shapes
    bcast = int(np.prod(sb)) != int(np.prod(sa))
    if bcast and tuple(sb) != (sa[0], sa[1], 1, 1):
        raise NotOnNpu(f"mul broadcast {tuple(sb)} → {tuple(sa)}: the unit broadcasts [N, C, 1, 1] only")
    s += _regs({Reg.N: sa[0], Reg.C: sa[1], Reg.INNER: _inner(sa), Reg.B_BCAST: int(bcast), Reg.ZA: a.za,
                Reg.ZB: a.zb, Reg.MULT: a.mult, Reg.SHIFT: a.shift, **_clamp_regs(a)})
    return NpuOp(s + [Instr(Op.MUL), Instr(Op.END)])


def matmul_gemm(a, in_shapes) -> tuple[int, int, int, int, int]:
    """(N, G, K, M, P) of a matmul (relay_passes/attrs.MatmulAttrs): per sample and head an
    [M × K]·[K × P] product, K the contracted size (D channels or L positions), M the outputs
    per head (L or D), P = Ha·Wa the positions of a."""
    (n, _, *sa), (_, cb, *sb) = in_shapes
    g = a.heads
    p, l = int(np.prod(sa)), int(np.prod(sb))
    d = cb // g
    return (n, g, d, l, p) if a.contract == "channels" else (n, g, l, d, p)


def _matmul(a, in_shapes, in_dtypes, params, npu) -> NpuOp:
    """MATMUL: each head's GEMM on the array, its stationary tiles read from b in the activation
    SRAM (targets/npu16/npu16_sim.h npu16_matmul), positions striped (memory.matmul_plan)."""
    if any(d != "uint8" for d in in_dtypes):
        raise NotOnNpu("matmul of int32 codes: the array takes uint8 codes")
    n, g, k, m, p = matmul_gemm(a, in_shapes)
    try:
        plan = memory.matmul_plan(k=k, m=m, positions=p, npu=npu)
    except memory.SramTooSmall as e:
        raise NotOnNpu(str(e)) from None
    s = machine_registers(npu)
    s += _regs({Reg.N: n, Reg.CONV_GROUPS: g, Reg.C: k, Reg.M: m, Reg.INNER: p,
                Reg.MM_POSITIONS: int(a.contract == "positions"), Reg.Z_IN: a.za, Reg.ZB: a.zb,
                Reg.MULT: a.mult, Reg.SHIFT: a.shift, Reg.STRIPE_ROWS: plan.rows, **_clamp_regs(a)})
    return NpuOp(s + [Instr(Op.MATMUL), Instr(Op.END)], sram_in=plan.act_in_sram,
                 sram_out=plan.act_sram - plan.act_in_sram)


def _row_plan_regs(shape, in_bytes: int, npu) -> tuple[list[Instr], memory.RowPlan]:
    """The row unit's stripe registers for codes [N, C, ...] (memory.row_plan); NotOnNpu on a
    machine without the row unit or when one position does not fit the activation SRAM."""
    if not npu.row_unit:
        raise NotOnNpu("the npu16 config has no row unit (row_unit false) for softmax and layer norm")
    try:
        plan = memory.row_plan(channels=shape[1], positions=_inner(shape), in_bytes=in_bytes, npu=npu)
    except memory.SramTooSmall as e:
        raise NotOnNpu(str(e)) from None
    return _regs({Reg.N: shape[0], Reg.C: shape[1], Reg.INNER: _inner(shape), Reg.STRIPE_ROWS: plan.rows}), plan


def _layer_norm(a, in_shapes, in_dtypes, params, npu) -> NpuOp:
    """LAYERNORM on the row unit (npu16_sim.h npu16_layer_norm): uint8 codes or int32 sums in,
    g and b as one int32 table [2C]."""
    wide = _wide(in_dtypes)
    regs, plan = _row_plan_regs(in_shapes[0], 4 if wide else 1, npu)
    s = machine_registers(npu) + regs
    s += _regs({Reg.IN_WIDE: wide, Reg.NORM_P: a.prec, Reg.NORM_E: a.eps, Reg.NORM_K: a.frac, **_clamp_regs(a)})
    return NpuOp(s + [Instr(Op.LAYERNORM), Instr(Op.END)], table=_int32_table(params, ("g", "b")),
                 sram_in=plan.act_in_sram, sram_out=plan.act_sram - plan.act_in_sram)


def _softmax(a, in_shapes, in_dtypes, params, npu) -> NpuOp:
    """SOFTMAX on the row unit (npu16_sim.h npu16_softmax): uint8 codes, the exp table int32."""
    if in_dtypes[0] != "uint8":
        raise NotOnNpu("softmax of int32 codes: the row unit takes uint8 codes")
    regs, plan = _row_plan_regs(in_shapes[0], 1, npu)
    table = np.ascontiguousarray(params["exp"], np.int32)
    s = machine_registers(npu) + regs
    s += _regs({Reg.CONV_GROUPS: a.groups, Reg.LUT_SIZE: table.size, Reg.MULT: a.mult, Reg.SHIFT: a.frac,
                **_clamp_regs(a)})
    return NpuOp(s + [Instr(Op.SOFTMAX), Instr(Op.END)], table=table,
                 sram_in=plan.act_in_sram, sram_out=plan.act_sram - plan.act_in_sram)


# kind → its lowering (every kind of relay_passes/opset.py): an NpuOp, or NotOnNpu saying why it stays on the host
LOWERINGS: dict[str, Callable[..., NpuOp]] = {
    "quantize": _host("float arithmetic: npu16 is integer-only"),
    "dequantize": _host("float arithmetic: npu16 is integer-only"),
    "flatten": _host("layout only (a reshape): nothing for the NPU to compute"),
    "layer_norm": _layer_norm,
    "softmax": _softmax,
    "matmul": _matmul,
    "conv2d": _conv2d, "linear": _linear, "add": _add, "gather": _gather,
    "max_pool2d": _pool(Op.MAXPOOL, dilated=True), "sum_pool2d": _pool(Op.SUMPOOL, dilated=False),
    **{k: _epilogue(k, unit) for k, unit in {"pad": _pad, "avg_pool2d": _avg_pool2d, "concat": _concat,
                                               "table": _table, "mul": _mul, "resize": _resize}.items()},
    "constant": _host("a constant: codes the host writes once per sample, nothing for the NPU to compute"),
    "reshape": _host("layout only (a reshape): nothing for the NPU to compute"),
    "crop": _epilogue("crop", _crop)}
# the kinds that always stay on the host, whatever their shapes
HOST_KINDS = frozenset(k for k, f in LOWERINGS.items() if hasattr(f, "host_reason"))
