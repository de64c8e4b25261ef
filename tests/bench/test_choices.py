"""The rules that turn benchmark runs into defaults: bench/cat_quant.verdict and
bench/iterations.choose."""
from bench.cat_quant import MODEL, summarise, verdict
from bench.iterations import choose


def _cat_runs(top1: dict, loss: dict, config="W4A4", method="waps"):
    return [{"model": MODEL, "config": config, "method": method, "variant": v, "seed": s,
             "top1": top1[v][s], "block_loss": loss[v][s]} for v in ("shared", "rescale") for s in range(3)]


SAME = {"shared": [0.90, 0.91, 0.90], "rescale": [0.905, 0.905, 0.905]}


def test_cat_verdict_follows_a_top1_difference_beyond_noise():
    worse = {"shared": [0.88, 0.881, 0.879], "rescale": [0.90, 0.901, 0.899]}
    loss = {"shared": [1.0, 1.0, 1.0], "rescale": [2.0, 2.1, 2.0]}
    assert verdict(summarise(_cat_runs(worse, loss))) == "rescale"


def test_cat_verdict_falls_back_to_block_loss_and_mixed_top1_does_not_decide():
    lower = {"shared": [1.0, 1.1, 1.0], "rescale": [2.0, 2.1, 2.0]}
    higher = {"shared": [2.0, 2.1, 2.0], "rescale": [1.0, 1.1, 1.0]}
    assert verdict(summarise(_cat_runs(SAME, lower))) == "shared"
    assert verdict(summarise(_cat_runs(SAME, higher))) == "rescale"
    up = {"shared": [0.90, 0.901, 0.899], "rescale": [0.88, 0.881, 0.879]}
    down = {"shared": [0.88, 0.881, 0.879], "rescale": [0.90, 0.901, 0.899]}
    mixed = _cat_runs(up, higher, "W2A4") + _cat_runs(down, higher, "W4A4")
    assert verdict(summarise(mixed)) == "rescale"               # top-1 split both ways: the loss decides


def _it_runs(table: dict):
    return [{"model": m, "method": meth, "iters": i, "seed": 0, "top1": t / 100}
            for (m, i), t in table.items() for meth in ("brecq", "waps")]


def test_iterations_choice_is_the_smallest_count_within_tolerance_of_the_best():
    runs = _it_runs({("a", 100): 80.0, ("a", 300): 89.8, ("a", 1000): 90.0,
                     ("b", 100): 70.0, ("b", 300): 79.9, ("b", 1000): 80.0})
    assert choose(runs, ["a", "b"], 0.3) == 300
    assert choose(runs, ["a", "b"], 0.05) == 1000


def test_iterations_choice_ignores_counts_missing_a_model():
    runs = _it_runs({("a", 300): 89.0, ("b", 300): 79.0, ("a", 3000): 99.0})
    assert choose(runs, ["a", "b"], 0.3) == 300
