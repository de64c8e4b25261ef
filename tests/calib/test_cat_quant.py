"""--cat-quant shared: a cat and the values it joins share one quantizer (transitively, as in
a DenseNet block), set once from all of them; the compiled cat then only moves codes."""
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from calib.config import CalibConfig
from calib.qmodel import QuantModel, cat_classes, output_bits
from tests.calib.test_capture_ops import graph_of
from tests.compile_helpers import assert_bit_exact_on_backends, calibrated
from waps_tvm.oracle import layer_agreement


class FireDense(nn.Module):
    """A fire module (two expands joined), a dense step (the cat joined again with a conv of
    it, through a max pool) and a cat that takes the graph input itself."""

    def __init__(self, cin: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(cin, 16, 3, padding=1)
        self.e1, self.e3 = nn.Conv2d(16, 16, 1), nn.Conv2d(16, 16, 3, padding=1)
        self.d = nn.Conv2d(32, 16, 3, padding=1)
        self.head = nn.Conv2d(48, 16, 1)
        self.side = nn.Conv2d(cin, 16, 3, padding=1)
        self.tail = nn.Conv2d(32 + cin, 16, 1)

    def forward(self, x):
        s = F.relu(self.stem(x))
        f = torch.cat([F.relu(self.e1(s)), F.relu(self.e3(s))], 1)
        g = torch.cat([f, F.max_pool2d(F.relu(self.d(f)), 3, 1, 1)], 1)
        u = torch.cat([x, F.relu(self.side(x)), self.head(g)], 1)
        return self.tail(u)


def _classes():
    graph = graph_of(FireDense(), (3, 8, 8))
    cfg = CalibConfig()
    return graph, cat_classes(graph, output_bits(graph, cfg, QuantModel(graph, cfg).last))


def test_cat_classes_join_fire_and_dense_cats_and_leave_the_input_out():
    graph, classes = _classes()
    ops = [[graph[m].op for m in c] for c in classes]
    assert sorted(map(len, classes)) == [3, 5], ops                  # {side, head, u}; {e1, e3, f, d, g}
    fire = next(c for c in classes if len(c) == 5)
    assert [graph[m].op for m in fire] == ["conv2d", "conv2d", "cat", "conv2d", "cat"]
    assert all(graph.input.name not in c for c in classes)
    assert all(graph[c[-1]].op == "cat" for c in classes)            # the class's quantizer lives on a cat


def test_shared_cat_quantizers_are_one_object_and_rescale_keeps_them_apart():
    graph, classes = _classes()
    shared = QuantModel(graph, CalibConfig(cat_quant="shared"))
    for c in classes:
        assert len({id(shared.layer(m).out_quant) for m in c}) == 1
        assert shared.layer(c[0]).out_quant.range_fixed
    apart = QuantModel(graph, CalibConfig(cat_quant="rescale"))
    assert apart.tied == [] and len({id(apart.layer(m).out_quant) for c in classes for m in c}) == 8


def test_shared_cat_calibrates_compiles_bit_exact_and_moves_codes_only():
    torch.manual_seed(0)
    model = FireDense()
    shared = calibrated(model, (3, 8, 8), wbits=4, abits=4, iters=3, samples=8, cat_quant="shared")
    rescale = calibrated(model, (3, 8, 8), wbits=4, abits=4, iters=3, samples=8, cat_quant="rescale")
    graph = shared.graph
    cats = [n for n in graph if n.op == "cat"]
    for art, same in ((shared, True), (rescale, False)):
        for n in cats:
            ins = [i for i in n.inputs if i in art.quant and graph[i].op != "input"]
            assert all((art.quant[i] == art.quant[n.name]) == same for i in ins), (n.name, same)
    x = np.random.default_rng(1).normal(size=(2, 3, 8, 8)).astype("float32")
    assert_bit_exact_on_backends(shared, x)
    rows = layer_agreement(shared, x)
    assert rows and max(r.max_diff for r in rows) <= 1


def test_shared_cat_quantizers_resume_to_the_same_bytes(tmp_path, monkeypatch):
    """The shared ranges are set before the first block and restored, not searched again,
    from a checkpoint: a run crashed in block 3 (a class spans blocks 2 and 3 here: the
    second cat joins the first part's output) resumes to the uninterrupted run's bytes."""
    from calib.calibrate import calibrate
    from tests.calib.test_calibrate_resume import CFG, _reference_and_crashed_run, _save
    graph = graph_of(nn.Sequential(FireDense(3), FireDense(16)), (3, 8, 8))
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    cfg = CalibConfig(**{**CFG, "cat_quant": "shared"})
    reference, ckpt = _reference_and_crashed_run(graph, x, cfg, tmp_path, monkeypatch)
    resumed = calibrate(graph, x, cfg, checkpoint=ckpt, resume=True)
    assert resumed.model.tied and _save(resumed, tmp_path / "resumed.waps") == reference
