"""Vision transformers end to end: patch embedding, class token and position embedding
(constants), per-head attention (two matmuls of activations around a grouped softmax), layer
norms, GELU MLPs, the class-token crop or a token mean: captured as graph nodes, calibrated,
stored, and compiled bit-exact on every backend, near the fake-quant model."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from calib import artifact
from calib.capture import capture, export_module
from calib.fold_bn import fold_batch_norm
from calib.fuse import fuse_activations
from tests.compile_helpers import assert_bit_exact_on_backends, calibrated
from waps_tvm.oracle import layer_agreement


class TimmAttention(nn.Module):
    """timm's attention: one qkv linear, reshape and permute to heads, q·kᵀ·scale, softmax,
    ·v, back to tokens, a projection."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class TimmStyleViT(nn.Module):
    """A patch embedding conv, a learned position embedding added to the tokens (no class
    token), one pre-norm encoder layer (timm attention, GELU MLP) and a head over the mean token."""

    def __init__(self, dim=16, heads=2, patch=4, size=16, classes=10):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2, dim))
        self.norm1, self.norm2, self.norm = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = TimmAttention(dim, heads)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        x = x + self.attn(self.norm1(x))
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return self.head(self.norm(x).mean(dim=1))


def tiny_torchvision_vit():
    """torchvision's VisionTransformer (class token, position embedding, nn.MultiheadAttention
    through scaled_dot_product_attention) in small, its token constants drawn at random."""
    from torchvision.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                              num_classes=10)
    with torch.no_grad():
        model.class_token.normal_(0, 1)
        model.encoder.pos_embedding.normal_(0, 0.5)
    return model.eval()


def graph_of(model, shape):
    return fuse_activations(fold_batch_norm(capture(export_module(model.eval(), shape))))


def test_torchvision_vit_is_captured_as_attention_nodes():
    g = graph_of(tiny_torchvision_vit(), (3, 32, 32))
    ops = [n.op for n in g]
    assert ops.count("matmul") == 4 and ops.count("softmax") == 2 and ops.count("layer_norm") == 5
    contracts = [n.attrs["contract"] for n in g if n.op == "matmul"]
    assert contracts == ["channels", "positions"] * 2
    assert all(n.attrs["groups"] == 2 for n in g if n.op == "softmax")
    assert ops.count("constant") == 2                      # the class token and the position embedding
    assert any(n.op == "cat" and n.attrs["axis"] == 2 for n in g)
    assert ops.count("crop") == 1                           # the class token read by the head


def test_timm_style_attention_is_captured_as_attention_nodes():
    torch.manual_seed(0)
    g = graph_of(TimmStyleViT(), (3, 16, 16))
    ops = [n.op for n in g]
    assert ops.count("matmul") == 2 and ops.count("softmax") == 1 and ops.count("constant") == 1
    assert "global_avg_pool" in ops                          # the mean over the tokens


def test_attention_points_get_their_own_bits():
    """--attn-bits: Q, K, V (the in-projection read by the matmuls), scores, probabilities and
    context at 8 bits while the MLP stays at --abits 4."""
    from calib.config import CalibConfig
    from calib.qmodel import output_bits
    g = graph_of(tiny_torchvision_vit(), (3, 32, 32))
    bits = output_bits(g, CalibConfig(abits=4, attn_bits=8), set(g.outputs))
    attention = [n.name for n in g if n.op in ("matmul", "softmax")]
    qkv = [n.name for n in g if n.op == "conv2d" and n.params["weight"].shape[0] == 3 * 16]
    assert len(attention) == 6 and len(qkv) == 2
    assert all(bits[k] == 8 for k in attention + qkv)
    mlp = [n.name for n in g if n.op == "conv2d" and n.params["weight"].shape[0] == 32]
    assert mlp and all(bits[k] == 4 for k in mlp)
    assert output_bits(g, CalibConfig(abits=4), set(g.outputs))[attention[0]] == 4


@pytest.fixture(scope="module")
def vit_art():
    return calibrated(tiny_torchvision_vit(), (3, 32, 32), wbits=4, abits=8, iters=2, samples=8)


@pytest.fixture(scope="module")
def timm_art():
    torch.manual_seed(0)
    return calibrated(TimmStyleViT().eval(), (3, 16, 16), wbits=4, abits=8, iters=2, samples=8)


def test_constants_round_trip_through_the_artifact(vit_art, tmp_path):
    artifact.save(vit_art, tmp_path / "vit.waps")
    back = artifact.load(tmp_path / "vit.waps")
    for n in vit_art.graph:
        if n.op == "constant":
            assert torch.equal(back.graph[n.name].params["value"], n.params["value"])


@pytest.mark.parametrize("which", ["vit_art", "timm_art"])
def test_bit_exact_on_every_backend_and_near_fake_quant(which, request):
    art = request.getfixturevalue(which)
    shape = art.graph.input.attrs["shape"]
    x = np.random.default_rng(0).normal(size=(2, *shape)).astype("float32")
    assert_bit_exact_on_backends(art, x)
    rows = layer_agreement(art, x)
    assert rows and max(r.max_diff for r in rows) <= 1


# measured here (2-core machine): 92 s to calibrate, 433 s on the three backends
VIT_B16_SIZE = 224


@pytest.mark.slow
def test_torchvision_vit_b_16_bit_exact_on_every_backend():
    """torchvision's ViT-B/16 (random weights, 10 classes; 12 layers, 12 heads, 768 wide) at
    224×224 (196 patches and the class token): every encoder layer's attention and MLP, W4A8."""
    from torchvision.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    model = VisionTransformer(image_size=VIT_B16_SIZE, patch_size=16, num_layers=12, num_heads=12, hidden_dim=768,
                              mlp_dim=3072, num_classes=10).eval()
    art = calibrated(model, (3, VIT_B16_SIZE, VIT_B16_SIZE), wbits=4, abits=8, iters=1, samples=2)
    assert sum(n.op == "matmul" for n in art.graph) == 24
    x = np.random.default_rng(0).normal(size=(1, 3, VIT_B16_SIZE, VIT_B16_SIZE)).astype("float32")
    assert_bit_exact_on_backends(art, x)
    rows = layer_agreement(art, x)
    assert rows and max(r.max_diff for r in rows) <= 1


@pytest.mark.slow
def test_trained_fashion_vit_at_w6a6_bit_exact_on_every_backend():
    """bench's FashionViT (trained weights; 4 encoder layers, 17 tokens, 1-channel patches)
    calibrated W6A6 on Fashion-MNIST images: the accuracy benchmark's transformer compiles."""
    from bench.models import load_pretrained
    from calib.config import CalibConfig
    from waps_tvm import api
    from waps_tvm.datasets import load_dataset
    calib = load_dataset("fashion-mnist", "calib", n=16, seed=0)
    _, art = api.quantize(load_pretrained("fashion_vit"), calib.x,
                          CalibConfig(wbits=6, abits=6, method="waps", iters=2, batch=8, samples=16, progress=False))
    x = calib.x[:2].numpy()
    assert_bit_exact_on_backends(art, x)
    rows = layer_agreement(art, x)
    assert rows and max(r.max_diff for r in rows) <= 1
