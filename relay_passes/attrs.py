"""What each op kind computes, apart from its tensors: one frozen dataclass per kind.

``Op.attrs`` holds one of these; relay_passes/opset.py names each kind's class (``OpKind.attrs``)
and relay_passes/program.py (``encode_attrs``/``decode_attrs``) is their only JSON writer and
reader, through ``to_json``/``from_json`` here. How an op is computed (form, layout, dot) is
its ``Schedule``, never an attribute.

JSON form (``waps.attrs``): one key per field; a field that is None is absent; tuples are
lists; a layer's ``group_scales`` are the parallel lists ``sigma`` and ``n`` (absent when the
layer has no groups). Sequences are stored as tuples so that instances compare and hash by
value; a list given to a constructor becomes a tuple. Constructors take keywords only.

Codes and zero points are ints; ``lo``/``hi`` clamp the output codes (inclusive); scales are
floats.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from calib.numerics import GroupScale


@dataclass(frozen=True, kw_only=True)
class Attrs:
    """Base of every kind's attributes: ``layer``, the source model's label of the op (its
    provenance, not what it computes; None when it has none)."""
    layer: str | None = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):
                object.__setattr__(self, f.name, tuple(v))

    def to_json(self) -> dict[str, Any]:
        """The JSON object of these attributes (see the module docstring)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            if f.name == "group_scales":
                if v:
                    out["sigma"] = [int(s.sigma) for s in v]
                    out["n"] = [int(s.n) for s in v]
            else:
                out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "Attrs":
        """The inverse of ``to_json`` (``obj`` is not modified)."""
        obj = dict(obj)
        if "sigma" in obj or "n" in obj:
            obj["group_scales"] = tuple(GroupScale(int(s), int(n)) for s, n in zip(obj.pop("sigma"), obj.pop("n")))
        return cls(**obj)


@dataclass(frozen=True, kw_only=True)
class QuantizeAttrs(Attrs):
    """float32 → codes: clip(floor(x / scale + 0.5) + zero_point, 0, qmax)."""
    scale: float
    zero_point: int
    qmax: int


@dataclass(frozen=True, kw_only=True)
class DequantizeAttrs(Attrs):
    """codes → float32: (x − zero_point)·scale."""
    scale: float
    zero_point: int


@dataclass(frozen=True, kw_only=True)
class LayerAttrs(Attrs):
    """A layer with weights (conv2d, linear): inputs x̄ − z_in (codes up to ``in_qmax``), WAPS
    groups ``group_scales`` (empty: none; one per group label p of ``params['groups']``),
    ``frac`` fractional accumulator bits, requant to z_out clamped to [lo, hi]."""
    spatial: ClassVar[bool]                # conv2d (a window over [N, C, H, W]) or linear ([N, F])
    z_in: int
    z_out: int
    lo: int
    hi: int
    in_qmax: int = 255
    frac: int = 0
    group_scales: tuple[GroupScale, ...] = ()

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "group_scales", tuple(self.group_scales))

    @property
    def scales(self) -> tuple[GroupScale, ...]:
        """γ_p, one per group; one unscaled group when the layer has none."""
        return self.group_scales or (GroupScale(0, 0),)

    @property
    def grouped(self) -> bool:
        """A grouped convolution (conv_groups > 1: depthwise or not); never a linear."""
        return self.conv_groups > 1


@dataclass(frozen=True, kw_only=True)
class ConvAttrs(LayerAttrs):
    """conv2d, NCHW/OIHW: stride, symmetric padding [ph, pw] (with z_in, the code of real 0),
    dilation, and ``conv_groups`` channel groups (torch's ``groups``; not the WAPS groups)."""
    spatial: ClassVar[bool] = True         # reads [N, C, H, W] through a window; weights [m, cg, kh, kw]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    conv_groups: int


@dataclass(frozen=True, kw_only=True)
class LinearAttrs(LayerAttrs):
    """linear of [N, F]: the 1×1 convolution of an [N, F, 1, 1] map. Its window is fixed
    (class constants, never serialised), so layer code reads conv and linear alike."""
    spatial: ClassVar[bool] = False        # reads [N, F]; weights [m, F]
    stride: ClassVar[tuple[int, int]] = (1, 1)
    padding: ClassVar[tuple[int, int]] = (0, 0)
    dilation: ClassVar[tuple[int, int]] = (1, 1)
    conv_groups: ClassVar[int] = 1


@dataclass(frozen=True, kw_only=True)
class AddAttrs(Attrs):
    """clamp(((a − za)·ka + (b − zb)·kb) >> t (rounded) + z_out, lo, hi)."""
    za: int
    zb: int
    ka: int
    kb: int
    t: int
    z_out: int
    lo: int
    hi: int


@dataclass(frozen=True, kw_only=True)
class MulAttrs(Attrs):
    """clamp(requant((a − za)·(b − zb); mult, shift) + z_out, lo, hi)."""
    za: int
    zb: int
    mult: int
    shift: int
    z_out: int
    lo: int
    hi: int


@dataclass(frozen=True, kw_only=True)
class MaxPoolAttrs(Attrs):
    """Window maximum: kernel, stride, symmetric padding [ph, pw] (never wins), dilation (None:
    absent from the JSON, meaning (1, 1); see ``rates``)."""
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int] | None = None

    @property
    def rates(self) -> tuple[int, int]:
        """The dilation, (1, 1) when none is written."""
        return self.dilation or (1, 1)


@dataclass(frozen=True, kw_only=True)
class SumPoolAttrs(Attrs):
    """Window sums of x̄ − z_in into int32 (padding reads z_in: contributes 0), undilated."""
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    z_in: int


@dataclass(frozen=True, kw_only=True)
class AvgPoolAttrs(Attrs):
    """Box averages over the windows in the op's params, requantized to z_out in [lo, hi]."""
    z_in: int
    z_out: int
    lo: int
    hi: int


@dataclass(frozen=True, kw_only=True)
class PadAttrs(Attrs):
    """Constant padding [top, left, bottom, right] with code ``value``."""
    pads: tuple[int, int, int, int]
    value: int


@dataclass(frozen=True, kw_only=True)
class ConcatAttrs(Attrs):
    """Concat along ``axis`` (1: channels; 2, 3: rows, columns; the other axes equal): input i is
    rescaled (x − zs[i])·ks[i] >> t, + z_out, clamped to [lo, hi]."""
    zs: tuple[int, ...]
    ks: tuple[int, ...]
    t: int
    z_out: int
    lo: int
    hi: int
    axis: int = 1

    def blocks(self, in_shapes) -> tuple[int, int, list[int], int]:
        """The concat as contiguous copies, for kernels that write flat buffers: (outer, inner,
        each input's extent along ``axis``, their total). Input i, read as [outer, extent_i,
        inner], fills extents [Σ_{j<i} extent_j, …) of the output read as [outer, total, inner]
        (axis 1: outer = N, inner = H·W)."""
        shapes = [tuple(int(d) for d in s) for s in in_shapes]
        sizes = [s[self.axis] for s in shapes]
        outer = int(np.prod(shapes[0][:self.axis]))
        inner = int(np.prod(shapes[0][self.axis + 1:]))
        return outer, inner, sizes, sum(sizes)


@dataclass(frozen=True, kw_only=True)
class MatmulAttrs(Attrs):
    """Product of two code maps a [N, Ca, Ha, Wa], b [N, Cb, Hb, Wb] in ``heads`` groups G, with
    P = Ha·Wa positions of a and L = Hb·Wb of b (attention: tokens as positions).
    contract "channels": Ca = Cb = G·D, out [N, G·L, Ha, Wa],
        acc[g·L + j, p] = Σ_d (a[g·D + d, p] − za)·(b[g·D + d, j] − zb)       (scores Q·Kᵀ)
    contract "positions": Ca = G·L, Cb = G·D, out [N, G·D, Ha, Wa],
        acc[g·D + d, p] = Σ_j (a[g·L + j, p] − za)·(b[g·D + d, j] − zb)       (probs·V)
    int32 accumulator (|acc| ≤ D·255² or L·255² < 2^31); out = clamp(requantize(acc, mult, shift)
    + z_out, lo, hi) (calib/numerics.output_codes), uint8."""
    heads: int
    contract: str
    za: int
    zb: int
    mult: int
    shift: int
    z_out: int
    lo: int
    hi: int


@dataclass(frozen=True, kw_only=True)
class ConstantAttrs(Attrs):
    """A constant code map params['codes'] (uint8 [C, H, W]) broadcast over the batch of its one
    input (only the input's batch size is read): [N, C, H, W]."""


@dataclass(frozen=True, kw_only=True)
class ReshapeAttrs(Attrs):
    """[N, C, H, W] → [N, C, H', W'] with H'·W' = H·W: each channel's positions re-laid row-major
    (``shape`` = (C, H', W'))."""
    shape: tuple[int, int, int]


@dataclass(frozen=True, kw_only=True)
class CropAttrs(Attrs):
    """x[:, :, top:top + height, left:left + width]."""
    top: int
    left: int
    height: int
    width: int


@dataclass(frozen=True, kw_only=True)
class ResizeAttrs(Attrs):
    """Nearest or bilinear resize (relay_passes/resize.py): weights with ``frac`` bits per axis,
    Σ w·(x − z_in) requantized by (mult, shift) to z_out in [lo, hi]."""
    mode: str
    frac: int
    z_in: int
    z_out: int
    mult: int
    shift: int
    lo: int
    hi: int


@dataclass(frozen=True, kw_only=True)
class LayerNormAttrs(Attrs):
    """Layer norm over the channels (axis 1) of codes (calib/numerics.layer_norm_codes):
    ``prec`` extra bits of the root (p), ``eps`` the float eps in integer units (e ≥ 1),
    ``frac`` the fractional bits of the gain and offset params g, b (k); z_out in [lo, hi]. The
    input is uint8 codes or the int32 sums of a global pool (the norm ignores their scale)."""
    prec: int
    eps: int
    frac: int
    z_out: int
    lo: int
    hi: int


@dataclass(frozen=True, kw_only=True)
class SoftmaxAttrs(Attrs):
    """Softmax over the channels (axis 1) in ``groups`` contiguous groups (one per attention
    head; calib/numerics.softmax_codes): the exp table params['exp'], e/S in output steps
    through ``mult`` = round(2^frac/s_out), z_out in [lo, hi]."""
    groups: int
    mult: int
    frac: int
    z_out: int
    lo: int
    hi: int


@dataclass(frozen=True, kw_only=True)
class TableAttrs(Attrs):
    """An elementwise function as a table over the input codes (params['table'])."""


@dataclass(frozen=True, kw_only=True)
class FlattenAttrs(Attrs):
    """[N, C, H, W] → [N, C·H·W]; no attributes."""


@dataclass(frozen=True, kw_only=True)
class GatherAttrs(Attrs):
    """Channels x[:, params['index']]; no attributes."""
