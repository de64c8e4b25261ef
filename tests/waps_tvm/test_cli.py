"""The command line end to end: real console script for the main job, in-process
``main()`` for the error corpus (each must be one line, exit 2, nothing written)."""
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch import nn

from calib import artifact
from waps_tvm.cli import main

EXE = [sys.executable, "-m", "waps_tvm.cli"]


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 32, 3, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(x.mean((2, 3)))


class Gated(Small):
    def forward(self, x):
        return self.fc(torch.sigmoid(self.conv(x)).mean((2, 3)))


def run(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code, err, *words, expect_code=2):
    assert code == expect_code
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("waps-tvm: error:")
    for w in words:
        assert w in lines[0], lines[0]


@pytest.mark.slow
def test_main_job_calibrates_saves_and_evaluates(tmp_path):
    out = tmp_path / "mnist.waps"
    p = subprocess.run(EXE + ["calibrate", "digit-recognizer", "--data", "mnist", "--samples", "256",
                              "--iters", "60", "-q", "-o", str(out)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert "float 99.06 %" in p.stdout
    quant = float(p.stdout.split("quantized")[1].split("%")[0].split(")")[-1])
    assert quant > 97.0
    art = artifact.load(out)
    assert art.config["method"] == "waps" and art.config["wbits"] == 4
    assert any(r.groups is not None for r in art.layers.values())
    p = subprocess.run(EXE + ["eval", str(out), "--data", "mnist", "--samples", "2000"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "top-1" in p.stdout


@pytest.mark.slow
def test_readme_main_job_compiles_for_npu16_and_reports(tmp_path):
    """The README's first command, with fewer iterations and test images."""
    out = tmp_path / "mnist"
    p = subprocess.run(EXE + ["compile", "digit-recognizer", "--data", "mnist", "--target", "npu16", "--samples", "128",
                              "--iters", "40", "--eval-samples", "300", "-q", "-o", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "compiled integer model (npu16)" in p.stdout and "npu16 runs" in p.stdout
    compiled = float(p.stdout.split("(npu16)")[1].split("%")[0])
    fake = float(p.stdout.split("fake-quant")[1].split("%")[0])
    assert compiled > 95.0 and abs(compiled - fake) <= 1.0
    assert (tmp_path / "mnist.waps").is_file()
    p = subprocess.run(EXE + ["report", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "| **total** |" in p.stdout and (out / "cycles.png").is_file()


def test_pt2_program_and_trusted_pickle(tmp_path, capsys):
    torch.manual_seed(0)
    model = Small().eval()
    prog = torch.export.export(model, (torch.zeros(1, 1, 8, 8),))
    torch.export.save(prog, tmp_path / "m.pt2")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((64, 1, 8, 8)).astype(np.float32))
    code, out, err = run(["calibrate", tmp_path / "m.pt2", "--data", tmp_path / "x.npy", "--iters", "5",
                          "--samples", "32", "-q", "-o", tmp_path / "a.waps"], capsys)
    assert code == 0, err
    assert artifact.load(tmp_path / "a.waps").graph.input.attrs["shape"] == [1, 8, 8]

    torch.save(model, tmp_path / "m.pt")
    code, _, err = run(["calibrate", tmp_path / "m.pt", "--data", tmp_path / "x.npy", "--method", "rtn",
                        "-q", "-o", tmp_path / "b.waps"], capsys)
    assert_one_line_error(code, err, "--trust-pickle", "runs arbitrary code")
    assert not (tmp_path / "b.waps").exists()
    code, _, err = run(["calibrate", tmp_path / "m.pt", "--trust-pickle", "--input-shape", "1,8,8",
                        "--data", tmp_path / "x.npy", "--method", "rtn", "-q", "-o", tmp_path / "b.waps"], capsys)
    assert code == 0, err
    assert (tmp_path / "b.waps").exists()


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 1, 28, 28)).astype(np.float32)
    np.save(tmp_path / "ok.npy", x)
    bad = x.copy()
    bad[0, 0, 0, :3] = [np.nan, np.inf, -np.inf]
    np.save(tmp_path / "nan.npy", bad)
    np.save(tmp_path / "rgb.npy", rng.standard_normal((4, 3, 32, 32)).astype(np.float32))
    torch.save(Small().state_dict(), tmp_path / "state.pt")
    torch.save(Gated(), tmp_path / "gated.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"PK\x03\x04 truncated")
    return tmp_path


@pytest.mark.parametrize("args, words", [
    (["digit-recognizer", "--data", "{d}/nan.npy"], ["NaN/Inf"]),
    (["digit-recognizer", "--data", "{d}/rgb.npy"], ["does not fit the model input", "(1, 28, 28)"]),
    (["{d}/state.pt", "--data", "{d}/ok.npy"], ["--arch"]),
    (["{d}/state.pt", "--arch", "resnet18", "--data", "{d}/ok.npy"], ["does not fit 'resnet18'"]),
    (["{d}/gated.pt", "--trust-pickle", "--input-shape", "1,28,28", "--data", "{d}/ok.npy"],
     ["unsupported layers", "sigmoid"]),
    (["{d}/corrupt.pt", "--data", "{d}/ok.npy"], ["not a readable PyTorch file"]),
    (["{d}/absent.pt2", "--data", "{d}/ok.npy"], ["no such model file"]),
    (["digit-recognizer", "--data", "imagenet"], ["mnist"]),
    (["digit-recognizer", "--data", "mnist", "--gammas", "1,1.1"], ["1 ± 2^-n"]),
])
def test_bad_input_is_one_line_exit_2_nothing_written(files, capsys, args, words):
    out = files / "out.waps"
    code, _, err = run(["calibrate", *[a.format(d=files) for a in args], "-q", "-o", out], capsys)
    assert_one_line_error(code, err, *words)
    assert not out.exists()
    assert not list(files.glob(".out.waps.*"))


def test_unwritable_output_is_one_line(files, capsys):
    (files / "plain.txt").write_text("not a folder")
    code, _, err = run(["calibrate", "digit-recognizer", "--data", files / "ok.npy", "--method", "rtn",
                        "--samples", "8", "-q", "--no-eval", "-o", files / "plain.txt" / "m.waps"], capsys)
    assert_one_line_error(code, err, "cannot write")


def test_eval_rejects_corrupt_artifact(tmp_path, capsys):
    (tmp_path / "x.waps").write_bytes(b"nonsense")
    code, _, err = run(["eval", tmp_path / "x.waps", "--data", "mnist"], capsys)
    assert_one_line_error(code, err, "not a zip archive")


def test_usage_errors_exit_2():
    p = subprocess.run(EXE + ["calibrate", "digit-recognizer", "--data", "mnist", "-o", "x.waps",
                              "--method", "magic"], capture_output=True, text=True)
    assert p.returncode == 2 and "invalid choice" in p.stderr


@pytest.mark.slow
def test_ctrl_c_exits_130_and_writes_nothing(tmp_path):
    out = tmp_path / "m.waps"
    p = subprocess.Popen(EXE + ["calibrate", "digit-recognizer", "--data", "mnist", "--iters", "100000",
                                "-q", "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         # a shell's background jobs inherit SIGINT ignored: restore the terminal's default
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(12)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130
    assert "interrupted" in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_group_prob_flag_is_recorded_in_the_artifact(tmp_path, capsys):
    torch.manual_seed(0)
    torch.export.save(torch.export.export(Small().eval(), (torch.zeros(1, 1, 8, 8),)), tmp_path / "m.pt2")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((32, 1, 8, 8)).astype(np.float32))
    for prob in ("softmax", "sigmoid"):
        code, _, err = run(["calibrate", tmp_path / "m.pt2", "--data", tmp_path / "x.npy", "--iters", "3",
                            "--samples", "32", "--group-prob", prob, "--no-eval", "-q",
                            "-o", tmp_path / f"{prob}.waps"], capsys)
        assert code == 0, err
        assert artifact.load(tmp_path / f"{prob}.waps").config["group_prob"] == prob
