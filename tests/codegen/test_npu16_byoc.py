"""--target npu16: BYOC partitions run as instruction streams on the simulator, bit-exact."""
import ctypes
import json

import numpy as np
import pytest

from calib import artifact
from calib.numerics import GroupScale
from codegen.npu16.lower import NotOnNpu, lower_op
from relay_passes import reference
from relay_passes.attrs import ConvAttrs, LinearAttrs, QuantizeAttrs
from targets.npu16.cost import LayerShape, layer_cost
from targets.npu16.isa import COUNTERS
from targets.npu16.params import NPU16
from tests.compile_helpers import run_in_fresh_process
from waps_tvm import cli
from waps_tvm.compiler import lower_artifact


def test_compile_npu16_runs_bit_exact_in_a_fresh_process_and_reports_placement(tiny_artifact, tmp_path, capsys):
    path = artifact.save(tiny_artifact, tmp_path / "t.waps")
    assert cli.main(["compile", str(path), "--target", "npu16", "-o", str(tmp_path / "out"), "--batch", "2"]) == 0
    text = capsys.readouterr().out
    assert "on the host (llvm)" in text and "float arithmetic: npu16 is integer-only" in text
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    where = {p["kind"]: p["target"] for p in meta["placement"]}
    assert where == {"quantize": "llvm", "dequantize": "llvm", "flatten": "llvm", "conv2d": "npu16",
                     "linear": "npu16", "add": "npu16", "sum_pool2d": "npu16", "gather": "npu16"}
    assert all(p["reason"] for p in meta["placement"] if p["target"] == "llvm")
    x = np.random.default_rng(3).normal(size=(2, 1, 16, 16)).astype("float32")
    codes = run_in_fresh_process(tmp_path / "out", x, tmp_path)
    ref = reference.run(lower_artifact(tiny_artifact, 2).program, x)
    np.testing.assert_array_equal(codes, ref[1])


def test_unsupported_ops_stay_on_the_host():
    with pytest.raises(NotOnNpu, match="at most 8"):
        lower_op("linear", LinearAttrs(group_scales=[GroupScale(0, 0)] * 9, z_in=0, z_out=0, lo=0, hi=15),
                 [(1, 32)], ["uint8"], {"w": np.zeros((4, 32), np.int8), "groups": np.zeros(32, np.int8)})
    with pytest.raises(NotOnNpu, match="integer-only"):
        lower_op("quantize", QuantizeAttrs(scale=1.0, zero_point=0, qmax=255), [(1, 3, 4, 4)], ["float32"], {})




@pytest.mark.parametrize("c,m,groups_sizes", [(48, 32, (16, 16, 16)), (40, 20, (20, 10, 10)), (24, 16, ())])
def test_simulator_counters_match_the_cost_model(tmp_path, c, m, groups_sizes):
    from tests.compile_helpers import npu16_simulator
    lib = npu16_simulator(tmp_path)
    rng = np.random.default_rng(0)
    w = rng.integers(-2, 2, (m, c, 3, 3)).astype(np.int8)
    groups = np.repeat(np.arange(len(groups_sizes)), groups_sizes).astype(np.int8) if groups_sizes else None
    attrs = ConvAttrs(conv_groups=1, stride=[1, 1], padding=[1, 1], dilation=[1, 1], z_in=3, z_out=0, lo=0, hi=255,
                      frac=2, group_scales=[GroupScale(0, 0), GroupScale(-1, 4), GroupScale(1, 4)])
    params = {"w": w}
    if groups is not None:
        params["groups"] = groups
    npu = NPU16(arrays=1, waps_pipelined=False)
    low = lower_op("conv2d", attrs, [(1, c, 6, 6)], ["uint8"], params, npu)
    x = rng.integers(0, 16, (1, c, 6, 6)).astype(np.uint8)
    out = np.zeros((1, m, 6, 6), np.uint8)
    bias = np.zeros(m, np.int32)
    mult = np.full(m, 2**30, np.int32)
    shift = np.full(m, 8, np.int32)
    cnt = np.zeros(len(COUNTERS), np.int64)
    p = lambda a: a.ctypes.data_as(ctypes.c_void_p)                              # noqa: E731
    assert lib.run(p(np.ascontiguousarray(low.words)), p(x), p(out), p(low.tiles), p(low.table), p(bias),
                   p(mult), p(shift), p(cnt)) == 0
    macs, steps, waps, shifts, adds, epi = (int(v) for v in cnt[:6])
    scaled = (False, True, True) if groups_sizes else ()
    model = layer_cost(LayerShape("l", c, m, 6, 6, 3, 3, group_sizes=tuple(groups_sizes), scaled=scaled),
                       npu)
    assert steps == model.compute_cycles
    assert waps == model.waps_cycles
    assert macs == model.macs and epi == m * 36
    assert shifts == model.shifts and adds == model.adds


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2", "regnet_x_600mf", "mnasnet0_5"])
def test_torchvision_npu16_bit_exact(arch):
    import tvm

    from tests.compile_helpers import scramble_groups, torchvision_w2
    from waps_tvm.compiler import build
    art = scramble_groups(torchvision_w2(arch), seed=6, tile=16)
    lowered = lower_artifact(art, 2)
    x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype("float32")
    vm = tvm.runtime.vm.VirtualMachine(build(lowered, "npu16"), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x))
    ref = reference.run(lowered.program, x)
    np.testing.assert_array_equal(out[1].numpy(), ref[1])


def test_report_table_json_and_chart(tiny_artifact, tmp_path, capsys):
    path = artifact.save(tiny_artifact, tmp_path / "t.waps")
    assert cli.main(["compile", str(path), "--target", "npu16", "-o", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    assert cli.main(["report", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    assert "| **total** |" in text and "WAPS groups cost" in text and "llvm: float arithmetic" in text
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    convs = [r for r in rep["ops"] if r["kind"] == "conv2d" and r["target"] == "npu16"]
    assert convs and all(r["npu16"]["cycles"] >= r["npu16"]["cycles_no_groups"] > 0 for r in convs)
    assert rep["totals"]["gathers"] >= 1 and rep["totals"]["cycles"] == sum(r["npu16"]["cycles"] for r in rep["ops"]
                                                                           if "npu16" in r)
    assert (tmp_path / "out" / "report.md").is_file() and (tmp_path / "out" / "cycles.png").stat().st_size > 1000
    assert cli.main(["report", str(tmp_path)]) == 2                     # not a compiled folder


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digit-recognizer", "fashion_resnet", "fashion_mobilenetv2"])
def test_benchmark_models_npu16_and_c_equal_llvm_and_reference(name):
    import tvm

    from calib.config import CalibConfig
    from tests.waps_tvm.test_compile import _benchmark
    from waps_tvm import api
    from waps_tvm.compiler import build
    from waps_tvm.datasets import load_dataset
    model, data = _benchmark(name)
    calib = load_dataset(data, "calib", n=64, input_shape=model.input_shape)
    _, art = api.quantize(model, calib.x, CalibConfig(wbits=2, abits=4, iters=30, samples=64, progress=False))
    lowered = lower_artifact(art, 2)
    x = load_dataset(data, "test", n=2, input_shape=model.input_shape).x.numpy()
    ref = reference.run(lowered.program, x)
    for target in ("llvm", "c", "npu16"):
        vm = tvm.runtime.vm.VirtualMachine(build(lowered, target), tvm.cpu())
        out = vm["main"](tvm.runtime.tensor(x))
        np.testing.assert_array_equal(out[1].numpy(), ref[1], err_msg=target)
        np.testing.assert_array_equal(out[0].numpy(), ref[0], err_msg=target)
