import pytest
import torch
from torch import nn

from calib.capture import capture, export_module
from calib.errors import UnsupportedOpError
from calib.fold_bn import fold_batch_norm
from calib.fuse import fuse_activations
from calib.qmodel import QuantModel
from calib.config import CalibConfig


def graph_of(model, shape):
    return fuse_activations(fold_batch_norm(capture(export_module(model, shape))))


def test_bn_folding_is_exact(tiny_resnet):
    g = graph_of(tiny_resnet, (1, 16, 16))
    assert not any(n.op == "batch_norm" for n in g)
    fp = QuantModel(g, CalibConfig(method="rtn", abits=32))
    fp.set_quant(False)
    x = torch.randn(8, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fp(x), tiny_resnet(x), rtol=1e-5, atol=1e-5)


def test_activations_fused_into_producers(tiny_resnet):
    g = graph_of(tiny_resnet, (1, 16, 16))
    acts = {n.source: n.attrs.get("act") for n in g if n.op in ("conv2d", "add")}
    assert acts["stem.0"] == "relu"
    assert acts["b1.0"] == "relu6"
    assert acts["a1.3"] is None  # conv before the residual add: no activation
    adds = [n for n in g if n.op == "add"]
    assert [a.attrs["act"] for a in adds] == ["relu", None]
    assert not any(n.op in ("relu", "relu6") for n in g)


class WithLogSigmoid(nn.Module):
    """log-sigmoid and nearest upsampling have no integer lowering (sigmoid now has)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.gate = nn.LogSigmoid()
        self.up = nn.Upsample(scale_factor=2)

    def forward(self, x):
        return self.up(self.gate(self.conv(x)))


def test_unsupported_ops_are_listed_by_module_name():
    with pytest.raises(UnsupportedOpError) as e:
        graph_of(WithLogSigmoid(), (1, 8, 8))
    msg = str(e.value)
    assert "gate" in msg and "log_sigmoid" in msg and "up" in msg
    assert "\n" not in msg


class FrozenAndScaled(nn.Module):
    """A frozen batch norm (torchvision's detection backbones with pretrained weights compute
    w·rsqrt(var + eps) and b − mean·scale from buffers, then x·scale + shift) and a learned
    per-channel layer scale after a pool (no conv to fold into)."""

    def __init__(self):
        super().__init__()
        from torchvision.ops.misc import FrozenBatchNorm2d
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fbn = FrozenBatchNorm2d(8)
        for b in (self.fbn.weight, self.fbn.running_var):
            b.uniform_(0.5, 2.0)
        for b in (self.fbn.bias, self.fbn.running_mean):
            b.uniform_(-1.0, 1.0)
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, 8).reshape(8, 1, 1))

    def forward(self, x):
        y = torch.relu(self.fbn(self.conv(x)))
        return nn.functional.max_pool2d(y, 2) * self.gamma - 0.25


def test_frozen_batch_norm_and_layer_scale_fold_exactly():
    torch.manual_seed(0)
    model = FrozenAndScaled().eval()
    g = graph_of(model, (3, 8, 8))
    assert [n.op for n in g] == ["input", "conv2d", "max_pool2d", "conv2d"]   # scale − 0.25: one 1×1 dw conv
    fp = QuantModel(g, CalibConfig(method="rtn", abits=32))
    fp.set_quant(False)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fp(x), model(x), rtol=1e-5, atol=1e-5)


class AlongWidth(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.c = nn.Parameter(torch.ones(8))          # broadcasts along W, not over channels

    def forward(self, x):
        return self.conv(x) * self.c


class OverWidth(AlongWidth):
    def __init__(self):
        super().__init__()
        self.c = nn.Parameter(torch.linspace(0.5, 2.0, 8))

    def forward(self, x):
        return self.conv(x) / self.c


def test_a_constant_that_is_not_per_channel_becomes_a_constant_map():
    """x·c with c varying along W: a ``constant`` node holding c on x's layout and a mul of maps;
    the captured model computes what the float model does."""
    model = AlongWidth().eval()
    with torch.no_grad():
        model.c.copy_(torch.linspace(0.5, 2.0, 8))
    g = graph_of(model, (3, 8, 8))
    const = [n for n in g if n.op == "constant"]
    assert len(const) == 1 and tuple(const[0].params["value"].shape) == (8, 8, 8)
    assert torch.equal(const[0].params["value"][0, 0], model.c.detach())
    assert [n.op for n in g if const[0].name in n.inputs] == ["mul"]


def test_a_division_by_a_constant_that_is_not_per_channel_is_refused_in_one_line():
    with pytest.raises(UnsupportedOpError, match="division by a constant that is not one value per channel"):
        graph_of(OverWidth().eval(), (3, 8, 8))
