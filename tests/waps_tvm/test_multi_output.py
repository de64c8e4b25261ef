"""Models that return several tensors (a feature pyramid returns one per level): captured,
calibrated, stored, compiled and run with every output, bit-exact on every backend, and
written by ``waps-tvm run`` as an .npz with one array per output."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from calib import artifact
from calib.errors import ModelError
from tests.compile_helpers import assert_bit_exact_on_backends, calibrated
from tests.conftest import randomize_bn
from waps_tvm.oracle import layer_agreement


class TinyPyramid(nn.Module):
    """A two-stage body and an FPN head in the manner of torchvision's: 1×1 laterals, nearest
    top-down upsampling and adds, 3×3 output convs and a max-pooled extra level; returns a dict
    of four levels (torch.export flattens it in key order)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.c3 = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.c4 = nn.Sequential(nn.Conv2d(16, 24, 3, 2, 1), nn.BatchNorm2d(24), nn.ReLU())
        self.lat = nn.ModuleList([nn.Conv2d(c, 12, 1) for c in (8, 16, 24)])
        self.out = nn.ModuleList([nn.Conv2d(12, 12, 3, 1, 1) for _ in range(3)])

    def forward(self, x):
        feats = [self.stem(x)]
        feats.append(self.c3(feats[-1]))
        feats.append(self.c4(feats[-1]))
        inner = self.lat[2](feats[2])
        levels = [self.out[2](inner)]
        for i in (1, 0):
            lateral = self.lat[i](feats[i])
            inner = lateral + F.interpolate(inner, size=lateral.shape[-2:], mode="nearest")
            levels.insert(0, self.out[i](inner))
        return {"p2": levels[0], "p3": levels[1], "p4": levels[2], "pool": F.max_pool2d(levels[2], 1, 2, 0)}


@pytest.fixture(scope="module")
def pyramid():
    torch.manual_seed(0)
    return calibrated(randomize_bn(TinyPyramid().eval()), (3, 32, 32), wbits=4, abits=4, iters=2, samples=8)


def test_every_output_is_captured_calibrated_and_stored(pyramid, tmp_path):
    g = pyramid.graph
    assert [g[o].shape for o in g.outputs] == [(12, 16, 16), (12, 8, 8), (12, 4, 4), (12, 2, 2)]
    assert g.labels == ("p2", "p3", "p4", "pool")                     # the model's dict keys
    with pytest.raises(ModelError, match="returns 4 tensors"):
        g.output
    artifact.save(pyramid, tmp_path / "p.waps")
    loaded = artifact.load(tmp_path / "p.waps").graph
    assert (loaded.outputs, loaded.labels) == (g.outputs, g.labels)
    from calib.fakequant import build_fake_quant
    outs = build_fake_quant(pyramid)(torch.zeros(2, 3, 32, 32))
    assert isinstance(outs, tuple) and [tuple(o.shape) for o in outs] == [(2, *g[o].shape) for o in g.outputs]


def _exact_everywhere_and_near_fake_quant(art, batch: int) -> None:
    """Every output bit-exact on every backend; every quantization point within one code of fake-quant."""
    x = np.random.default_rng(0).normal(size=(batch, 3, 32, 32)).astype("float32")
    assert_bit_exact_on_backends(art, x)
    rows = layer_agreement(art, x)
    assert rows and max(r.max_diff for r in rows) <= 1


def test_every_output_bit_exact_on_every_backend_and_near_fake_quant(pyramid):
    _exact_everywhere_and_near_fake_quant(pyramid, 2)


def test_standalone_c_unit_returns_every_output(pyramid, tmp_path):
    """The C unit (no TVM inside) writes one dequantized array and one codes array per output,
    equal to the reference's."""
    from codegen.c.emit import build_shared, emit_c, run_shared
    from relay_passes import reference
    from waps_tvm.compiler import lower_artifact
    prog = lower_artifact(pyramid, 2, "split").program
    assert "#define WAPS_MODEL_OUTPUTS 4" in emit_c(prog)
    x = np.random.default_rng(1).normal(size=(2, 3, 32, 32)).astype("float32")
    got = run_shared(build_shared(prog, tmp_path / "pyramid.so"), prog, x)
    want = reference.run(prog, x)
    assert len(got) == len(want) == 8
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


@pytest.mark.slow
def test_compile_and_run_write_one_array_per_output(pyramid, tmp_path):
    artifact.save(pyramid, tmp_path / "p.waps")
    x = np.random.default_rng(1).normal(size=(3, 3, 32, 32)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    cli = [sys.executable, "-m", "waps_tvm.cli"]
    r = subprocess.run([*cli, "compile", str(tmp_path / "p.waps"), "-o", str(tmp_path / "out"), "--target", "npu16"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    names = [res["name"] for res in meta["results"]]
    assert names == ["p2", "p3", "p4", "pool"] and meta["outputs"] == ["dequantized", "codes"] * 4
    run = [*cli, "run", str(tmp_path / "out"), "--input", str(tmp_path / "x.npy")]
    r = subprocess.run(run, capture_output=True, text=True)                 # several outputs need an .npz
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--output F.npz" in r.stderr
    r = subprocess.run([*run, "--codes", "--output", str(tmp_path / "y.npz")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = np.load(tmp_path / "y.npz")
    from relay_passes import reference
    from waps_tvm.frontend import to_program
    want = reference.run(to_program(pyramid, 3), x)[1::2]
    assert list(got.files) == names
    for name, w in zip(names, want):
        np.testing.assert_array_equal(got[name], w)


@pytest.mark.slow
def test_faster_rcnn_fpn_backbone_five_outputs_bit_exact():
    """torchvision's Faster R-CNN ResNet-50 FPN backbone (random weights, so BatchNorm2d as
    torchvision builds it untrained): ResNet body, 1×1 laterals, nearest top-down upsampling,
    3×3 output convs and the max-pooled extra level, as one integer program with five outputs."""
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                                                 num_classes=2).backbone
    art = calibrated(randomize_bn(model.eval()), (3, 32, 32), wbits=4, abits=4, iters=1, samples=2)
    g = art.graph
    assert [g[o].shape for o in g.outputs] == [(256, 8, 8), (256, 4, 4), (256, 2, 2), (256, 1, 1), (256, 1, 1)]
    assert g.labels == ("0", "1", "2", "3", "pool")
    _exact_everywhere_and_near_fake_quant(art, 1)


@pytest.mark.slow
def test_emulated_aarch64_run_writes_every_output(pyramid, tmp_path):
    """--target aarch64 under qemu (scripts/aarch64-emulation.sh): every output, named, equal to
    the reference's."""
    from targets import cpu
    from tests.emulation_helpers import require
    from waps_tvm import cli, emulation
    require(lambda: cpu.export_cc("aarch64"))
    require(emulation.python)
    waps = artifact.save(pyramid, tmp_path / "p.waps")
    assert cli.main(["compile", str(waps), "--target", "aarch64", "-o", str(tmp_path / "a64")]) == 0
    x = np.random.default_rng(2).normal(size=(2, 3, 32, 32)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    assert cli.main(["run", str(tmp_path / "a64"), "--input", str(tmp_path / "x.npy"), "--emulate",
                     "--output", str(tmp_path / "y.npz")]) == 0
    from relay_passes import reference
    from waps_tvm.frontend import to_program
    want = reference.run(to_program(pyramid, 2), x)[0::2]                  # dequantized of each output
    got = np.load(tmp_path / "y.npz")
    assert list(got.files) == ["p2", "p3", "p4", "pool"]
    for name, w in zip(got.files, want):
        assert got[name].tobytes() == w.tobytes(), name
