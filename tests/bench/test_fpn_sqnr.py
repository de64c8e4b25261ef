"""bench/fpn_sqnr.py (issue 16 item 4): the SQNR arithmetic, and the tables rendered from a JSON."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bench import fpn_sqnr
from bench.fpn_sqnr import LevelPower, level_db, render, sqnr_db


def test_sqnr_of_known_powers():
    assert sqnr_db(100.0, 1.0) == pytest.approx(20.0)
    assert sqnr_db(1.0, 1.0) == 0.0
    assert sqnr_db(1.0, 10.0) == pytest.approx(-10.0)
    assert sqnr_db(5.0, 0.0) == math.inf                      # identical outputs
    assert sqnr_db(0.0, 2.0) == -math.inf
    for bad in ((0.0, 0.0), (-1.0, 1.0), (1.0, -1.0)):
        with pytest.raises(ValueError):
            sqnr_db(*bad)


def test_level_power_sums_over_batches_and_measures_code_differences():
    """Noise of power 0.01 on a unit signal is 20 dB; two batches sum like one; the code
    difference is counted in output steps."""
    f = np.ones((4, 8, 5, 5), np.float32)
    noise = 0.1 * np.where(np.arange(f.size).reshape(f.shape) % 2, 1.0, -1.0)
    q = f + noise
    one, two = LevelPower(), LevelPower()
    one.add(f, q, q, step=0.5)
    two.add(f[:2], q[:2], q[:2], step=0.5)
    two.add(f[2:], q[2:], q[2:], step=0.5)
    assert sqnr_db(one.signal, one.noise) == pytest.approx(20.0)
    assert (two.signal, two.noise) == pytest.approx((one.signal, one.noise))
    assert one.noise_fakequant == one.noise and one.max_code_diff == 0
    three = LevelPower()
    three.add(f, q, q + 1.5, step=0.5)                          # fake-quant 1.5 = 3 steps of 0.5 off
    assert three.max_code_diff == 3
    assert sqnr_db(three.signal, three.noise_fakequant) < sqnr_db(three.signal, three.noise)
    with pytest.raises(ValueError, match="shapes differ"):
        LevelPower().add(f, q[:1], q, step=0.5)


def _run(precision: str, method: str, seed: int, noise: dict[str, float]) -> dict:
    """A run row with signal 100 per level and the given compiled noise (fake-quant: 2× it)."""
    return {"precision": precision, "method": method, "seed": seed, "px": 32, "iters": 1, "samples": 4, "batch": 4,
            "eval": 4, "calib_s": 1.0, "eval_s": 2.0, "block_loss": 0.0,
            "shapes": {"0": [256, 8, 8], "pool": [256, 1, 1]},
            "levels": {k: {"signal": 100.0, "noise": v, "noise_fakequant": 2 * v, "max_code_diff": 1}
                       for k, v in noise.items()}}


@pytest.fixture
def res() -> dict:
    return {"meta": {"px": 32, "iters": 1, "samples": 4, "batch": 4, "eval": 4, "machine": "test cpu, 2 cores",
                     "workers": 2, "seconds": 10.0},
            "runs": [_run("W4A4", "brecq", 0, {"0": 10.0, "pool": 1.0}),
                     _run("W4A4", "waps", 0, {"0": 1.0, "pool": 0.1}),
                     _run("W8A8", "brecq", 0, {"0": 0.0, "pool": 0.01}),
                     _run("W8A8", "waps", 0, {"0": 0.0, "pool": 0.01})]}


def test_render_tables_levels_by_precision_and_method(res):
    md = render(res)
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.strip().strip("|").split("|")]
            for ln in md.splitlines() if ln.startswith("| `") or ln.startswith("| all")}
    head = next(ln for ln in md.splitlines() if ln.startswith("| level | shape"))
    assert "W4A4 BRECQ | W4A4 BRECQ+WAPS | W4A4 WAPS − BRECQ | W8A8 BRECQ" in head
    # first table (compiled): level '0' is 10 dB and 20 dB at W4A4, +10 dB apart; no noise at W8A8
    assert md.index("Compiled integer program") < md.index("| `0` | 256×8×8 | 10.00 | 20.00 | +10.00 | ∞ | ∞ | – |")
    assert "| `pool` | 256×1×1 | 20.00 | 30.00 | +10.00 | 40.00 | 40.00 | +0.00 |" in md
    # all levels pool the sums: W4A4 BRECQ 200 / 11
    assert f"| all levels |  | {10 * math.log10(200 / 11):.2f} |" in md
    # fake-quant table (noise doubled: 3.01 dB lower), no shape column
    assert f"| `0` | {10 - 10 * math.log10(2):.2f} | {20 - 10 * math.log10(2):.2f} | +10.00 |" in md
    assert "largest difference" in md.lower() and ": 1 code (" in md
    assert "mAP" in md and "randomize_bn" in md and "32×32×3" in md and "seed 0;" in md
    assert rows["`pool`"][0] == "`pool`"


def test_seeds_average_and_show_their_spread(res):
    res["runs"] += [_run("W4A4", "brecq", 1, {"0": 1.0, "pool": 1.0}), _run("W4A4", "waps", 1, {"0": 1.0, "pool": 1.0})]
    md = render(res)
    # level '0' at W4A4 BRECQ: seeds 10 and 20 dB → 15 ± 7.07; WAPS − BRECQ paired per seed: (+10 + 0) / 2
    assert "| `0` | 256×8×8 | 15.00 ± 7.07 | 20.00 ± 0.00 | +5.00 |" in md
    assert "seeds 0, 1;" in md


def test_render_flag_rewrites_md_and_png_from_the_json(res, tmp_path):
    (tmp_path / "fpn_sqnr.json").write_text(json.dumps(res))
    assert fpn_sqnr.main(["--render", "--results", str(tmp_path)]) == 0
    assert (tmp_path / "fpn_sqnr.md").read_text() == render(res)
    assert (tmp_path / "fpn_sqnr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_readme_block_follows_the_json(res, tmp_path):
    from bench.readme_blocks import fpn_sqnr as block
    (tmp_path / "fpn_sqnr.json").write_text(json.dumps(res))
    text = block(tmp_path)
    assert "| level | W4A4 BRECQ | W4A4 BRECQ+WAPS | W8A8 BRECQ | W8A8 BRECQ+WAPS |" in text
    assert "| `0` | 10.00 | 20.00 | ∞ | ∞ |" in text
    assert f"| all levels | {level_db(res['runs'][0], 'all'):.2f} |" in text
    assert "32×32 inputs, 4 calibration and 4 evaluation images, 1 iterations per block, seed 0." in text


def test_a_run_of_another_setup_is_not_kept(res):
    """Runs are keyed by their setup, so a rerun with other settings never mixes with them."""
    other = dict(res["runs"][0], iters=2)
    assert fpn_sqnr._key(other) != fpn_sqnr._key(res["runs"][0])
    assert fpn_sqnr._key(other)[:3] == fpn_sqnr._key(res["runs"][0])[:3]
