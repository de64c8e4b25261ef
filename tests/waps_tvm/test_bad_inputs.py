"""The corrupt-input corpus: every entry point, every kind of bad input, each ends with one
line ``waps-tvm: error: …``, exit code 2, and nothing half-written next to the output.

(Calibration inputs — NaN data, wrong shapes, unsupported ops, corrupt .pt, missing files,
Ctrl-C — are also covered in test_cli.py; the .waps loader is fuzzed in
tests/calib/test_artifact_fuzz.py.)
"""
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from torch import nn

from calib import artifact
from tests.compile_helpers import rewrite_archive
from tests.waps_tvm.conftest import free_port
from tests.waps_tvm.test_cli import EXE, assert_one_line_error, run
from waps_tvm.cli import main


class Wide(nn.Module):
    """One linear layer over 1×512×512: 8-bit codes × 8-bit weights over 262,144 inputs
    cannot be bounded inside int32."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(512 * 512, 4)

    def forward(self, x):
        return self.fc(torch.flatten(x, 1))


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


@pytest.fixture(scope="module")
def corpus(tiny_artifact, tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    np.save(d / "x.npy", rng.standard_normal((16, 1, 16, 16)).astype(np.float32))
    good = artifact.save(tiny_artifact, d / "good.waps")
    blob = good.read_bytes()
    (d / "truncated.waps").write_bytes(blob[: len(blob) // 2])
    (d / "empty.waps").write_bytes(b"")
    flipped = bytearray(blob)
    for i in range(len(blob) // 3, len(blob) // 3 + 64):
        flipped[i] ^= 0xFF
    (d / "flipped.waps").write_bytes(bytes(flipped))
    rewrite_archive(good, d / "v2.waps", version=2)
    rewrite_archive(good, d / "nomanifest.waps", drop=("manifest.json",))

    model = Small().eval()
    prog = torch.export.export(model, (torch.randn(1, 1, 16, 16),))
    torch.export.save(prog, d / "good.pt2")
    pt2 = (d / "good.pt2").read_bytes()
    (d / "truncated.pt2").write_bytes(pt2[: len(pt2) // 2])
    (d / "garbage.pt2").write_bytes(b"\x00" * 1000)
    state = model.state_dict()
    torch.save(state, d / "good.pt")
    (d / "truncated.pt").write_bytes((d / "good.pt").read_bytes()[:200])
    nan = {k: v.clone() for k, v in state.items()}
    nan["conv.weight"][0, 0, 0, 0] = float("nan")
    torch.save(Small().eval(), d / "module.pt")
    bad = Small().eval()
    bad.load_state_dict(nan)
    torch.save(bad, d / "nan_module.pt")

    from tests.compile_helpers import calibrated
    torch.manual_seed(0)
    wide = calibrated(Wide(), (1, 512, 512), wbits=8, abits=8, iters=0, samples=2)
    artifact.save(wide, d / "wide.waps")
    return d


CALIBRATE = [
    (["{d}/truncated.pt2"], ["not a readable torch.export program"]),
    (["{d}/garbage.pt2"], ["not a readable torch.export program"]),
    (["{d}/truncated.pt", "--arch", "resnet18"], ["not a readable PyTorch file"]),
    (["{d}/nan_module.pt", "--trust-pickle", "--input-shape", "1,16,16"], ["NaN", "conv"]),
    (["{d}/missing.pt2"], ["no such model file"]),
]


@pytest.mark.parametrize("args, words", CALIBRATE, ids=[a[0].split("/")[-1] for a, _ in CALIBRATE])
def test_calibrate_rejects(corpus, capsys, args, words):
    out = corpus / "out.waps"
    code, _, err = run(["calibrate", *[a.format(d=corpus) for a in args], "--data", corpus / "x.npy",
                        "--method", "rtn", "--samples", "8", "-q", "--no-eval", "-o", out], capsys)
    assert_one_line_error(code, err, *words)
    assert not out.exists() and not list(corpus.glob(".out.waps*"))


ARTIFACTS = [
    ("truncated.waps", ["not a zip archive"]),
    ("empty.waps", ["not a zip archive"]),
    ("flipped.waps", ["good"]),
    ("v2.waps", ["version 2 is not supported"]),
    ("nomanifest.waps", ["manifest.json"]),
    ("missing.waps", ["no such"]),
]


@pytest.mark.parametrize("name, words", ARTIFACTS, ids=[n for n, _ in ARTIFACTS])
@pytest.mark.parametrize("command", ["compile", "eval"])
def test_artifact_commands_reject(corpus, capsys, name, words, command):
    path = corpus / name
    words = [path.stem] if words == ["good"] else words         # whatever broke, the file is named
    extra = ["-o", str(corpus / "o")] if command == "compile" else ["--data", str(corpus / "x.npy")]
    code, _, err = run([command, path, *extra], capsys)
    assert_one_line_error(code, err, *words)
    assert not (corpus / "o").exists() and not list(corpus.glob(".o.*"))


def test_accumulator_overflow_is_rejected_by_layer(corpus, capsys):
    code, _, err = run(["compile", corpus / "wide.waps", "-o", corpus / "o"], capsys)
    assert_one_line_error(code, err, "fc", "could overflow its int32 accumulator")
    assert not (corpus / "o").exists()


@pytest.mark.parametrize("where", ["file", "readonly"])
def test_compile_unwritable_output(corpus, capsys, tmp_path, where):
    if where == "file":
        (tmp_path / "f").write_text("a file")
        out = tmp_path / "f" / "out"
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        out = ro / "out"
        if subprocess.run(["touch", str(ro / "probe")]).returncode == 0:   # root ignores the mode bits
            (ro / "probe").unlink()
            pytest.skip("running as root: a read-only folder is still writable")
    code, _, err = run(["compile", corpus / "good.waps", "-o", out], capsys)
    assert_one_line_error(code, err, "cannot write", str(out.parent.name))


def test_compiled_folder_damage(corpus, capsys, tmp_path):
    out = tmp_path / "c"
    assert run(["compile", corpus / "good.waps", "-o", out], capsys)[0] == 0
    np.save(tmp_path / "in.npy", np.zeros((1, 1, 16, 16), np.float32))
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "meta.json").write_text("{ not json")
    assert_one_line_error(*run(["run", broken, "--input", tmp_path / "in.npy"], capsys)[::2], "meta.json")
    shutil.copy(out / "meta.json", broken / "meta.json")
    lib = (out / "model.so").read_bytes()
    (broken / "model.so").write_bytes(lib[:4096])
    assert_one_line_error(*run(["run", broken, "--input", tmp_path / "in.npy"], capsys)[::2], "model.so")
    (broken / "graph.onnx").write_bytes(b"\x08garbage")
    assert_one_line_error(*run(["inspect", broken], capsys)[::2], "graph.onnx")
    (broken / "report.json").write_text("[]")
    assert_one_line_error(*run(["report", broken], capsys)[::2], "not a waps-tvm report")


@pytest.mark.slow
def test_ctrl_c_during_compile_exits_130_and_leaves_nothing(corpus, tmp_path):
    out = tmp_path / "big"
    p = subprocess.Popen(EXE + ["compile", "digit-recognizer", "--data", "mnist", "--iters", "100000", "-q",
                                "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(15)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def llvm_build(corpus):
    out = corpus / "llvm"
    assert main(["compile", str(corpus / "good.waps"), "-o", str(out), "-q"]) == 0
    np.save(corpus / "x1.npy", np.zeros((1, 1, 16, 16), np.float32))
    return out


TRACKER = [                 # tune/run --tracker: none of these waits for TVM's minute of retries
    (["--tracker", "{closed}", "--key", "k"], ["cannot reach the RPC tracker at 127.0.0.1:"]),
    (["--tracker", "nohost", "--key", "k"], ["--tracker 'nohost': expected host:port"]),
    (["--tracker", "{empty}"], ["--tracker needs --key"]),
    (["--key", "k"], ["--key names a kind of board", "--tracker"]),
    (["--rpc", "{closed}", "--key", "k"], ["--key names a kind of board"]),
    (["--tracker", "{empty}", "--key", "nope"], ["no server under key 'nope'", "keys there: none"]),
]


@pytest.mark.parametrize("extra, words", TRACKER,
                         ids=["unreachable", "malformed", "no-key", "key-alone", "key-with-rpc", "no-server"])
@pytest.mark.parametrize("command", ["tune", "run"])
def test_tracker_flags_reject(corpus, llvm_build, request, capsys, command, extra, words):
    empty = request.getfixturevalue("empty_tracker") if "{empty}" in extra else None    # only these need tornado
    extra = [a.format(closed=f"127.0.0.1:{free_port()}", empty=empty) for a in extra]
    argv = ["tune", corpus / "good.waps", "--target", "aarch64", "--work-dir", corpus / "rec"] if command == "tune" \
        else ["run", llvm_build, "--input", corpus / "x1.npy"]
    t0 = time.monotonic()
    code, _, err = run([*argv, *extra], capsys)
    assert_one_line_error(code, err, *words)
    assert time.monotonic() - t0 < 30 and not (corpus / "rec").exists()


def test_rpc_tracker_and_server_reject(empty_tracker, capsys, monkeypatch):
    port = empty_tracker.rpartition(":")[2]
    assert_one_line_error(*run(["rpc-tracker", "--port", port], capsys)[::2], f"cannot listen on 127.0.0.1:{port}")
    closed = f"127.0.0.1:{free_port()}"
    assert_one_line_error(*run(["rpc-server", "--tracker", closed, "--key", "k"], capsys)[::2],
                          f"cannot reach the RPC tracker at {closed}")
    assert_one_line_error(*run(["rpc-server", "--key", "k"], capsys)[::2], "--key names a kind of board")
    assert_one_line_error(*run(["rpc-server", "--tracker", empty_tracker], capsys)[::2], "--tracker needs --key")
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "tornado" else real(name, *a, **k))
    assert_one_line_error(*run(["rpc-tracker", "--port", str(free_port())], capsys)[::2],
                          "rpc-tracker needs the tornado package")


NPU_BUDGET = [
    (["--npu-budget", "1%", "--method", "brecq"], ["--npu-budget", "brecq", "WAPS groups"]),
    (["--npu-config", "{d}/missing.json"], ["--npu-config", "--npu-budget"]),
    (["--npu-budget", "1%", "--npu-config", "{d}/missing.json"], ["missing.json"]),
]


@pytest.mark.parametrize("args, words", NPU_BUDGET, ids=["no-waps", "config-alone", "no-config"])
def test_calibrate_rejects_npu_budget(corpus, capsys, args, words):
    out = corpus / "out.waps"
    code, _, err = run(["calibrate", corpus / "good.pt2", "--data", corpus / "x.npy", "--samples", "8", "-q",
                        "--no-eval", "-o", out, *[a.format(d=corpus) for a in args]], capsys)
    assert_one_line_error(code, err, *words)
    assert not out.exists()


def test_calibrate_rejects_a_budget_that_is_not_a_percentage(corpus, capsys):
    with pytest.raises(SystemExit) as e:            # argparse's usage error
        run(["calibrate", corpus / "good.pt2", "--data", corpus / "x.npy", "-o", corpus / "out.waps",
             "--npu-budget", "lots"], capsys)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith("--npu-budget: 'lots' is not a percentage such as 1%")
