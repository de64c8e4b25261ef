"""bench/accuracy.py: the compiled-model columns and the per-model setup lines of its report."""
import pytest
import torch

from bench import accuracy


def _run(model, config, method, seed, top1, compiled=None):
    row = {"model": model, "config": config, "method": method, "seed": seed, "top1": top1, "seconds": 1.0,
           "iters": 100, "samples": 256, "lam": 0.1, "sec_per_iter": 0.01, "blocks": []}
    if compiled is not None:
        row["compiled"] = {"images": 10000, "compiled_top1": compiled, "fakequant_top1": top1 * 100,
                           "agreement": 99.5}
    return row


def test_summary_lists_compiled_runs_and_each_models_own_setup(monkeypatch, tmp_path):
    monkeypatch.setattr(accuracy, "RESULTS", tmp_path)              # no cpu.json: only --compile rows
    results = {"setup": "300 iterations, 2 workers", "setup_by_model": {"fashion_mobilenetv3": "100 iterations"},
               "float": {"fashion_resnet": 0.92, "fashion_mobilenetv3": 0.9},
               "runs": [_run("fashion_resnet", "W2A4", "brecq", 1, 0.9),
                        _run("fashion_resnet", "W2A4", "brecq", 0, 0.91),
                        _run("fashion_mobilenetv3", "W4A4", "qdrop+waps", 0, 0.885, compiled=88.4),
                        _run("fashion_mobilenetv3", "W2A4", "waps", 0, 0.87, compiled=86.9)]}
    text = accuracy.summarise(results)
    assert "Seeds 0, 1." in text                                    # the global setup: not repeated
    assert "Seeds 0; 100 iterations." in text
    table = text.split("per method (`--compile`)")[1]
    rows = [line for line in table.splitlines() if line.startswith("| fashion_")]
    # model, then configuration in CONFIGS order, then method; runs without "compiled" left out
    assert rows == ["| fashion_mobilenetv3 | W4A4 | QDrop+WAPS | 0 | 88.40 | 88.50 | 99.50 % |",
                    "| fashion_mobilenetv3 | W2A4 | BRECQ+WAPS | 0 | 86.90 | 87.00 | 99.50 % |"]


def test_summary_without_compiled_runs_has_no_compiled_table(monkeypatch, tmp_path):
    monkeypatch.setattr(accuracy, "RESULTS", tmp_path)
    results = {"setup": "s", "float": {"fashion_resnet": 0.92}, "runs": [_run("fashion_resnet", "W2A4", "rtn", 0, 0.3)]}
    assert "compiled" not in accuracy.summarise(results)


@pytest.mark.slow
def test_compiled_accuracy_agrees_with_fake_quant():
    """A small hardswish + SE net (FashionMobileNetV3's ops) calibrated by RTN, compiled for
    llvm: its top-1 and the fake-quant model's are measured on the same images and agree on
    nearly all of them."""
    from torch import nn

    from bench.models import SqueezeExcitation
    from calib.config import CalibConfig
    from waps_tvm import api
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.Hardswish(),
                          SqueezeExcitation(16, 16), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    x = torch.randn(200, 1, 28, 28)
    _, art = api.quantize(model, x[:64], CalibConfig(wbits=4, abits=4, method="rtn", samples=64, progress=False))
    y = api.predict(model, x).argmax(1)                             # labels: the float model's top-1
    got = accuracy.compiled_accuracy(art, x, y, batch=100)
    assert got["images"] == 200
    assert got["fakequant_top1"] == pytest.approx(api.evaluate(art, x, y) * 100)
    assert got["agreement"] >= 99.0 and abs(got["compiled_top1"] - got["fakequant_top1"]) <= 1.0
    with pytest.raises(ValueError, match="multiple of the batch"):
        accuracy.compiled_accuracy(art, x[:150], y[:150], batch=100)


def test_the_vit_runs_its_own_plan_and_the_cnns_skip_it():
    assert accuracy.plan("fashion_vit", "W6A6") == accuracy.plan("fashion_vit", "W4A4") == accuracy.VIT_METHODS
    assert accuracy.plan("fashion_vit", "W2A4") == [] and accuracy.plan("fashion_resnet", "W6A6") == []
    assert accuracy.plan("fashion_resnet", "W2A4") == accuracy.METHODS


def test_summary_sets_the_papers_vit_figure_beside_the_vit(monkeypatch, tmp_path):
    monkeypatch.setattr(accuracy, "RESULTS", tmp_path)
    results = {"setup": "s", "float": {"fashion_vit": 0.88},
               "runs": [_run("fashion_vit", "W6A6", "waps", 0, 0.87, compiled=87.1)]}
    text = accuracy.summarise(results)
    assert "## fashion_vit" in text and accuracy.PAPER["fashion_vit"] in text
    assert "| fashion_vit | W6A6 | BRECQ+WAPS | 0 | 87.10 | 87.00 | 99.50 % |" in text


def test_a_model_whose_seeds_ran_with_different_worker_counts_says_so():
    row = {"model": "fashion_vit", "config": "W4A4", "method": "brecq"}
    same = [{**row, "seed": s, "workers": 1} for s in (0, 1)]
    assert accuracy._mixed_workers(same) == ""
    mixed = [{**row, "seed": 0, "workers": 2}, {**row, "seed": 1, "workers": 1}, {**row, "seed": 2, "workers": 1},
             {**row, "seed": 3}]
    said = accuracy._mixed_workers(mixed)
    assert "2 (seed 0)" in said and "1 (seeds 1, 2)" in said and "not recorded (seed 3)" in said
