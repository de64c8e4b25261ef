import numpy as np
import torch
from hypothesis import given, settings, strategies as st

import pytest

from calib.config import CalibConfig
from calib.errors import ConfigError
from calib.product_groups import (ProductGroups, assign_tile_groups, group_probabilities, rectified_sigmoid_ratio,
                                  rectified_softmax)
from calib.rounding import BetaSchedule

GAMMAS = [1.0, 1 - 2**-4, 1 + 2**-4]


def test_gamma_y_follows_eq14():
    pg = ProductGroups(4, GAMMAS, "softmax")
    with torch.no_grad():
        pg.r.copy_(torch.tensor([[9.0, 0, 0], [0, 9.0, 0], [0, 0, 9.0], [0, 0, 0]]))
    s = rectified_softmax(pg.r)
    assert torch.allclose(s[:3], torch.eye(3))
    gy = pg.gamma_y()
    assert torch.allclose(gy[:3], torch.tensor(GAMMAS))
    assert abs(float(gy[3].detach()) - np.mean(GAMMAS)) < 1e-6


@pytest.mark.parametrize("prob", ["softmax", "sigmoid"])
def test_rectified_softmax_converges_to_one_hot_under_the_regulariser(prob):
    """Minimising a loss that prefers a group per channel plus the annealed regulariser
    drives every channel to an exactly one-hot s, and the channels settle one by one."""
    torch.manual_seed(0)
    c = 48
    # 16 channels per group, shuffled: a tile-granular assignment can match it exactly
    target = torch.tensor(np.random.default_rng(0).permutation(np.repeat(GAMMAS, 16)), dtype=torch.float32)
    pg = ProductGroups(c, GAMMAS, prob)
    opt = torch.optim.Adam([pg.r], lr=0.05)
    sched = BetaSchedule(600, 0.2, 20, 2)
    for t in range(600):
        loss = ((pg.gamma_y() - target) ** 2).sum() * 100
        if sched.active(t):
            loss = loss + 0.01 * pg.regulariser(sched(t))
        opt.zero_grad()
        loss.backward()
        opt.step()
        pg.track(t)
    s = pg.probs().detach()
    assert torch.all((s == 0) | (s == 1))
    assert torch.all(pg.settled_at >= 0)
    assert len(set(pg.settled_at.tolist())) > 1
    pg.harden(tile=16)
    assert torch.allclose(pg.gamma_y(), target)


@settings(max_examples=200, deadline=None)
@given(c=st.integers(1, 200), g=st.integers(1, 4), tile=st.sampled_from([4, 8, 16]), seed=st.integers(0, 10**6))
def test_tile_assignment_sizes_are_whole_tiles(c, g, tile, seed):
    rng = np.random.default_rng(seed)
    scores = rng.dirichlet(np.ones(g), size=c)
    settled = np.where(rng.random(c) < 0.5, rng.integers(0, 100, c), -1)
    out = assign_tile_groups(scores, settled, tile)
    assert out.shape == (c,) and out.min() >= 0 and out.max() < g
    sizes = np.bincount(out, minlength=g)
    partial = [s for s in sizes if s % tile]
    # every group is whole tiles except one, which holds the partial tile
    assert len(partial) <= 1
    assert sum(-(-s // tile) for s in sizes) == -(-c // tile)  # no extra tiles used


def test_tile_assignment_serves_early_settlers_first():
    # 20 channels prefer group 0, 12 group 1: one tile each, so 4 must move
    scores = np.vstack([np.tile([0.6, 0.4], (20, 1)), np.tile([0.1, 0.9], (12, 1))])
    settled = np.full(32, -1)
    settled[16:20] = 0            # these settled first and must keep group 0
    out = assign_tile_groups(scores, settled, tile=16)
    assert np.bincount(out).tolist() == [16, 16]
    assert np.all(out[16:20] == 0)
    assert np.all(out[20:] == 1)
    assert (out[:16] == 1).sum() == 4


def test_sigmoid_ratio_is_eq15_as_printed():
    r = torch.tensor([[2.0, -1.0, 0.5], [9.0, -9.0, -9.0], [0.0, 0.0, 0.0]])
    sig = 1 / (1 + torch.exp(-r))
    expect = (sig / sig.sum(1, keepdim=True) * 1.2 - 0.1).clamp(0, 1)
    assert torch.allclose(rectified_sigmoid_ratio(r), expect)
    assert torch.equal(rectified_sigmoid_ratio(r)[1], torch.tensor([1.0, 0.0, 0.0]))  # one-hot is reachable
    assert torch.allclose(group_probabilities(r, "sigmoid"), expect)


def test_sigmoid_ratio_depends_on_logit_level_softmax_does_not():
    """The two forms differ: the softmax is shift-invariant per row, eq. 15's ratio is not
    (R = [9, 0, 0] is one-hot under softmax but still undecided under the sigmoid ratio)."""
    r = torch.tensor([[9.0, 0.0, 0.0]])
    assert torch.allclose(rectified_softmax(r), rectified_softmax(r + 5))
    assert not torch.allclose(rectified_sigmoid_ratio(r), rectified_sigmoid_ratio(r + 5))
    assert torch.equal(rectified_softmax(r), torch.tensor([[1.0, 0.0, 0.0]]))
    assert float(rectified_sigmoid_ratio(r)[0, 0]) < 0.6


def test_product_groups_use_the_chosen_form_and_reject_others():
    r = torch.tensor([[1.0, -2.0, 0.3]])
    for prob, fn in (("sigmoid", rectified_sigmoid_ratio), ("softmax", rectified_softmax)):
        pg = ProductGroups(1, GAMMAS, prob)
        with torch.no_grad():
            pg.r.copy_(r)
        assert torch.allclose(pg.probs(), fn(r))
    with pytest.raises(ValueError, match="group probability"):
        ProductGroups(1, GAMMAS, "tanh")


def test_config_group_prob_is_validated_recorded_and_reaches_the_layers():
    from calib.capture import capture, export_module
    from calib.qmodel import QuantModel
    with pytest.raises(ConfigError, match="--group-prob"):
        CalibConfig(group_prob="tanh").validate()
    assert CalibConfig(group_prob="softmax").to_json()["group_prob"] == "softmax"
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 32, 3), torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3))
    g = capture(export_module(net.eval(), (1, 8, 8)))
    for prob in ("softmax", "sigmoid"):
        model = QuantModel(g, CalibConfig(method="waps", group_prob=prob))
        grouped = [l for l in model.quant_layers().values() if l.groups is not None]
        assert grouped and all(l.groups.prob == prob for l in grouped)
