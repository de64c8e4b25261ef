"""The .waps artifact: everything the compiler needs from calibration, versioned.

Format version 1 (documented in docs/waps-format.md). A ZIP archive holding
    manifest.json      format, version, producer, config, graph, layers, tensors,
                       arrays (dtype, shape, sha256 of each), report
    arrays/<key>.npy   one NumPy array per entry (loaded with allow_pickle=False)
Writes go to a temporary file in the destination folder, then os.replace, so a
reader never sees a half-written artifact. The bytes are a function of the content
alone (fixed member timestamps, no timings): the same calibration gives the same file. The loader checks structure, hashes,
dtypes, shapes and value ranges, and raises ArtifactError with one line otherwise.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calib.errors import ArtifactError
from calib.graph import NODE_PARAMS, PARAM_OPS, QUANT_OPS, Graph, node_param_shape
from calib.graph_check import check_node
from calib.numerics import GroupScale, group_scale
from calib.quantizers import CODE_BITS, FLOAT_BITS

FORMAT = "waps"
VERSION = 1


@dataclass
class TensorQuant:
    """Codes of one tensor: real = scale·(code − zero_point), code ∈ [0, 2^bits − 1].
    bits = 32 means the tensor stays float (weight-only quantization)."""

    bits: int
    scale: float = 1.0
    zero_point: int = 0

    @property
    def is_float(self) -> bool:
        return self.bits >= FLOAT_BITS


@dataclass
class LayerRecord:
    """One conv2d/linear. Shapes: w_codes [m, c/groups, kh, kw] or [m, c] int8;
    w_scale, bias, gamma_z, phi_z [m] float32; groups [units] int8 group index per
    input unit (unit = ``unit_size`` consecutive input features), or None."""

    wbits: int
    unit_size: int
    w_codes: np.ndarray
    w_scale: np.ndarray
    bias: np.ndarray
    gamma_z: np.ndarray
    phi_z: np.ndarray
    groups: np.ndarray | None = None
    group_scales: list[GroupScale] = field(default_factory=list)


@dataclass
class WapsArtifact:
    graph: Graph                              # structure only (no float parameters)
    layers: dict[str, LayerRecord]
    quant: dict[str, TensorQuant]             # the input and every QUANT_OPS output (graph.QUANT_OPS)
    config: dict[str, Any]
    report: list[dict[str, Any]] = field(default_factory=list)
    producer: str = "waps-tvm"
    version: int = VERSION


_LAYER_ARRAYS = ("w_codes", "w_scale", "bias", "gamma_z", "phi_z", "groups")
_DTYPES = {"w_codes": np.int8, "w_scale": np.float32, "bias": np.float32, "gamma_z": np.float32,
           "phi_z": np.float32, "groups": np.int8}


def save(art: WapsArtifact, path: str | os.PathLike) -> Path:
    """Write ``art`` to ``path`` atomically."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    layers = {}
    for name, rec in art.layers.items():
        entry = {"wbits": rec.wbits, "unit_size": rec.unit_size,
                 "group_scales": [[g.sigma, g.n] for g in rec.group_scales]}
        for a in _LAYER_ARRAYS:
            v = getattr(rec, a)
            if v is None:
                continue
            k = f"{name}.{a}"
            arrays[k] = np.ascontiguousarray(v, dtype=_DTYPES[a])
            entry[a] = k
        layers[name] = entry
    node_params = {}
    for n in art.graph:
        for p in NODE_PARAMS.get(n.op, ()):
            k = f"{n.name}.{p}"
            arrays[k] = np.ascontiguousarray(n.params[p].detach().cpu().numpy(), dtype=np.float32)
            node_params.setdefault(n.name, {})[p] = k
    buffers = {}
    meta = {}
    for k, v in arrays.items():
        b = io.BytesIO()
        np.save(b, v, allow_pickle=False)
        buffers[k] = b.getvalue()
        meta[k] = {"dtype": str(v.dtype), "shape": list(v.shape), "sha256": hashlib.sha256(buffers[k]).hexdigest()}
    manifest = {
        "format": FORMAT, "version": art.version, "producer": art.producer,
        "config": art.config, "output": _outputs_json(art.graph.outputs),
        **({"output_labels": list(art.graph.labels)} if art.graph.labels else {}), "graph": art.graph.to_json(),
        "layers": layers, **({"node_params": node_params} if node_params else {}),
        "tensors": {k: {"bits": q.bits, "scale": q.scale, "zero_point": q.zero_point} for k, q in art.quant.items()},
        "arrays": meta, "report": art.report,
        "numerics": {"shift": "round_half_up", "requant": "q_multiply_shift round_half_up",
                     "act_rounding": "half_to_even"},
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise ArtifactError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr(_entry("manifest.json"), json.dumps(manifest, indent=1, allow_nan=False))
            for k, b in buffers.items():
                z.writestr(_entry(f"arrays/{k}.npy"), b)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise ArtifactError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _entry(name: str) -> zipfile.ZipInfo:
    """A zip member with a fixed timestamp and mode: the same artifact gives the same bytes."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    return info


def load(path: str | os.PathLike) -> WapsArtifact:
    """Read and validate a .waps file; any defect raises ArtifactError (one line)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such artifact file")
    try:
        with zipfile.ZipFile(path) as z:
            manifest = json.loads(z.read("manifest.json"))
            if not isinstance(manifest, dict):
                raise ArtifactError(f"{path}: manifest is not a JSON object")
            _check_header(path, manifest)
            arrays = {}
            for k, meta in manifest["arrays"].items():
                raw = z.read(f"arrays/{k}.npy")
                if hashlib.sha256(raw).hexdigest() != meta["sha256"]:
                    raise ArtifactError(f"{path}: array '{k}' is corrupt (checksum mismatch)")
                v = np.load(io.BytesIO(raw), allow_pickle=False)
                if str(v.dtype) != meta["dtype"] or list(v.shape) != meta["shape"]:
                    raise ArtifactError(f"{path}: array '{k}' has dtype/shape {v.dtype}{v.shape}, "
                                        f"manifest says {meta['dtype']}{tuple(meta['shape'])}")
                arrays[k] = v
    except ArtifactError:
        raise
    except zipfile.BadZipFile:
        raise ArtifactError(f"{path}: not a .waps artifact (not a zip archive or truncated)") from None
    except KeyError as e:
        raise ArtifactError(f"{path}: artifact is missing {e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ArtifactError(f"{path}: manifest.json is not valid JSON") from None
    except (ValueError, TypeError, AttributeError, OSError, EOFError, zipfile.LargeZipFile, NotImplementedError,
            zlib.error, OverflowError) as e:
        raise ArtifactError(f"{path}: malformed artifact ({type(e).__name__}: {_first_line(e)})") from None
    try:
        art = _build(manifest, arrays)
    except ArtifactError:
        raise
    except (KeyError, ValueError, TypeError, IndexError, AttributeError, OverflowError) as e:
        raise ArtifactError(f"{path}: malformed artifact ({type(e).__name__}: {_first_line(e)})") from None
    try:
        validate(art, str(path))
    except ArtifactError:
        raise
    except (KeyError, ValueError, TypeError, IndexError, AttributeError, OverflowError) as e:
        raise ArtifactError(f"{path}: malformed artifact ({type(e).__name__}: {_first_line(e)})") from None
    return art


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else ""


def _outputs_json(outputs: tuple[str, ...]) -> str | list[str]:
    """The manifest's "output": the value's name for a single-output model (as before several
    were allowed), the list of names in the model's order otherwise."""
    return outputs[0] if len(outputs) == 1 else list(outputs)


def _check_header(path: Path, m: dict) -> None:
    if m.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a .waps artifact (format {m.get('format')!r})")
    v = m.get("version")
    if v != VERSION:
        raise ArtifactError(f"{path}: artifact format version {v!r} is not supported (this build reads version {VERSION})")
    for k in ("graph", "layers", "tensors", "arrays", "output", "config"):
        if k not in m:
            raise ArtifactError(f"{path}: manifest lacks '{k}'")
    out = m["output"]
    if not (isinstance(out, str) or (isinstance(out, list) and out and all(isinstance(o, str) for o in out))):
        raise ArtifactError(f"{path}: manifest 'output' must be a value name or a list of them")


def _build(m: dict, arrays: dict[str, np.ndarray]) -> WapsArtifact:
    labels = m.get("output_labels", [])
    if not isinstance(labels, list) or not all(isinstance(s, str) for s in labels) or \
            (labels and len(labels) != (len(m["output"]) if isinstance(m["output"], list) else 1)):
        raise ArtifactError("manifest 'output_labels' must be one name per output")
    graph = Graph.from_json(m["graph"], m["output"], labels)
    layers = {}
    for name, e in m["layers"].items():
        get = lambda a: arrays[e[a]] if a in e else None  # noqa: E731
        layers[name] = LayerRecord(int(e["wbits"]), int(e["unit_size"]), get("w_codes"), get("w_scale"),
                                   get("bias"), get("gamma_z"), get("phi_z"), get("groups"),
                                   [GroupScale(int(s), int(n)) for s, n in e["group_scales"]])
    for name, entry in m.get("node_params", {}).items():
        node = graph[name]
        if set(entry) != set(NODE_PARAMS.get(node.op, ())):
            raise ArtifactError(f"manifest 'node_params' of {node.op} '{name}' must be {NODE_PARAMS.get(node.op, ())}")
        node.params = {p: torch.from_numpy(arrays[k].copy()) for p, k in entry.items()}
    quant = {k: TensorQuant(int(q["bits"]), float(q["scale"]), int(q["zero_point"])) for k, q in m["tensors"].items()}
    return WapsArtifact(graph, layers, quant, m["config"], m.get("report", []), m.get("producer", ""), m["version"])


def validate(art: WapsArtifact, where: str = "artifact") -> None:
    """Semantic checks: graph well-formed, every layer complete and in range."""
    names = set()
    shapes: dict[str, tuple[int, ...]] = {}
    for n in art.graph:
        for i in n.inputs:
            if i not in names:
                raise ArtifactError(f"{where}: node '{n.name}' reads '{i}' before it is defined")
        names.add(n.name)
        shapes[n.name] = tuple(n.shape)
        check_node(n, shapes, where)
        if n.op in PARAM_OPS and n.name not in art.layers:
            raise ArtifactError(f"{where}: layer '{n.name}' has no weights")
        for p in NODE_PARAMS.get(n.op, ()):
            v = n.params.get(p)
            if v is None or tuple(v.shape) != node_param_shape(n) or not bool(torch.isfinite(v).all()):
                raise ArtifactError(f"{where}: {n.op} '{n.name}' needs {p}: {node_param_shape(n)} finite values")
        if n.op in (*QUANT_OPS, "input") and n.name not in art.quant:
            raise ArtifactError(f"{where}: tensor '{n.name}' has no quantization parameters")
    for out in art.graph.outputs:
        if out not in names:
            raise ArtifactError(f"{where}: output '{out}' is not a graph node")
    for name, rec in art.layers.items():
        if name not in names or art.graph[name].op not in PARAM_OPS:
            raise ArtifactError(f"{where}: layer record '{name}' matches no conv/linear node")
        for a in ("w_codes", "w_scale", "bias", "gamma_z", "phi_z"):
            if getattr(rec, a) is None:
                raise ArtifactError(f"{where}: layer '{name}' lacks {a}")
        m = rec.w_codes.shape[0]
        lo, hi = -(2 ** (rec.wbits - 1)), 2 ** (rec.wbits - 1) - 1
        if rec.wbits not in CODE_BITS or rec.w_codes.min(initial=0) < lo or rec.w_codes.max(initial=0) > hi:
            raise ArtifactError(f"{where}: layer '{name}' weight codes outside the {rec.wbits}-bit range")
        for a in ("w_scale", "bias", "gamma_z", "phi_z"):
            v = getattr(rec, a)
            if v.shape != (m,) or not np.all(np.isfinite(v)):
                raise ArtifactError(f"{where}: layer '{name}' {a} must be {m} finite values")
        if np.any(rec.w_scale <= 0):
            raise ArtifactError(f"{where}: layer '{name}' has non-positive weight scales")
        if rec.groups is not None:
            g = len(rec.group_scales)
            node = art.graph[name]
            fan_in = rec.w_codes.shape[1] * (node.attrs.get("groups", 1) if node.op == "conv2d" else 1)
            if rec.unit_size < 1 or rec.groups.shape != (fan_in // rec.unit_size,) or fan_in % rec.unit_size:
                raise ArtifactError(f"{where}: layer '{name}' group assignment does not match its {fan_in} inputs")
            if g < 1 or rec.groups.min() < 0 or rec.groups.max() >= g:
                raise ArtifactError(f"{where}: layer '{name}' group index outside 0..{g - 1}")
            for s in rec.group_scales:
                if s.sigma not in (-1, 0, 1) or not 0 <= s.n <= 15:
                    raise ArtifactError(f"{where}: layer '{name}' group scale {s} is not 1 ± 2^-n")
    for k, q in art.quant.items():
        if q.bits not in (*CODE_BITS, FLOAT_BITS):
            raise ArtifactError(f"{where}: tensor '{k}' has unsupported bit width {q.bits}")
        if not q.is_float and (not np.isfinite(q.scale) or q.scale <= 0 or not 0 <= q.zero_point < 2**q.bits):
            raise ArtifactError(f"{where}: tensor '{k}' has invalid scale/zero point")


def group_scales_of(gammas) -> list[GroupScale]:
    return [group_scale(g) for g in gammas]
