"""README.md's benchmark numbers are bench/results/ rendered by bench.readme (issue 17, item 3)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench import readme
from bench.readme import README, RESULTS, ReadmeError, rewrite
from bench.readme_blocks import cpu


@pytest.fixture
def results(tmp_path) -> Path:
    """A writable copy of bench/results/ (the .md and .json files)."""
    out = tmp_path / "results"
    out.mkdir()
    for f in RESULTS.iterdir():
        if f.suffix in (".md", ".json"):
            shutil.copy(f, out / f.name)
    return out


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_readme_matches_results():
    """Fails when a results file changed without `python -m bench.readme`, or the README was hand-edited."""
    text = README.read_text()
    assert rewrite(text, RESULTS) == text, "README.md differs from bench/results/: run python -m bench.readme"


def test_check_flags_a_stale_readme_and_rewrite_fixes_it(tmp_path, capsys):
    stale = README.read_text().replace("77 of 78 blocks", "70 of 78 blocks", 1)
    assert stale != README.read_text()
    path = tmp_path / "README.md"
    path.write_text(stale)
    assert readme.main(["--check", "--readme", str(path)]) == 1
    assert path.read_text() == stale, "--check must not write"
    assert "70 of 78" in capsys.readouterr().out
    assert readme.main(["--readme", str(path)]) == 0
    assert path.read_text() == README.read_text()
    assert readme.main(["--check", "--readme", str(path)]) == 0


def test_new_results_reach_every_marked_place(results):
    """The headline (W8A8) ORT ratio appears in Status, Known gaps and the table; all follow
    cpu_ort.json, and the lower-precision columns do not leak into the headline."""
    data = json.loads((results / "cpu_ort.json").read_text())
    top = data["meta"]["headline"]
    assert top == "W8A8"
    row = next(r for r in data["rows"] if r["model"] == "resnet18")
    was = f"{row['builds'][top]['vs_ort_int8']:.2f}× on ResNet-18"

    def faster(data):
        row = next(r for r in data["rows"] if r["model"] == "resnet18")
        row["builds"][top]["vs_ort_int8"] = 0.123
        row["builds"][top]["fast_ms"] = 1.451
        row["builds"]["W2A4"]["vs_ort_int8"] = 0.456
    _edit_json(results / "cpu_ort.json", faster)
    old = README.read_text()
    new = rewrite(old, results)
    assert was in old and was not in new
    assert new.count("0.12× on ResNet-18") == 2 and "0.46× on ResNet-18" not in new
    assert "(our W8A8 build)" in new
    line = next(ln for ln in new.splitlines() if ln.startswith("| ResNet-18 224² |") and "**0.12×**" in ln)
    assert "| 1.45 | **0.12×** |" in line and "| 0.46× |" in line
    assert readme.main(["--check", "--results", str(results)]) == 1


def test_cpu_ort_headers_state_precisions_and_peak(results):
    """Every TVM and ORT column names its precision; the throughput table quotes the peak."""
    from bench.readme_blocks import cpu_ort
    text = cpu_ort(results)
    heads = [ln for ln in text.splitlines() if ln.startswith("| model |")]
    assert len(heads) == 2
    for h in heads:
        for cell in h.strip("| ").split(" | "):
            if "TVM" in cell or "ORT int8" in cell:
                assert any(p in cell for p in ("W8A8", "W4A4", "W2A4")), cell
    peak = json.loads((results / "cpu_ort.json").read_text())["meta"]["peak"]
    assert f"= {peak['peak_gmacs']:.0f} GMAC/s" in text


def test_cpu_block_names_the_forms_it_measured(results):
    """cpu.json times split/fused only, so the block says so and points at the fast form's
    numbers; once it times the fast form too, the pointer goes and a column comes."""
    text = cpu(results)
    ort = json.loads((results / "cpu_ort.json").read_text())
    fast = next(r for r in ort["rows"] if r["model"] == "fashion_resnet")["builds"]["W4A4"]["fast_ms"]
    assert "does not time" in text and f"W4A4 {fast:.3f} ms" in text and "WAPS fast" not in text
    assert "Known gaps" not in text

    def add_fast(data):
        for r in data["rows"]:
            r["tvm_int_fast_ms"] = 0.05
    _edit_json(results / "cpu.json", add_fast)
    text = cpu(results)
    assert "does not time" not in text and "| WAPS fast |" in text


def test_accuracy_counts_blocks_from_the_results(results):
    md = results / "accuracy.md"
    md.write_text(md.read_text().replace("| digit_recognizer | W2A4 | 15/15 | 15/15 |",
                                         "| digit_recognizer | W2A4 | 14/15 | 15/15 |"))
    new = rewrite(README.read_text(), results)
    assert "76 of 78 blocks" in new.replace("\n", " ") and "77 of 78 against QDrop" in new.replace("\n", " ")


@pytest.mark.parametrize("bad, message", [
    ("<!-- bench:nope --><!-- /bench:nope -->", "no generator"),
    ("<!-- bench:cpu -->", "unpaired"),
    ("<!-- bench:ort_ratio -->\nx\n<!-- /bench:ort_ratio -->", "share a line"),
])
def test_marker_errors(bad, message):
    with pytest.raises(ReadmeError, match=message):
        rewrite(README.read_text() + "\n" + bad + "\n", RESULTS)


def test_missing_marker_is_an_error():
    text = README.read_text()
    start, end = text.index("<!-- bench:vela_compare -->"), text.index("<!-- /bench:vela_compare -->")
    with pytest.raises(ReadmeError, match="no markers for bench:vela_compare"):
        rewrite(text[:start] + text[end + len("<!-- /bench:vela_compare -->"):], RESULTS)


def test_prose_spans_follow_results(results):
    """The npu16 sweep, Table 6 and calibration-memory phrases are read from their results."""
    from bench.readme_blocks import calib_memory, npu16_sweep_fit, npu16_table6, vela_stem
    vela = results / "vela_compare.md"
    assert vela_stem(results) == "1.36–1.88×"
    vela.write_text(vela.read_text().replace("| 1.88 |", "| 2.10 |"))
    assert vela_stem(results) == "1.36–2.10×"
    sweep = results / "npu16_sweep.md"
    sweep.write_text(sweep.read_text().replace("| 1 | – (17 layers do not fit) | – (11 layers do not fit) | "
                                               "– (7 layers do not fit) | – (3 layers do not fit) | 9.48 M, 20.1 MB, 75% |",
                                               "| 1 | – (17 layers do not fit) | – (11 layers do not fit) | "
                                               "– (7 layers do not fit) | – (3 layers do not fit) | – (1 layers do not fit) |"))
    assert npu16_sweep_fit(results) == "ResNet-18 needs 512 KiB per buffer and MobileNetV2 128 KiB"
    assert "ResNet-18 gives +0.0030 (+0.20 %), 0.50× the paper's +0.006" in npu16_table6(results)

    def bigger(data):
        data["rows"].append({"model": "resnet18", "samples": 2048, "peak_rss_gb": 15.04, "peak_anon_gb": 9.96,
                             "status": "done"})
    _edit_json(results / "calib_memory.json", bigger)
    assert calib_memory(results) == ("ResNet-18 peaks at 15.0 GB RSS (10.0 GB anonymous) with 2048 samples and "
                                     "ResNet-50 at 11.9 GB RSS (8.0 GB anonymous) with 1024 samples")
