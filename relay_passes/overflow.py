"""CheckOverflow: prove, per layer, that no int32 intermediate can overflow.

For a conv/linear with input codes x̄ ∈ [0, in_qmax], zero point z, and per output
channel k and group p the weight mass A_p[k] = Σ_{i∈G_p} Σ_kernel |w[k,i,·]|:
    |Σ w·x̄|           ≤ A_p·in_qmax           (the u8×s8 conv before the z correction)
    |acc_p|           ≤ A_p·max(z, in_qmax − z)·2^L   (L = frac, fractional accumulator bits)
    |acc_p + 2^(n−1)| ≤ |acc_p| + 2^(n−1)      (the rounding add of the group shift)
    |acc + b|         ≤ Σ_p (|acc_p| + (|acc_p| + 2^(n_p−1)) >> n_p) + |b|
All must stay ≤ 2^31 − 1 (every partial sum of the merge is bounded by the last line).
A matmul of two uint8 code maps sums K = D (contract "channels") or L ("positions") products:
    |acc|             ≤ K·max(za, 255 − za)·max(zb, 255 − zb)
Requantization and residual adds run in int64: |acc·M| < 2^62, |(x − z)·k| < 2^40.
A layer that fails is rejected by name; the bound uses the layer's actual weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from calib.numerics import INT32_MAX
from relay_passes.attrs import MatmulAttrs
from relay_passes.opset import is_layer
from relay_passes.program import waps_pass, Op, Program, parse
from relay_passes.quantize import CompileError


def accumulator_bound(op: Op) -> int:
    """The largest magnitude any int32 intermediate of ``op`` can reach."""
    w = np.abs(op.params["w"].astype(np.int64))
    a = op.attrs
    xmax, z = int(a.in_qmax), int(a.z_in)
    groups = op.params.get("groups")
    m = w.shape[0]
    if a.spatial:
        cg, cgroups = w.shape[1], a.conv_groups
        chan = (np.arange(m)[:, None] // (m // cgroups)) * cg + np.arange(cg)[None, :]      # [m, cg]
        mass = w.sum(axis=(2, 3))                                                          # [m, cg]
    else:
        chan = np.broadcast_to(np.arange(w.shape[1]), w.shape)
        mass = w
    worst = 0
    total = np.abs(op.params["bias"].astype(np.int64))
    for p, gs in enumerate(op.group_scales):
        sel = np.ones_like(chan, bool) if groups is None else groups[chan] == p
        a_p = (mass * sel).sum(axis=1)
        raw = a_p * xmax
        acc = (a_p * max(z, xmax - z)) << a.frac
        half = (1 << (gs.n - 1)) if gs.sigma else 0
        total = total + acc + (((acc + half) >> gs.n) if gs.sigma else 0)
        worst = max(worst, int(raw.max()), int((acc + half).max()))
    return max(worst, int(total.max()))


def matmul_bound(op: Op, b_shape: tuple[int, ...]) -> int:
    """The largest |acc| of a matmul whose second operand has ``b_shape`` (uint8 codes)."""
    a = op.attrs
    terms = b_shape[1] // a.heads if a.contract == "channels" else int(np.prod(b_shape[2:]))
    return terms * max(a.za, 255 - a.za) * max(a.zb, 255 - a.zb)


def check_overflow(program: Program) -> dict[str, int]:
    """Bound of every conv/linear and matmul (name → bound); CompileError naming the first that
    overflows."""
    bounds = {}
    for op in program.ops:
        if isinstance(op.attrs, MatmulAttrs):
            b = matmul_bound(op, program.shape_of(op.inputs[1]))
            if b > INT32_MAX:
                raise CompileError(f"matmul {op.label} could overflow its int32 accumulator (bound {b} > 2^31-1)")
            bounds[op.name] = b
        elif is_layer(op):
            b = accumulator_bound(op)
            if b > INT32_MAX:
                raise CompileError(f"layer {op.label} could overflow its int32 accumulator "
                                   f"(bound {b} > 2^31-1); use fewer weight/activation bits or split the layer")
            bounds[op.name] = b
    return bounds


@dataclass
class OverflowReport:
    bounds: dict[str, int]                  # conv/linear/matmul op → largest int32 intermediate


def CheckOverflow(sink=None):  # noqa: N802 (TVM pass naming)
    """The pass (the module is unchanged); ``sink(OverflowReport)`` receives the bounds."""
    @waps_pass("waps.CheckOverflow")
    def _pass(mod, ctx):
        bounds = check_overflow(parse(mod))
        if sink is not None:
            sink(OverflowReport(bounds))
        return mod
    return _pass
