"""Channels-last blocks (ConvNeXt's: permute to NHWC, layer norm and linears over the channels,
GELU, permute back, a layer scale) are captured as 1×1 convs and channel layer norms of the
NCHW map, calibrated, stored with the norms' γ and β, and compiled bit-exact on every backend."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from calib import artifact
from calib.capture import capture, export_module
from calib.config import CalibConfig
from calib.fold_bn import fold_batch_norm
from calib.fuse import fuse_activations
from calib.qmodel import QuantModel
from calib.errors import UnsupportedOpError
from tests.compile_helpers import assert_bit_exact_on_backends, calibrated
from waps_tvm.oracle import layer_agreement


class ChannelsLastBlock(nn.Module):
    """ConvNeXt's block in small: depthwise 7×7, then over NHWC a layer norm, an expanding
    linear, GELU and a projecting linear, back to NCHW, a layer scale and the residual add."""

    def __init__(self, c: int):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.up, self.down = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.scale = nn.Parameter(torch.rand(c, 1, 1) + 0.5)

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.down(F.gelu(self.up(self.norm(y)))).permute(0, 3, 1, 2)
        return x + self.scale * y


class TinyConvNeXt(nn.Module):
    """A stem with a channels-first layer norm (LayerNorm2d: permute, norm, permute), two blocks
    around a downsampling, and a head that norms the pooled [N, C, 1, 1] then flattens."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, 4)
        self.stem_norm = nn.LayerNorm(16)
        self.block1 = ChannelsLastBlock(16)
        self.down_norm = nn.LayerNorm(16)
        self.down = nn.Conv2d(16, 24, 2, 2)
        self.block2 = ChannelsLastBlock(24)
        self.head_norm = nn.LayerNorm(24)
        self.fc = nn.Linear(24, 10)
        with torch.no_grad():                 # norms that are not the identity
            for m in (self.stem_norm, self.down_norm, self.head_norm, self.block1.norm, self.block2.norm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)

    @staticmethod
    def _norm2d(norm, x):
        return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward(self, x):
        x = self._norm2d(self.stem_norm, self.stem(x))
        x = self.block1(x)
        x = self.block2(self.down(self._norm2d(self.down_norm, x)))
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(torch.flatten(self._norm2d(self.head_norm, x), 1))


def test_channels_last_ops_are_captured_on_the_nchw_map():
    torch.manual_seed(0)
    g = capture(export_module(TinyConvNeXt().eval(), (3, 32, 32)))
    ops = [n.op for n in g]
    assert ops.count("layer_norm") == 5 and "gather" not in ops
    up = next(n for n in g if n.source.endswith("block1.up"))
    assert up.op == "conv2d" and up.shape == (64, 8, 8) and tuple(up.params["weight"].shape) == (64, 16, 1, 1)
    head = next(n for n in g if n.source.endswith("head_norm"))
    assert head.shape == (24, 1, 1)
    assert g[g.output].op == "linear"


def test_capture_equals_the_model_in_float():
    torch.manual_seed(0)
    model = TinyConvNeXt().eval()
    g = fuse_activations(fold_batch_norm(capture(export_module(model, (3, 32, 32)))))
    qm = QuantModel(g, CalibConfig(progress=False))
    qm.set_quant(False)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(qm(x), model(x), rtol=1e-4, atol=1e-5)


def test_a_norm_over_a_non_channel_axis_is_refused_in_one_message():
    class WidthNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm = nn.Conv2d(3, 4, 3, padding=1), nn.LayerNorm(8)

        def forward(self, x):
            return self.norm(self.conv(x))          # over W of an NCHW map

    with pytest.raises(UnsupportedOpError, match="layer_norm over the last axis of a \\(4, 8, 8\\) tensor"):
        capture(export_module(WidthNorm().eval(), (3, 8, 8)))


@pytest.fixture(scope="module")
def convnext_art():
    torch.manual_seed(0)
    return calibrated(TinyConvNeXt().eval(), (3, 32, 32), wbits=4, abits=8, iters=2, samples=8)


def test_norm_parameters_travel_in_the_artifact(convnext_art, tmp_path):
    artifact.save(convnext_art, tmp_path / "c.waps")
    loaded = artifact.load(tmp_path / "c.waps")
    for n in convnext_art.graph:
        if n.op == "layer_norm":
            for p in ("weight", "bias"):
                torch.testing.assert_close(loaded.graph[n.name].params[p], n.params[p], rtol=0, atol=0)


def test_bit_exact_on_every_backend_and_near_fake_quant(convnext_art):
    x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype("float32")
    assert_bit_exact_on_backends(convnext_art, x)
    rows = layer_agreement(convnext_art, x)
    assert rows and max(r.max_diff for r in rows) <= 1


# the size: at 224×224 with one calibration sample, 71 s to calibrate and 102 s on the
# three backends here (2 cores); two samples took 363–1,216 s to calibrate
CONVNEXT_SIZE = 224


@pytest.mark.slow
def test_torchvision_convnext_tiny_bit_exact_on_every_backend():
    """torchvision's ConvNeXt-T (random weights, 10 classes): every block's channels-last layer
    norm and linears, its LayerNorm2d stem and downsamplings and the normed head, W4A8."""
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.convnext_tiny(num_classes=10).eval()
    art = calibrated(model, (3, CONVNEXT_SIZE, CONVNEXT_SIZE), wbits=4, abits=8, iters=1, samples=1)
    assert sum(n.op == "layer_norm" for n in art.graph) == 23
    x = np.random.default_rng(0).normal(size=(1, 3, CONVNEXT_SIZE, CONVNEXT_SIZE)).astype("float32")
    assert_bit_exact_on_backends(art, x)
    rows = layer_agreement(art, x)
    assert rows and max(r.max_diff for r in rows) <= 1
