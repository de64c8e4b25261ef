"""The hardware-aware group search: its benefit (rounding error the groups remove), its
knapsack (never over budget, nothing left that fits), and a calibration that uses it."""
import dataclasses
import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from calib.config import CalibConfig
from calib.group_search import (GroupBudget, choose, gamma_set, layer_options, search, unit_errors)
from calib.numerics import group_scale
from calib.qmodel import QuantModel, takes_groups
from calib.quantizers import init_weight_scale
from targets.npu16.group_cost import NpuGroupCost
from targets.npu16.params import NPU16


def test_gamma_sets_are_shift_add_scales_and_nested():
    for n in (3, 4, 5):
        for g in range(1, 5):
            gs = gamma_set(g, n)
            assert len(gs) == len(set(gs)) == g and gs[0] == 1.0
            for v in gs:
                group_scale(v)                   # raises unless 1 ± 2^-k
            assert gs == gamma_set(4, n)[:g]
    assert gamma_set(3, 4) == CalibConfig().gammas      # the paper's set


def test_unit_errors_match_a_direct_sum_for_a_grouped_conv_and_a_flattened_linear():
    torch.manual_seed(0)
    w = torch.randn(6, 2, 3, 3)                          # conv with 2 groups: c = 4, 3 outputs per group
    s = init_weight_scale(w, 3)
    h = torch.rand(4) + 0.1
    gamma = 0.875
    got = unit_errors(w, s, 3, 2, h, 1, gamma)
    want = torch.zeros(4, dtype=torch.float64)
    for o, j in itertools.product(range(6), range(2)):
        i = (o // 3) * 2 + j                             # input channel read by output o's tap column j
        q = gamma * s[o] * torch.clamp(torch.round(w[o, j] / gamma / s[o]), -4, 3)
        want[i] += h[i].double() * ((w[o, j] - q).double() ** 2).sum()
    torch.testing.assert_close(got, want)

    lin = torch.randn(5, 8)                              # 4 units of 2 features (a flatten of 4×1×2)
    s = init_weight_scale(lin, 2)
    h = torch.rand(8) + 0.1
    per_feature = torch.stack([(h[i].double() * (lin[:, i] - 1.0 * s * torch.clamp(torch.round(lin[:, i] / s), -2, 1))
                                .double().pow(2)).sum() for i in range(8)])
    torch.testing.assert_close(unit_errors(lin, s, 2, 1, h, 2, 1.0), per_feature.reshape(4, 2).sum(1))


def test_more_groups_never_remove_less_error():
    torch.manual_seed(1)
    w = torch.randn(32, 48, 3, 3)
    opts = layer_options(w, init_weight_scale(w, 2), 2, 1, torch.rand(48), 1,
                         GroupBudget(0.01, NpuGroupCost(NPU16())))
    gains = [opts[g][1] for g in (1, 2, 3, 4)]
    assert gains[0] == 0 and all(b >= a for a, b in zip(gains, gains[1:])) and gains[-1] > 0
    assert [len(opts[g][0]) for g in (1, 2, 3, 4)] == [1, 2, 3, 4]


def _options(gains):
    return {f"l{i}": {g: ((1.0,) * g, v) for g, v in enumerate(row, 1)} for i, row in enumerate(gains)}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.lists(st.floats(0, 1), min_size=3, max_size=3),
                          st.integers(100, 10_000), st.lists(st.integers(0, 2_000), min_size=3, max_size=3),
                          st.booleans()), min_size=1, max_size=6),
       st.floats(0, 0.5))
def test_choice_stays_within_budget_and_leaves_no_fitting_upgrade(layers, fraction):
    gains = [[0.0, *sorted(g)] for g, *_ in layers]
    options = _options(gains)
    costs = {}
    for i, (_, base, extra, host) in enumerate(layers):
        extra = sorted(extra)
        costs[f"l{i}"] = {g: None for g in range(1, 5)} if host else {1: base, 2: base + extra[0],
                                                                       3: base + extra[1], 4: base + extra[2]}
    plan = choose(options, costs, fraction)
    assert plan.overhead_cycles <= fraction * plan.base_cycles + 1e-9
    spare = fraction * plan.base_cycles - plan.overhead_cycles
    for c in plan.layers:
        g = len(c.gammas)
        if c.base is None:                               # off the accelerator: the groups are free
            assert c.benefit == max(options[c.name][k][1] for k in range(1, 5))
            continue
        for k in range(g + 1, 5):                        # greedy stops only when nothing better fits
            gain = options[c.name][k][1] - options[c.name][g][1]
            add = (costs[c.name][k] - costs[c.name][1]) - c.overhead
            assert gain <= 0 or add > spare + 1e-9


def test_zero_budget_takes_only_free_groups_and_a_large_one_takes_the_best():
    options = _options([[0, .1, .2, .3], [0, .5, .6, .6]])
    costs = {"l0": {1: 100, 2: 100, 3: 110, 4: 150}, "l1": {1: 100, 2: 120, 3: 130, 4: 140}}
    none = choose(options, costs, 0.0)
    assert [len(c.gammas) for c in none.layers] == [2, 1] and none.overhead_cycles == 0
    tight = choose(options, costs, 0.1)                  # 20 cycles: l1's g=2 (+.5 for 20) beats l0's g=3
    assert [len(c.gammas) for c in tight.layers] == [2, 2] and tight.overhead_cycles == 20
    every = choose(options, costs, 10.0)
    assert [len(c.gammas) for c in every.layers] == [4, 3]     # l1's g=4 adds nothing over g=3


def test_search_on_a_model_is_within_budget_and_calibration_uses_its_groups(tiny_graph_data):
    from calib.calibrate import calibrate
    graph, data = tiny_graph_data
    cfg = CalibConfig(wbits=2, abits=4, iters=4, batch=8, samples=48, tile=4, progress=False)
    npu = dataclasses.replace(NPU16(), waps_pipelined=False, tile=4)
    cost = NpuGroupCost(npu)
    model = QuantModel(graph, cfg)
    grouped = [n for n in graph if n.op in ("conv2d", "linear") and takes_groups(graph, n, cfg)]
    assert grouped
    full = search(model, graph, data, GroupBudget(10.0, cost), cfg.tile, lambda n: takes_groups(graph, n, cfg))
    assert all(len(c.gammas) > 1 for c in full.layers if c.name in {n.name for n in grouped})
    tight_budget = GroupBudget(full.overhead_fraction / 3, cost)
    result = calibrate(graph, data, cfg, group_budget=tight_budget)
    plan = result.group_plan
    assert plan.overhead_cycles <= tight_budget.fraction * plan.base_cycles
    assert sum(len(c.gammas) for c in plan.layers) < sum(len(c.gammas) for c in full.layers)
    assert result.config.layer_gammas == plan.gammas() and result.config.npu_budget == tight_budget.fraction
    # the search only chooses: calibrating with its choice given directly gives the same artifact
    from calib.export import to_artifact
    direct = calibrate(graph, data, dataclasses.replace(cfg, layer_gammas=plan.gammas()))
    a, b = to_artifact(result), to_artifact(direct)
    assert a.quant == b.quant
    for name, rec in a.layers.items():
        other = b.layers[name]
        assert np.array_equal(rec.w_codes, other.w_codes) and rec.group_scales == other.group_scales
        assert (rec.groups is None) == (other.groups is None)
        assert rec.groups is None or np.array_equal(rec.groups, other.groups)
    for c in plan.layers:                                # the reconstructed model has exactly the plan's groups
        layer = result.model.layer(c.name)
        got = (1.0,) if layer.groups is None else tuple(np.round(layer.groups.gammas.tolist(), 12))
        assert got == c.gammas
        if layer.groups is not None:
            assert layer.groups.hard
