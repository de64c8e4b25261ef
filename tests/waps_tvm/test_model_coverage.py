"""Coverage over torchvision's classifiers, as a new user would try them: random weights,
W4A4, one calibration iteration per block, a small input; calibrate, compile for llvm
(the default fast form), c and npu16, run, and hold every backend bit-exact to the NumPy
reference and the reference to the fake-quant model (codes within 1 at every quantization
point). Nothing is downloaded; each model is built with ``weights=None``."""
import numpy as np
import pytest
import torch
import torchvision

from tests.compile_helpers import assert_bit_exact_on_backends, calibrated
from tests.conftest import randomize_bn
from waps_tvm.oracle import layer_agreement

# torchvision's classifiers, each at the smallest input it takes here (64×64 where 32×32
# pools a feature map away; Inception-v3 needs 75×75).
MODELS = ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "mobilenet_v2",
          "mobilenet_v3_small", "mobilenet_v3_large", "mnasnet0_5", "mnasnet1_0", "efficientnet_b0",
          "efficientnet_v2_s", "regnet_x_400mf", "regnet_y_400mf", "shufflenet_v2_x1_0", "squeezenet1_1",
          "densenet121", "googlenet", "inception_v3", "alexnet", "vgg11_bn"]
SIZE = {"shufflenet_v2_x1_0": 64, "squeezenet1_1": 64, "googlenet": 64, "alexnet": 64, "inception_v3": 75}
EXTRA = {"googlenet": dict(aux_logits=False, init_weights=False),
         "inception_v3": dict(aux_logits=False, init_weights=False)}


def _model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_bn(getattr(torchvision.models, arch)(weights=None, num_classes=10, **EXTRA.get(arch, {})))


@pytest.mark.slow
@pytest.mark.parametrize("arch", MODELS)
def test_torchvision_classifier_calibrates_compiles_and_runs_bit_exact(arch):
    px = SIZE.get(arch, 32)
    art = calibrated(_model(arch), (3, px, px), wbits=4, abits=4, iters=1, samples=2)
    x = np.random.default_rng(0).normal(size=(1, 3, px, px)).astype("float32")
    assert_bit_exact_on_backends(art, x)
    rows = layer_agreement(art, x)
    bad = [r for r in rows if r.max_diff > 1]
    assert rows and not bad, bad
