import pytest
import torch
import torch.nn.functional as F

from calib.graph import Node
from calib.qmodel import QuantLayer

GAMMAS = [1.0, 1 - 2**-4, 1 + 2**-4]


def make_layer(op, groups=1, unit_size=1):
    torch.manual_seed(0)
    if op == "conv2d":
        w = torch.randn(8, 32 // groups, 3, 3)
        attrs = {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": groups, "act": None}
    else:
        w = torch.randn(8, 32 * unit_size)
        attrs = {"act": None}
    node = Node("n", op, ["x"], attrs, {"weight": w, "bias": torch.randn(8)})
    layer = QuantLayer(node, 4, 32, unit_size, GAMMAS)
    with torch.no_grad():
        layer.groups.r.normal_(0, 2)
        layer.gamma_z.uniform_(0.8, 1.2)
        layer.phi_z.normal_(0, 0.1)
    return layer


@pytest.mark.parametrize("op, groups, unit_size", [("conv2d", 1, 1), ("conv2d", 4, 1), ("linear", 1, 1), ("linear", 1, 9)])
def test_folded_scales_equal_the_definition(op, groups, unit_size):
    """γ^y and γ^z folded into the weights equal eq. 9 computed on activations."""
    layer = make_layer(op, groups, unit_size)
    x = torch.randn(2, 32, 5, 5) if op == "conv2d" else torch.randn(2, 32 * unit_size)
    gy = layer.groups.gamma_y().repeat_interleave(unit_size)
    xs = x * (gy.reshape(1, -1, 1, 1) if op == "conv2d" else gy.reshape(1, -1))
    w = layer.qweight()
    if op == "conv2d":
        y = F.conv2d(xs, w, layer.bias, 1, 1, 1, groups)
        want = layer.gamma_z.reshape(1, -1, 1, 1) * y + layer.phi_z.reshape(1, -1, 1, 1)
    else:
        want = layer.gamma_z * F.linear(xs, w, layer.bias) + layer.phi_z
    torch.testing.assert_close(layer.preact(x), want, rtol=1e-5, atol=1e-5)
