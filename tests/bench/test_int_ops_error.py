"""bench/int_ops_error: the integer layer norm stays within one code of float, the GELU table
equals float's codes, and the table renders every row."""
import numpy as np

from bench import int_ops_error as b


def test_layer_norm_within_one_code_and_almost_always_equal():
    rng = np.random.default_rng(1)
    for c, i, o in ((64, 8, 8), (64, 4, 4)):
        r = b.layer_norm_error(c, i, o, 512, rng)
        assert r["max_diff"] <= 1 and r["equal"] > 0.99


def test_a_wrong_rule_shows():
    """The comparison is sharp: float codes off by one step everywhere give RMS 1."""
    got = np.arange(10)
    assert b._compare(got + 1, got) == {"max_diff": 1, "equal": 0.0, "rms": 1.0}


def test_gelu_table_is_exact_and_render_lists_rows():
    rows = [b.gelu_error(4, np.random.default_rng(0))]
    assert rows[0]["max_diff"] == 0
    md = b.render(rows, {"positions": 1, "seed": 0})
    assert "| gelu (table) | – | 4 | 4 | 0 | 100.000 % |" in md
