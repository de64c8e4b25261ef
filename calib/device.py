"""Where calibration runs: ``--device auto|cpu|cuda[:N]`` resolved once to a torch.device.

Every tensor calibration creates is created on this device, explicitly; what leaves
calibration (the artifact, checkpoints) leaves as CPU copies.
"""
from __future__ import annotations

import torch

from calib.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")


def check_device_name(name: str) -> None:
    """Syntax only (no CUDA query): auto, cpu, cuda or cuda:N."""
    kind, _, index = name.partition(":")
    if kind not in DEVICES or (index and (kind != "cuda" or not index.isdigit())):
        raise ConfigError(f"--device {name}: choose auto, cpu, cuda or cuda:N")


def resolve_device(name: str) -> torch.device:
    """auto → cuda when a CUDA device is usable, else cpu. Asking for CUDA where there is
    none (a CPU-only torch build, no driver, or an index beyond the devices) is a ConfigError."""
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available here "
                          f"(torch {torch.__version__}, {'a CPU-only build' if torch.version.cuda is None else 'no usable GPU'})")
    dev = torch.device(name)
    index = 0 if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return torch.device("cuda", index)
