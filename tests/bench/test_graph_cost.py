"""bench/graph_cost: a captured graph's chains (the compiler's rule, codegen/npu16/cascade.form)
and node costs, with cascading on and off (bench/npu16.py's cascade table)."""
import torch
from torch import nn

from bench.graph_cost import graph_chains
from targets.npu16.params import NPU16
from waps_tvm.model_io import LoadedModel


def test_graph_chains_merge_a_conv_chain_and_keep_what_fits():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).eval()
    graph = LoadedModel("tiny", (3, 16, 16), module=model).graph()
    on, costs_on = graph_chains(graph, NPU16())
    off, costs_off = graph_chains(graph, NPU16(cascade=False))
    assert off == [] and len(on) == 1 and len(on[0].ops) >= 3 and all(lk.kept for lk in on[0].links)
    moved = {k: sum(c.bytes["input"] + c.bytes["output"] for c in v.values())
             for k, v in (("on", costs_on), ("off", costs_off))}
    saved = sum(c.bytes.get("saved", 0) for c in costs_on.values())
    assert saved > 0 and moved["on"] == moved["off"] - saved
