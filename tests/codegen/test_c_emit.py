"""The portable C99 backend: bit-exact against the NumPy reference, nothing TVM inside."""
import copy
import subprocess

import numpy as np
import pytest

from codegen.c.emit import CFLAGS, INCLUDE_DIRS, KERNELS, build_shared, emit_c, run_shared
from relay_passes import reference
from tests.compile_helpers import calibrated, scramble_groups, torchvision_w2
from waps_tvm.compiler import lower_artifact


def _check(art, batch, tmp_path, seed=0):
    prog = lower_artifact(art, batch, "split").program
    x = np.random.default_rng(seed).normal(size=(batch, *art.graph.input.attrs["shape"])).astype("float32")
    lib = build_shared(prog, tmp_path / "model.so")
    deq, codes = run_shared(lib, prog, x)
    ref = reference.run(prog, x)
    np.testing.assert_array_equal(codes, ref[1])
    np.testing.assert_array_equal(deq, ref[0])
    return prog


def test_tiny_resnet_bit_exact(tiny_artifact, tmp_path):
    prog = _check(tiny_artifact, 3, tmp_path)
    kinds = {o.kind for o in prog.ops}
    assert {"gather", "sum_pool2d", "add", "conv2d", "linear"} <= kinds     # every kernel ran


def test_generated_c_is_plain_c99_without_tvm(tiny_artifact, tmp_path):
    prog = lower_artifact(tiny_artifact, 1, "split").program
    src = emit_c(prog)
    for text in (src, KERNELS.read_text()):
        includes = [ln for ln in text.splitlines() if ln.startswith("#include")]
        assert all(i.split()[1] in ('"waps_kernels.h"', '"waps_numeric.h"', "<math.h>", "<stdint.h>", "<string.h>") for i in includes)
        assert not any(tok in text for tok in ("TVMFFI", "TVMValue", "tvm_", "DLTensor", "dlpack"))
    (tmp_path / "m.c").write_text(src)
    r = subprocess.run(["gcc", *CFLAGS, "-pedantic", "-Werror", *(f"-I{d}" for d in INCLUDE_DIRS), str(tmp_path / "m.c"),
                        "-o", str(tmp_path / "m.so"), "-lm"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_tile_groups_and_other_seeds(tiny_artifact, tmp_path):
    _check(scramble_groups(copy.deepcopy(tiny_artifact), seed=11, tile=16), 2, tmp_path, seed=4)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2", "regnet_x_600mf", "mnasnet0_5"])
def test_torchvision_bit_exact(arch, tmp_path):
    art = scramble_groups(torchvision_w2(arch), seed=5, tile=16)
    _check(art, 2, tmp_path)
