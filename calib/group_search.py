"""Hardware-aware WAPS group search: per layer, the number of groups g ∈ {1, …, 4} and the
shift n of the group scales, chosen before reconstruction so that what the groups cost on an
accelerator stays within a budget (``waps-tvm calibrate … --npu-budget 1%``).

Candidates: Γ_g(n) = (1, 1 − 2^−n, 1 + 2^−n, 1 − 2^−(n−1))[:g] for n in ``shifts`` (the paper's
(1, 1 − 2^−4, 1 + 2^−4) is Γ_3(4)); g = 1 is no groups.

Benefit of Γ for a layer: the drop in its output noise-to-signal ratio under the diagonal
(per-input-unit) approximation of the output error. With h_i = E[x_i²] over a probe of the
calibration data (float model), weights W, per-output-channel steps s_o, b-bit codes q:
    e_u(γ) = Σ_{i∈u} h_i Σ_{o, taps} (W_oi − γ·s_o·q(W_oi / γ))²,  E(Γ) = Σ_u min_{γ∈Γ} e_u(γ),
    S = Σ_i h_i Σ_{o, taps} W_oi²,  benefit(Γ) = (E({1}) − E(Γ)) / S.
WAPS scales each input unit's weight grid by its group's γ (γ^y is folded into the weight),
so this is the rounding error the groups can remove; the noise-to-signal ratios of successive
layers add, so benefits of different layers are comparable.

Cost: a ``GroupCost`` (the accelerator's cost model, e.g. targets/npu16/group_cost.py) gives
a layer's cycles with g tile-sized groups, none empty: the most any assignment calibration
can produce costs (an emptier assignment costs less), so the budget holds for the artifact.
The budget is a fraction of the summed cycles of the accelerator's conv/linear layers without
groups (npu16: their compute-unit cycles, a lower bound); the compiled model's total also
holds its DMA and other ops, so the measured overhead fraction is lower still. Selection: a greedy multiple-choice knapsack taking the upgrade with
the most benefit per cycle that still fits, until none does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from calib.errors import ConfigError
from calib.graph import PARAM_OPS, Graph, Node
from calib.rounding import nearest_codes

SHIFTS = (3, 4, 5)
MAX_GROUPS = 4
PROBE_SAMPLES = 128
PROBE_BATCH = 16


def gamma_set(g: int, n: int) -> tuple[float, ...]:
    """Γ_g(n): g scales, the first 1 (no shift), then 1 − 2^−n, 1 + 2^−n, 1 − 2^−(n−1)."""
    if not 1 <= g <= MAX_GROUPS or not 2 <= n <= 15:
        raise ConfigError(f"group set g={g}, n={n}: g must be 1..{MAX_GROUPS} and n 2..15")
    return (1.0, 1.0 - 2.0 ** -n, 1.0 + 2.0 ** -n, 1.0 - 2.0 ** -(n - 1))[:g]


class GroupCost(Protocol):
    def cycles(self, graph: Graph, node: Node, groups: int, tile: int) -> int | None:
        """Cycles of conv/linear ``node`` with ``groups`` WAPS groups of whole ``tile``-channel
        tiles, none empty (groups = 1: no WAPS); None when the accelerator does not run it.
        For the budget to hold, the extra cycles must bound the real ones from above and the
        groups = 1 cycles the layer's real cycles from below (e.g. compute units only)."""


@dataclass(frozen=True)
class GroupBudget:
    """The request: WAPS overhead ≤ ``fraction`` of the layers' cycles under ``cost``."""
    fraction: float
    cost: GroupCost
    shifts: tuple[int, ...] = SHIFTS
    max_groups: int = MAX_GROUPS
    probe: int = PROBE_SAMPLES

    def __post_init__(self):
        if not self.fraction >= 0:
            raise ConfigError(f"NPU budget {self.fraction * 100:g} %: must be ≥ 0")


@dataclass(frozen=True)
class LayerChoice:
    name: str
    gammas: tuple[float, ...]      # (1.0,): no groups
    benefit: float                 # drop in output noise-to-signal ratio
    overhead: int                  # cycles the groups may add (worst case over assignments)
    base: int | None               # cycles without groups; None: not run by the accelerator


@dataclass(frozen=True)
class GroupPlan:
    fraction: float
    layers: tuple[LayerChoice, ...]

    @property
    def base_cycles(self) -> int:
        return sum(c.base for c in self.layers if c.base is not None)

    @property
    def overhead_cycles(self) -> int:
        return sum(c.overhead for c in self.layers)

    @property
    def overhead_fraction(self) -> float:
        return self.overhead_cycles / max(self.base_cycles, 1)

    def gammas(self) -> dict[str, tuple[float, ...]]:
        return {c.name: c.gammas for c in self.layers}


def unit_errors(weight: torch.Tensor, scale: torch.Tensor, bits: int, conv_groups: int, h: torch.Tensor,
                unit_size: int, gamma: float) -> torch.Tensor:
    """e_u(γ) [units] (float64): h-weighted squared error of the weights on the γ-scaled grid.

    weight [m, c/G, kh, kw] or [m, F]; scale [m]; h [c] or [F] = E[x_i²] per input feature
    (a conv's channel, a linear's feature; a unit is ``unit_size`` consecutive features). Output
    channel block k of a conv with G groups reads input channels k·c/G … (k+1)·c/G − 1."""
    shape = (-1,) + (1,) * (weight.dim() - 1)
    w = weight.double()
    q = gamma * scale.double().reshape(shape) * nearest_codes(w / gamma, scale.double(), bits)
    err = (w - q).pow(2)
    per_col = err.reshape(err.shape[0], err.shape[1], -1).sum(2)           # [m, c/G]
    m, cg = per_col.shape
    per_feature = per_col.reshape(conv_groups, m // conv_groups, cg).sum(1).reshape(-1)   # [c]
    return (per_feature * h.double()).reshape(-1, unit_size).sum(1)


def layer_options(weight: torch.Tensor, scale: torch.Tensor, bits: int, conv_groups: int, h: torch.Tensor,
                  unit_size: int, budget: GroupBudget) -> dict[int, tuple[tuple[float, ...], float]]:
    """{g: (best Γ_g(n) over n, its benefit)} for g = 1 … max_groups (g = 1: ((1.0,), 0))."""
    sets = {(g, n): gamma_set(g, n) for g in range(2, budget.max_groups + 1) for n in budget.shifts}
    values = sorted({v for s in sets.values() for v in s} | {1.0})
    errs = {v: unit_errors(weight, scale, bits, conv_groups, h, unit_size, v) for v in values}
    base = errs[1.0].sum()
    signal = (weight.double().pow(2).reshape(weight.shape[0], weight.shape[1], -1).sum(2)
              .reshape(conv_groups, -1, weight.shape[1]).sum(1).reshape(-1) * h.double()).sum()
    out = {1: ((1.0,), 0.0)}
    for g in range(2, budget.max_groups + 1):
        best = None
        for n in budget.shifts:
            gs = sets[(g, n)]
            e = torch.stack([errs[v] for v in gs]).min(0).values.sum()
            gain = float((base - e) / signal.clamp_min(1e-30))
            if best is None or gain > best[1]:
                best = (gs, gain)
        out[g] = best
    return out


def choose(options: dict[str, dict[int, tuple[tuple[float, ...], float]]], costs: dict[str, dict[int, int | None]],
           fraction: float) -> GroupPlan:
    """Greedy multiple-choice knapsack over layers: start with no groups, repeatedly take the
    upgrade (to any larger g) with the most benefit per added cycle that fits the budget
    (free upgrades first, by benefit), until none adds benefit within it.

    options[layer][g] = (Γ, benefit); costs[layer][g] = cycles (None: not on the accelerator,
    then the groups are free for the budget). Layers absent from ``options`` keep no groups
    but count in the base."""
    base = sum(c[1] for c in costs.values() if c[1] is not None)
    limit = fraction * base
    chosen = {name: 1 for name in options}

    def extra(name: str, g: int) -> int:
        c = costs[name]
        return 0 if c[1] is None else c[g] - c[1]

    spent = 0
    while True:
        best, best_key = None, None
        for name, opts in options.items():
            cur = chosen[name]
            for g in opts:
                if g <= cur:
                    continue
                gain = opts[g][1] - opts[cur][1]
                add = extra(name, g) - extra(name, cur)
                if gain <= 0 or spent + add > limit:
                    continue
                key = (float("inf") if add <= 0 else gain / add, gain)
                if best_key is None or key > best_key:
                    best, best_key = (name, g, add), key
        if best is None:
            break
        name, g, add = best
        chosen[name] = g
        spent += add
    layers = []
    for name, c in costs.items():
        g = chosen.get(name, 1)
        gammas, gain = options[name][g] if name in options else ((1.0,), 0.0)
        layers.append(LayerChoice(name, gammas, gain, extra(name, g) if name in options else 0, c[1]))
    return GroupPlan(fraction, tuple(layers))


@torch.no_grad()
def input_energy(model, names: list[str], data: torch.Tensor, probe: int) -> dict[str, torch.Tensor]:
    """h [features] = E[x_i²] of each named QuantLayer's float input over the first ``probe``
    samples of ``data`` (channel i of a conv: mean over samples and pixels)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def pre(_module, args):
            x = args[0].detach().double()
            per = x.transpose(0, 1).reshape(x.shape[1], -1)
            sums[name] = sums.get(name, 0) + per.pow(2).sum(1)
            counts[name] = counts.get(name, 0) + per.shape[1]
        return pre

    handles = [model.layer(n).register_forward_pre_hook(hook(n)) for n in names]
    # the float pass switches every quantizer off; all of them are switched back as they were
    # (an input quantizer left off would never get its range: calibrate's init_from skips it)
    was = [m.quant for m in model.ops.values()], model.input_quant.enabled
    device = next(iter(model.buffers())).device
    try:
        model.set_quant(False)
        sub = data[:probe]
        for i in range(0, len(sub), PROBE_BATCH):
            model(sub[i:i + PROBE_BATCH].to(device=device, dtype=torch.float32))
    finally:
        for h in handles:
            h.remove()
        for m, q in zip(model.ops.values(), was[0]):
            m.quant = q
        model.input_quant.enabled = was[1]
    return {n: sums[n] / counts[n] for n in names}


def search(model, graph: Graph, data: torch.Tensor, budget: GroupBudget, tile: int, can_group) -> GroupPlan:
    """The plan for ``model`` (a QuantModel built with any groups): ``can_group(node)`` says
    whether a layer may take WAPS groups at all (not depthwise, more units than a tile)."""
    layers = [n for n in graph if n.op in PARAM_OPS]
    grouped = [n for n in layers if can_group(n)]
    h = input_energy(model, [n.name for n in grouped], data, budget.probe)
    options, costs = {}, {}
    for n in layers:
        gs = range(1, budget.max_groups + 1) if n in grouped else (1,)
        costs[n.name] = {g: budget.cost.cycles(graph, n, g, tile) for g in gs}
        if costs[n.name][1] is None:
            costs[n.name] = {g: None for g in gs}
    for n in grouped:
        q = model.layer(n.name)
        options[n.name] = layer_options(q.weight, q.w_scale, q.wbits, n.attrs.get("groups", 1), h[n.name],
                                        q.unit_size, budget)
    return choose(options, costs, budget.fraction)
