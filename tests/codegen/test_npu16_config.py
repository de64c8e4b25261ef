"""--npu-config: the npu16 machine as data, end to end (tiles 8/16/32 bit-exact, counters in
the report equal to the estimator, the config recorded), and its one-line errors."""
import json

import numpy as np
import pytest

from calib import artifact
from relay_passes import reference
from targets.npu16.counters import measure
from targets.npu16.params import DEFAULT, NPU16, NpuConfigError, from_config, load_config
from targets.npu16.report import estimate
from tests.compile_helpers import run_in_fresh_process
from waps_tvm import cli
from waps_tvm.compiler import lower_artifact


def test_config_round_trip_and_defaults():
    npu = NPU16(tile=8, arrays=3, clock_mhz=500, dma_bytes_per_cycle=4, epilogue_width=16, sram_act_kib=128,
                waps_pipelined=False, first_layer_im2col=True)
    assert from_config(json.loads(json.dumps(npu.to_config()))) == npu
    assert npu.to_config()["first_layer_im2col"] is True
    assert from_config({}) == DEFAULT and not DEFAULT.first_layer_im2col
    assert from_config({"first_layer_im2col": True}).first_layer_im2col
    assert from_config({"cycles_per_value": {"add": 0.75}}).unit_q8("add") == 192
    got = from_config({"tile": 32, "epilogue_lanes": 4, "sram_kib": {"weights": 64}})
    assert (got.tile, got.epilogue_width, got.sram_weight_kib) == (32, 4, 64)
    assert got.arrays == DEFAULT.arrays and got.sram_act_kib == DEFAULT.sram_act_kib


@pytest.mark.parametrize("cfg,msg", [
    ({"tiles": 8}, "unknown key(s) tiles"),
    ({"tile": 0}, "tile must be 1 to 64"),
    ({"tile": 128}, "tile must be 1 to 64"),
    ({"tile": "16"}, "tile: expected int"),
    ({"arrays": 5}, "1 to 4 MAC arrays"),
    ({"clock_mhz": -1}, "clock_mhz must be positive"),
    ({"dma_bytes_per_cycle": 0}, "dma_bytes_per_cycle must be at least 1"),
    ({"epilogue_lanes": 2.5}, "epilogue_lanes: expected int"),
    ({"waps_pipelined": 1}, "waps_pipelined: expected bool"),
    ({"first_layer_im2col": "yes"}, "first_layer_im2col: expected bool"),
    ({"sram_kib": 512}, "sram_kib must be an object"),
    ({"sram_kib": {"weights": 0}}, "sram_kib.weights must be at least 1"),
    ({"cycles_per_value": {"add": -1}}, "cycles_per_value.add must be 0 or at least 1/256"),
    ({"cycles_per_value": {"conv": 1}}, "cycles_per_value must be an object with keys among"),
    ({"weight_bytes_per_cycle": -1}, "weight_bytes_per_cycle must not be negative"),
    ([16], "must be a JSON object"),
])
def test_bad_config_is_one_line_exit_2(tmp_path, capsys, cfg, msg):
    path = tmp_path / "npu.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(NpuConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        load_config(path)
    # the config is checked before the model is read
    assert cli.main(["compile", str(tmp_path / "none.waps"), "--target", "npu16", "--npu-config", str(path),
                     "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("waps-tvm: error: --npu-config") and msg in err and "\n" not in err


def test_config_file_errors_and_other_targets(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{tile: 8")
    good = tmp_path / "good.json"
    good.write_text('{"tile": 8}')
    for path, target, msg in ((bad, "npu16", "not JSON"), (tmp_path / "missing.json", "npu16", "cannot read"),
                              (good, "llvm", "does not apply to --target llvm")):
        assert cli.main(["compile", str(tmp_path / "none.waps"), "--target", target, "--npu-config", str(path),
                         "-o", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("waps-tvm: error: ") and msg in err and "\n" not in err


def test_tiles_8_16_32_bit_exact_with_counters_equal_to_the_estimator(tiny_artifact, tmp_path, capsys):
    path = artifact.save(tiny_artifact, tmp_path / "t.waps")
    x = np.random.default_rng(5).normal(size=(2, 1, 16, 16)).astype("float32")
    lowered = lower_artifact(tiny_artifact, 2)
    ref = reference.run(lowered.program, x)
    cycles = {}
    for tile in (8, 16, 32):
        cfg = tmp_path / f"npu{tile}.json"
        cfg.write_text(json.dumps({"tile": tile, "arrays": 2, "epilogue_lanes": 4, "waps_pipelined": tile != 32}))
        out = tmp_path / f"out{tile}"
        assert cli.main(["compile", str(path), "--target", "npu16", "--npu-config", str(cfg), "-o", str(out),
                         "--batch", "2"]) == 0
        assert f"{tile}x{tile} MAC array x2" in capsys.readouterr().out
        np.testing.assert_array_equal(run_in_fresh_process(out, x, tmp_path), ref[1], err_msg=f"tile {tile}")
        npu = load_config(cfg)
        meta = json.loads((out / "meta.json").read_text())
        assert from_config(meta["npu16"]) == npu and load_config(out / "npu_config.json") == npu
        rep = json.loads((out / "report.json").read_text())
        assert rep["npu"]["tile"] == tile and from_config(rep["npu"]) == npu
        # every offloaded op's counts are the simulator's counters, equal to the estimator
        counted = {r["op"]: r["npu16"] for r in rep["ops"] if "npu16" in r}
        assert counted and all(c["counted"] for c in counted.values())
        for op in lowered.program.ops:
            if op.name in counted:
                assert counted[op.name]["counters"] == estimate(lowered.program, op, npu).counters(), (tile, op.name)
        cycles[tile] = rep["totals"]["cycles"]
        # the runtime reads the same counters from the library after a run
        syms = {r["symbol"]: r["op"] for r in meta["placement"] if r.get("symbol")}
        again = measure(out / "model.so", (2, 1, 16, 16), sorted(syms))
        assert {syms[s]: c for s, c in again.items()} == {k: v["counters"] for k, v in counted.items()}
    assert len(set(cycles.values())) == 3, cycles


def test_first_layer_im2col_end_to_end(tiny_artifact, tmp_path, capsys):
    """first_layer_im2col compiled for real: the 1-channel 3×3 stem takes one array step per
    output tile and pixel (⌈9/16⌉) instead of 9, the outputs stay bit-exact and every op's
    counters equal the estimator (which report.layer_shape told the stem runs im2col)."""
    path = artifact.save(tiny_artifact, tmp_path / "t.waps")
    x = np.random.default_rng(6).normal(size=(2, 1, 16, 16)).astype("float32")
    lowered = lower_artifact(tiny_artifact, 2)
    cfg = tmp_path / "npu.json"
    cfg.write_text(json.dumps({"first_layer_im2col": True}))
    out = tmp_path / "out"
    assert cli.main(["compile", str(path), "--target", "npu16", "--npu-config", str(cfg), "-o", str(out),
                     "--batch", "2"]) == 0
    capsys.readouterr()
    np.testing.assert_array_equal(run_in_fresh_process(out, x, tmp_path), reference.run(lowered.program, x)[1])
    npu = load_config(cfg)
    rep = json.loads((out / "report.json").read_text())
    counted = {r["op"]: r["npu16"]["counters"] for r in rep["ops"] if "npu16" in r}
    for op in lowered.program.ops:
        if op.name in counted:
            assert counted[op.name] == estimate(lowered.program, op, npu).counters(), op.name
    stem = next(op for op in lowered.program.ops if op.kind == "conv2d")
    assert stem.params["w"].shape[1:] == (1, 3, 3) and "groups" not in stem.params
    out_tiles_pixels = 2 * -(-stem.shape[1] // npu.tile) * stem.shape[2] * stem.shape[3]
    assert counted[stem.name]["array_steps"] == out_tiles_pixels                   # 9 without im2col
    plain = estimate(lowered.program, stem, DEFAULT).counters()
    assert plain["array_steps"] == 9 * out_tiles_pixels and plain["macs"] == counted[stem.name]["macs"]
