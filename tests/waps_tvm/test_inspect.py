"""waps-tvm inspect: Relax stages, the ONNX rendering (checked by onnx.checker), netron."""
import urllib.request

import onnx
import pytest

from calib import artifact
from waps_tvm import cli


@pytest.fixture(scope="module")
def compiled_npu16(tiny_artifact, tmp_path_factory):
    d = tmp_path_factory.mktemp("i")
    path = artifact.save(tiny_artifact, d / "t.waps")
    assert cli.main(["compile", str(path), "--target", "npu16", "-o", str(d / "out"), "--dump-ir"]) == 0
    return d / "out"


def test_onnx_shows_groups_epilogues_gathers_and_placement(compiled_npu16, capsys):
    model = onnx.load(str(compiled_npu16 / "graph.onnx"))
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert {"GroupConv", "ShiftAdd", "Requant", "Gather", "Quantize", "Dequantize"} <= set(ops)
    assert all(n.domain == "ai.waps" for n in model.graph.node)
    attrs = {n.name: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in model.graph.node}
    shift_add = next(v for k, v in attrs.items() if k.endswith("/shift_add") and len(v["sigma"]) == 3)
    assert shift_add["sigma"] == [0, -1, 1] and shift_add["shifts"] == [0, 4, 4]
    targets = {v["target"].decode() for v in attrs.values()}
    assert targets == {"npu16", "llvm"}
    group = next(v for v in attrs.values() if "channel_begin" in v)
    assert group["channel_end"] > group["channel_begin"] and group["target"] == b"npu16"
    assert cli.main(["inspect", str(compiled_npu16)]) == 0
    out = capsys.readouterr().out
    assert "GroupConv" in out and "on npu16" in out and "partitioned" in out


def test_stages_print_and_missing_stage_is_one_line(compiled_npu16, capsys):
    for stage in ("quantized", "permuted", "legalized", "partitioned", "final"):
        assert cli.main(["inspect", str(compiled_npu16), "--stage", stage]) == 0
        assert "def main" in capsys.readouterr().out
    assert cli.main(["inspect", str(compiled_npu16), "--stage", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown stage" in err and "\n" not in err
    assert cli.main(["inspect", str(compiled_npu16.parent)]) == 2


def test_netron_serves_the_graph(compiled_npu16, capsys):
    import threading
    result = {}

    def serve():
        result["rc"] = cli.main(["inspect", str(compiled_npu16), "--netron", "--serve-seconds", "6"])
    t = threading.Thread(target=serve)
    t.start()
    import time
    address = None
    for _ in range(50):
        time.sleep(0.1)
        out = capsys.readouterr().out
        if "netron serving" in out:
            address = out.split(" at ")[-1].split()[0]
            break
    assert address, "netron did not start"
    page = urllib.request.urlopen(address, timeout=5).read().decode()
    assert "netron" in page.lower()
    t.join(20)
    assert result.get("rc") == 0
