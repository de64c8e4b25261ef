"""The source tables of a resize (``F.interpolate`` / ``nn.Upsample``, NCHW): per output row
and per output column two source indices and an integer weight, computed as PyTorch's CPU
kernels compute them (aten/src/ATen/native/UpSample.h), in float32 like torch.

    nearest   scale = float32(1/scale_factor) if a scale factor is given, else
              float32(in)/float32(out); src(i) = min(⌊float32(i)·scale⌋, in − 1)
    bilinear  align_corners: scale = float32(in − 1)/float32(out − 1) (0 when out = 1),
              src(i) = scale·i; otherwise scale as for nearest and
              src(i) = max(scale·(i + 0.5) − 0.5, 0). i0 = min(⌊src⌋, in − 1),
              i1 = i0 + (i0 < in − 1), λ1 = clamp(src − i0, 0, 1)

The integer op (relay_passes/reference.py ``resize``) weighs row i0 by ``w0`` and row i1 by
2^F − w0, with w0 = 2^F − round(λ1·2^F): F = ``RESIZE_FRAC`` for bilinear, F = 0 for nearest
(w0 = 1, i1 = i0: a pure gather of codes).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from calib.numerics import quantize_multiplier
from relay_passes.attrs import CropAttrs, ResizeAttrs
from relay_passes.program import Op

RESIZE_FRAC = 10        # bilinear weights in units of 2^-10: |acc| ≤ 2^20·255 stays far inside int32
MAX_FRAC = 11           # the contract's limit: |acc| ≤ 2^(2F)·255 < 2^31 (npu16 rejects more)
MODES = ("nearest", "bilinear")


@dataclass(frozen=True)
class AxisTable:
    """One axis of a resize: output position o reads i0[o] (weight w0[o]) and i1[o]
    (weight 2^frac − w0[o]); int32 arrays of the output length."""

    i0: np.ndarray
    i1: np.ndarray
    w0: np.ndarray
    frac: int

    def lam(self) -> np.ndarray:
        """The weight of i1 as a real number (what the integer weights stand for)."""
        return 1.0 - self.w0.astype(np.float64) / (1 << self.frac)


def _scale(n_in: int, n_out: int, scale: float | None) -> np.float32:
    if scale is not None and scale > 0:
        return np.float32(1.0 / scale)
    return np.float32(n_in) / np.float32(n_out)


def nearest_axis(n_in: int, n_out: int, scale: float | None = None) -> AxisTable:
    """mode="nearest" (aten upsample_nearest2d): src = min(⌊i·s⌋, in − 1) in float32."""
    s = _scale(n_in, n_out, scale)
    src = np.floor(np.arange(n_out, dtype=np.float32) * s).astype(np.int64)
    i0 = np.minimum(src, n_in - 1).astype(np.int32)
    return AxisTable(i0, i0.copy(), np.ones(n_out, np.int32), 0)


def linear_axis(n_in: int, n_out: int, align_corners: bool, scale: float | None = None,
                frac: int = RESIZE_FRAC) -> AxisTable:
    """mode="bilinear" along one axis (aten upsample_bilinear2d, float32 source coordinates)."""
    dst = np.arange(n_out, dtype=np.float32)
    if align_corners:
        s = np.float32(n_in - 1) / np.float32(n_out - 1) if n_out > 1 else np.float32(0)
        src = s * dst
    else:
        s = _scale(n_in, n_out, scale)
        src = np.maximum(s * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = i0 + (i0 < n_in - 1)
    lam = np.clip(src - i0.astype(np.float32), np.float32(0), np.float32(1))
    w1 = np.floor(lam.astype(np.float64) * (1 << frac) + 0.5).astype(np.int64)
    return AxisTable(i0.astype(np.int32), i1.astype(np.int32), ((1 << frac) - w1).astype(np.int32), frac)


def resize_tables(in_hw: tuple[int, int], out_hw: tuple[int, int], mode: str, align_corners: bool = False,
                  scales: tuple[float, float] | None = None) -> tuple[AxisTable, AxisTable]:
    """(rows, columns) of a resize from ``in_hw`` to ``out_hw``; ``scales`` the scale factors
    torch was given (None: computed from the sizes)."""
    if mode not in MODES:
        raise ValueError(f"resize mode {mode!r} (choose from {', '.join(MODES)})")
    sc = scales if scales is not None else (None, None)
    if mode == "nearest":
        return tuple(nearest_axis(i, o, s) for i, o, s in zip(in_hw, out_hw, sc))
    return tuple(linear_axis(i, o, align_corners, s) for i, o, s in zip(in_hw, out_hw, sc))


def resize_params(rows: AxisTable, cols: AxisTable) -> dict[str, np.ndarray]:
    """The op's params: y0, y1, wy (rows) and x0, x1, wx (columns), int32."""
    return {"y0": rows.i0, "y1": rows.i1, "wy": rows.w0, "x0": cols.i0, "x1": cols.i1, "wx": cols.w0}


def resize_op(name: str, src: str, in_hw, out_hw, mode: str, align_corners: bool, scales, s_in: float,
              z_in: int, s_out: float, z_out: int, qmax: int = 255) -> Op:
    """A resize op (the conformance example and ProgramBuilder.resize): nearest shares the input's codes
    (F = 0, multiplier exactly 1); bilinear requantizes Σ w·(x − z_in) by s_in/(s_out·2^(2F))."""
    rows, cols = resize_tables(in_hw, out_hw, mode, align_corners, scales)
    if mode == "nearest":
        s_out, z_out = s_in, z_in
    mult, shift = quantize_multiplier(np.array([s_in / (s_out * 4.0**rows.frac)]))
    attrs = ResizeAttrs(mode=mode, frac=rows.frac, z_in=int(z_in), z_out=int(z_out), mult=int(mult[0]),
                        shift=int(shift[0]), lo=0, hi=int(qmax))
    return Op("resize", name, [src], attrs, resize_params(rows, cols))


def crop_as_resize(a: CropAttrs) -> tuple[ResizeAttrs, dict[str, np.ndarray]]:
    """A crop as the nearest resize that reads its box (attributes and params): rows top + i and
    columns left + j, F = 0 and the exact unit multiplier with z_in = z_out = 0 over [0, 255], so
    every uint8 code moves unchanged (npu16 runs a crop as its RESIZE gather)."""
    rows, cols = (np.arange(start, start + size, dtype=np.int32) for start, size in ((a.top, a.height),
                                                                                    (a.left, a.width)))
    mult, shift = quantize_multiplier(np.array([1.0]))
    attrs = ResizeAttrs(mode="nearest", frac=0, z_in=0, z_out=0, mult=int(mult[0]), shift=int(shift[0]), lo=0, hi=255)
    return attrs, resize_params(*(AxisTable(i, i.copy(), np.ones(i.size, np.int32), 0) for i in (rows, cols)))
