"""Residual adds in the epilogue of the fast conv that feeds them (codegen/cpu_fusion.py): which
pairs fuse, and the fused build bit for bit against the NumPy reference at every fold case."""
import numpy as np
import pytest
import torch
from torch import nn

from codegen.cpu_fusion import residual_fusions
from relay_passes import fast_kernels, reference
from tests.compile_helpers import calibrated, scramble_groups


class Residuals(nn.Module):
    """Residual adds of every kind the fusion meets: a 3×3 conv as the add's second operand, a
    1×1 conv as its first, a 24-channel pair (channels not a multiple of 16: not fused), and a
    conv whose output is also read by another conv (not fused)."""

    def __init__(self):
        super().__init__()
        def cbn(c_in, c_out, k):
            return nn.Sequential(nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.BatchNorm2d(c_out))
        self.stem, self.a, self.b = cbn(3, 32, 3), cbn(32, 32, 3), cbn(32, 32, 1)
        self.c, self.d = cbn(32, 24, 1), cbn(24, 24, 1)
        self.e, self.f = cbn(24, 32, 1), cbn(32, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = torch.relu(x + self.a(x))                   # conv is operand b
        z = self.b(y) + y                               # conv is operand a
        t = self.c(z)
        u = self.d(t) + t                               # 24 channels
        g = self.e(u)
        h = g + self.f(g)                               # g: read by f too; f's output fuses
        return self.fc(h.mean((2, 3)))


@pytest.fixture(scope="module", params=[(8, 8), (4, 4)], ids=["W8A8", "W4A4"])
def artifact(request):
    """Calibrated with WAPS groups scattered in 4-channel tiles: at W4A4 they fold into one
    accumulator, at W8A8 each group keeps its own (fast_kernels.fold_groups)."""
    from tests.conftest import randomize_bn
    torch.manual_seed(0)
    wbits, abits = request.param
    return scramble_groups(calibrated(randomize_bn(Residuals()), (3, 12, 12), wbits=wbits, abits=abits),
                           seed=3, tile=4)


def _lowered(art):
    from waps_tvm.compiler import lower_artifact
    return lower_artifact(art, 2, "fast")


def test_the_pairs_that_fuse(artifact):
    low = _lowered(artifact)
    prog = low.program
    fusions = residual_fusions(prog)
    adds = [o for o in prog.ops if o.kind == "add"]
    assert len(adds) == 4
    fused_adds = {f.add for f in fusions}
    convs = {f.conv: prog[f.conv] for f in fusions}
    assert len(fusions) == 3 and all(c.params["w"].shape[0] == 32 for c in convs.values())
    assert {f.conv_operand for f in fusions} == {0, 1}
    not_fused = [a for a in adds if a.name not in fused_adds]
    assert len(not_fused) == 1 and prog.shape_of(not_fused[0].name)[1] == 24
    users = prog.consumers()
    assert all(len(users[c]) == 1 for c in convs)
    # both epilogue merges are exercised: folded groups at W4A4, one accumulator per group at W8A8
    folds = {(fast_kernels.fold_groups(c) or ("none",))[0] for c in convs.values()}
    assert all(c.n_groups > 1 for c in convs.values())
    assert folds == ({"none"} if convs[fusions[0].conv].attrs.in_qmax == 255 else {"x"})


def test_fused_build_equals_the_reference_and_the_unfused_build(artifact):
    import tvm
    from tvm import relax

    from waps_tvm.compiler import build
    x = np.random.default_rng(5).normal(size=(2, 3, 12, 12)).astype("float32")
    outs = {}
    for fuse in (False, True):
        low = _lowered(artifact)
        vm = relax.VirtualMachine(build(low, "llvm", fuse=("residual-adds",) if fuse else ()), tvm.cpu())
        outs[fuse] = [o.numpy() for o in vm["main"](tvm.runtime.tensor(x))]
        assert len(low.fusions) == (3 if fuse else 0)
        names = {gv.name_hint for gv in low.final.functions}
        assert sum(n.endswith("_add_kernel") for n in names) == len(low.fusions)
        # the fused pairs' own kernels are gone from what is built
        assert not any(f"{f.add}_kernel" in names or f"{f.conv}_kernel" in names for f in low.fusions)
    ref = reference.run(low.program, x)
    for fuse in (False, True):
        np.testing.assert_array_equal(outs[fuse][1], ref[1])
        np.testing.assert_array_equal(outs[fuse][0], ref[0])


def test_compile_flag_fuses_and_runs_like_the_unfused_build(tiny_artifact, tmp_path, capsys):
    """``waps-tvm compile --fuse-residual-adds``: meta.json names the pair fused (TinyResNet's
    a1 + down; its depthwise residual stays unfused) and the library's codes equal the unfused
    library's; the flag is refused for targets it does not apply to, as a usage error."""
    from calib import artifact as waps_artifact
    from waps_tvm import cli, runner
    path = waps_artifact.save(tiny_artifact, tmp_path / "tiny.waps")
    for name, extra in (("plain", []), ("fused", ["--fuse-residual-adds"])):
        assert cli.main(["compile", str(path), "--target", "llvm", "-o", str(tmp_path / name), "-q", *extra]) == 0
    meta = {n: __import__("json").loads((tmp_path / n / "meta.json").read_text()) for n in ("plain", "fused")}
    assert meta["plain"]["waps"]["fused_residual_adds"] == []
    assert len(meta["fused"]["waps"]["fused_residual_adds"]) == 1
    x = np.random.default_rng(2).normal(size=(3, 1, 16, 16)).astype("float32")
    plain, fused = (runner.load(tmp_path / n)(x) for n in ("plain", "fused"))
    np.testing.assert_array_equal(plain[1], fused[1])
    capsys.readouterr()
    assert cli.main(["compile", str(path), "--target", "c", "-o", str(tmp_path / "c"), "--fuse-residual-adds"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--fuse" in err[0] and not (tmp_path / "c").exists()


# ---------------------------------------------------------------- expansion + depthwise

@pytest.fixture(scope="module", params=[(8, 8), (4, 4)], ids=["W8A8", "W4A4"])
def inverted(request):
    """At W4A4 the expansions' groups fold into one accumulator, at W8A8 each keeps its own."""
    from tests.conftest import TinyMobileNet, randomize_bn
    torch.manual_seed(0)
    wbits, abits = request.param
    return scramble_groups(calibrated(randomize_bn(TinyMobileNet()), (3, 14, 14), wbits=wbits, abits=abits),
                           seed=3, tile=4)


def test_the_expand_depthwise_pairs_that_fuse(inverted):
    from codegen.cpu_fusion import depthwise_fusions
    prog = _lowered(inverted).program
    fusions = depthwise_fusions(prog)
    dws = [o for o in prog.ops if o.kind == "conv2d" and o.attrs.conv_groups > 1]
    assert len(dws) == 5 and len(fusions) == 4
    assert {f.depthwise for f in fusions} == {o.name for o in dws if o.params["w"].shape[0] != 40}
    kernels = {prog[f.depthwise].params["w"].shape[2] for f in fusions}
    strides = {tuple(prog[f.depthwise].attrs.stride) for f in fusions}
    assert kernels == {3, 5} and strides == {(1, 1), (2, 2)}
    assert any(tuple(prog[f.depthwise].attrs.dilation) == (2, 2) for f in fusions)


def _splits(kind):
    """An expand_tasks replacement that forces one kind of split: the most bands (halo rows
    expanded twice), the most channel chunks, or both."""
    def choose(n, oh, w, m, lanes, rows_for, threads, budget=fast_kernels.CACHE_BUDGET):
        unit = max(lanes, 16)
        bands = [b for b in range(1, oh + 1) if oh % b == 0]
        chunks = [q for q in range(1, m // unit + 1) if m % (q * unit) == 0]
        return {"bands": fast_kernels.Tasks(bands[-1], 1), "chunks": fast_kernels.Tasks(1, chunks[-1]),
                "both": fast_kernels.Tasks(bands[len(bands) // 2], chunks[-1])}[kind]
    return choose


@pytest.mark.parametrize("split", ["default", "bands", "chunks", "both"])
def test_expand_depthwise_equals_the_reference_for_every_split(inverted, split, monkeypatch):
    import tvm
    from tvm import relax

    from waps_tvm.compiler import build
    if split != "default":
        monkeypatch.setattr(fast_kernels, "expand_tasks", _splits(split))
    x = np.random.default_rng(5).normal(size=(2, 3, 14, 14)).astype("float32")
    low = _lowered(inverted)
    vm = relax.VirtualMachine(build(low, "llvm", fuse=("expand-depthwise",)), tvm.cpu())
    out = [o.numpy() for o in vm["main"](tvm.runtime.tensor(x))]
    assert len(low.fusions) == 4
    names = {gv.name_hint for gv in low.final.functions}
    assert sum(n.endswith("_kernel") and "__" in n for n in names) == 4
    assert not any(f"{f.conv}_kernel" in names or f"{f.depthwise}_kernel" in names for f in low.fusions)
    ref = reference.run(low.program, x)
    np.testing.assert_array_equal(out[1], ref[1])
    np.testing.assert_array_equal(out[0], ref[0])


def test_expand_tasks_fits_the_cache_and_balances_the_threads():
    tasks = fast_kernels.expand_tasks
    def rows(s, k=3):
        return lambda r: (r - 1) * s + k
    # a large map: bands whose expanded rows fit the budget, a whole multiple of the threads
    t = tasks(1, 112, 112, 96, 32, rows(1), 2)
    assert 112 % t.bands == 0 and 96 % (32 * t.chunks) == 0
    assert rows(1)(112 // t.bands) * 112 * (96 // t.chunks) <= fast_kernels.CACHE_BUDGET
    assert (t.bands * t.chunks) % 2 == 0
    # a small map fits whole: the threads split its channels, no row is expanded twice
    t = tasks(1, 7, 7, 960, 32, rows(1), 2)
    assert t.bands == 1 and t.chunks % 2 == 0
    assert tasks(1, 14, 14, 128, 16, rows(1), 1) == fast_kernels.Tasks(1, 1)
    # nothing fits: the smallest working set
    t = tasks(1, 8, 4096, 64, 16, rows(1), 1, budget=1)
    assert t == fast_kernels.Tasks(8, 4)


def test_compile_flag_fuse_takes_both_kinds(inverted, tmp_path, capsys):
    """``waps-tvm compile --fuse residual-adds,expand-depthwise``: meta.json names the pairs and
    the library's codes equal the unfused library's; an unknown kind is a usage error."""
    import json

    from calib import artifact as waps_artifact
    from waps_tvm import cli, runner
    path = waps_artifact.save(inverted, tmp_path / "inv.waps")
    for name, extra in (("plain", []), ("fused", ["--fuse", "expand-depthwise,residual-adds"])):
        assert cli.main(["compile", str(path), "--target", "llvm", "-o", str(tmp_path / name), "-q", *extra]) == 0
    meta = json.loads((tmp_path / "fused" / "meta.json").read_text())
    assert len(meta["waps"]["fused_expand_depthwise"]) == 4 and len(meta["waps"]["fused_residual_adds"]) == 1
    x = np.random.default_rng(2).normal(size=(1, 3, 14, 14)).astype("float32")
    plain, fused = (runner.load(tmp_path / n)(x) for n in ("plain", "fused"))
    np.testing.assert_array_equal(plain[1], fused[1])
    capsys.readouterr()
    assert cli.main(["compile", str(path), "-o", str(tmp_path / "bad"), "--fuse", "expand-everything"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "expand-everything" in err[0] and not (tmp_path / "bad").exists()
