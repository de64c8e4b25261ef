"""The resumable state of a calibration between two blocks, and its atomic file.

After block k every later result depends only on (a) the QuantModel's tensors (the
frozen codes, steps, zero points, γ^z/φ^z and group assignments of blocks ≤ k; the
untouched initial state of the rest), (b) the RNG states (torch's global generators,
which QDrop's masks draw from, and calibration's own batch generator), and (c) the
float and quantized activations at the frontier. (a) and (b) are stored; (c) is not:
it is recomputed on resume by re-running blocks ≤ k with their frozen parameters,
exactly the evaluation that produced it (same ops, same chunks, no randomness), so it
comes out bit-identical on the CPU and a checkpoint stays the size of the model, not
of the data. Adam state never crosses a block boundary (each block starts its own
optimisers), so there is none to store.

A checkpoint carries a fingerprint (SHA-256) of the options, the model, the data and
the runtime (torch version, device type); resuming with anything else is refused.
File: ``torch.save`` of tensors and plain containers, read back with
``weights_only=True`` (no code runs on load), written to a temporary file beside the
target, fsynced and renamed into place: a kill at any moment leaves the previous
checkpoint or the new one, never a torn file.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from calib.config import CalibConfig
from calib.errors import CheckpointError
from calib.graph import Graph
from calib.qmodel import QuantModel

FORMAT = "waps-calib-checkpoint"
VERSION = 1


def checkpoint_path(output: str | os.PathLike) -> Path:
    """Where the checkpoint of a calibration writing ``output`` lives: ``output.ckpt``."""
    output = Path(output)
    return output.with_name(output.name + ".ckpt")


@dataclass(frozen=True)
class Fingerprint:
    """SHA-256 hex digests of what a calibration's result depends on."""

    config: str
    model: str
    data: str
    runtime: str

    @staticmethod
    def of(graph: Graph, data: torch.Tensor, cfg: CalibConfig, device: torch.device) -> "Fingerprint":
        return Fingerprint(_sha(json.dumps(cfg.to_json(), sort_keys=True).encode()),
                           _graph_digest(graph), _tensor_digest(data),
                           _sha(f"torch {torch.__version__} on {device.type}".encode()))

    def differences(self, other: "Fingerprint") -> list[str]:
        words = {"config": "options", "model": "model", "data": "calibration data",
                 "runtime": "torch version or device"}
        return [words[f.name] for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _tensor_digest(t: torch.Tensor, h=None) -> str:
    h = h or hashlib.sha256()
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no bytes copy
    return h.hexdigest()


def _graph_digest(graph: Graph) -> str:
    h = hashlib.sha256(json.dumps(graph.to_json(), sort_keys=True).encode())
    for n in graph:
        for k in sorted(n.params):
            h.update(f"{n.name}.{k}".encode())
            _tensor_digest(n.params[k], h)
    return h.hexdigest()


@dataclass
class Checkpoint:
    """Calibration state after ``blocks_done`` of ``n_blocks`` blocks (all tensors on the CPU)."""

    fingerprint: Fingerprint
    blocks_done: int
    n_blocks: int
    model_state: dict[str, torch.Tensor]
    groups_off: list[str]                       # layers whose groups were dropped (rtn)
    history: dict[str, list[torch.Tensor]]      # ProductGroups.history per layer (Fig. 8 data)
    report: list[dict]                          # calib.calibrate.BlockReport fields per block done
    rng: dict[str, torch.Tensor]                # "cpu", "generator", and "cuda" on a CUDA run
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @staticmethod
    def capture(model: QuantModel, fingerprint: Fingerprint, blocks_done: int, n_blocks: int,
                report: list[dict], generator: torch.Generator, seconds: float) -> "Checkpoint":
        rng = {"cpu": torch.get_rng_state(), "generator": generator.get_state().cpu()}
        if generator.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(generator.device)
        layers = model.quant_layers()
        return Checkpoint(
            fingerprint, blocks_done, n_blocks,
            {k: v.detach().cpu() for k, v in model.state_dict().items()},  # saved at once: no copy needed
            [name for name, l in layers.items() if l.groups is None],
            {name: [torch.from_numpy(np.ascontiguousarray(h)) for h in l.groups.history]
             for name, l in layers.items() if l.groups is not None and l.groups.history},
            list(report), rng, seconds)

    def restore(self, model: QuantModel, generator: torch.Generator) -> None:
        """Put ``model`` (freshly built for the same graph and options, on any device) and
        the RNGs into the checkpointed state."""
        layers = model.quant_layers()
        for name in self.groups_off:
            layers[name].groups = None
        model.load_state_dict(self.model_state, strict=True)
        for name, snaps in self.history.items():
            layers[name].groups.history = [h.numpy().copy() for h in snaps]
        torch.set_rng_state(self.rng["cpu"])
        generator.set_state(self.rng["generator"])
        if "cuda" in self.rng:
            torch.cuda.set_rng_state(self.rng["cuda"], generator.device)

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically: temp file in the same folder, fsync, os.replace."""
        path = Path(path)
        payload = {"format": FORMAT, "version": VERSION, **asdict(self)}
        payload["fingerprint"] = asdict(self.fingerprint)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        except OSError as e:
            raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e}") from None
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(e, OSError):
                raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e}") from None
            raise
        return path

    @staticmethod
    def load(path: str | os.PathLike) -> "Checkpoint":
        path = Path(path)
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no checkpoint to resume from") from None
        except Exception as e:  # unpickling failures come in many types; one line says enough
            raise CheckpointError(f"{path}: not a readable calibration checkpoint ({type(e).__name__})") from None
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise CheckpointError(f"{path}: not a calibration checkpoint")
        if payload.get("version") != VERSION:
            raise CheckpointError(f"{path}: checkpoint version {payload.get('version')!r} is not supported "
                                  f"(this build reads version {VERSION})")
        try:
            payload.pop("format"), payload.pop("version")
            payload["fingerprint"] = Fingerprint(**payload["fingerprint"])
            return Checkpoint(**payload)
        except (TypeError, KeyError) as e:
            raise CheckpointError(f"{path}: malformed calibration checkpoint ({e})") from None

    def check(self, expected: Fingerprint, path: str | os.PathLike) -> None:
        """Refuse a checkpoint made with other options, model, data or runtime."""
        diff = self.fingerprint.differences(expected)
        if diff:
            raise CheckpointError(f"{path}: checkpoint of a run with other {', '.join(diff)}; "
                                  "rerun with that run's arguments, or delete it to start over")


def progress(path: str | os.PathLike) -> tuple[int, int] | None:
    """(blocks done, blocks) of the checkpoint at ``path``, or None if there is none (or it
    is unreadable)."""
    try:
        ck = Checkpoint.load(path)
    except CheckpointError:
        return None
    return ck.blocks_done, ck.n_blocks
