import pytest
import torch

from calib.capture import capture, export_module
from calib.fold_bn import fold_batch_norm
from calib.fuse import fuse_activations


@pytest.fixture(scope="session")
def tiny_graph_data():
    """TinyResNet(16)'s fused graph for 1×8×8 inputs and 48 calibration images."""
    from tests.conftest import TinyResNet, randomize_bn
    torch.manual_seed(0)
    net = randomize_bn(TinyResNet(16))
    graph = fuse_activations(fold_batch_norm(capture(export_module(net, (1, 8, 8)))))
    return graph, torch.randn(48, 1, 8, 8, generator=torch.Generator().manual_seed(1))
