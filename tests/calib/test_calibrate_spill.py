"""Calibration keeps only what later blocks need, and spilling float activations to
memory-mapped files changes no bit of the result."""
import os

import pytest
import torch
from torch import nn

from calib import artifact, calibrate as calibrate_mod, frontier
from calib.blocks import find_blocks
from calib.calibrate import calibrate
from calib.capture import capture, export_module
from calib.config import CalibConfig
from calib.errors import ConfigError
from calib.export import to_artifact
from calib.fold_bn import fold_batch_norm
from calib.fuse import fuse_activations
from calib.qmodel import QuantModel
from calib.reconstruct import _precompute, leading_glue
from calib.spill import Spill

CFG = dict(wbits=2, abits=4, iters=4, batch=8, tile=8, device="cpu", progress=False)


class PoolNet(nn.Module):
    """Stem, max-pool (leading glue of the next block), one residual unit, fc."""

    def __init__(self, c=16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.a = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                               nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        x = self.pool(self.stem(x))
        x = torch.relu(x + self.a(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@pytest.fixture(scope="module")
def pool_graph_data():
    from tests.conftest import randomize_bn
    torch.manual_seed(0)
    graph = fuse_activations(fold_batch_norm(capture(export_module(randomize_bn(PoolNet()), (1, 8, 8)))))
    # more samples than one evaluation chunk (256), so chunked writes into the spill files are exercised
    return graph, torch.randn(300, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _bytes(result, path):
    return artifact.save(to_artifact(result), path).read_bytes()


@pytest.mark.parametrize("method,cwac", [("waps", False), ("qdrop+waps", False), ("waps", True)])
def test_spilling_every_float_activation_gives_the_same_bytes_and_leaves_no_files(
        pool_graph_data, tmp_path, method, cwac):
    graph, x = pool_graph_data
    plain = calibrate(graph, x, CalibConfig(method=method, cwac=cwac, samples=300, **CFG))
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    spilled = calibrate(graph, x, CalibConfig(method=method, cwac=cwac, samples=300, spill_gb=0,
                                              spill_dir=str(spill_dir), **CFG))
    assert plain.spilled == 0 and spilled.spilled > 0
    assert _bytes(spilled, tmp_path / "s.waps") == _bytes(plain, tmp_path / "p.waps")
    assert os.listdir(spill_dir) == []


def test_spill_files_are_unlinked_at_once_and_hold_the_values(tmp_path):
    s = Spill(threshold=100, directory=tmp_path)
    big = s.empty((10, 3, 4), torch.float32, torch.device("cpu"))  # 480 bytes: spilled
    small = s.empty((5,), torch.float32, torch.device("cpu"))       # 20 bytes: in memory
    big.copy_(torch.arange(120, dtype=torch.float32).reshape(10, 3, 4))
    assert os.listdir(tmp_path) == []
    assert torch.equal(big, torch.arange(120, dtype=torch.float32).reshape(10, 3, 4))
    assert big.shape == (10, 3, 4) and small.shape == (5,)
    assert (s.files, s.bytes) == (1, 480)


def test_spill_threshold_is_validated_and_not_part_of_the_recipe(tmp_path):
    with pytest.raises(ConfigError):
        CalibConfig(spill_gb=-1).validate()
    with pytest.raises(ConfigError):
        Spill.from_config(1.0, str(tmp_path / "missing"))
    assert CalibConfig(spill_gb=0, spill_dir="/x").to_json() == CalibConfig().to_json()
    assert Spill.from_config(None).threshold > 0


def test_blocks_reconstruct_without_float_inputs_unless_qdrop_reads_them(pool_graph_data, monkeypatch):
    graph, x = pool_graph_data
    seen = {}
    real = calibrate_mod.reconstruct

    def spy(model, block, q_in, fp_in, fp_out, *args, **kwargs):
        seen.setdefault(kwargs.get("spill") is not None and args[0].method, []).append(sorted(fp_in))
        return real(model, block, q_in, fp_in, fp_out, *args, **kwargs)
    monkeypatch.setattr(calibrate_mod, "reconstruct", spy)
    calibrate(graph, x[:40], CalibConfig(method="waps", samples=40, **CFG))
    calibrate(graph, x[:40], CalibConfig(method="qdrop+waps", samples=40, **CFG))
    assert seen["waps"] and all(keys == [] for keys in seen["waps"])
    assert seen["qdrop+waps"] and all(keys for keys in seen["qdrop+waps"])


def test_leading_glue_is_precomputed_as_codes(pool_graph_data):
    graph, x = pool_graph_data
    model = QuantModel(graph, CalibConfig(method="waps", **CFG)).eval()
    model.input_quant.init_from(x)
    blocks = find_blocks(graph)
    stem, body = blocks[0], next(b for b in blocks if leading_glue(model, b))
    q = frontier.evaluate(model, stem, {graph.input.name: frontier.encode(model.input_quant(x), model.input_quant)},
                          compact=True)
    rest, q_pre, fp_pre = _precompute(model, body, leading_glue(model, body), q, {})
    assert fp_pre == {}
    assert all(isinstance(v, frontier.Codes) for v in q_pre.values())
    with torch.no_grad():
        ref = model.run(leading_glue(model, body), {k: v[:] for k, v in q.items()})
    assert all(torch.equal(v[:], ref[k]) for k, v in q_pre.items())


def test_run_with_keep_frees_intermediates_and_gives_the_same_outputs(pool_graph_data):
    graph, x = pool_graph_data
    model = QuantModel(graph, CalibConfig(method="waps", **CFG)).eval()
    model.set_quant(False)
    names = [n.name for n in graph if n.op != "input"]
    with torch.no_grad():
        full = model.run(names, {graph.input.name: x})
        lean = model.run(names, {graph.input.name: x}, keep={graph.output})
    assert set(lean) == {graph.output}
    assert torch.equal(lean[graph.output], full[graph.output])
