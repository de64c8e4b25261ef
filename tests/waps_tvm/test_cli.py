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
        return self.fc(torch.nn.functional.logsigmoid(self.conv(x)).mean((2, 3)))


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
    assert "estimated per batch: NPU" in p.stdout and "% on the host" in p.stdout
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
     ["unsupported layers", "log_sigmoid"]),
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


@pytest.fixture
def small_pt2(tmp_path):
    torch.manual_seed(0)
    prog = torch.export.export(Small().eval(), (torch.zeros(1, 1, 8, 8),))
    torch.export.save(prog, tmp_path / "m.pt2")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((32, 1, 8, 8)).astype(np.float32))
    return tmp_path


def test_ctrl_c_after_a_block_says_how_to_resume_and_resume_finishes(small_pt2, capsys, monkeypatch):
    from calib import calibrate as calibrate_mod
    d = small_pt2
    args = ["calibrate", d / "m.pt2", "--data", d / "x.npy", "--iters", "3", "--batch", "8", "--samples", "32",
            "--device", "cpu", "-q", "--no-eval", "-o", d / "a.waps"]
    real, calls = calibrate_mod.reconstruct, []

    def interrupted_in_block_2(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)
    with monkeypatch.context() as m:
        m.setattr(calibrate_mod, "reconstruct", interrupted_in_block_2)
        code, _, err = run(args, capsys)
    assert code == 130
    assert "interrupted after 1 of 2 blocks" in err and "Traceback" not in err
    assert err.strip().endswith("--resume") and "continue with: waps-tvm calibrate" in err
    ckpt = d / "a.waps.ckpt"
    assert ckpt.is_file() and not (d / "a.waps").exists()

    code, _, err = run([*args[:-2], "--iters", "4", "-o", d / "a.waps", "--resume"], capsys)
    assert_one_line_error(code, err, "a.waps.ckpt", "other options")
    code, _, err = run(args, capsys)
    assert_one_line_error(code, err, "1 of 2 blocks", "add --resume")
    assert not (d / "a.waps").exists() and ckpt.is_file()

    code, _, err = run(args + ["--resume"], capsys)
    assert code == 0, err
    assert (d / "a.waps").is_file() and not ckpt.exists()
    code, _, err = run(args[:-2] + ["-o", d / "b.waps"], capsys)
    assert code == 0, err
    assert (d / "a.waps").read_bytes() == (d / "b.waps").read_bytes()


def test_resume_without_checkpoint_and_cuda_without_cuda_are_one_line(small_pt2, capsys):
    d = small_pt2
    base = ["calibrate", d / "m.pt2", "--data", d / "x.npy", "--method", "rtn", "-q", "--no-eval", "-o", d / "a.waps"]
    code, _, err = run(base + ["--resume"], capsys)
    assert_one_line_error(code, err, "no checkpoint", "a.waps.ckpt")
    code, _, err = run(base + ["--device", "tpu"], capsys)
    assert_one_line_error(code, err, "--device tpu")
    if not torch.cuda.is_available():
        code, _, err = run(base + ["--device", "cuda"], capsys)
        assert_one_line_error(code, err, "CUDA is not available")
    assert sorted(p.name for p in d.iterdir()) == ["m.pt2", "x.npy"]


def _tiny_resnet_pt2(folder):
    from tests.conftest import TinyResNet, randomize_bn
    torch.manual_seed(0)
    prog = torch.export.export(randomize_bn(TinyResNet(16)), (torch.zeros(1, 1, 8, 8),))
    torch.export.save(prog, folder / "tiny.pt2")
    return folder / "tiny.pt2"


def _calib_args(model, out):
    """4 blocks (stem, two residual units, fc) on the bundled 8×8 digits; a few seconds each."""
    return ["calibrate", str(model), "--data", "digits", "--samples", "64", "--iters", "30", "--batch", "16",
            "--method", "qdrop+waps", "--device", "cpu", "--no-eval", "-q", "-o", str(out)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    model = _tiny_resnet_pt2(d)
    p = subprocess.run(EXE + _calib_args(model, d / "ref.waps"), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    return model, (d / "ref.waps").read_bytes()


def _wait_for_blocks(proc, ckpt, blocks: int) -> tuple[int, int]:
    from calib.checkpoint import progress
    deadline = time.time() + 600
    while time.time() < deadline:
        done = progress(ckpt)
        if done and done[0] >= blocks:
            return done
        assert proc.poll() is None, "the calibration ended before it could be stopped"
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.slow
def test_killed_calibration_resumes_to_the_same_bytes(uninterrupted, tmp_path):
    model, reference = uninterrupted
    out, ckpt = tmp_path / "m.waps", tmp_path / "m.waps.ckpt"
    p = subprocess.Popen(EXE + _calib_args(model, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = _wait_for_blocks(p, ckpt, 2)
    p.kill()                                       # SIGKILL: no handler, no cleanup
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL
    assert done[0] < done[1] == 4 and not out.exists()
    r = subprocess.run(EXE + _calib_args(model, out) + ["--resume"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == reference
    assert sorted(f.name for f in tmp_path.iterdir()) == ["m.waps"]  # checkpoint and temp files gone


@pytest.mark.slow
def test_ctrl_c_prints_the_resume_command_which_finishes_the_run(uninterrupted, tmp_path):
    import shlex
    model, reference = uninterrupted
    out = tmp_path / "m.waps"
    p = subprocess.Popen(EXE + _calib_args(model, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for_blocks(p, tmp_path / "m.waps.ckpt", 1)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in err
    command = shlex.split(err.split("continue with: ")[1].strip())
    assert command[0] == "waps-tvm" and command[-1] == "--resume"
    r = subprocess.run(EXE + command[1:], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == reference


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
