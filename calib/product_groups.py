"""WAPS input-channel product-scaling groups (paper eqs. 14-15 and appendix C).

Each input unit i (a channel; for a linear after a flatten, the producer channel
whose H·W features it reads) learns logits R[i, :] over g groups with fixed scales
γ^G. The group probability (eq. 15) is s(R_ip) = clamp(π_ip·(ζ − τ) + τ, 0, 1) with
π_ip = σ(R_ip) / Σ_j σ(R_ij) as the paper writes it ("sigmoid"), or π_i = softmax(R_i)
("softmax", the default: same top-1, 5-7 % lower block loss, bench/results/eq15.md);
it gives γ^y_i = Σ_p γ_p·s_ip / Σ_j s_ij while soft. A channel *settles* the first step
its s becomes one-hot; hardening assigns groups whose sizes are whole tiles
(the last group in memory order may hold the partial tile), serving channels in
the order they settled so early, decisive channels keep their group.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from calib import native
from calib.rounding import STRETCH, TAU, ZETA, binary_regulariser


GROUP_PROBS = ("sigmoid", "softmax")


def rectified_softmax(r: torch.Tensor) -> torch.Tensor:
    """s [c, g] from logits R [c, g] with π = softmax(R_i)."""
    return (torch.softmax(r, dim=1) * (ZETA - TAU) + TAU).clamp(0, 1)


def rectified_sigmoid_ratio(r: torch.Tensor) -> torch.Tensor:
    """s [c, g] from logits R [c, g] with π_ip = σ(R_ip) / Σ_j σ(R_ij) (eq. 15 as printed).

    Unlike the softmax, π depends on the logits' absolute values, not only their
    differences: s = 1 needs π ≥ (1 − τ)/(ζ − τ) = 11/12, so the losing logits' σ must
    sum to at most 1/11 of the winner's (they must go well negative)."""
    sig = torch.sigmoid(r)
    return (sig / sig.sum(1, keepdim=True) * (ZETA - TAU) + TAU).clamp(0, 1)


def group_probabilities(r: torch.Tensor, form: str) -> torch.Tensor:
    """s [c, g] for ``form`` in GROUP_PROBS."""
    if form == "sigmoid":
        return rectified_sigmoid_ratio(r)
    if form == "softmax":
        return rectified_softmax(r)
    raise ValueError(f"unknown group probability form {form!r}; choose one of {GROUP_PROBS}")


def assign_tile_groups(scores: np.ndarray, settled_at: np.ndarray, tile: int) -> np.ndarray:
    """Hard group per unit with tile-granular group sizes.

    scores [c, g]: group probabilities; settled_at [c]: step each unit settled
    (-1 if never). Group sizes: tile counts by largest remainder of the preferred
    counts over T = ceil(c / tile) tiles; the group with the most spare capacity
    absorbs the partial tile. Units are served earliest-settled first (unsettled
    last, most confident first) and take their preferred group while it has room,
    else the room-having group they score highest. Returns int64 [c] in [0, g)."""
    c, g = scores.shape
    tiles = -(-c // tile)
    preferred = scores.argmax(1)
    desired = np.bincount(preferred, minlength=g).astype(np.float64)
    exact = desired / tile
    t = np.floor(exact).astype(np.int64)
    for p in np.argsort(-(exact - t), kind="stable")[: tiles - t.sum()]:
        t[p] += 1
    cap = t * tile
    spare = np.where(t > 0, cap - desired, -np.inf)
    cap[int(np.argmax(spare))] -= tiles * tile - c

    never = settled_at < 0
    order = np.lexsort((-scores.max(1), np.where(never, np.iinfo(np.int64).max, settled_at)))
    out = np.empty(c, dtype=np.int64)
    for i in order:
        ranked = np.argsort(-scores[i], kind="stable")
        p = next(p for p in ranked if cap[p] > 0)
        out[i] = p
        cap[p] -= 1
    return out


class _SoftGroups(torch.autograd.Function):
    """(γ^y [units], reg, s [units, g]) from logits R as one autograd node through calib/native's
    soft_groups kernels (``group_probabilities``, ``ProductGroups.gamma_y`` and the binary
    regulariser at ``beta``, or reg 0 and not computed where None; torch takes some 35 small
    ops and their backward). s is not differentiable: read it, don't learn through it.
    Values: those of the torch forms up to an ulp or two (own exp) and ~β·1e-7 relative in
    the regulariser."""

    @staticmethod
    def forward(ctx, r, gammas, sigmoid_form: bool, beta: float | None):
        ctx.set_materialize_grads(False)
        s, gy, reg = native.soft_groups_forward(r, gammas, sigmoid_form, STRETCH, beta)
        ctx.save_for_backward(r, gammas, s, gy)
        ctx.sigmoid_form, ctx.beta = sigmoid_form, beta
        ctx.mark_non_differentiable(s)
        return gy, torch.tensor(reg, dtype=r.dtype, device=r.device), s

    @staticmethod
    def backward(ctx, ggy, greg, _gs):
        r, gammas, s, gy = ctx.saved_tensors
        c_reg = float(greg) if greg is not None and ctx.beta is not None else 0.0
        ggy = ggy if ggy is not None else torch.zeros_like(gy)
        return (native.soft_groups_backward(r, gammas, ctx.sigmoid_form, STRETCH, s, gy, ggy, ctx.beta, c_reg),
                None, None, None)


class ProductGroups(nn.Module):
    """Learnable group membership of ``units`` input units over the scales ``gammas``;
    ``prob`` selects the eq. 15 form (GROUP_PROBS)."""

    def __init__(self, units: int, gammas: list[float], prob: str = "softmax"):
        super().__init__()
        if prob not in GROUP_PROBS:
            raise ValueError(f"unknown group probability form {prob!r}; choose one of {GROUP_PROBS}")
        self.prob = prob
        g = len(gammas)
        self.register_buffer("gammas", torch.tensor(gammas, dtype=torch.float32))
        # start every unit undecided; the γ=1 group is slightly preferred so the soft
        # γ^y starts at ≈1 even for asymmetric γ^G choices
        r = torch.zeros(units, g)
        r[:, int(np.argmin(np.abs(np.array(gammas) - 1.0)))] = 0.5
        self.r = nn.Parameter(r)
        self.register_buffer("settled_at", torch.full((units,), -1, dtype=torch.int64))
        self.register_buffer("assignment", torch.full((units,), -1, dtype=torch.int64))
        self.history: list[np.ndarray] = []  # s[:, 0] snapshots for the Fig. 8 plot
        self.native = False   # γ^y and regulariser through _SoftGroups (reconstruct's Speedups.native_soft)
        self._step_s: torch.Tensor | None = None
        self._step: tuple[torch.Tensor, torch.Tensor, float | None] | None = None   # (γ^y, reg, β) of _SoftGroups

    @property
    def hard(self) -> bool:
        return bool(self.assignment[0] >= 0)

    def probs(self) -> torch.Tensor:
        """s [units, g], the one of the current step where ``begin_step`` made it."""
        return self._step_s if self._step_s is not None else group_probabilities(self.r, self.prob)

    def begin_step(self, beta: float | None = None) -> None:
        """Compute s once for this step: γ^y and the regulariser share it until ``end_step``,
        which follows the step's backward (``track`` then reads the updated logits). With
        ``native`` (and tensors the kernels take) γ^y and, for ``beta``, the regulariser come
        from one _SoftGroups node instead."""
        if self.native and native.soft_groups_usable(self.r, self.gammas):
            gy, reg, _ = _SoftGroups.apply(self.r, self.gammas, self.prob == "sigmoid", beta)
            self._step = (gy, reg, beta)
        else:
            self._step_s = group_probabilities(self.r, self.prob)

    def end_step(self) -> None:
        self._step_s = None
        self._step = None

    def gamma_y(self) -> torch.Tensor:
        """γ^y [units]: soft mixture while learning, exactly γ_p once hard."""
        if self._step is not None:    # made by begin_step, which a hard assignment skips
            return self._step[0]
        if self.hard:
            return self.gammas[self.assignment]
        s = self.probs()
        return (s * self.gammas).sum(1) / s.sum(1)

    def regulariser(self, beta: float) -> torch.Tensor:
        if self._step is not None and self._step[2] == beta:
            return self._step[1]
        return binary_regulariser(self.probs(), beta)

    @torch.no_grad()
    def track(self, step: int, record: bool = False) -> None:
        """Update settle steps; a unit that leaves one-hot again is unsettled (one C call with
        ``native``)."""
        s = (native.soft_groups_track(self.r, self.prob == "sigmoid", STRETCH, step, self.settled_at)
             if self.native else None)
        if s is None:
            s = self.probs()
            onehot = s.max(1).values >= 1.0
            self.settled_at[onehot & (self.settled_at < 0)] = step
            self.settled_at[~onehot] = -1
        if record:
            self.history.append(s.detach().cpu().numpy().copy())

    @torch.no_grad()
    def harden(self, tile: int) -> None:
        s = self.probs().cpu().numpy()
        self.assignment.copy_(torch.from_numpy(assign_tile_groups(s, self.settled_at.cpu().numpy(), tile)))

    def set_assignment(self, assignment: torch.Tensor) -> None:
        self.assignment.copy_(assignment.to(torch.int64))
