"""--target aarch64 and JSON llvm targets: cross export, emulated and RPC runs bit-exact
against the x86 build and the NumPy reference, and the one-line errors around them.

The runs need scripts/aarch64-emulation.sh (cross gcc, qemu-user, the aarch64 Python in
.aarch64/); without it they fail in CI and are skipped elsewhere."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time

import numpy as np
import pytest

from calib import artifact
from relay_passes import reference
from targets import cpu
from tests.emulation_helpers import require
from waps_tvm import cli, emulation, runner
from waps_tvm.compiler import lower_artifact

x86_host = pytest.mark.skipif(runner.machine() == "aarch64", reason="on an aarch64 machine aarch64 builds run natively")
CORTEX_A53 = '{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a53"}'


@pytest.fixture(scope="module")
def builds(tiny_artifact, tmp_path_factory):
    """The TinyResNet artifact compiled for llvm, aarch64 and a Cortex-A53 JSON dict, an input,
    and the reference interpreter's outputs for it."""
    require(lambda: cpu.export_cc("aarch64"))
    d = tmp_path_factory.mktemp("a64")
    waps = artifact.save(tiny_artifact, d / "tiny.waps")
    for name, target in (("llvm", "llvm"), ("aarch64", "aarch64"), ("a53", CORTEX_A53)):
        assert cli.main(["compile", str(waps), "--target", target, "-o", str(d / name)]) == 0
    x = np.random.default_rng(3).normal(size=(1, 1, 16, 16)).astype("float32")
    np.save(d / "x.npy", x)
    ref = reference.run(lower_artifact(tiny_artifact, 1).program, x)
    return d, x, ref


def _run(capsys, folder, x_path, *extra):
    assert cli.main(["run", str(folder), "--input", str(x_path), *extra]) == 0, capsys.readouterr().err


def _one_line_error(capsys, argv) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("waps-tvm: error: "), err
    return err


def test_meta_records_the_target_and_the_library_is_aarch64(builds):
    d, _, _ = builds
    meta = json.loads((d / "aarch64" / "meta.json").read_text())
    assert meta["target"] == "aarch64" and meta["arch"] == "aarch64"
    assert meta["llvm_target"] == cpu.AARCH64
    a53 = json.loads((d / "a53" / "meta.json").read_text())
    assert a53["target"] == "llvm:aarch64-linux-gnu:cortex-a53" and a53["llvm_target"]["mcpu"] == "cortex-a53"
    llvm = json.loads((d / "llvm" / "meta.json").read_text())
    assert llvm["target"] == "llvm" and llvm["arch"] == runner.machine()
    elf = (d / "aarch64" / "model.so").read_bytes()[:20]
    assert elf[:4] == b"\x7fELF" and int.from_bytes(elf[18:20], "little") == 183   # EM_AARCH64


def _sdot_count(lib) -> int:
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    if objdump is None:
        require(lambda: (_ for _ in ()).throw(runner.RunError("no aarch64-linux-gnu-objdump (binutils)")))
    text = subprocess.run([objdump, "-d", str(lib)], capture_output=True, text=True, check=True).stdout
    return sum("\tsdot\t" in line for line in text.splitlines())


def test_aarch64_convs_use_the_arm_dot_product(builds):
    """--target aarch64 has +dotprod: the convs are tensorized with NEON sdot (A4 codes ≤ 127);
    the Cortex-A53 dict (ARMv8.0, no dot product) gets plain vectorized code."""
    d, _, _ = builds
    assert _sdot_count(d / "aarch64" / "model.so") >= 16
    assert _sdot_count(d / "a53" / "model.so") == 0


def test_emulated_runs_equal_x86_and_the_reference(builds, capsys):
    require(emulation.python)
    d, x, ref = builds
    x86 = runner.load(d / "llvm")(x)
    np.testing.assert_array_equal(x86[1], ref[1])
    np.testing.assert_array_equal(x86[0], ref[0])
    for name in ("aarch64", "a53"):
        _run(capsys, d / name, d / "x.npy", "--emulate", "--codes", "--output", str(d / f"{name}_codes.npy"))
        _run(capsys, d / name, d / "x.npy", "--emulate", "--output", str(d / f"{name}_deq.npy"))
        codes, deq = np.load(d / f"{name}_codes.npy"), np.load(d / f"{name}_deq.npy")
        assert codes.dtype == x86[1].dtype and codes.tobytes() == x86[1].tobytes(), name
        assert deq.dtype == np.float32 and deq.tobytes() == x86[0].tobytes(), name


def test_run_many_runs_several_folders_in_one_emulated_process(builds, tmp_path):
    """emulation.run_many: each folder's outputs, in order; an x86 folder is refused before qemu
    starts; a folder that fails inside the emulated runner is named and the run fails."""
    require(emulation.python)
    d, x, ref = builds
    more = np.concatenate([x, x[:1]])
    outs = emulation.run_many([(d / "aarch64", x), (d / "a53", more)])
    assert [o[1].tobytes() for o in outs] == [np.ascontiguousarray(r).tobytes() for r in (ref[1], np.concatenate([ref[1], ref[1][:1]]))]
    assert outs[0][0].tobytes() == np.ascontiguousarray(ref[0]).tobytes() and outs[0][2] == []
    with pytest.raises(runner.RunError, match="run it without --emulate"):
        emulation.run_many([(d / "aarch64", x), (d / "llvm", x)])
    # an x86 library whose meta.json claims aarch64: only the runner under qemu finds out
    fake = tmp_path / "fake"
    shutil.copytree(d / "llvm", fake)
    meta = json.loads((fake / "meta.json").read_text())
    (fake / "meta.json").write_text(json.dumps({**meta, "arch": "aarch64"}))
    with pytest.raises(runner.RunError, match=re.escape(f"(exit 2): {fake / 'model.so'}: cannot load")):
        emulation.run_many([(d / "aarch64", x), (fake, x)])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server_port():
    """An aarch64 TVM RPC server under qemu (waps-tvm rpc-server --emulate) on a free port."""
    require(emulation.python)
    port = _free_port()
    server = emulation.rpc_server("127.0.0.1", port, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120                # qemu start + `import tvm` of the server
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "RPC server did not start"
                time.sleep(0.5)
        yield port
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_rpc_server_under_qemu_runs_bit_exact(builds, server_port, capsys):
    d, _, ref = builds
    port = server_port
    _run(capsys, d / "aarch64", d / "x.npy", "--rpc", f"127.0.0.1:{port}", "--codes",
         "--output", str(d / "rpc_codes.npy"), "--repeat", "2")
    assert "latency over 2 runs (on 127.0.0.1" in capsys.readouterr().out
    codes = np.load(d / "rpc_codes.npy")
    assert codes.dtype == ref[1].dtype and codes.tobytes() == np.ascontiguousarray(ref[1]).tobytes()
    # an x86 library on the aarch64 server: one line saying what it was compiled for
    err = _one_line_error(capsys, ["run", str(d / "llvm"), "--input", str(d / "x.npy"), "--rpc", f"127.0.0.1:{port}"])
    assert f"(compiled for {runner.machine()})" in err


def test_tune_aarch64_through_rpc_and_compile_with_the_records(builds, server_port, capsys):
    """tune --target aarch64 --rpc: every candidate is linked by the cross gcc, uploaded to the
    emulated board and timed there; compile --tuning-records builds the aarch64 library from the
    records, and it still equals the reference bit for bit."""
    d, _, ref = builds
    rec = d / "rec_a64"
    argv = ["tune", str(d / "tiny.waps"), "--target", "aarch64", "--rpc", f"127.0.0.1:{server_port}",
            "--work-dir", str(rec), "--trials", "8", "-q"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "8 trials" in out and "best records" in out, out
    info = json.loads((rec / "waps-tuning.json").read_text())
    assert info["target"]["mtriple"] == "aarch64-linux-gnu" and info["target"]["num-cores"] >= 1
    records = [json.loads(line) for line in (rec / "search" / "database_tuning_record.json").read_text().splitlines()]
    workloads = (rec / "database_workload.json").read_text().splitlines()
    measured = [r for r in records if all(float(s) < 1e9 for s in r[1][1])]
    assert len(measured) > len(workloads)          # the defaults, and candidates the board ran
    assert cli.main(["compile", str(d / "tiny.waps"), "--target", "aarch64", "--tuning-records", str(rec),
                     "-o", str(d / "tuned_a64"), "-q"]) == 0, capsys.readouterr().err
    _run(capsys, d / "tuned_a64", d / "x.npy", "--emulate", "--codes", "--output", str(d / "tuned_codes.npy"))
    assert np.load(d / "tuned_codes.npy").tobytes() == np.ascontiguousarray(ref[1]).tobytes()
    # records of the aarch64 board do not apply to this machine's llvm build
    _one_line_error(capsys, ["compile", str(d / "tiny.waps"), "--tuning-records", str(rec), "-o", str(d / "no")])


def test_aarch64_folder_run_natively_is_one_line(builds, capsys):
    d, _, _ = builds
    err = _one_line_error(capsys, ["run", str(d / "aarch64"), "--input", str(d / "x.npy")])
    assert "compiled for aarch64" in err and "--emulate" in err and "--rpc host:port" in err


def test_unreachable_rpc_endpoint_is_one_line_and_quick(builds, capsys):
    d, _, _ = builds
    port = _free_port()                                  # closed again: nothing listens there
    t0 = time.monotonic()
    err = _one_line_error(capsys, ["run", str(d / "llvm"), "--input", str(d / "x.npy"), "--rpc", f"127.0.0.1:{port}"])
    assert f"127.0.0.1:{port}" in err and time.monotonic() - t0 < 10
    assert "host:port" in _one_line_error(capsys, ["run", str(d / "llvm"), "--input", str(d / "x.npy"), "--rpc", "nohost"])


@x86_host
def test_emulating_a_native_build_or_without_setup_is_one_line(builds, capsys, monkeypatch, tmp_path):
    d, _, _ = builds
    assert "run it without --emulate" in _one_line_error(
        capsys, ["run", str(d / "llvm"), "--input", str(d / "x.npy"), "--emulate"])
    monkeypatch.setenv("WAPS_AARCH64_ROOT", str(tmp_path))
    assert "scripts/aarch64-emulation.sh" in _one_line_error(
        capsys, ["run", str(d / "aarch64"), "--input", str(d / "x.npy"), "--emulate"])


@pytest.mark.parametrize("target, says", [
    ("arm", "choose from llvm, aarch64, c, npu16"),
    ('{"kind": "llvm", "mtriple": ', "not valid JSON"),
    ('{"kind": "cuda"}', "only llvm target dicts"),
    ('{"kind": "llvm", "bogus": 1}', "Unknown config option 'bogus'"),
    ('{"kind": "llvm", "mtriple": "foo-bar-baz"}', "no backend for 'foo'"),
    ('{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "nonsense"}', "mcpu 'nonsense'"),
    ('{"kind": "llvm", "mattr": "+neon"}', '"mattr" must be a list'),
])
def test_bad_targets_are_one_line_errors_before_any_work(target, says, tmp_path, capsys):
    # the artifact path does not exist: the target is checked first
    err = _one_line_error(capsys, ["compile", str(tmp_path / "none.waps"), "--target", target, "-o", str(tmp_path / "o")])
    assert says in err
    assert not (tmp_path / "o").exists()


def test_missing_cross_compiler_names_the_setup(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cpu.shutil, "which", lambda name: None)
    err = _one_line_error(capsys, ["compile", str(tmp_path / "none.waps"), "--target", "aarch64", "-o", str(tmp_path / "o")])
    assert "aarch64-linux-gnu-gcc" in err and "scripts/aarch64-emulation.sh" in err
    assert cpu.export_cc("llvm") is None                 # native targets link with TVM's default


def test_target_resolution():
    assert cpu.resolve("aarch64").cross == (cpu.host_arch() != "aarch64")
    assert cpu.resolve("llvm").arch == cpu.host_arch() and not cpu.resolve("npu16").cross
    t = cpu.resolve(CORTEX_A53)
    assert (t.arch, t.triple, t.name) == ("aarch64", "aarch64-linux-gnu", "llvm:aarch64-linux-gnu:cortex-a53")
    assert cpu.resolve('{"mtriple": "arm64-apple-macos"}').arch == "aarch64"
    assert cpu.resolve('{"kind": "llvm"}').name == "llvm"


def test_emulated_and_rpc_runs_take_any_number_of_samples(builds, server_port, capsys):
    """One more sample than the compiled batch: two chunks under qemu and over RPC, the padded
    rows dropped; each sample's codes are the reference's."""
    d, x, ref = builds
    more = np.concatenate([x, x[:1]])
    np.save(d / "more.npy", more)
    want = np.concatenate([ref[1], ref[1][:1]])
    _run(capsys, d / "aarch64", d / "more.npy", "--emulate", "--codes", "--output", str(d / "more_emu.npy"))
    _run(capsys, d / "aarch64", d / "more.npy", "--rpc", f"127.0.0.1:{server_port}", "--codes",
         "--output", str(d / "more_rpc.npy"))
    for name in ("more_emu.npy", "more_rpc.npy"):
        codes = np.load(d / name)
        assert codes.shape == want.shape and codes.tobytes() == np.ascontiguousarray(want).tobytes(), name


def test_unfolded_group_accumulators_bit_exact_under_qemu(tiny_artifact, tmp_path, monkeypatch, capsys):
    """With n_p > L no group folds into a shared accumulator (fast_kernels.fold_groups is None),
    so each aarch64 conv keeps one accumulator per group and the shift-add runs on the tile:
    that path, under qemu, equals the reference."""
    require(emulation.python)
    require(lambda: cpu.export_cc("aarch64"))
    from relay_passes import fast_kernels, quantize
    monkeypatch.setattr(quantize, "FRAC_BITS", 2)                 # L ≤ 2 < n = 4 for every scaled group
    lowered = lower_artifact(tiny_artifact, 1, "fast", target="aarch64")
    fast_grouped = [op for op in lowered.program.ops if op.kind == "conv2d" and "groups" in op.params
                    and op.schedule.form == "fast"]
    assert fast_grouped and all(fast_kernels.fold_groups(op) is None for op in fast_grouped)
    waps = artifact.save(tiny_artifact, tmp_path / "tiny.waps")
    assert cli.main(["compile", str(waps), "--target", "aarch64", "-o", str(tmp_path / "a64")]) == 0
    x = np.random.default_rng(4).normal(size=(1, 1, 16, 16)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    _run(capsys, tmp_path / "a64", tmp_path / "x.npy", "--emulate", "--codes", "--output", str(tmp_path / "c.npy"))
    want = reference.run(lowered.program, x)[1]
    assert np.load(tmp_path / "c.npy").tobytes() == np.ascontiguousarray(want).tobytes()


def test_fused_kernels_bit_exact_under_qemu(tmp_path, capsys):
    """--fuse residual-adds,expand-depthwise on aarch64 (sdot products, the fused epilogue and
    the banded expansion): under qemu the codes equal the reference's."""
    require(emulation.python)
    require(lambda: cpu.export_cc("aarch64"))
    import torch

    from tests.compile_helpers import calibrated, scramble_groups
    from tests.conftest import TinyMobileNet, randomize_bn
    torch.manual_seed(0)
    art = scramble_groups(calibrated(randomize_bn(TinyMobileNet()), (3, 14, 14)), seed=3, tile=4)
    waps = artifact.save(art, tmp_path / "m.waps")
    assert cli.main(["compile", str(waps), "--target", "aarch64", "-o", str(tmp_path / "a64"),
                     "--fuse", "residual-adds,expand-depthwise"]) == 0
    meta = json.loads((tmp_path / "a64" / "meta.json").read_text())["waps"]
    assert len(meta["fused_residual_adds"]) == 1 and len(meta["fused_expand_depthwise"]) == 4
    x = np.random.default_rng(4).normal(size=(1, 3, 14, 14)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    _run(capsys, tmp_path / "a64", tmp_path / "x.npy", "--emulate", "--codes", "--output", str(tmp_path / "c.npy"))
    want = reference.run(lower_artifact(art, 1, "fast", target="aarch64").program, x)[1]
    assert np.load(tmp_path / "c.npy").tobytes() == np.ascontiguousarray(want).tobytes()
