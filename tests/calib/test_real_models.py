"""Coverage: torchvision classifiers beyond ResNet/MobileNetV2 capture, calibrate (rtn) and
export with every quantization point in art.quant. Random weights, tiny inputs, no downloads."""
import time

import pytest
import torch
import torchvision.models as tvm

from calib.artifact import load, save
from calib.blocks import MAX_UNIT_LAYERS, find_blocks
from calib.calibrate import calibrate
from calib.capture import capture, export_module
from calib.config import CalibConfig
from calib.export import to_artifact
from calib.fakequant import build_fake_quant
from calib.fold_bn import fold_batch_norm
from calib.fuse import fuse_activations
from calib.graph import PARAM_OPS, QUANT_OPS

# Two models with every kind of join (SE gates and hardswish; channel shuffle): the 1000-class
# head, 8-bit activations and the artifact round trip. tests/waps_tvm/test_model_coverage.py
# takes all of torchvision's classifiers through calibrate → compile → run.
MODELS = [  # (name, constructor kwargs, input pixels)
    ("mobilenet_v3_small", {}, 32), ("shufflenet_v2_x1_0", {}, 32),
]


def randomize_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BN statistics, so folding and the standalone-BN path are exercised."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1, generator=g)
            m.running_var.uniform_(0.5, 1.5, generator=g)
            m.weight.data.uniform_(0.5, 1.5, generator=g)
            m.bias.data.normal_(0, 0.1, generator=g)
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("name, kwargs, px", MODELS, ids=[m[0] for m in MODELS])
def test_torchvision_model_calibrates(name, kwargs, px, tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(getattr(tvm, name)(**kwargs))
    t0 = time.perf_counter()
    graph = fuse_activations(fold_batch_norm(capture(export_module(model, (3, px, px)))))
    blocks = find_blocks(graph)
    assert all(sum(graph[n].op in PARAM_OPS for n in b.nodes) <= MAX_UNIT_LAYERS for b in blocks)
    data = torch.randn(4, 3, px, px, generator=torch.Generator().manual_seed(1))
    cfg = CalibConfig(wbits=4, abits=8, method="rtn", batch=4, samples=4, progress=False, device="cpu")
    result = calibrate(graph, data, cfg)
    art = to_artifact(result)
    points = {n.name for n in graph if n.op in (*QUANT_OPS, "input")}
    assert points <= set(art.quant)
    back = load(save(art, tmp_path / f"{name}.waps"))
    fq = build_fake_quant(back)
    with torch.no_grad():
        y, want = fq(data), model(data)
    assert torch.isfinite(y).all()
    corr = torch.corrcoef(torch.stack([y.flatten(), want.flatten()]))[0, 1]
    print(f"{name}: {time.perf_counter() - t0:.1f} s, {len(blocks)} blocks, corr {corr:.3f}")
    assert corr > 0.5, corr
