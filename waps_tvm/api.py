"""Python API: quantize a model, save/load artifacts, evaluate fake-quant models."""
from __future__ import annotations

import os

import torch

from calib import artifact as waps_file
from calib.artifact import WapsArtifact
from calib.calibrate import CalibResult, calibrate
from calib.config import CalibConfig
from calib.export import to_artifact
from calib.fakequant import build_fake_quant
from calib.errors import DataError
from waps_tvm import __version__
from waps_tvm.model_io import LoadedModel


def quantize(model: torch.nn.Module | LoadedModel, data: torch.Tensor, config: CalibConfig | None = None,
             input_shape: tuple[int, int, int] | None = None, checkpoint: str | os.PathLike | None = None,
             resume: bool = False, group_budget: GroupBudget | None = None) -> tuple[CalibResult, WapsArtifact]:
    """Calibrate ``model`` (an nn.Module or LoadedModel) on ``data`` [N, C, H, W] float32,
    on ``config.device``. ``checkpoint``: a file written after every block (see
    ``calib.checkpoint``); ``resume`` continues from it. Delete it after saving the artifact.
    ``group_budget``: choose each layer's WAPS groups under an accelerator cycle budget
    (calib/group_search.py; e.g. ``waps_tvm.npu_budget.npu16_budget``)."""
    cfg = (config or CalibConfig()).validate()
    if isinstance(model, torch.nn.Module):
        model = LoadedModel(type(model).__name__, tuple(input_shape or data.shape[1:]), module=model)
    if tuple(data.shape[1:]) != tuple(model.input_shape):
        raise DataError(f"data shape {tuple(data.shape[1:])} does not fit the model input {tuple(model.input_shape)}")
    result = calibrate(model.graph(), data[: cfg.samples], cfg, checkpoint, resume, group_budget)
    return result, to_artifact(result, producer=f"waps-tvm {__version__}")


def save_artifact(art: WapsArtifact, path: str | os.PathLike):
    return waps_file.save(art, path)


def load_artifact(path: str | os.PathLike) -> WapsArtifact:
    return waps_file.load(path)


@torch.no_grad()
def predict(model, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """Logits of ``model`` over ``x`` in batches (float32)."""
    model.eval()
    return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean())


def evaluate(art: WapsArtifact, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 of the fake-quant model rebuilt from the artifact."""
    return top1(predict(build_fake_quant(art), x), y)
