"""The Vela benchmark's project-side parts (CI has no TensorFlow or Vela): the graph → description
translator, the TFLite weight layouts, and the parser of a real Vela output committed under
tests/bench/data/vela_tiny/ (made by tests/bench/make_vela_fixture.py)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bench import vela, vela_describe, vela_report
from bench.vela_tflite import ROLES, conv_kernel, dense_kernel, layer_name
from calib.errors import UnsupportedOpError
from tests.bench.make_vela_fixture import tiny_graph

DATA = Path(__file__).resolve().parent / "data" / "vela_tiny"
VELA = DATA / "vela"


@pytest.fixture(scope="module")
def graph():
    return tiny_graph()


def test_describe_keeps_order_shapes_and_conv_attributes(graph, tmp_path):
    desc = vela_describe.describe(graph, "tiny")
    assert [(n.op, n.shape) for n in desc.nodes] == [
        ("input", [3, 32, 32]), ("conv2d", [16, 16, 16]), ("max_pool2d", [16, 8, 8]), ("conv2d", [32, 8, 8]),
        ("conv2d", [16, 8, 8]), ("add", [16, 8, 8]), ("avg_pool2d", [16, 4, 4]), ("global_avg_pool", [16, 1, 1]),
        ("flatten", [16]), ("linear", [10])]
    stem, pool, dw, pw, add = desc.nodes[1:6]
    assert (stem.attrs["stride"], stem.attrs["padding"], stem.attrs["groups"], stem.attrs["act"]) == \
        ([2, 2], [1, 1], 1, "relu")
    assert (pool.attrs["kernel"], pool.attrs["stride"], pool.attrs["padding"]) == ([3, 3], [2, 2], [1, 1])
    assert (dw.attrs["groups"], dw.attrs["padding"], dw.attrs["act"]) == (16, [1, 1], "relu6")
    assert (pw.attrs["groups"], pw.attrs["padding"], pw.attrs["act"]) == (2, [0, 0], None)
    assert add.inputs == [pool.name, pw.name] and add.attrs["act"] == "relu"
    assert desc.weights[f"{dw.name}.weight"].shape == (32, 1, 3, 3)
    assert desc.weights[f"{pw.name}.weight"].shape == (16, 16, 1, 1)
    # BN folded into the stem: its weights are the graph's, not the module's
    np.testing.assert_array_equal(desc.weights[f"{stem.name}.weight"], graph[stem.name].params["weight"].numpy())
    path = vela_describe.write(desc, tmp_path)
    body = json.loads(path.read_text())
    assert body["format"] == vela_describe.FORMAT and body["output"] == desc.output == "linear"
    assert [n["name"] for n in body["nodes"]] == [n.name for n in desc.nodes]
    with np.load(tmp_path / body["weights"]) as z:
        assert sorted(z.files) == sorted(desc.weights)


def test_describe_matches_the_committed_fixture(graph):
    """The fixture's graph.json is what describe() writes today (so the parser tests stay meaningful)."""
    body = json.loads((DATA / "graph.json").read_text())
    desc = vela_describe.describe(graph, "tiny")
    assert [(n["name"], n["op"], n["inputs"], n["shape"]) for n in body["nodes"]] == \
        [(n.name, n.op, n.inputs, n.shape) for n in desc.nodes]


class _Bad(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(3, 2, 1)

    def forward(self, x):
        return self.pool(torch.sigmoid(self.conv(x)))


def test_describe_names_every_untranslatable_node():
    from calib.capture import capture, export_module
    from calib.fuse import fuse_activations
    g = fuse_activations(capture(export_module(_Bad(), (3, 8, 8))))
    with pytest.raises(UnsupportedOpError) as e:
        vela_describe.describe(g)
    msg = str(e.value)
    assert "op elementwise" in msg and "padded max-pool of a possibly negative input" in msg


def test_max_pool_padding_is_accepted_after_a_relu_through_pools(graph):
    vela_describe.describe(graph)  # the stem's max-pool pads a ReLU output: no error
    # non-negativity is followed through pools; a conv without activation may be negative
    by_name = {n.name: n for n in graph.nodes}
    assert vela_describe._nonnegative(by_name["max_pool2d"], by_name)
    assert not vela_describe._nonnegative(by_name["conv2d_2"], by_name)


def test_conv_kernels_are_nhwc_with_torch_channel_order():
    w = np.arange(6 * 2 * 3 * 3, dtype=np.float32).reshape(6, 2, 3, 3)     # groups 3: c/g = 2
    kind, k = conv_kernel(w, 3)
    assert kind == "conv" and k.shape == (3, 3, 2, 6) and k[1, 2, 1, 4] == w[4, 1, 1, 2]
    dw = np.arange(8 * 1 * 3 * 3, dtype=np.float32).reshape(8, 1, 3, 3)    # 4 channels, multiplier 2
    kind, k = conv_kernel(dw, 4)
    assert kind == "depthwise" and k.shape == (3, 3, 4, 2)
    for i in range(4):
        for j in range(2):
            np.testing.assert_array_equal(k[:, :, i, j], dw[i * 2 + j, 0])
    fc = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert dense_kernel(fc).shape == (4, 3) and dense_kernel(fc)[1, 2] == fc[2, 1]


def test_depthwise_kernel_computes_torch_depthwise_conv():
    """Evaluate the NHWC depthwise kernel by hand against torch on the same input."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 5, 5)
    w = torch.randn(6, 1, 3, 3)
    ref = torch.nn.functional.conv2d(x, w, groups=3).numpy()[0]             # [6, 3, 3]
    _, k = conv_kernel(w.numpy(), 3)
    xh = x.numpy()[0].transpose(1, 2, 0)                                  # HWC
    out = np.zeros((3, 3, 3, 2), np.float32)
    for oy in range(3):
        for ox in range(3):
            out[oy, ox] = np.einsum("yxc,yxcm->cm", xh[oy:oy + 3, ox:ox + 3], k)
    np.testing.assert_allclose(out.reshape(3, 3, 6).transpose(2, 0, 1), ref, rtol=1e-5, atol=1e-5)


def test_nodes_in_reads_keras_scopes_of_fused_tensor_names():
    assert vela_report.nodes_in("tiny_1/conv2d_1__op_1/Relu6;tiny_1/conv2d_1__op_1/BiasAdd;;"
                                "tiny_1/conv2d_1__pad_1/Pad;tiny_1/conv2d_1__op_1/Squeeze1_act") == ["conv2d_1"]
    assert vela_report.nodes_in("m_1/add___op_2/Relu;m_1/add___sum_2/Add") == ["add_"]
    assert vela_report.nodes_in("m_1/relu_3__op_1/Relu;m_1/conv2d_5__op_1/BiasAdd") == ["relu_3", "conv2d_5"]
    assert vela_report.nodes_in("StatefulPartitionedCall_1:0") == []
    assert vela_report.nodes_in("#84") == []
    assert set(ROLES) == set(vela_report.ROLES)
    for role in ROLES:
        assert vela_report.nodes_in(f"m_1/{layer_name('conv2d_12', role)}_3/X") == ["conv2d_12"]


def test_parser_reads_the_real_vela_output():
    summary = vela_report.parse_summary(VELA / "tiny_summary_Ethos_U55_High_End_Embedded.csv")
    ops = vela_report.parse_per_layer(VELA / "tiny_per-layer.csv", VELA / "tiny_debug.xml")
    assert summary["system_config"] == "Ethos_U55_High_End_Embedded" and summary["memory_mode"] == "Shared_Sram"
    assert summary["core_clock"] == 500e6
    assert sum(o.op_cycles for o in ops) == summary["cycles_total"]
    for o in ops:  # Op Cycles is the largest unit's cycles
        assert o.op_cycles == max(o.cycles.values())
        assert o.bound == ("" if o.op_cycles == 0 else next(u for u in vela_report.UNITS
                                                             if o.cycles[u] == o.op_cycles))
    assert [o.target for o in ops].count("CPU") == 1
    tops = json.loads((DATA / "tflite_ops.json").read_text())
    g = json.loads((DATA / "graph.json").read_text())
    costs, stray = vela_report.attribute(ops, tops, {n["name"]: n["op"] for n in g["nodes"]}, g["output"])
    assert stray == []
    by = {c.node: c for c in costs}
    assert [c.node for c in costs] == ["conv2d", "max_pool2d", "conv2d_1", "conv2d_2", "add", "avg_pool2d",
                                       "mean", "linear"]
    assert by["max_pool2d"].tflite_types == ["PAD", "MAX_POOL_2D"]   # its zero padding is its own
    assert by["avg_pool2d"].targets == ["CPU"] and by["avg_pool2d"].op_cycles == 0
    assert by["linear"].tflite_types == ["FULLY_CONNECTED"]          # found through the model output
    assert by["conv2d"].macs == 16 * 16 * 16 * 27
    assert sum(c.op_cycles for c in costs) == summary["cycles_total"]
    assert by["conv2d"].bound == "npu" and by["linear"].bound == "off_chip_flash"


def test_parser_reads_cpu_operators_and_the_default_config():
    out = (DATA / "vela_stdout.txt").read_text()
    assert vela_report.cpu_operators(out) == [("Passthrough", "tiny_1/avg_pool2d__op_1/AvgPool")]
    cfg = vela_report.system_config(out)
    assert cfg["System Configuration"] == "Ethos_U55_High_End_Embedded" and cfg["Memory Mode"] == "Shared_Sram"
    assert (cfg["core_clock"], cfg["axi0_port"], cfg["axi1_port"]) == ("500000000.0", "Sram", "OffChipFlash")
    assert cfg["OffChipFlash_clock_scales"] == "0.125"


def test_parser_refuses_a_per_layer_csv_that_disagrees_with_the_debug_database(tmp_path):
    rows = (VELA / "tiny_per-layer.csv").read_text().splitlines()
    (tmp_path / "a.csv").write_text("\n".join(rows[:1] + rows[2:]) + "\n")       # one row dropped
    with pytest.raises(vela_report.VelaOutputError, match="rows"):
        vela_report.parse_per_layer(tmp_path / "a.csv", VELA / "tiny_debug.xml")
    rows[1], rows[3] = rows[3], rows[1]                                           # two rows swapped
    (tmp_path / "b.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(vela_report.VelaOutputError, match="disagree"):
        vela_report.parse_per_layer(tmp_path / "b.csv", VELA / "tiny_debug.xml")


def test_collect_and_markdown_from_the_fixture(graph, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(DATA, work)
    rec = vela.collect(graph, "tiny", 32, 0, 8, work)
    assert rec["graph_nodes_without_vela_rows"] == [] and rec["unattributed_vela_ops"] == []
    assert rec["sum_of_layer_op_cycles"] == rec["totals"]["cycles_total"]
    assert rec["cpu_operators"][0]["nodes"] == ["avg_pool2d"]
    assert rec["config"]["system_config"] == "Ethos_U55_High_End_Embedded"
    assert rec["float_check"]["rel"] < 1e-5          # the Keras float model reproduced torch's output
    md = vela.markdown([rec], top=3)
    rows = [line.split(" | ")[0].lstrip("| ") for line in md.splitlines()
            if line.startswith("| ") and line.split(" | ")[0].lstrip("| ") in {n["node"] for n in rec["nodes"]}]
    assert rows == [n["node"] for n in sorted(rec["nodes"], key=lambda n: -n["op_cycles"])[:3]]
    assert f"| {rec['totals']['cycles_total'] / 1e6:.2f} M |" in md


def test_missing_vela_venv_is_one_line_and_exit_2(capsys, tmp_path):
    assert vela.main(["--vela-python", str(tmp_path / "nope" / "python"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no Vela venv python" in err


def test_npu16_beside_vela_on_the_fixture(graph, tmp_path):
    """bench/vela_compare: every Vela node gets an npu16 cost of the same op, totals add up, and
    each node differing by more than 25 % carries an explanation naming both bounds."""
    from bench import vela_compare
    from targets.npu16.params import load_config
    work = tmp_path / "w"
    shutil.copytree(DATA, work)
    rec = vela.collect(graph, "tiny", 32, 0, 8, work)
    res = vela_compare.compare(rec, load_config(vela_compare.CONFIG), graph)
    by_node = {n["node"]: n for n in res["nodes"]}
    assert {n["node"] for n in rec["nodes"]} <= set(by_node)
    assert res["npu16_cycles"] == sum(n["npu16"] for n in res["nodes"]) > 0
    assert res["vela_cycles"] == sum(n["op_cycles"] for n in rec["nodes"])
    for n in res["nodes"]:
        assert (abs(n["ratio"] - 1) > vela_compare.DIFFER) == bool(n["why"]) or not n["vela"]
        assert n["npu16_bound"] in ("compute", "weights", "feature maps", "unit")
    stem = next(n for n in res["nodes"] if n["op"] == "conv2d")
    assert stem["macs"] == 16 * 16 * 16 * 27
    md = vela_compare.markdown([res], load_config(vela_compare.CONFIG), vela_compare.CONFIG)
    assert "| tiny |" in md and md.count("\n| ") >= len(res["nodes"])


def test_npu16_beside_vela_runs_the_stem_im2col_when_the_config_says(graph, tmp_path):
    """first_layer_im2col in the compared config: the 3-channel 3×3 stem takes ⌈27/16⌉ = 2 array
    steps per pixel instead of 9 (node_cost asks first_layer.runs_im2col, as the lowering does);
    every other node costs the same."""
    from dataclasses import replace

    from bench import vela_compare
    from targets.npu16.params import load_config
    work = tmp_path / "w"
    shutil.copytree(DATA, work)
    rec = vela.collect(graph, "tiny", 32, 0, 8, work)
    npu = load_config(vela_compare.CONFIG)
    off, on = (vela_compare.compare(rec, replace(npu, first_layer_im2col=b), graph)["nodes"] for b in (False, True))
    changed = [(a, b) for a, b in zip(off, on) if a != b]
    assert len(changed) == 1 and changed[0][0]["op"] == "conv2d"
    (a, b), = changed
    assert a["npu16_parts"]["compute"] == 9 * 16 * 16 and b["npu16_parts"]["compute"] == 2 * 16 * 16
