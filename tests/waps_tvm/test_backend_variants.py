"""Group counts, group scales and weight widths other than the defaults, compiled for every
backend (llvm fast and split, c, npu16) and run bit-exact against the reference; the
reference held to the fake-quant model layer by layer (codes within 1)."""
import numpy as np
import pytest
import torch

from calib.config import default_gammas
from relay_passes import reference
from tests.compile_helpers import calibrated, scramble_groups
from tests.conftest import TinyResNet, randomize_bn
from waps_tvm.compiler import build, lower_artifact
from waps_tvm.oracle import layer_agreement

VARIANTS = {
    "groups2": dict(gammas=default_gammas(2)),
    "groups4": dict(gammas=default_gammas(4)),
    "gammas": dict(gammas=(1.0, 1 - 2**-2, 1 + 2**-3)),        # n = 2, 3: other shifts than the default 4
    "w3": dict(wbits=3),
    "w8a8": dict(wbits=8, abits=8),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request):
    torch.manual_seed(0)
    art = calibrated(randomize_bn(TinyResNet()), (1, 16, 16), **VARIANTS[request.param])
    return request.param, scramble_groups(art, seed=3)


def _run(lowered, target, x):
    import tvm
    vm = tvm.runtime.vm.VirtualMachine(build(lowered, target), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x))
    return out[0].numpy(), out[1].numpy()


@pytest.mark.slow
def test_variant_bit_exact_on_every_backend(variant):
    name, art = variant
    x = np.random.default_rng(7).normal(size=(2, 1, 16, 16)).astype("float32")
    layers = [r for r in art.layers.values() if r.groups is not None]
    assert layers and all(len(r.group_scales) == len(VARIANTS[name].get("gammas", default_gammas(3)))
                          for r in layers)
    for form, target in (("fast", "llvm"), ("split", "llvm"), ("split", "c"), ("split", "npu16")):
        lowered = lower_artifact(art, 2, form)
        deq, codes = _run(lowered, target, x)
        ref = reference.run(lowered.program, x)
        np.testing.assert_array_equal(codes, ref[1], err_msg=f"{name} {form} {target}")
        np.testing.assert_array_equal(deq, ref[0], err_msg=f"{name} {form} {target}")
    rows = layer_agreement(art, x)
    assert all(r.max_diff <= 1 for r in rows), rows
