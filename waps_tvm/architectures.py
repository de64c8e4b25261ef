"""Architectures by name: torchvision's, plus RegNetX-600MF (used by BRECQ and the WAPS
paper; torchvision has no 600MF variant) from pycls's published parameters."""
from __future__ import annotations

from functools import partial

import torch

from calib.errors import ModelError


def regnet_x_600mf(num_classes: int = 1000) -> torch.nn.Module:
    """pycls RegNetX-600MF: depth 16, w0 48, wa 36.97, wm 2.24, group width 24 (no SE)."""
    from torchvision.models.regnet import BlockParams, RegNet
    params = BlockParams.from_init_params(depth=16, w_0=48, w_a=36.97, w_m=2.24, group_width=24)
    norm = partial(torch.nn.BatchNorm2d, eps=1e-05, momentum=0.1)
    return RegNet(params, num_classes=num_classes, norm_layer=norm)


EXTRA = {"regnet_x_600mf": regnet_x_600mf}


def names() -> list[str]:
    import torchvision
    return sorted(set(torchvision.models.list_models(module=torchvision.models)) | set(EXTRA))


def get_architecture(name: str, num_classes: int = 1000) -> torch.nn.Module:
    """A randomly initialised architecture (no weights are downloaded)."""
    if name in EXTRA:
        return EXTRA[name](num_classes=num_classes)
    try:
        import torchvision
    except ImportError as e:
        raise ModelError("torchvision architectures need torchvision installed") from e
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ModelError(f"unknown architecture '{name}'")
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
