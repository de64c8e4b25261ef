"""Code widths between 4 and 8 (W6A6, W5A7): calibrated, stored and compiled bit-exact on
every backend (codes in int8/uint8 lanes, as 8-bit ones), near the fake-quant model."""
import numpy as np
import pytest
import torch
from torch import nn

from calib import artifact
from calib.config import ACT_BITS, WEIGHT_BITS, CalibConfig
from tests.compile_helpers import assert_bit_exact_on_backends, calibrated
from waps_tvm.oracle import layer_agreement


class SmallResNet(nn.Module):
    """Conv-BN-ReLU stem, one residual block, a depthwise conv, pooling and a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16), nn.ReLU6())
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.body(x))
        return self.fc(self.dw(x).mean((2, 3)))


def test_every_width_from_2_to_8_is_accepted():
    assert set(range(2, 9)) <= set(WEIGHT_BITS) and set(range(2, 9)) <= set(ACT_BITS)
    CalibConfig(wbits=6, abits=6, attn_bits=5, first_last_bits=7, residual_bits=6).validate()


@pytest.mark.parametrize("wbits,abits", [(6, 6), (5, 7)])
def test_bit_exact_on_every_backend_and_near_fake_quant(wbits, abits, tmp_path):
    torch.manual_seed(0)
    art = calibrated(SmallResNet(), (3, 16, 16), wbits=wbits, abits=abits)
    art = artifact.load(artifact.save(art, tmp_path / "m.waps"))
    inner = [r for n, r in art.layers.items() if r.wbits == wbits]
    assert inner and max(np.abs(r.w_codes).max() for r in inner) > 8            # beyond 4-bit codes
    assert any(q.bits == abits for q in art.quant.values())
    x = np.random.default_rng(0).normal(size=(2, 3, 16, 16)).astype("float32")
    assert_bit_exact_on_backends(art, x)
    rows = layer_agreement(art, x)
    assert rows and max(r.max_diff for r in rows) <= 1
