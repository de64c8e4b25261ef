"""bench/calib_memory: the watchdog stops a child before the machine runs out of memory,
and new results are merged with the rows measured before."""
import json
import subprocess
import sys
import time
from types import SimpleNamespace

from bench.calib_memory import merge, stopped_row, watch, write


def test_watchdog_kills_the_child_when_memory_available_falls_below_the_floor():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    t0 = time.monotonic()
    w = watch(proc, floor_gb=2.5, interval=0.05, available=lambda: 1.0)
    assert proc.returncode is not None and time.monotonic() - t0 < 30
    assert w.stopped_at_gb is not None and w.min_available_gb == 1.0


def test_watchdog_stops_a_child_at_the_time_limit_and_the_row_says_how_far_it_got():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    w = watch(proc, floor_gb=2.5, interval=0.05, available=lambda: 100.0, time_limit_s=0.3)
    assert proc.returncode is not None and w.timed_out and w.stopped_at_gb is None
    trace = [{"block": 1, "name": "conv2d", "peak_rss_in_block": 9.0},
             {"block": 2, "name": "add_", "peak_rss_in_block": 11.8}]
    row = stopped_row("resnet50", 1024, 2, 4, "stopped at the time limit", trace, {"peak_rss_polled_gb": 10.5})
    assert row["peak_rss_so_far_gb"] == 11.8 and "2 blocks done, last add_" in row["status"]


def test_watchdog_lets_a_child_finish_and_reports_its_peak():
    proc = subprocess.Popen([sys.executable, "-c", "x = bytearray(200 * 2**20); import time; time.sleep(1.0)"])
    w = watch(proc, floor_gb=2.5, interval=0.05, available=lambda: 100.0)
    assert proc.returncode == 0 and w.stopped_at_gb is None
    assert w.peak_anon_gb > 0.15 and w.peak_rss_gb >= w.peak_anon_gb


def _row(model, n, code, peak):
    return {"model": model, "samples": n, "peak_rss_gb": peak, "rss_before_gb": 0.7, "seconds": 1.0,
            "code": code, "status": "done"}


def test_merge_keeps_older_rows_and_replaces_only_the_same_measurement():
    old = [_row("resnet18", 64, "aaa", 2.0), _row("resnet50", 32, "aaa", 4.0)]
    new = [_row("resnet18", 64, "bbb", 1.5), _row("resnet50", 32, "aaa", 3.9)]
    got = merge(old, new)
    assert _row("resnet18", 64, "aaa", 2.0) in got and len(got) == 3
    assert [r["peak_rss_gb"] for r in got if r["model"] == "resnet50"] == [3.9]


def test_write_merges_into_the_existing_result_file(tmp_path):
    (tmp_path / "calib_memory.json").write_text(json.dumps({"rows": [_row("resnet18", 64, "old", 2.6)],
                                                            "note": "kept"}))
    stopped = {"model": "resnet50", "samples": 1024, "status": "stopped at 21.0 GB: would exceed",
               "peak_anon_gb": 20.0, "code": "new"}
    write([_row("resnet18", 1024, "new", 9.0), stopped], SimpleNamespace(tag=""), results=tmp_path)
    doc = json.loads((tmp_path / "calib_memory.json").read_text())
    assert [(r["samples"], r["code"]) for r in doc["rows"]] == [(64, "old"), (1024, "new"), (1024, "new")]
    assert doc["note"] == "kept"
    md = (tmp_path / "calib_memory.md").read_text()
    assert "| resnet18 | 64 | 2.60 |" in md and "stopped at 21.0 GB" in md and "kept" in md
