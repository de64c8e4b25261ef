"""Fast-form kernels: the exact folds (WAPS groups into one accumulator, gathers into the
conv that reads them) against the NumPy reference, on each side of their conditions."""
import copy
from dataclasses import replace

import numpy as np
import pytest

from calib.numerics import GroupScale
from relay_passes import fast_kernels, reference
from relay_passes.legalize import legalize_waps
from relay_passes.permute import permute_channels
from tests.compile_helpers import scramble_groups
from tests.relay_passes.helpers import assert_same
from waps_tvm.frontend import to_program


@pytest.fixture(scope="module")
def permuted(tiny_artifact):
    """TinyResNet (W4A4) with 4-channel scattered groups: fast convs, and a gather before one."""
    art = scramble_groups(copy.deepcopy(tiny_artifact), seed=7, tile=4)
    prog = permute_channels(to_program(art, 2))[0]
    for o in _depthwise(prog):                  # WAPS on the depthwise conv too: a group per channel
        o.params["groups"] = (np.arange(o.params["w"].shape[0]) % 3).astype(np.int8)
        o.group_scales = [GroupScale(0, 4), GroupScale(-1, 4), GroupScale(1, 4)]
    return prog


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(11).normal(size=(2, 1, 16, 16)).astype("float32")


def _waps_convs(prog):
    return [o for o in prog.ops if o.kind == "conv2d" and "groups" in o.params and o.attrs.conv_groups == 1]


def _clip_weights(prog):                     # |w| ≤ 7: w·17 fits int8, the fold goes on the weights
    for o in _waps_convs(prog):
        o.params["w"] = np.clip(o.params["w"], -7, 7).astype(np.int8)


def _shift_beyond_frac(prog):                # n_p > L: the shift rounds, no fold is exact
    for o in _waps_convs(prog) + _depthwise(prog):
        o.group_scales = [GroupScale(s.sigma, o.attrs.frac + 1) if s.sigma else s for s in o.group_scales]


def _depthwise(prog):
    return [o for o in prog.ops if o.kind == "conv2d"
            and o.attrs.conv_groups == o.params["w"].shape[0] > 1 and o.params["w"].shape[1] == 1]


@pytest.mark.parametrize("side, change", [("x", None), ("w", _clip_weights), (None, _shift_beyond_frac)])
def test_group_fold_is_exact_on_each_side(permuted, x, side, change):
    prog = permuted.copy()
    if change:
        change(prog)
    prog, _ = legalize_waps(prog, "fast", fast_kernels.host_dot())
    convs = _waps_convs(prog)
    assert convs and all(o.schedule.layout == "NHWC" for o in convs)       # all took the fast kernel
    folds = [fast_kernels.fold_groups(o) for o in convs]
    sides = {f[0] if f else None for f in folds}
    assert sides == {side} if side != "x" else "x" in sides and None not in sides   # as-calibrated W4: mixed
    # the gathers in front of fast convs are gone: read through the weights (fold) or the packing
    assert not any(o.kind == "gather" and o.schedule.layout == "NHWC"
                   and any(c.inputs == [o.name] for c in convs) for o in prog.ops)
    # depthwise: one multiply per channel (K_k) exactly when the per-channel fold is
    dws = _depthwise(prog)
    assert dws and all((fast_kernels.depthwise_factors(o) is None) == (side is None) for o in dws)
    folded = [(o, f) for o, f in zip(convs, folds) if "in_index" in o.params]
    assert folded and all((f is not None and f[3] is not None) == (side is not None) for _, f in folded)
    assert_same(prog, x)


def test_fold_rejects_sums_that_could_leave_int32(permuted):
    op = copy.deepcopy(_waps_convs(permuted)[0])
    op.params["w"] = np.full_like(op.params["w"], -8)
    op.attrs = replace(op.attrs, in_qmax=15)
    assert fast_kernels.fold_groups(op) is not None
    op.params["w"] = np.full((1, 2**21, 1, 1), -8, np.int8)            # 2^21 · 8 · 17 · 15 > 2^31
    op.params["groups"] = np.zeros(2**21, np.int8)
    op.group_scales = [GroupScale(1, 4)]
    assert fast_kernels.fold_groups(op) is None


def test_tvm_vnni_name_builds_exactly_after_alias(permuted, x, monkeypatch):
    """meta-schedule's VNNI rule and its records use TVM's name 'dot_16x4_vnni', whose own body
    does not build with LLVM 22; after alias_tvm_vnni it is ours: it builds, bit-exact."""
    if fast_kernels.host_dot() != "vnni":
        pytest.skip("this CPU has no AVX-512 VNNI")
    fast_kernels.alias_tvm_vnni()
    monkeypatch.setattr(fast_kernels, "VNNI", fast_kernels.TVM_VNNI)
    prog, _ = legalize_waps(permuted.copy(), "fast", "vnni")
    assert_same(prog, x)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_torchvision_224_fast_form_bit_exact(arch):
    """The shapes the CPU numbers are measured on: 224×224, 1000 classes, the fast form with
    this CPU's inner product (VNNI where it has it), bit for bit against the reference."""
    import torch
    import tvm

    from tests.compile_helpers import calibrated
    from tests.conftest import randomize_bn
    from waps_tvm.architectures import get_architecture
    from waps_tvm.compiler import build, lower_artifact
    torch.manual_seed(0)
    art = calibrated(randomize_bn(get_architecture(arch, 1000)), (3, 224, 224), iters=1, samples=2)
    lowered = lower_artifact(art, 1, "fast")
    assert sum(o.schedule.form == "fast" for o in lowered.program.ops) > 10
    x = np.random.default_rng(0).normal(size=(1, 3, 224, 224)).astype("float32")
    out = tvm.runtime.vm.VirtualMachine(build(lowered), tvm.cpu())["main"](tvm.runtime.tensor(x))
    ref = reference.run(lowered.program, x)
    np.testing.assert_array_equal(out[1].numpy(), ref[1])
    np.testing.assert_array_equal(out[0].numpy(), ref[0])
