"""The per-layer oracle: every integer op on the fake-quant model's input codes agrees with
the fake-quant model's output codes within 1, and a compiler mistake is caught."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from relay_passes import quantize
from waps_tvm.oracle import layer_agreement


def _x(n, shape, seed=0):
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype("float32")


def test_every_layer_within_one_code(tiny_artifact):
    rows = layer_agreement(tiny_artifact, _x(16, (1, 16, 16)))
    assert {r.kind for r in rows} == {"conv2d", "linear", "add"} and len(rows) == 9
    assert all(r.max_diff <= 1 and r.differing < 0.01 for r in rows), rows


@pytest.mark.parametrize("mistake", ["multiplier", "bias", "frac"])
def test_a_compiler_mistake_is_caught(tiny_artifact, monkeypatch, mistake):
    """The same program errors that every bit-exact backend test would share."""
    real_layer, real_mult = quantize.ProgramBuilder.layer, quantize.quantize_multiplier
    if mistake == "multiplier":                      # α′ 25 % too large
        monkeypatch.setattr(quantize, "quantize_multiplier", lambda a: real_mult(a * 1.25))
    elif mistake == "bias":                          # the bias' sign lost
        def layer(self, ls, x, conv):
            v = real_layer(self, ls, x, conv)
            op = self.ops[-1]
            op.params["bias"] = -op.params["bias"]
            return v
        monkeypatch.setattr(quantize.ProgramBuilder, "layer", layer)
    else:                                            # bias and α′ assume L fractional bits, the sums get none
        def layer(self, ls, x, conv):
            v = real_layer(self, ls, x, conv)
            self.ops[-1].attrs = replace(self.ops[-1].attrs, frac=0)
            return v
        monkeypatch.setattr(quantize.ProgramBuilder, "layer", layer)
    rows = layer_agreement(tiny_artifact, _x(16, (1, 16, 16)))
    assert max(r.max_diff for r in rows) >= 2


@pytest.mark.slow
@pytest.mark.parametrize("arch,wbits", [("resnet18", 4), ("mobilenet_v2", 2), ("regnet_x_400mf", 3),
                                        ("mnasnet0_5", 8)])
def test_torchvision_layers_within_one_code(arch, wbits):
    from tests.compile_helpers import calibrated
    from tests.conftest import randomize_bn
    from waps_tvm.architectures import get_architecture
    torch.manual_seed(0)
    art = calibrated(randomize_bn(get_architecture(arch, 10)), (3, 32, 32), wbits=wbits)
    rows = layer_agreement(art, _x(4, (3, 32, 32), seed=1))
    assert len(rows) > 10
    bad = [r for r in rows if r.max_diff > 1]
    assert not bad, bad
    assert np.mean([r.differing for r in rows]) < 0.01
