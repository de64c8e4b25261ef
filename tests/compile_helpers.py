"""Small calibrated artifacts for compiler tests (random weights, a few iterations)."""
from __future__ import annotations

import numpy as np
import torch

from calib.config import CalibConfig
from codegen.npu16.lower import HOST_KINDS                            # what npu16 leaves on the host


def calibrated(model: torch.nn.Module, input_shape, wbits=4, abits=4, iters=2, samples=16, seed=0, gammas=None,
               **options):
    """``model`` calibrated (waps) on random data; ``options``: further CalibConfig fields."""
    from waps_tvm import api
    g = torch.Generator().manual_seed(seed)
    data = torch.randn((samples, *input_shape), generator=g)
    cfg = CalibConfig(wbits=wbits, abits=abits, method="waps", iters=iters, batch=min(8, samples),
                      samples=samples, seed=seed, progress=False, **({"gammas": tuple(gammas)} if gammas else {}),
                      **options)
    _, art = api.quantize(model.eval(), data, cfg)
    return art


_TORCHVISION_W2: dict = {}


def torchvision_w2(arch: str):
    """A torchvision architecture (seed 0, random weights and BN statistics, 10 classes)
    calibrated W2A4 at 32×32 with ``calibrated``'s defaults. Calibrated once per test
    process, since several backends' tests take the same models; each call gets its own copy."""
    import copy
    if arch not in _TORCHVISION_W2:
        from tests.conftest import randomize_bn
        from waps_tvm.architectures import get_architecture
        torch.manual_seed(0)
        _TORCHVISION_W2[arch] = calibrated(randomize_bn(get_architecture(arch, 10)), (3, 32, 32), wbits=2, abits=4)
    return copy.deepcopy(_TORCHVISION_W2[arch])


def scramble_groups(art, seed=0, tile=None):
    """Give every WAPS layer a random group assignment (tile-granular runs when ``tile``),
    scattered over its channels: exercises permutation, gathers and every group path."""
    rng = np.random.default_rng(seed)
    for rec in art.layers.values():
        if rec.groups is None:
            continue
        c = rec.groups.size
        g = len(rec.group_scales)
        if tile:
            labels = np.repeat(rng.integers(0, g, size=-(-c // tile)), tile)[:c]
        else:
            labels = rng.integers(0, g, size=c)
        rec.groups = rng.permutation(labels).astype(np.int8)
    return art


def compile_c_wrapper(source: str, folder):
    """``source`` (C99, -Wall -Werror -pedantic) built by gcc as a shared library in ``folder``
    and loaded with ctypes. ctypes caches a library by path, so give each build its own folder."""
    import ctypes
    import subprocess
    from pathlib import Path
    d = Path(folder)
    (d / "t.c").write_text(source)
    r = subprocess.run(["gcc", "-std=c99", "-O2", "-Wall", "-Werror", "-pedantic", "-fPIC", "-shared",
                        str(d / "t.c"), "-o", str(d / "t.so")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return ctypes.CDLL(str(d / "t.so"))


BACKENDS = (("fast", "llvm"), ("split", "c"), ("split", "npu16"))   # (form, target) a model test runs


def assert_bit_exact_on_backends(art, x: np.ndarray, npu_kinds: tuple[str, ...] | None = None) -> None:
    """``art`` lowered for batch len(``x``) in each (form, target) of BACKENDS and run by the TVM
    VM: both outputs equal the NumPy reference's. On npu16 every op but HOST_KINDS (or, given
    ``npu_kinds``, every op of those kinds, at least one) is placed on the NPU."""
    import tvm

    from relay_passes import reference
    from waps_tvm.compiler import build, lower_artifact
    for form, target in BACKENDS:
        lowered = lower_artifact(art, len(x), form)
        out = tvm.runtime.vm.VirtualMachine(build(lowered, target), tvm.cpu())["main"](tvm.runtime.tensor(x))
        ref = reference.run(lowered.program, x)
        assert len(out) == len(ref) == 2 * len(art.graph.outputs)      # (dequantized, codes) per output
        for i in range(len(ref)):
            np.testing.assert_array_equal(out[i].numpy(), ref[i], err_msg=f"{form} {target} output {i}")
        if target == "npu16":
            checked = [r for r in lowered.placement
                       if (r["kind"] in npu_kinds if npu_kinds else r["kind"] not in HOST_KINDS)]
            # an op stays on the host only when even its smallest stripe does not fit the default
            # SRAM (targets/npu16/memory.py: e.g. one output tile of a 3×3 conv over 1024 channels)
            on_npu = [r for r in checked if r["target"] == "npu16"]
            assert on_npu and all(r in on_npu or "SRAM" in r["reason"] for r in checked), \
                [(r["op"], r["reason"]) for r in checked if r not in on_npu]


def run_in_fresh_process(folder, x: np.ndarray, tmp) -> np.ndarray:
    """Run a compiled folder in a new Python process where torch cannot be imported (the
    runner needs only NumPy and the TVM runtime); returns the output codes."""
    import subprocess
    import sys
    from pathlib import Path
    tmp = Path(tmp)
    np.save(tmp / "fresh_x.npy", x)
    code = ("import sys\nsys.modules['torch'] = None\nimport numpy as np\nfrom waps_tvm import runner\n"
            f"m = runner.load({str(folder)!r})\n"
            f"np.save({str(tmp / 'fresh_codes.npy')!r}, m(np.load({str(tmp / 'fresh_x.npy')!r}))[1])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return np.load(tmp / "fresh_codes.npy")


def rewrite_archive(src, dst, version=None, drop=()):
    """Copy the .waps ZIP ``src`` to ``dst`` with the manifest's version replaced and the
    members in ``drop`` left out (for loader error tests)."""
    import json
    import zipfile
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.namelist():
            if item in drop:
                continue
            data = zin.read(item)
            if item == "manifest.json" and version is not None:
                data = json.dumps({**json.loads(data), "version": version}).encode()
            zout.writestr(item, data)
    return dst


_NPU16_DRIVER = r'''
#include "npu16_sim.h"
int run(const uint32_t *prog, const void *x, void *out, const int8_t *tiles, const int32_t *table,
        const int32_t *bias, const int32_t *mult, const int32_t *shift, int64_t *counters) {
  npu16_bufs b; memset(&b, 0, sizeof(b));
  b.x = x; b.out = out; b.tiles = tiles; b.table = table; b.bias = bias; b.mult = mult; b.shift = shift;
  npu16_counters c; memset(&c, 0, sizeof(c));
  int rc = npu16_execute(prog, &b, &c);
  memcpy(counters, &c, sizeof(c));
  return rc;
}
/* every buffer: k inputs (xs), the AVGPOOL window table in ``table``, the LUT */
int run_ops(const uint32_t *prog, const void *const *xs, int nxs, void *out, const int8_t *tiles,
            const int32_t *table, const uint8_t *lut, const int32_t *bias, const int32_t *mult,
            const int32_t *shift, int64_t *counters) {
  npu16_bufs b; memset(&b, 0, sizeof(b));
  b.xs = xs; b.x = xs[0]; b.x2 = nxs > 1 ? xs[1] : 0; b.out = out; b.tiles = tiles; b.table = table;
  b.lut = lut; b.bias = bias; b.mult = mult; b.shift = shift;
  npu16_counters c; memset(&c, 0, sizeof(c));
  int rc = npu16_execute(prog, &b, &c);
  memcpy(counters, &c, sizeof(c));
  return rc;
}
'''


def npu16_simulator(folder):
    """The npu16 simulator behind a ctypes driver ``run(prog, x, out, tiles, table, bias, mult,
    shift, counters)`` and ``run_ops(prog, xs, nxs, out, tiles, table, lut, bias, mult, shift,
    counters)`` (k inputs, a lookup table), compiled in ``folder`` with the ISA header generated from isa.py."""
    import ctypes
    import subprocess
    from pathlib import Path

    from targets.c_source import INCLUDE_DIR
    from targets.npu16.isa import c_header
    folder = Path(folder)
    (folder / "drv.c").write_text(_NPU16_DRIVER)
    (folder / "npu16_isa.h").write_text(c_header())
    subprocess.run(["gcc", "-std=c99", "-O1", "-shared", "-fPIC", f"-I{folder}", f"-I{INCLUDE_DIR / 'npu16'}",
                    f"-I{INCLUDE_DIR}", str(folder / "drv.c"), "-o", str(folder / "drv.so")], check=True)
    return ctypes.CDLL(str(folder / "drv.so"))
