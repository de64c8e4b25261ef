"""waps-tvm compile / run: end-to-end bit-exactness, the fresh-process runner, errors."""
import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from calib import artifact
from relay_passes import reference
from tests.compile_helpers import calibrated, rewrite_archive, scramble_groups, torchvision_w2
from waps_tvm import cli
from waps_tvm.compiler import build, lower_artifact

ROOT = Path(__file__).resolve().parents[2]


def _bit_exact(art, batch, form, seed=0):
    import tvm
    lowered = lower_artifact(art, batch, form)
    shape = (batch, *art.graph.input.attrs["shape"])
    x = np.random.default_rng(seed).normal(size=shape).astype("float32")
    ref = reference.run(lowered.program, x)
    vm = tvm.runtime.vm.VirtualMachine(build(lowered), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x))
    np.testing.assert_array_equal(out[1].numpy(), ref[1])
    np.testing.assert_array_equal(out[0].numpy(), ref[0])
    return lowered


@pytest.fixture(scope="module")
def compiled(tiny_artifact, tmp_path_factory):
    d = tmp_path_factory.mktemp("c")
    path = artifact.save(tiny_artifact, d / "tiny.waps")
    assert cli.main(["compile", str(path), "--target", "llvm", "-o", str(d / "out"), "--batch", "2",
                     "--dump-ir"]) == 0
    return d


def test_compile_writes_library_metadata_and_stages(compiled):
    out = compiled / "out"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["input"]["shape"] == [2, 1, 16, 16] and meta["input"]["layout"] == "NCHW"
    assert meta["output"]["shape"] == [2, 10] and meta["waps"]["form"] == "fast"
    assert meta["waps"]["gathers"] >= 1 and meta["versions"]["tvm"]
    assert sorted(p.stem for p in (out / "ir").iterdir()) == ["final", "legalized", "permuted", "quantized"]
    assert (out / "graph.onnx").is_file()
    assert not [p for p in compiled.iterdir() if p.name.startswith(".")]     # no temp folders left


def test_runs_in_a_fresh_process_importing_only_tvm_numpy_runner(compiled, tiny_artifact):
    x = np.random.default_rng(1).normal(size=(2, 1, 16, 16)).astype("float32")
    np.save(compiled / "x.npy", x)
    # torch, calib and the compiler are made unimportable: the runner needs TVM and NumPy only
    # (tvm_ffi imports torch for DLPack when it can, so "not imported" is not the test)
    code = (
        "import sys\n"
        "for blocked in ('torch', 'calib', 'relay_passes', 'codegen', 'waps_tvm.cli', 'waps_tvm.api'):\n"
        "    sys.modules[blocked] = None\n"
        "import numpy as np\n"
        "from waps_tvm import runner\n"
        f"m = runner.load({str(compiled / 'out')!r})\n"
        f"deq, codes = m(np.load({str(compiled / 'x.npy')!r}))\n"
        f"np.save({str(compiled / 'codes.npy')!r}, codes)\n"
        "assert sorted(k for k, v in sys.modules.items() if v and k.startswith('waps_tvm')) == ['waps_tvm', 'waps_tvm.runner']\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lowered = lower_artifact(tiny_artifact, 2)
    np.testing.assert_array_equal(np.load(compiled / "codes.npy"), reference.run(lowered.program, x)[1])


def test_runner_main_runs_several_folders_and_reports_each_failure(compiled, tiny_artifact, tmp_path, capsys):
    """``python -m waps_tvm.runner`` takes FOLDER X.npy OUTDIR triples (what emulation.run_many
    starts under qemu): a failing triple is one stderr line and exit 2, the others still run."""
    from waps_tvm import runner
    x = np.random.default_rng(2).normal(size=(3, 1, 16, 16)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    outs = [tmp_path / f"o{i}" for i in range(3)]
    for o in outs:
        o.mkdir()
    args = [str(compiled / "out"), str(tmp_path / "x.npy"), str(outs[0]),
            str(tmp_path / "missing"), str(tmp_path / "x.npy"), str(outs[1]),
            str(compiled / "out"), str(tmp_path / "x.npy"), str(outs[2]), "--repeat", "2"]
    assert runner.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{tmp_path / 'missing'}: not a compiled waps-tvm folder"), err
    want = reference.run(lower_artifact(tiny_artifact, 2).program, np.concatenate([x, x[-1:]]))[1][:3]
    for o in (outs[0], outs[2]):
        np.testing.assert_array_equal(np.load(o / "codes.npy"), want)
        assert len(np.load(o / "times.npy")) == 2
    assert not list(outs[1].iterdir())
    with pytest.raises(SystemExit):                      # not a whole number of triples
        runner.main(args[:4])


def test_cli_run_prints_saves_and_times(compiled, capsys):
    x = np.random.default_rng(2).normal(size=(2, 1, 16, 16)).astype("float32")
    np.save(compiled / "x2.npy", x)
    assert cli.main(["run", str(compiled / "out"), "--input", str(compiled / "x2.npy"),
                     "--output", str(compiled / "y.npy"), "--repeat", "3"]) == 0
    text = capsys.readouterr().out
    assert "latency over 3 runs" in text
    y = np.load(compiled / "y.npy")
    assert y.shape == (2, 10) and y.dtype == np.float32
    assert cli.main(["run", str(compiled / "out"), "--input", str(compiled / "x2.npy"), "--codes",
                     "--output", str(compiled / "c.npy")]) == 0
    assert np.load(compiled / "c.npy").dtype == np.uint8


@pytest.mark.parametrize("count", [1, 3, 5])
def test_run_takes_any_number_of_samples(compiled, tiny_artifact, count):
    """A batch-2 build runs 1, 3 or 5 samples: chunks of 2, the last padded and trimmed; each
    sample's codes equal the reference's for that sample alone."""
    from waps_tvm import runner
    x = np.random.default_rng(5).normal(size=(count, 1, 16, 16)).astype("float32")
    deq, codes = runner.load(compiled / "out")(x)
    assert deq.shape == (count, 10) and codes.shape == (count, 10)
    single = lower_artifact(tiny_artifact, 1).program
    want = np.concatenate([reference.run(single, x[i:i + 1])[1] for i in range(count)])
    np.testing.assert_array_equal(codes, want)
    np.save(compiled / f"x{count}.npy", x)
    assert cli.main(["run", str(compiled / "out"), "--input", str(compiled / f"x{count}.npy"), "--codes",
                     "--output", str(compiled / f"c{count}.npy")]) == 0
    np.testing.assert_array_equal(np.load(compiled / f"c{count}.npy"), want)


@pytest.mark.parametrize("case,expect", [
    ("shape", "does not match the compiled shape (2, 1, 16, 16)"),
    ("dtype", "input must be a float array"),
    ("nan", "NaN or Inf"),
    ("notnpy", "cannot read a .npy array"),
    ("folder", "not a compiled waps-tvm folder"),
])
def test_run_bad_input_is_one_line(compiled, capsys, case, expect):
    folder, path = compiled / "out", compiled / f"bad_{case}.npy"
    if case == "shape":
        np.save(path, np.zeros((3, 1, 16, 15), np.float32))        # any N; the sample shape is fixed
    elif case == "dtype":
        np.save(path, np.zeros((2, 1, 16, 16), np.int64))
    elif case == "nan":
        np.save(path, np.full((2, 1, 16, 16), np.nan, np.float32))
    elif case == "notnpy":
        path.write_text("hello")
    else:
        np.save(path, np.zeros((2, 1, 16, 16), np.float32))
        folder = compiled
    assert cli.main(["run", str(folder), "--input", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert expect in err and "\n" not in err


def test_compile_errors_are_one_line(compiled, tiny_artifact, tmp_path, capsys):
    good = compiled / "tiny.waps"
    assert cli.main(["compile", str(good), "--target", "cuda", "-o", str(tmp_path / "o")]) == 2
    assert "unknown target 'cuda'" in capsys.readouterr().err
    bad = rewrite_archive(good, tmp_path / "v99.waps", version=99)
    assert cli.main(["compile", str(bad), "-o", str(tmp_path / "o")]) == 2
    assert "version 99 is not supported" in capsys.readouterr().err
    weight_only = copy.deepcopy(tiny_artifact)
    for q in weight_only.quant.values():
        q.bits = 32
    artifact.save(weight_only, tmp_path / "w32.waps")
    assert cli.main(["compile", str(tmp_path / "w32.waps"), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "weight-only" in err and "\n" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("form", ["split", "fused", "fast"])
def test_tiny_resnet_bit_exact_tile_groups(tiny_artifact, form):
    art = scramble_groups(copy.deepcopy(tiny_artifact), seed=7, tile=16)
    _bit_exact(art, 3, form)


# -------------------------------------------------------------- coverage (slow)

TORCHVISION = ["resnet18", "mobilenet_v2", "regnet_x_600mf", "mnasnet0_5"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", TORCHVISION)
def test_torchvision_architectures_bit_exact(arch):
    art = scramble_groups(torchvision_w2(arch), seed=3, tile=16)
    _bit_exact(art, 1, "split")
    _bit_exact(art, 4, "fused", seed=1)
    _bit_exact(art, 2, "fast", seed=2)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digit-recognizer", "fashion_resnet", "fashion_mobilenetv2"])
def test_benchmark_models_bit_exact_and_agree_with_fake_quant(name):
    import tvm
    from calib.fakequant import build_fake_quant
    from waps_tvm.datasets import load_dataset
    model, data = _benchmark(name)
    calib = load_dataset(data, "calib", n=128, input_shape=model.input_shape)
    from calib.config import CalibConfig
    from waps_tvm import api
    _, art = api.quantize(model, calib.x, CalibConfig(wbits=2, abits=4, iters=60, samples=128, progress=False))
    _bit_exact(art, 1, "split")
    _bit_exact(art, 1, "fast")
    test = load_dataset(data, "test", n=2000, input_shape=model.input_shape)
    lowered = lower_artifact(art, 250, "fused")
    vm = tvm.runtime.vm.VirtualMachine(build(lowered), tvm.cpu())
    got = np.concatenate([vm["main"](tvm.runtime.tensor(test.x[i:i + 250].numpy()))[0].numpy()
                          for i in range(0, 2000, 250)])
    np.testing.assert_array_equal(got[:250], reference.run(lowered.program, test.x[:250].numpy())[0])
    with torch.no_grad():
        fq = build_fake_quant(art)(test.x).numpy()
    agree = (got.argmax(1) == fq.argmax(1)).mean()
    assert agree >= 0.995, agree


def _benchmark(name):
    from waps_tvm.model_io import LoadedModel, load_model
    if name == "digit-recognizer":
        return load_model(name), "mnist"
    from bench.models import load_pretrained
    return LoadedModel(name, (1, 28, 28), module=load_pretrained(name)), "fashion-mnist"
