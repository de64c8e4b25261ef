"""Where calibration runs: ``--device auto|cpu|cuda[:N]`` resolved once to a torch.device.

Every tensor calibration creates is created on this device, explicitly; what leaves
calibration (the artifact, checkpoints) leaves as CPU copies.
"""
from __future__ import annotations

import torch

from calib.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")
CONV_DTYPES = ("auto", "float32", "bfloat16")


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


def native_bf16(device: torch.device) -> bool:
    """True where bfloat16 convolutions run in hardware: a CUDA device that supports bf16,
    or a CPU that oneDNN runs bf16 on natively (AVX512-BF16, AMX); elsewhere bf16 is
    emulated and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def check_conv_dtype(name: str) -> None:
    if name not in CONV_DTYPES:
        raise ConfigError(f"--conv-dtype {name}: choose {', '.join(CONV_DTYPES)}")


def uses_bf16(conv_dtype: str, device: torch.device) -> bool:
    """Whether reconstruction runs its conv/linear products in bfloat16: ``--conv-dtype``
    bfloat16, or auto where ``native_bf16`` (bench/results/bf16.md: top-1 and block loss
    within noise of float32; bench/results/calib_speed.md: the speed)."""
    check_conv_dtype(conv_dtype)
    return conv_dtype == "bfloat16" or (conv_dtype == "auto" and native_bf16(device))
