"""bench/npu16_sweep: a design point's totals over a captured graph, and what a too-small SRAM does."""
from dataclasses import replace

from bench.npu16_sweep import markdown, point
from targets.npu16.params import DEFAULT
from tests.bench.make_vela_fixture import tiny_graph


def test_points_grow_with_less_sram_and_mark_layers_that_do_not_fit():
    graph = tiny_graph()
    big = point(graph, replace(DEFAULT, sram_weight_kib=512, sram_act_kib=512))
    small = point(graph, replace(DEFAULT, sram_weight_kib=8, sram_act_kib=8))
    tiny = point(graph, replace(DEFAULT, sram_weight_kib=2, sram_act_kib=2))
    assert not big["misfits"] and not small["misfits"] and big["cycles"] > 0
    assert small["offchip_mb"] > big["offchip_mb"]                 # halos and weights fetched again
    assert tiny["misfits"]                                         # the stem's rows no longer fit
    four = point(graph, replace(DEFAULT, arrays=4, sram_weight_kib=512, sram_act_kib=512))
    assert four["cycles"] <= big["cycles"] and four["offchip_mb"] == big["offchip_mb"]
    rows = [{"model": "tiny", "arrays": 1, "sram_kib": 1, **tiny}, {"model": "tiny", "arrays": 1, "sram_kib": 512, **big}]
    md = markdown(rows, DEFAULT)
    assert "layers do not fit" in md and f"{big['cycles'] / 1e6:.2f} M" in md
