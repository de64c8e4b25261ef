"""Integer-program op → npu16 instruction stream (+ tiled weights and channel tables).

``lower_op(kind, attrs, shapes, dtypes, params, npu)`` returns an ``NpuOp`` or raises
``NotOnNpu`` with the reason an op stays on the host (llvm): float arithmetic
(quantize/dequantize), pure layout changes (flatten), or shapes the array cannot take
(more than MAX_GROUPS WAPS groups, int32 codes into the uint8-only units). Every stream starts with the machine registers of
``npu`` (targets/npu16/params.py; default today's npu16), and weights are tiled for its
array side ``npu.tile``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from codegen.npu16.tiling import tile_weights
from targets.npu16.isa import MAX_GROUPS, Instr, Op, Reg, encode, machine_registers, set_
from targets.npu16.params import DEFAULT, NPU16


class NotOnNpu(Exception):
    """The op runs on the host; the message says why."""


@dataclass
class NpuOp:
    stream: list[Instr]
    tiles: np.ndarray | None = None          # int8 (conv: tiled; depthwise: raw [M, KH, KW])
    table: np.ndarray | None = None          # int32 channel table (conv) or window table (avg pool)
    lut: np.ndarray | None = None            # uint8 lookup table (table op)
    counts: dict = field(default_factory=dict)

    @property
    def words(self) -> np.ndarray:
        return encode(self.stream)


def lower_op(kind: str, a: dict, in_shapes: list[tuple[int, ...]], in_dtypes: list[str],
             params: dict[str, np.ndarray], npu: NPU16 = DEFAULT) -> NpuOp:
    if kind in ("quantize", "dequantize"):
        raise NotOnNpu("float arithmetic: npu16 is integer-only")
    if kind == "flatten":
        raise NotOnNpu("layout only (a reshape): nothing for the NPU to compute")
    wide = int(in_dtypes[0] != "uint8")
    s: list[Instr] = machine_registers(npu)
    if kind in ("conv2d", "linear"):
        shape = in_shapes[0] if kind == "conv2d" else (in_shapes[0][0], in_shapes[0][1], 1, 1)
        n, c, h, w = shape
        wt = params["w"] if kind == "conv2d" else params["w"][:, :, None, None]
        m, cg, kh, kw = wt.shape
        g = a.get("conv_groups", 1)
        sig, ns = a.get("sigma", [0]), a.get("n", [0])
        groups = params.get("groups")
        if len(sig) > MAX_GROUPS:
            raise NotOnNpu(f"{len(sig)} WAPS groups: the D1/D2 datapath holds at most {MAX_GROUPS}")
        stride = a.get("stride", [1, 1])
        pad = a.get("padding", [0, 0])
        dil = a.get("dilation", [1, 1])
        regs = {Reg.N: n, Reg.C: c, Reg.H: h, Reg.W: w, Reg.M: m, Reg.KH: kh, Reg.KW: kw, Reg.CONV_GROUPS: g,
                Reg.SH: stride[0], Reg.SW: stride[1], Reg.PH: pad[0], Reg.PW: pad[1], Reg.DH: dil[0],
                Reg.DW: dil[1], Reg.Z_IN: a["z_in"], Reg.Z_OUT: a["z_out"], Reg.LO: a["lo"], Reg.HI: a["hi"],
                Reg.FRAC: a.get("frac", 0), Reg.IN_WIDE: wide}
        s += [set_(r, v) for r, v in regs.items()]
        if g > 1 and cg == 1 and g == c == m and groups is None:       # (a channel multiplier runs as CONV)
            s.append(Instr(Op.DWCONV))
            s.append(Instr(Op.END))
            return NpuOp(s, tiles=np.ascontiguousarray(wt.reshape(m, kh, kw)))
        tiles, table, in_tiles = tile_weights(wt, groups, g, len(sig) if groups is not None else 1, npu.tile)
        p_count = len(in_tiles)
        s.append(set_(Reg.NGROUPS, p_count))
        for p in range(p_count):
            s += [set_(Reg.SIGMA0 + p, sig[p] if groups is not None else 0),
                  set_(Reg.NSHIFT0 + p, ns[p] if groups is not None else 0),
                  set_(Reg.TILES0 + p, int(in_tiles[p]))]
        s += [Instr(Op.CONV), Instr(Op.END)]
        return NpuOp(s, tiles=tiles, table=table)
    if kind == "add":
        s += [set_(Reg.COUNT, int(np.prod(in_shapes[0]))), set_(Reg.ZA, a["za"]), set_(Reg.ZB, a["zb"]),
              set_(Reg.KA, a["ka"]), set_(Reg.KB, a["kb"]), set_(Reg.T, a["t"]), set_(Reg.Z_OUT, a["z_out"]),
              set_(Reg.LO, a["lo"]), set_(Reg.HI, a["hi"]), Instr(Op.ADD), Instr(Op.END)]
        return NpuOp(s)
    if kind in ("max_pool2d", "sum_pool2d"):
        if wide:
            raise NotOnNpu("pooling of int32 (pooled) codes")
        n, c, h, w = in_shapes[0]
        (kh, kw), (sh, sw), (ph, pw) = a["kernel"], a["stride"], a["padding"]
        dh, dw = a.get("dilation", (1, 1)) if kind == "max_pool2d" else (1, 1)
        s += [set_(r, v) for r, v in {Reg.N: n, Reg.C: c, Reg.H: h, Reg.W: w, Reg.KH: kh, Reg.KW: kw,
                                       Reg.SH: sh, Reg.SW: sw, Reg.PH: ph, Reg.PW: pw, Reg.DH: dh, Reg.DW: dw,
                                       Reg.Z_IN: a.get("z_in", 0)}.items()]
        s += [Instr(Op.MAXPOOL if kind == "max_pool2d" else Op.SUMPOOL), Instr(Op.END)]
        return NpuOp(s)
    if kind == "gather":
        shape = in_shapes[0]
        inner = int(np.prod(shape[2:])) if len(shape) > 2 else 1
        s += [set_(Reg.N, shape[0]), set_(Reg.C, shape[1]), set_(Reg.OUT_CHANNELS, params["index"].size),
              set_(Reg.INNER, inner), set_(Reg.IN_WIDE, wide), Instr(Op.GATHER), Instr(Op.END)]
        return NpuOp(s)
    if kind in _EPILOGUE_KINDS:
        if any(d != "uint8" for d in in_dtypes):
            raise NotOnNpu(f"{kind} of int32 (pooled) codes: the unit takes uint8 codes")
        return _EPILOGUE_KINDS[kind](s, a, in_shapes, params)
    raise NotOnNpu(f"no npu16 lowering for {kind}")


def _inner(shape) -> int:
    return int(np.prod(shape[2:])) if len(shape) > 2 else 1


def _regs(values: dict) -> list[Instr]:
    return [set_(r, int(v)) for r, v in values.items()]


def _clamp_regs(a: dict) -> dict:
    return {Reg.Z_OUT: a["z_out"], Reg.LO: a["lo"], Reg.HI: a["hi"]}


def _pad(s, a, in_shapes, params) -> NpuOp:
    n, c, h, w = in_shapes[0]
    top, left, bottom, right = a["pads"]
    s += _regs({Reg.N: n, Reg.C: c, Reg.H: h, Reg.W: w, Reg.PAD_TOP: top, Reg.PAD_LEFT: left,
                Reg.PAD_BOTTOM: bottom, Reg.PAD_RIGHT: right, Reg.PAD_VALUE: a["value"]})
    return NpuOp(s + [Instr(Op.PAD), Instr(Op.END)])


def avg_pool_windows(params: dict[str, np.ndarray]) -> np.ndarray:
    """The AVGPOOL window table: h0 [OH], h1 [OH], w0 [OW], w1 [OW], rq [OH·OW] as one int32 array."""
    return np.concatenate([np.asarray(params[k], np.int32).ravel() for k in ("h0", "h1", "w0", "w1", "rq")])


def _avg_pool2d(s, a, in_shapes, params) -> NpuOp:
    n, c, h, w = in_shapes[0]
    s += _regs({Reg.N: n, Reg.C: c, Reg.H: h, Reg.W: w, Reg.OH: params["h0"].size, Reg.OW: params["w0"].size,
                Reg.COUNT: params["mult"].size, Reg.Z_IN: a["z_in"], **_clamp_regs(a)})
    return NpuOp(s + [Instr(Op.AVGPOOL), Instr(Op.END)], table=avg_pool_windows(params))


def _concat(s, a, in_shapes, params) -> NpuOp:
    """One CONCAT command per input: the epilogue streams it through its rescale."""
    c_out = sum(int(sh[1]) for sh in in_shapes)
    s += _regs({Reg.N: in_shapes[0][0], Reg.INNER: _inner(in_shapes[0]), Reg.OUT_CHANNELS: c_out, Reg.T: a["t"],
                **_clamp_regs(a)})
    off = 0
    for i, (shape, z, k) in enumerate(zip(in_shapes, a["zs"], a["ks"])):
        s += _regs({Reg.INPUT_SEL: i, Reg.C: shape[1], Reg.C_OFFSET: off, Reg.ZA: z, Reg.KA: k})
        s.append(Instr(Op.CONCAT))
        off += int(shape[1])
    return NpuOp(s + [Instr(Op.END)])


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
    s += _regs({Reg.N: sa[0], Reg.C: sa[1], Reg.INNER: _inner(sa), Reg.B_BCAST: int(bcast), Reg.ZA: a["za"],
                Reg.ZB: a["zb"], Reg.MULT: a["mult"], Reg.SHIFT: a["shift"], **_clamp_regs(a)})
    return NpuOp(s + [Instr(Op.MUL), Instr(Op.END)])


_EPILOGUE_KINDS = {"pad": _pad, "avg_pool2d": _avg_pool2d, "concat": _concat, "table": _table, "mul": _mul}
