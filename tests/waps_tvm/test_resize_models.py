"""F.interpolate / nn.Upsample end to end: torch's source indices, capture to the graph ops,
calibrate → lower_artifact → the NumPy reference, within 1 code of the fake-quant model at
every quantization point, and the nearest resize exactly equal to it (a gather of codes)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from relay_passes import reference
from relay_passes.resize import linear_axis, resize_tables
from waps_tvm.compiler import lower_artifact
from waps_tvm.oracle import layer_agreement, to_codes


class NearestNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.b(F.interpolate(torch.relu(self.a(x)), scale_factor=2, mode="nearest"))


class BilinearNet(nn.Module):
    def __init__(self, align_corners: bool):
        super().__init__()
        self.align_corners = align_corners
        self.a, self.b = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        y = F.interpolate(self.a(x), size=(7, 9), mode="bilinear", align_corners=self.align_corners)
        return self.b(y)


def test_source_tables_follow_torch():
    """Nearest picks torch's elements exactly; bilinear with fine weights is torch's float result."""
    rng = np.random.default_rng(0)
    for trial in range(120):
        h, w = (int(v) for v in rng.integers(2, 12, 2))
        mode = ("nearest", "bilinear")[trial % 2]
        ac = bool(rng.integers(0, 2)) if mode == "bilinear" else None
        x = torch.from_numpy(rng.normal(size=(1, 1, h, w)).astype(np.float32))
        if trial % 4 < 2:
            sf = float(rng.choice([0.5, 0.6, 1.5, 1.7, 2.0, 2.5, 3.0, 1 / 3]))
            y, scales = F.interpolate(x, scale_factor=sf, mode=mode, align_corners=ac), (sf, sf)
        else:
            size = tuple(int(v) for v in rng.integers(1, 14, 2))
            y, scales = F.interpolate(x, size=size, mode=mode, align_corners=ac), None
        out = tuple(y.shape[2:])
        xn, want = x.numpy()[0, 0].astype(np.float64), y.numpy()[0, 0]
        if mode == "nearest":
            r, c = resize_tables((h, w), out, mode, False, scales)
            np.testing.assert_array_equal(xn[r.i0][:, c.i0].astype(np.float32), want)
            continue
        r, c = (linear_axis(n, o, ac, s, frac=30)
                for n, o, s in zip((h, w), out, scales or (None, None)))
        ly, lx = r.lam()[:, None], c.lam()[None, :]
        got = ((1 - ly) * ((1 - lx) * xn[r.i0][:, c.i0] + lx * xn[r.i0][:, c.i1])
               + ly * ((1 - lx) * xn[r.i1][:, c.i0] + lx * xn[r.i1][:, c.i1]))
        np.testing.assert_allclose(got, want, atol=1e-5)


def _through_the_compiler(model, mode, bits=4):
    """calibrate → .waps file (its graph checks) → lower_artifact → reference and the oracle."""
    import tempfile
    from pathlib import Path
    from calib.artifact import load, save
    from tests.compile_helpers import calibrated
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        art = load(save(calibrated(model, (1, 6, 5), wbits=bits, abits=bits, iters=1, samples=8), Path(d) / "m.waps"))
    ops = [n.op for n in art.graph]
    assert f"upsample_{mode}2d" in ops, ops
    x = np.random.default_rng(1).normal(size=(8, 1, 6, 5)).astype("float32")
    lowered = lower_artifact(art, 8, "split")
    kinds = [o.kind for o in lowered.program.ops]
    assert "resize" in kinds, kinds
    out = reference.run(lowered.program, x)
    assert out[1].shape[0] == 8
    rows = layer_agreement(art, x)
    assert len(rows) >= 2 and all(r.max_diff <= 1 for r in rows), rows
    return art, x, rows


def test_upsampling_model_runs_bit_exact_on_every_backend():
    """Nearest then bilinear inside one model: the fast llvm form (NHWC convs around the NCHW
    resize), C and npu16 (resize on the NPU) equal the reference."""
    from tests.compile_helpers import assert_bit_exact_on_backends, calibrated

    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)

        def forward(self, x):
            y = F.interpolate(torch.relu(self.a(x)), scale_factor=1.5, mode="nearest")
            return self.b(F.interpolate(y, scale_factor=0.7, mode="bilinear", align_corners=True))

    torch.manual_seed(0)
    art = calibrated(Both(), (1, 6, 5), wbits=4, abits=4, iters=1, samples=8)
    x = np.random.default_rng(2).normal(size=(1, 1, 6, 5)).astype("float32")
    assert_bit_exact_on_backends(art, x, npu_kinds=("resize",))


def test_nearest_upsample_compiles_and_is_a_gather_of_the_fake_quant_codes():
    from calib.fakequant import build_fake_quant
    from waps_tvm.frontend import build_program
    art, x, _ = _through_the_compiler(NearestNet(), "nearest")
    node = next(n for n in art.graph if n.op == "upsample_nearest2d")
    program, values = build_program(art, len(x))
    model = build_fake_quant(art)
    g = art.graph
    with torch.no_grad():
        env = {g.input.name: model.input_quant(torch.from_numpy(x))}
        model.run([n.name for n in g if n.op != "input"], env)
    src = node.inputs[0]
    op = program[values[node.name].name]
    assert op.attrs.mode == "nearest" and values[node.name].codes == values[src].codes
    got = reference.OPS["resize"](op, to_codes(env[src], values[src].codes).astype(np.uint8))
    np.testing.assert_array_equal(got, to_codes(env[node.name], values[node.name].codes))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("align_corners", [False, True])
def test_bilinear_resize_within_one_code_of_fake_quant(align_corners, bits):
    """At A8 the 2^-10 weights do move some codes by one (about 1 %), never by two."""
    art, _, rows = _through_the_compiler(BilinearNet(align_corners), "bilinear", bits)
    assert "upsample_bilinear2d" in {r.kind for r in rows}
    node = next(n for n in art.graph if n.op == "upsample_bilinear2d")
    assert node.attrs["align_corners"] is align_corners and node.attrs["size"] == [7, 9]
