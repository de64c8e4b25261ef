"""AdaRound: learned up/down rounding of weights (eqs. 12-13) and its regulariser.

h(V) = clamp(σ(V)·(ζ − τ) + τ, 0, 1), ζ = 1.1, τ = −0.1.
w̄ = clamp(floor(w/s) + h(V), qmin, qmax) while soft; h(V) ≥ 0.5 ⇔ round up once hard.
Regulariser: Σ (1 − |2h − 1|^β), β annealed from 20 to 2 after a warm-up (BRECQ).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from calib import native

ZETA, TAU = 1.1, -0.1
STRETCH = (ZETA - TAU, TAU)     # (span, low) of the rectified sigmoid, as calib/native's kernels take it


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(v) * (ZETA - TAU) + TAU).clamp(0, 1)


def binary_regulariser(h: torch.Tensor, beta: float) -> torch.Tensor:
    """Σ (1 − |2h − 1|^β): zero exactly when every h is 0 or 1."""
    return (1 - (2 * h - 1).abs().pow(beta)).sum()


class BetaSchedule:
    """β(t): ``start`` during the first ``warmup`` fraction (where the regulariser is
    off), then linear decay to ``end`` at t = t_max (BRECQ's LinearTempDecay)."""

    def __init__(self, t_max: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0):
        self.t_max, self.warmup, self.start, self.end = t_max, warmup, start, end

    def active(self, t: int) -> bool:
        return t >= self.warmup * self.t_max

    def __call__(self, t: int) -> float:
        t0 = self.warmup * self.t_max
        if t < t0:
            return self.start
        rel = (t - t0) / max(self.t_max - t0, 1)
        return self.end + (self.start - self.end) * max(0.0, 1.0 - rel)


class _SoftRound(torch.autograd.Function):
    """(w, reg) = (clamp(floor + h(V), qmin, qmax)·scale, Σ (1 − |2h(V) − 1|^β)) as one autograd
    node through calib/native's soft_round kernels: one pass forward, one backward (torch
    takes some 30 small ops and their backward). ``beta`` None: reg is 0 and not computed.
    Values: those of ``AdaRound.forward`` and ``binary_regulariser`` up to an ulp or two in
    h (its own exp) and ~β·1e-7 relative in the regulariser (exp·log for the power)."""

    @staticmethod
    def forward(ctx, v, floor, scale, qmin: float, qmax: float, beta: float | None):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(v, floor, scale)
        ctx.qmin, ctx.qmax, ctx.beta = qmin, qmax, beta
        w, reg = native.soft_round_forward(v, floor, scale, qmin, qmax, STRETCH, beta)
        return w, torch.tensor(reg, dtype=v.dtype, device=v.device)

    @staticmethod
    def backward(ctx, gw, greg):
        v, floor, scale = ctx.saved_tensors
        c_reg = float(greg) if greg is not None and ctx.beta is not None else 0.0
        gw = gw if gw is not None else torch.zeros_like(v)
        gv = native.soft_round_backward(v, floor, scale, gw, ctx.qmin, ctx.qmax, STRETCH, ctx.beta, c_reg)
        return gv, None, None, None, None, None


class AdaRound(nn.Module):
    """Learned rounding for one weight tensor with per-output-channel scale ``scale`` [m]."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bits: int):
        super().__init__()
        self.qmin, self.qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        shape = (-1,) + (1,) * (weight.dim() - 1)
        self.register_buffer("scale", scale.reshape(shape).clone())
        w = weight / self.scale
        self.register_buffer("floor", w.floor())
        rest = (w - self.floor).clamp(1e-4, 1 - 1e-4)
        # start where h(V) equals the fractional part: soft rounding = the float weight
        self.v = nn.Parameter(-torch.log((ZETA - TAU) / (rest - TAU) - 1))
        self.hard = False
        self.native = False   # soft weights and regulariser through _SoftRound (Speedups.native_soft)
        self._step_h: torch.Tensor | None = None
        self._step: tuple[torch.Tensor, torch.Tensor, float | None] | None = None   # (w, reg, β) of _SoftRound

    def h(self) -> torch.Tensor:
        """h(V), the one of the current step where ``begin_step`` made it."""
        return self._step_h if self._step_h is not None else rectified_sigmoid(self.v)

    def begin_step(self, beta: float | None = None) -> None:
        """Compute h(V) once for this step: the forward and the regulariser share it (one
        autograd node, not two) until ``end_step``, which follows the step's backward. With
        ``native`` (and tensors the kernels take) the soft weights and, for ``beta``, the
        regulariser come from one _SoftRound node instead."""
        if self.native and native.soft_round_usable(self.v, self.floor, self.scale):
            w, reg = _SoftRound.apply(self.v, self.floor, self.scale, float(self.qmin), float(self.qmax), beta)
            self._step = (w, reg, beta)
        else:
            self._step_h = rectified_sigmoid(self.v)

    def end_step(self) -> None:
        self._step_h = None
        self._step = None

    def codes(self) -> torch.Tensor:
        """Integer codes w̄ (as float): soft during learning, {floor, floor+1} once hard."""
        up = (self.v >= 0).float() if self.hard else self.h()
        return (self.floor + up).clamp(self.qmin, self.qmax)

    def forward(self) -> torch.Tensor:
        if self._step is not None and not self.hard:
            return self._step[0]
        return self.codes() * self.scale

    def regulariser(self, beta: float) -> torch.Tensor:
        if self._step is not None and self._step[2] == beta:
            return self._step[1]
        return binary_regulariser(self.h(), beta)


def nearest_codes(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Round-to-nearest weight codes (half to even)."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return (weight / scale.reshape(shape)).round().clamp(qmin, qmax)


def cosine_lr(step: int, total: int, base: float) -> float:
    return base * 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))
