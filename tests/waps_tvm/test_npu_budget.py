"""``--npu-budget``: the compiled npu16 model's measured WAPS overhead (its report, from the
simulator's counters) stays within the budget the groups were chosen under."""
import json

import pytest

from tests.waps_tvm.test_cli import run


@pytest.mark.slow
def test_budgeted_groups_compile_within_budget(tmp_path, capsys):
    serial = tmp_path / "serial.json"                   # WAPS not hidden behind the array: g = 3 costs +11.5 %
    serial.write_text(json.dumps({"waps_pipelined": False}))
    art = tmp_path / "m.waps"
    code, out, err = run(["calibrate", "digit-recognizer", "--data", "mnist", "--samples", "64", "--iters", "20",
                          "--wbits", "2", "--npu-budget", "3%", "--npu-config", serial, "--no-eval", "-q",
                          "-o", art], capsys)
    assert code == 0, err
    assert "WAPS groups under the npu16 budget" in out
    code, _, err = run(["compile", art, "--target", "npu16", "--npu-config", serial, "-o", tmp_path / "c", "-q"],
                       capsys)
    assert code == 0, err
    totals = json.loads((tmp_path / "c" / "report.json").read_text())["totals"]
    assert 0 < totals["waps_overhead_pct"] <= 3.0
    from calib import artifact
    cfg = artifact.load(art).config
    assert cfg["npu_budget"] == 0.03 and any(len(g) > 1 for g in cfg["layer_gammas"].values())
    assert any(len(g) < 3 for g in cfg["layer_gammas"].values())          # the budget took groups away
