import copy
import json
import zipfile

import numpy as np
import pytest
import torch

from calib import artifact
from calib.artifact import FORMAT, VERSION
from calib.calibrate import calibrate
from calib.capture import capture, export_module
from calib.config import CalibConfig
from calib.errors import ArtifactError
from calib.export import to_artifact
from calib.fakequant import build_fake_quant
from calib.fold_bn import fold_batch_norm
from calib.fuse import fuse_activations


@pytest.fixture(scope="module")
def calibrated():
    from tests.conftest import TinyResNet, randomize_bn
    torch.manual_seed(0)
    net = randomize_bn(TinyResNet())
    g = fuse_activations(fold_batch_norm(capture(export_module(net, (1, 16, 16)))))
    x = torch.randn(64, 1, 16, 16)
    cfg = CalibConfig(wbits=2, abits=4, method="waps", iters=30, batch=16, tile=8, progress=False)
    result = calibrate(g, x, cfg)
    return result, to_artifact(result), x


def test_round_trip_preserves_everything(calibrated, tmp_path):
    result, art, x = calibrated
    path = artifact.save(art, tmp_path / "m.waps")
    back = artifact.load(path)
    assert back.graph.to_json() == art.graph.to_json()
    assert back.quant == art.quant
    for name, rec in art.layers.items():
        other = back.layers[name]
        for a in ("w_codes", "w_scale", "bias", "gamma_z", "phi_z"):
            np.testing.assert_array_equal(getattr(rec, a), getattr(other, a))
        assert (rec.groups is None) == (other.groups is None)
        if rec.groups is not None:
            np.testing.assert_array_equal(rec.groups, other.groups)
            assert rec.group_scales == other.group_scales
    assert not list(tmp_path.glob(".*tmp"))  # no temporary left behind


def test_waps_layers_carry_tile_granular_groups(calibrated):
    _, art, _ = calibrated
    grouped = {k: r for k, r in art.layers.items() if r.groups is not None}
    assert grouped, "no layer received product groups"
    for rec in grouped.values():
        sizes = np.bincount(rec.groups, minlength=len(rec.group_scales))
        assert sum(1 for s in sizes if s % 8) <= 1
        assert [(g.sigma, g.n) for g in rec.group_scales] == [(0, 0), (-1, 4), (1, 4)]


def test_fake_quant_model_matches_the_calibrated_model(calibrated):
    result, art, x = calibrated
    rebuilt = build_fake_quant(art)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), result.model(x), rtol=0, atol=1e-5)


def _rewrite(src, dst, edit_manifest=None, edit_member=None):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename == "manifest.json" and edit_manifest:
                m = json.loads(data)
                edit_manifest(m)
                data = json.dumps(m).encode()
            elif edit_member and item.filename.startswith("arrays/"):
                data = edit_member(item.filename, data)
            zout.writestr(item, data)


@pytest.mark.parametrize("case, expect", [
    ("truncated", "not a zip archive"),
    ("garbage", "not a zip archive"),
    ("version", f"version 99 is not supported (this build reads version {VERSION})"),
    ("format", "not a .waps artifact"),
    ("flipped", "checksum mismatch"),
    ("shape", "dtype/shape"),
    ("codes_range", "outside the 2-bit range"),
    ("dangling", "reads 'nowhere'"),
    ("missing_file", "no such artifact file"),
])
def test_corrupt_artifacts_are_rejected(calibrated, tmp_path, case, expect):
    _, art, _ = calibrated
    good = artifact.save(art, tmp_path / "good.waps")
    bad = tmp_path / "bad.waps"
    raw = good.read_bytes()
    if case == "truncated":
        bad.write_bytes(raw[: len(raw) // 2])
    elif case == "garbage":
        bad.write_bytes(b"\x00" * 100)
    elif case == "version":
        _rewrite(good, bad, lambda m: m.update(version=99))
    elif case == "format":
        _rewrite(good, bad, lambda m: m.update(format="onnx"))
    elif case == "flipped":
        _rewrite(good, bad, edit_member=lambda n, d: d[:-1] + bytes([d[-1] ^ 1]))
    elif case == "shape":
        def edit(m):
            k = next(iter(m["arrays"]))
            m["arrays"][k]["shape"] = [999]
        _rewrite(good, bad, edit)
    elif case == "codes_range":
        broken = copy.deepcopy(art)
        name = next(k for k, r in broken.layers.items() if r.wbits == 2)
        broken.layers[name].w_codes[...] = 7
        artifact.save(broken, bad)
    elif case == "dangling":
        _rewrite(good, bad, lambda m: m["graph"][-1].update(inputs=["nowhere"]))
    elif case == "missing_file":
        bad = tmp_path / "absent.waps"
    with pytest.raises(ArtifactError) as e:
        artifact.load(bad)
    assert expect in str(e.value)
    assert "\n" not in str(e.value)


def test_format_constants():
    assert FORMAT == "waps" and VERSION == 1
