"""--target c: every integer op offloaded to C99 through BYOC, inside the exported module."""

import numpy as np
import pytest

from calib import artifact
from relay_passes import reference
from tests.compile_helpers import run_in_fresh_process
from waps_tvm import cli
from waps_tvm.compiler import lower_artifact


def test_offload_replaces_every_op_by_a_c_entry(tiny_artifact):
    from codegen.c.byoc import offload
    mod = offload(lower_artifact(tiny_artifact, 1).module)
    calls = [b.value for blk in mod["main"].body.blocks for b in blk.bindings
             if hasattr(b.value, "op") and getattr(b.value.op, "name", "") == "relax.call_dps_packed"]
    n_ops = len(lower_artifact(tiny_artifact, 1).program.ops)
    assert len(calls) == n_ops
    assert not [gv for gv, f in mod.functions.items() if f.attrs is not None and "waps.kind" in f.attrs]


def test_compile_c_target_runs_bit_exact_in_a_fresh_process(tiny_artifact, tmp_path):
    path = artifact.save(tiny_artifact, tmp_path / "t.waps")
    assert cli.main(["compile", str(path), "--target", "c", "-o", str(tmp_path / "out"), "--batch", "2"]) == 0
    x = np.random.default_rng(9).normal(size=(2, 1, 16, 16)).astype("float32")
    codes = run_in_fresh_process(tmp_path / "out", x, tmp_path)
    ref = reference.run(lower_artifact(tiny_artifact, 2).program, x)
    np.testing.assert_array_equal(codes, ref[1])


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_torchvision_c_target_bit_exact(arch, tmp_path):
    import tvm

    from tests.compile_helpers import scramble_groups, torchvision_w2
    from waps_tvm.compiler import build
    art = scramble_groups(torchvision_w2(arch), seed=2, tile=16)
    lowered = lower_artifact(art, 2)
    x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype("float32")
    vm = tvm.runtime.vm.VirtualMachine(build(lowered, "c"), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x))
    ref = reference.run(lowered.program, x)
    np.testing.assert_array_equal(out[1].numpy(), ref[1])
    np.testing.assert_array_equal(out[0].numpy(), ref[0])
