"""The int32 overflow proof and the NumPy reference's conv against an independent one."""
from dataclasses import replace
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from relay_passes import reference
from relay_passes.overflow import accumulator_bound, check_overflow
from relay_passes.program import Op, Program
from relay_passes.attrs import ConvAttrs
from relay_passes.quantize import CompileError
from calib.numerics import GroupScale, merge_groups, group_scale


def _conv_op(w, groups=None, z=3, qmax=15, conv_groups=1, pad=1):
    m = w.shape[0]
    attrs = ConvAttrs(stride=[1, 1], padding=[pad, pad], dilation=[1, 1], conv_groups=conv_groups,
                      z_in=z, z_out=0, lo=-2**31, hi=2**31 - 1, in_qmax=qmax, layer="blk.conv (m)")
    params = {"w": w.astype(np.int8), "bias": np.zeros(m, np.int32),
              "mult": np.full(m, 2**30, np.int32), "shift": np.full(m, -1, np.int32)}    # requant: (a·2^30 + 2^29) >> 30 = a
    if groups is not None:
        params["groups"] = groups.astype(np.int8)
    op = Op("conv2d", "conv", ["input"], attrs, params, (), "int32")
    if groups is not None:
        op.group_scales = [GroupScale(0, 0), GroupScale(-1, 4), GroupScale(1, 4)]
    return op


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.booleans(), st.integers(1, 2))
def test_reference_conv_matches_torch(seed, with_groups, conv_groups):
    rng = np.random.default_rng(seed)
    c, m = 4 * conv_groups, 2 * conv_groups
    w = rng.integers(-8, 8, (m, c // conv_groups, 3, 3))
    x = rng.integers(0, 16, (2, c, 5, 5))
    groups = rng.integers(0, 3, c) if with_groups else None
    op = _conv_op(w, groups, conv_groups=conv_groups)
    got = reference._layer(op, x)
    # independent: torch conv of (x − z) with real-zero padding, one conv per group, merged
    xz = torch.tensor(x - 3, dtype=torch.float64)
    accs = []
    for p in range(3 if with_groups else 1):
        mask = torch.ones(c, dtype=torch.float64) if groups is None else torch.tensor(groups == p, dtype=torch.float64)
        wt = torch.tensor(w, dtype=torch.float64) * mask.reshape(conv_groups, -1).repeat_interleave(m // conv_groups, 0)[:, :, None, None]
        accs.append(F.conv2d(xz, wt, padding=1, groups=conv_groups).round().long().numpy())
    scales = [group_scale(g) for g in ((1.0, 0.9375, 1.0625) if with_groups else (1.0,))]
    np.testing.assert_array_equal(got, merge_groups(accs, scales))


def test_bound_is_reached_and_never_exceeded():
    rng = np.random.default_rng(0)
    w = rng.integers(-8, 8, (4, 6, 3, 3))
    op = _conv_op(w, rng.integers(0, 3, 6), z=0, qmax=15, pad=0)
    bound = accumulator_bound(op)
    # worst case input: x̄ = qmax where w > 0 for output 0 (all-positive contributions)
    x = np.where(w[0] > 0, 15, 0)[None]
    acc = reference._group_accumulators(op, x)
    assert max(int(np.abs(a).max()) for a in acc) <= bound
    assert int(acc[0][0, 0].max() + acc[1][0, 0].max() + acc[2][0, 0].max()) == int((np.clip(w[0], 0, None) * 15).sum())


def test_overflowing_layer_is_rejected_by_name():
    w = np.full((2, 512, 3, 3), 127)
    op = _conv_op(w, z=0, qmax=255 * 49)                 # pooled (wide) input: too large for int32
    prog = Program((1, 512, 4, 4), [op], ["conv", "conv"])
    with pytest.raises(CompileError, match=r"blk.conv \(m\) could overflow"):
        check_overflow(prog)
    op.attrs = replace(op.attrs, in_qmax=15)
    assert check_overflow(prog)["conv"] == 127 * 512 * 9 * 15


def test_matmul_bound_counts_its_products_and_rejects_too_many():
    from relay_passes.attrs import GatherAttrs, MatmulAttrs
    probs = Op("gather", "probs", ["input"], GatherAttrs(), {"index": np.zeros(1, np.int32)}, (1, 40000, 1, 1), "uint8")
    v = Op("gather", "v", ["input"], GatherAttrs(), {"index": np.zeros(2, np.int32)}, (1, 2, 200, 200), "uint8")
    attrs = MatmulAttrs(heads=1, contract="positions", za=0, zb=0, mult=1 << 30, shift=0, z_out=0, lo=0, hi=255,
                        layer="attn.pv")
    op = Op("matmul", "pv", ["probs", "v"], attrs, {}, (1, 2, 1, 1), "uint8")
    prog = Program((1, 1, 1, 1), [probs, v, op], ["pv", "pv"])
    with pytest.raises(CompileError, match=r"matmul attn.pv could overflow"):        # 40000·255² > 2^31
        check_overflow(prog)
    v.shape = (1, 2, 100, 100)
    assert check_overflow(prog)["pv"] == 10000 * 255 * 255
    op.attrs = replace(attrs, contract="channels")
    assert check_overflow(prog)["pv"] == 2 * 255 * 255
