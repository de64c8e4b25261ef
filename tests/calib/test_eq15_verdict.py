"""bench/eq15.py's verdict: paired per-seed differences, ties go to the paper's form."""
from bench.eq15 import paired, verdict


def _runs(sig, soft, metric="top1"):
    return ([{"model": "m", "form": "sigmoid", "seed": s, metric: a} for s, a in enumerate(sig)]
            + [{"model": "m", "form": "softmax", "seed": s, metric: a} for s, a in enumerate(soft)])


def _summary(top1, loss):
    return {"m": {"top1": paired(_runs(*top1), "m", "top1"),
                  "block_loss": paired(_runs(*loss, metric="block_loss"), "m", "block_loss")}}


TIE = ([0.910, 0.912, 0.909], [0.911, 0.910, 0.911])


def test_noise_level_difference_keeps_the_papers_form():
    s = paired(_runs([0.910, 0.912, 0.909], [0.911, 0.910, 0.911]), "m", "top1")
    assert s["within_noise"]
    assert verdict(_summary(TIE, ([5.0, 5.2, 4.9], [5.1, 5.0, 5.0]))) == "sigmoid"


def test_consistent_softmax_win_beyond_noise_picks_softmax():
    s = paired(_runs([0.900, 0.902, 0.899], [0.910, 0.911, 0.910]), "m", "top1")
    assert not s["within_noise"] and s["diff"] < 0
    assert verdict(_summary(([0.900, 0.902, 0.899], [0.910, 0.911, 0.910]), TIE)) == "softmax"


def test_top1_tie_falls_back_to_a_block_loss_difference_beyond_noise():
    assert verdict(_summary(TIE, ([5.3, 5.5, 5.4], [5.0, 5.1, 5.0]))) == "softmax"
    assert verdict(_summary(TIE, ([5.0, 5.1, 5.0], [5.3, 5.5, 5.4]))) == "sigmoid"
