import collections

import pytest
import torchvision

from waps_tvm.architectures import get_architecture

from calib.blocks import find_blocks
from calib.capture import capture, export_module
from calib.fold_bn import fold_batch_norm
from calib.fuse import fuse_activations


def blocks_of(model, shape=(3, 64, 64), residual=True):
    g = fuse_activations(fold_batch_norm(capture(export_module(model.eval(), shape))))
    return g, find_blocks(g, residual)


def sources(g, b):
    return [g[n].source for n in b.nodes if g[n].op in ("conv2d", "linear")]


def check_partition(g, blocks):
    seen = [n for b in blocks for n in b.nodes]
    assert sorted(seen) == sorted(n.name for n in g if n.op != "input")
    for b in blocks:
        assert b.outputs, b


@pytest.mark.parametrize("arch, residual, layers", [
    ("resnet18", 8, 2), ("mobilenet_v2", 10, 23), ("regnet_x_600mf", 16, 2), ("mnasnet0_5", 10, 23)])
def test_torchvision_blocks(arch, residual, layers):
    g, blocks = blocks_of(get_architecture(arch))
    check_partition(g, blocks)
    kinds = collections.Counter(b.kind for b in blocks)
    assert kinds == {"residual": residual, "layer": layers}


def test_resnet18_units_are_basic_blocks():
    g, blocks = blocks_of(torchvision.models.resnet18())
    res = [b for b in blocks if b.kind == "residual"]
    assert sources(g, res[0]) == ["layer1.0.conv1", "layer1.0.conv2"]
    assert sources(g, res[2]) == ["layer2.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0"]
    assert all(len(b.inputs) == 1 and len(b.outputs) == 1 for b in res)


def test_mobilenet_inverted_residual_with_skip():
    g, blocks = blocks_of(torchvision.models.mobilenet_v2())
    res = [b for b in blocks if b.kind == "residual"]
    assert sources(g, res[0]) == ["features.3.conv.0.0", "features.3.conv.1.0", "features.3.conv.2"]


def test_layerwise_mode_has_no_residual_blocks():
    g, blocks = blocks_of(torchvision.models.resnet18(), residual=False)
    check_partition(g, blocks)
    assert all(b.kind == "layer" for b in blocks)
    assert sum(1 for b in blocks) == 21


def test_user_cnn_with_grouped_depthwise_and_plain_add(tiny_resnet):
    g, blocks = blocks_of(tiny_resnet, (1, 16, 16))
    check_partition(g, blocks)
    res = [b for b in blocks if b.kind == "residual"]
    assert [sources(g, b) for b in res] == [["a1.0", "a1.3", "down.0"], ["b1.0", "b1.3"]]


@pytest.mark.parametrize("name, residual, layers", [
    ("fashion_resnet", 5, 2), ("fashion_mobilenetv2", 2, 12),
    # SE gates are mul-join units: alone, or with their block's convs when it has a residual add
    ("fashion_mobilenetv3", 5, 13)])
def test_benchmark_models_blocks(name, residual, layers):
    from bench.models import MODELS
    g, blocks = blocks_of(MODELS[name](), (1, 28, 28))
    check_partition(g, blocks)
    assert collections.Counter(b.kind for b in blocks) == {"residual": residual, "layer": layers}


def test_digit_recognizer_is_five_single_layer_blocks():
    from waps_tvm.model_io import digit_recognizer
    g, blocks = blocks_of(digit_recognizer(), (1, 28, 28))
    check_partition(g, blocks)
    assert [sources(g, b) for b in blocks] == [["conv_layers.0"], ["conv_layers.3"], ["conv_layers.6"],
                                               ["fc_layers.0"], ["fc_layers.2"]]
