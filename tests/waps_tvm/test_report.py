"""The per-compile report (waps_tvm/report.py): rows, Markdown, PNGs, accuracy agreement."""
import json

import numpy as np
import pytest

from calib import artifact
from waps_tvm import cli, runner


@pytest.fixture(scope="module")
def labelled(tiny_artifact, tmp_path_factory):
    d = tmp_path_factory.mktemp("r")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((24, 1, 16, 16)).astype(np.float32)
    np.savez(d / "test.npz", x=x, y=rng.integers(0, 10, 24))
    return artifact.save(tiny_artifact, d / "t.waps"), d / "test.npz"


def test_llvm_report_rows_groups_gathers_and_accuracy(labelled, tiny_artifact, tmp_path, capsys):
    waps, data = labelled
    out = tmp_path / "out"
    assert cli.main(["compile", str(waps), "--target", "llvm", "--batch", "4", "-o", str(out),
                     "--eval-data", str(data), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "agreement" in printed
    rep = json.loads((out / "report.json").read_text())
    assert {r["target"] for r in rep["ops"]} == {"llvm"}
    convs = [r for r in rep["ops"] if r["kind"] == "conv2d"]
    # every WAPS layer's group sizes add up to its input channels and match the artifact's labels
    by_layer = {r["layer"]: r for r in convs if r["group_sizes"]}
    for name, rec in tiny_artifact.layers.items():
        if rec.groups is not None and name in by_layer:
            sizes = by_layer[name]["group_sizes"]
            assert sizes == [int((rec.groups == p).sum()) for p in range(len(sizes))]
    # a gather is an op of its own, or folded into the fast conv it feeds (read through in_index)
    assert by_layer and rep["totals"]["gathers"] == sum(r["kind"] == "gather" or r["gather_folded"]
                                                        for r in rep["ops"]) >= 1
    assert any(r["gathered"] for r in rep["ops"])
    assert rep["totals"]["macs"] == sum(r["macs"] for r in rep["ops"]) > 0
    acc = rep["accuracy"]
    model = runner.load(out)
    x, y = np.load(data)["x"], np.load(data)["y"]
    preds = np.concatenate([model(x[i:i + 4])[0].argmax(1) for i in range(0, 24, 4)])
    assert acc["images"] == 24 and acc["compiled_top1"] == pytest.approx(float((preds == y).mean()))
    assert acc["disagreements"] == round((1 - acc["agreement"]) * 24)
    md = (out / "report.md").read_text()
    assert "predictions agree on" in md and "| **total** |" in md and "gather in" in md
    assert (out / "groups.png").stat().st_size > 1000 and not (out / "cycles.png").exists()
    assert not list(out.glob(".*tmp*"))

    assert cli.main(["report", str(out)]) == 0                        # re-render from report.json
    assert "predictions agree on" in capsys.readouterr().out


def test_report_errors_are_one_line(labelled, tmp_path, capsys):
    waps, _ = labelled
    unlabelled = tmp_path / "x.npy"
    np.save(unlabelled, np.zeros((4, 1, 16, 16), np.float32))
    assert cli.main(["compile", str(waps), "-o", str(tmp_path / "o"), "--eval-data", str(unlabelled), "-q"]) == 2
    assert "has no labels" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()                              # checked before compiling
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "report.json").write_text("{\"ops\": 1}")
    assert cli.main(["report", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a waps-tvm report" in err and "\n" not in err


def test_npu16_report_vela_columns_csv_roofline_and_recost(labelled, tmp_path, capsys):
    """An npu16 build's report has the Vela-style columns (bound, MAC utilisation, SRAM peaks,
    off-chip bytes, time) and a CSV and roofline; `report --npu-config` re-costs it for another
    machine from the stored cost queries, equal to the estimator there, without recompiling."""
    import csv

    from targets.npu16.params import NPU16, from_config
    from targets.npu16.report import CostQuery
    waps, _ = labelled
    out = tmp_path / "out"
    assert cli.main(["compile", str(waps), "--target", "npu16", "--batch", "1", "-o", str(out), "-q"]) == 0
    capsys.readouterr()
    rep = json.loads((out / "report.json").read_text())
    npu_rows = [r for r in rep["ops"] if "npu16" in r]
    assert npu_rows and all(r["npu16"]["counted"] for r in npu_rows)
    for r in npu_rows:
        c = r["npu16"]
        assert c["bound"] in ("compute", "dma", "epilogue") and 0 <= c["utilisation"] <= 1
        assert c["offchip_read"] == c["counters"]["dma_in_bytes"] and c["time_us"] == c["cycles"] / 800
        # the stored query re-costs to the counted numbers on the same machine
        assert CostQuery.from_json(c["query"]).cost(NPU16()).counters() == c["counters"]
    host = [r for r in rep["ops"] if r["target"] != "npu16"]          # quantize, dequantize, ...: host time
    assert host and all("host" in r and "npu16" not in r for r in host)
    t = rep["totals"]
    assert t["host_time_us"] > 0 and t["total_time_us"] == pytest.approx(t["npu_time_us"] + t["host_time_us"])
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert [r["op"] for r in rows] == [r["op"] for r in rep["ops"]]
    assert (out / "roofline.png").stat().st_size > 1000
    assert "| bound | MAC util |" in (out / "report.md").read_text()

    small = tmp_path / "small.json"
    small.write_text(json.dumps({"tile": 8, "arrays": 2, "clock_mhz": 500, "sram_kib": {"activations": 1}}))
    assert cli.main(["report", str(out), "--npu-config", str(small)]) == 0
    capsys.readouterr()
    again = json.loads((out / "recost-small" / "report.json").read_text())
    npu = from_config(json.loads(small.read_text()))
    assert again["npu"] == npu.to_config() and again["recosted_from"] == rep["npu"]
    moved = 0
    for before, after in zip(rep["ops"], again["ops"]):
        if "npu16" not in before:
            assert "npu16" not in after
            continue
        if "npu16" not in after:                   # the 1 KiB activation buffer is too small for it
            assert "does not fit this npu16" in after["reason"] and after["target"] == "llvm"
            assert after["host"]["cycles"] > 0 and after["host"]["query"]["fn"] == "kernel"    # its host time
            moved += 1
            continue
        assert not after["npu16"]["counted"]
        assert after["npu16"]["counters"] == CostQuery.from_json(before["npu16"]["query"]).cost(npu).counters()
    assert moved and moved < len(npu_rows)
    moved_us = sum(r["host"]["time_us"] for b, r in zip(rep["ops"], again["ops"]) if "npu16" in b and "host" in r)
    assert again["totals"]["host_time_us"] == pytest.approx(t["host_time_us"] + moved_us)   # same (default) host
    assert (out / "recost-small" / "report.csv").exists() and (out / "report.json").read_text() == json.dumps(rep, indent=1)
    assert cli.main(["report", str(out), "--out", str(tmp_path / "x")]) == 2     # --out needs --npu-config
    assert "--out goes with --npu-config" in capsys.readouterr().err


def test_npu16_report_host_time_of_a_transformer():
    """A timm-style ViT on npu16: its layer norms and softmax run on the NPU's row unit, each
    faster there than the host model says it would take on the host; what stays on the host
    (quantize, dequantize, reshape, constant) has host cycles and time, and the totals add the
    host's time to the NPU's and give its share."""
    import torch

    from codegen.npu16.byoc import placement
    from codegen.npu16.lower import HOST_KINDS
    from targets.npu16.host_cost import host_row
    from targets.npu16.params import DEFAULT
    from targets.npu16.report import host_query
    from tests.compile_helpers import calibrated
    from tests.waps_tvm.test_transformer import TimmStyleViT
    from waps_tvm import report
    from waps_tvm.compiler import lower_artifact
    torch.manual_seed(0)
    art = calibrated(TimmStyleViT().eval(), (3, 16, 16), wbits=4, abits=8, iters=1, samples=8)
    prog = lower_artifact(art, 1, "split", target="npu16").program
    rep = report.build(prog, placement(None, prog=prog), "npu16")
    norms = [r for r in rep["ops"] if r["kind"] in ("layer_norm", "softmax")]
    assert {r["kind"] for r in norms} == {"layer_norm", "softmax"}
    for r in norms:
        assert r["target"] == "npu16" and "host" not in r and r["npu16"]["query"]["fn"] == "row"
        on_host = host_row(*host_query(prog, prog[r["op"]]), DEFAULT.host)
        assert 0 < r["npu16"]["time_us"] < on_host["time_us"], (r["op"], r["npu16"]["time_us"], on_host["time_us"])
    host = [r for r in rep["ops"] if r["target"] != "npu16"]
    assert host and {r["kind"] for r in host} <= HOST_KINDS
    t = rep["totals"]
    assert t["host_time_us"] == pytest.approx(sum(r["host"]["time_us"] for r in host)) and t["host_time_us"] > 0
    assert t["total_time_us"] == pytest.approx(t["npu_time_us"] + t["host_time_us"]) and 0 < t["host_share"] < 1
    assert t["cycles"] == sum(r["npu16"]["cycles"] for r in rep["ops"] if "npu16" in r)
    md = report.markdown(rep)
    assert f"host {t['host_time_us']:,.1f} µs" in md and "% on the host" in md
