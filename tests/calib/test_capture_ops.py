"""Capture of each op of the issue-13 vocabulary from small nn.Modules, and the float
executor (quant off) equal to the torch model."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from calib.capture import capture, export_module
from calib.config import CalibConfig
from calib.errors import UnsupportedOpError
from calib.fold_bn import fold_batch_norm
from calib.fuse import fuse_activations
from calib.qmodel import QuantModel


def graph_of(model, shape=(8, 6, 6)):
    return fuse_activations(fold_batch_norm(capture(export_module(model.eval(), shape))))


def float_matches(model, graph, shape=(8, 6, 6)):
    fp = QuantModel(graph, CalibConfig(method="rtn", abits=32))
    fp.set_quant(False)
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fp(x), model.eval()(x), rtol=1e-5, atol=1e-5)


class Fn(nn.Module):
    """conv → f(·) → conv, so f reads a quantized tensor and feeds a layer."""

    def __init__(self, f, c_mid=8):
        super().__init__()
        self.a, self.b, self.f = nn.Conv2d(8, 8, 1), nn.Conv2d(c_mid, 4, 1), f

    def forward(self, x):
        return self.b(self.f(self.a(x)))


def ops(graph):
    return [n for n in graph if n.op not in ("input", "conv2d")]


@pytest.mark.parametrize("f, fn, attrs", [
    (F.hardswish, "hardswish", {}), (F.hardsigmoid, "hardsigmoid", {}), (torch.sigmoid, "sigmoid", {}),
    (F.silu, "silu", {}), (lambda x: F.gelu(x, approximate="tanh"), "gelu", {"approximate": "tanh"}),
    (F.gelu, "gelu", {"approximate": "none"}), (torch.tanh, "tanh", {}),
    (lambda x: F.leaky_relu(x, 0.2), "leaky_relu", {"negative_slope": 0.2}), (F.mish, "mish", {}),
    (lambda x: F.hardtanh(x, -1.0, 2.0), "hardtanh", {"min_val": -1.0, "max_val": 2.0}),
])
def test_elementwise(f, fn, attrs):
    m = Fn(f)
    g = graph_of(m)
    (n,) = ops(g)
    assert n.op == "elementwise" and n.attrs == {"fn": fn, **attrs}
    float_matches(m, g)


class Pieces(nn.Module):
    """chunk, split, narrow, slice and a channel shuffle (view/transpose/view)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(8, 8, 1), nn.Conv2d(12, 4, 1)

    def forward(self, x):
        y = self.a(x)
        p, q = y.chunk(2, dim=1)
        r, s = torch.split(y, [3, 5], 1)
        n = y.narrow(1, 2, 3)[:, 1:]
        shuffled = y.view(1, 2, 4, 6, 6).transpose(1, 2).contiguous().view(1, 8, 6, 6)
        return self.b(torch.cat([q, s, n, shuffled[:, :1]], 1))


def test_gathers_alias_the_right_pieces():
    m = Pieces()
    shape = (8, 6, 6)
    g = graph_of(m, shape)
    gathers = [n.attrs["index"] for n in g if n.op == "gather"]
    assert gathers == [[4, 5, 6, 7], [3, 4, 5, 6, 7], [3, 4], [0]]
    (cat,) = [n for n in g if n.op == "cat"]
    assert cat.attrs == {"axis": 1} and len(cat.inputs) == 4 and cat.shape == (12, 6, 6)
    fp = QuantModel(g, CalibConfig(method="rtn", abits=32))
    fp.set_quant(False)
    x = torch.randn(1, *shape)
    with torch.no_grad():
        torch.testing.assert_close(fp(x), m(x), rtol=1e-5, atol=1e-5)


def test_channel_shuffle_is_one_gather():
    m = Fn(lambda y: y.view(1, 2, 4, 6, 6).transpose(1, 2).reshape(1, 8, 6, 6))
    g = graph_of(m)
    (n,) = ops(g)
    assert n.op == "gather" and n.attrs["index"] == [0, 4, 1, 5, 2, 6, 3, 7]


def test_spatial_view_is_refused():
    m = Fn(lambda y: y.permute(0, 2, 3, 1).reshape(1, 8, 6, 6))
    with pytest.raises(UnsupportedOpError, match="not a channel gather"):
        graph_of(m)


class SE(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.fc1, self.fc2, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = F.relu(self.a(x))
        s = F.hardsigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        return self.b(s * y)


def test_se_mul_puts_the_broadcast_operand_second():
    m = SE()
    g = graph_of(m)
    (mul,) = [n for n in g if n.op == "mul"]
    assert [g[i].op for i in mul.inputs] == ["conv2d", "elementwise"] and mul.attrs == {}
    assert g[mul.inputs[1]].shape == (8, 1, 1)
    float_matches(m, g)


@pytest.mark.parametrize("pool, op, attrs", [
    (lambda x: F.max_pool2d(x, 3, 2, 1, dilation=2, ceil_mode=True), "max_pool2d",
     {"kernel": [3, 3], "stride": [2, 2], "padding": [1, 1], "dilation": [2, 2], "ceil_mode": True}),
    (lambda x: F.avg_pool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=False), "avg_pool2d",
     {"kernel": [3, 3], "stride": [2, 2], "padding": [1, 1], "ceil_mode": True, "count_include_pad": False,
      "divisor_override": None}),
    (lambda x: F.avg_pool2d(x, 2, divisor_override=3), "avg_pool2d",
     {"kernel": [2, 2], "stride": [2, 2], "padding": [0, 0], "ceil_mode": False, "count_include_pad": True,
      "divisor_override": 3}),
    (lambda x: F.adaptive_avg_pool2d(x, (4, 3)), "adaptive_avg_pool2d", {"output_size": [4, 3]}),
    (lambda x: F.pad(x, [1, 2, 3, 0], value=0.5), "pad", {"pads": [3, 1, 0, 2], "value": 0.5}),
])
def test_pooling_and_pad(pool, op, attrs):
    m = Fn(pool)
    g = graph_of(m)
    (n,) = ops(g)
    assert n.op == op and n.attrs == attrs
    float_matches(m, g)


@pytest.mark.parametrize("f, op, attrs", [
    (lambda x: F.interpolate(x, scale_factor=2, mode="nearest"), "upsample_nearest2d",
     {"size": [12, 12], "scales": [2.0, 2.0]}),
    (lambda x: nn.Upsample(size=(4, 9))(x), "upsample_nearest2d", {"size": [4, 9], "scales": None}),
    (lambda x: F.interpolate(x, scale_factor=1.7, mode="bilinear"), "upsample_bilinear2d",
     {"size": [10, 10], "scales": [1.7, 1.7], "align_corners": False}),
    (lambda x: F.interpolate(x, scale_factor=1.7, mode="bilinear", recompute_scale_factor=True),
     "upsample_bilinear2d", {"size": [10, 10], "scales": None, "align_corners": False}),
    (lambda x: F.interpolate(x, size=(7, 9), mode="bilinear", align_corners=True), "upsample_bilinear2d",
     {"size": [7, 9], "scales": None, "align_corners": True}),
])
def test_interpolate(f, op, attrs):
    """torch's scale factor is kept where torch uses it for the source indices (it differs from size ratios)."""
    m = Fn(f)
    g = graph_of(m)
    (n,) = ops(g)
    assert n.op == op and n.attrs == attrs and n.shape == (8, *attrs["size"])
    float_matches(m, g)


def test_bicubic_interpolate_is_refused():
    with pytest.raises(UnsupportedOpError, match="upsample_bicubic2d"):
        graph_of(Fn(lambda x: F.interpolate(x, scale_factor=2, mode="bicubic")))


def test_adaptive_pool_to_one_stays_global():
    g = graph_of(Fn(lambda y: F.adaptive_avg_pool2d(y, 1)))
    assert [n.op for n in ops(g)] == ["global_avg_pool"]


class DensePreact(nn.Module):
    """DenseNet's shape: cat → BN → ReLU → conv, a BN with no conv before it."""

    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b = nn.Conv2d(8, 4, 1), nn.BatchNorm2d(12), nn.Conv2d(12, 4, 1)
        self.bn.running_mean.normal_()
        self.bn.running_var.uniform_(0.5, 2)
        self.bn.weight.data.normal_()

    def forward(self, x):
        return self.b(F.relu(self.bn(torch.cat([x, self.a(x)], 1))))


def test_standalone_batch_norm_becomes_depthwise_conv():
    m = DensePreact()
    g = graph_of(m)
    bn = [n for n in g if n.op == "conv2d" and n.is_depthwise]
    assert len(bn) == 1 and bn[0].attrs["act"] == "relu" and bn[0].params["weight"].shape == (12, 1, 1, 1)
    float_matches(m, g)


def test_identity_ops_and_single_input_cat_vanish():
    m = Fn(lambda y: torch.cat([F.dropout(y.clone(), 0.5, training=False)], 1))
    assert ops(graph_of(m)) == []


def test_readers_of_a_refused_op_are_refused_with_it():
    """``cumsum`` is not captured; the conv reading it and the layers after it must not crash
    looking for it: one UnsupportedOpError naming each refused op once. (This test used
    ``x - 0.5`` and ``* 2.0`` until constant per-channel affines became folded batch norms.)"""
    from torch import nn

    from calib.capture import capture, export_module

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.d = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.d(torch.cumsum(self.c(torch.cumsum(x, 3)), 2))

    with pytest.raises(UnsupportedOpError) as e:
        capture(export_module(M().eval(), (3, 8, 8)))
    msg = str(e.value)
    assert msg.split(": ", 1)[1].split("; ") == ["cumsum: cumsum", "cumsum_1: cumsum"]   # each call once
