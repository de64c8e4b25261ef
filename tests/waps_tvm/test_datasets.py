"""Dataset intake: built-ins, array files, image folders and their one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from calib.errors import DataError
from waps_tvm.datasets import BUILTIN, Dataset, load_dataset


@pytest.mark.parametrize(
    ("name", "hw", "mean", "std"),
    [
        ("mnist", 28, 0.1307, 0.3081),
        ("fashion-mnist", 28, 0.2860, 0.3530),
        ("digits", 8, 0.5, 0.5),
    ],
)
@pytest.mark.parametrize("split", ["calib", "test"])
def test_builtin_shapes_and_normalisation(name: str, hw: int, mean: float, std: float, split: str) -> None:
    d = load_dataset(name, split, n=256, input_shape=(1, hw, hw))
    assert isinstance(d, Dataset) and d.name == name
    assert d.x.shape == (256, 1, hw, hw) and d.x.dtype == torch.float32
    assert d.y is not None and d.y.shape == (256,) and d.y.dtype == torch.int64
    assert 0 <= int(d.y.min()) and int(d.y.max()) <= 9
    # Pixels were in [0, 1] before normalisation, so the range maps to these bounds.
    assert float(d.x.min()) >= -mean / std - 1e-5
    assert float(d.x.max()) <= (1 - mean) / std + 1e-5
    assert float(d.x.min()) == pytest.approx(-mean / std, abs=1e-5)  # some pixel is background


def test_builtin_split_sizes() -> None:
    assert len(load_dataset("digits", "calib")) == 1397
    assert len(load_dataset("digits", "test")) == 400
    assert len(load_dataset("fashion-mnist", "test")) == 10_000
    assert len(load_dataset("mnist", "test")) == 10_000


def test_builtin_mean_is_near_zero() -> None:
    # The per-dataset constants are the real statistics for MNIST and Fashion-MNIST.
    for name in ("mnist", "fashion-mnist"):
        x = load_dataset(name, "test", n=2000).x
        assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.05


def test_subset_is_deterministic() -> None:
    a = load_dataset("fashion-mnist", "test", n=64, seed=3)
    b = load_dataset("fashion-mnist", "test", n=64, seed=3)
    c = load_dataset("fashion-mnist", "test", n=64, seed=4)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, c.x)


def test_returned_tensors_do_not_alias_cache() -> None:
    a = load_dataset("digits", "test")
    a.x.zero_()
    assert float(load_dataset("digits", "test").x.abs().sum()) > 0


def test_npz_with_labels(tmp_path: Path) -> None:
    x = np.random.default_rng(0).integers(0, 256, (10, 3, 4, 5), dtype=np.uint8)
    y = np.arange(10, dtype=np.int32)
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=y)
    d = load_dataset(str(path), n=4, seed=1, input_shape=(3, 4, 5))
    assert d.x.shape == (4, 3, 4, 5) and d.x.dtype == torch.float32
    assert d.y is not None and d.y.dtype == torch.int64
    # uint8 is scaled to [0, 1]; the labels still point at their own samples.
    for xi, yi in zip(d.x, d.y):
        assert torch.allclose(xi, torch.from_numpy(x[int(yi)]).float() / 255)


def test_npy_float_without_labels(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((6, 1, 3, 3)).astype(np.float64)
    path = tmp_path / "d.npy"
    np.save(path, x)
    d = load_dataset(str(path))
    assert d.y is None and d.x.dtype == torch.float32
    assert torch.allclose(d.x, torch.from_numpy(x).float())


def test_nan_rejected_with_count(tmp_path: Path) -> None:
    x = np.zeros((4, 1, 2, 2), dtype=np.float32)
    x[0, 0, 0, 0] = np.nan
    x[2, 0, 1, 1] = np.inf
    path = tmp_path / "bad.npy"
    np.save(path, x)
    with pytest.raises(DataError, match=r"bad\.npy.* 2 NaN/Inf"):
        load_dataset(str(path))


def test_object_array_rejected(tmp_path: Path) -> None:
    path = tmp_path / "obj.npy"
    np.save(path, np.array([None, {"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="object array"):
        load_dataset(str(path))


def test_wrong_rank_and_missing_x(tmp_path: Path) -> None:
    np.save(tmp_path / "r3.npy", np.zeros((4, 28, 28), dtype=np.float32))
    with pytest.raises(DataError, match="rank 4"):
        load_dataset(str(tmp_path / "r3.npy"))
    np.savez(tmp_path / "nox.npz", images=np.zeros((1, 1, 2, 2)))
    with pytest.raises(DataError, match="no array 'x'"):
        load_dataset(str(tmp_path / "nox.npz"))


def test_shape_mismatch_message() -> None:
    with pytest.raises(DataError) as e:
        load_dataset("mnist", "test", n=8, input_shape=(3, 32, 32))
    assert str(e.value) == "data shape (1, 28, 28) does not fit the model input (3, 32, 32)"


def _png(path: Path, value: int, size: tuple[int, int] = (12, 10), mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = (value, value, value) if mode == "RGB" else value
    Image.new(mode, size, colour).save(path)


def test_folder_with_class_subfolders(tmp_path: Path) -> None:
    # Sorted sub-folder names give the labels: cat → 0, dog → 1.
    _png(tmp_path / "dog" / "a.png", 200)
    _png(tmp_path / "dog" / "b.PNG", 200)
    _png(tmp_path / "cat" / "a.png", 50, mode="L")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    d = load_dataset(str(tmp_path), input_shape=(1, 8, 6))
    assert d.x.shape == (3, 1, 8, 6) and d.x.dtype == torch.float32
    assert d.y is not None and d.y.tolist() == [0, 1, 1]
    assert torch.allclose(d.x[0], torch.full((1, 8, 6), 50 / 255))
    assert torch.allclose(d.x[2], torch.full((1, 8, 6), 200 / 255))

    rgb = load_dataset(str(tmp_path), input_shape=(3, 8, 6), n=2, seed=0)
    assert rgb.x.shape == (2, 3, 8, 6)


def test_flat_folder_with_normalize_json(tmp_path: Path) -> None:
    _png(tmp_path / "x.png", 255)
    _png(tmp_path / "y.jpg", 0)
    (tmp_path / "normalize.json").write_text(json.dumps({"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}))
    d = load_dataset(str(tmp_path), input_shape=(3, 4, 4))
    assert d.y is None and d.x.shape == (2, 3, 4, 4)
    assert float(d.x.max()) == pytest.approx(1.0) and float(d.x.min()) == pytest.approx(-1.0, abs=0.02)


def test_folder_needs_input_shape(tmp_path: Path) -> None:
    _png(tmp_path / "x.png", 10)
    with pytest.raises(DataError, match="input shape"):
        load_dataset(str(tmp_path))


def test_unknown_spec_lists_builtins() -> None:
    with pytest.raises(DataError) as e:
        load_dataset("no-such-dataset")
    msg = str(e.value)
    assert "\n" not in msg and "no-such-dataset" in msg
    assert all(name in msg for name in BUILTIN)


def test_bad_split_and_n() -> None:
    with pytest.raises(DataError, match="split"):
        load_dataset("digits", "train")
    with pytest.raises(DataError, match="positive"):
        load_dataset("digits", n=0)
