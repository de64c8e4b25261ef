"""A calibration stopped between blocks resumes from its checkpoint to the same bytes."""
import dataclasses

import pytest
import torch

from calib import artifact, calibrate as calibrate_mod
from calib.calibrate import calibrate
from calib.checkpoint import Checkpoint, progress
from calib.config import CalibConfig
from calib.errors import CheckpointError
from calib.export import to_artifact


CFG = dict(wbits=2, abits=4, method="qdrop+waps", iters=6, batch=8, tile=8, device="cpu", progress=False)


class Crash(Exception):
    pass


def _crash_at_block(monkeypatch, n: int) -> None:
    """Make the n-th block's reconstruction fail, as a crash in the middle of a run would."""
    real, calls = calibrate_mod.reconstruct, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise Crash
        return real(*args, **kwargs)
    monkeypatch.setattr(calibrate_mod, "reconstruct", flaky)


def _save(result, path):
    return artifact.save(to_artifact(result), path).read_bytes()


def _reference_and_crashed_run(graph, x, cfg, tmp_path, monkeypatch):
    """(the uninterrupted run's bytes, the checkpoint of a run that crashed in block 3)."""
    reference = _save(calibrate(graph, x, cfg), tmp_path / "ref.waps")
    ckpt = tmp_path / "m.waps.ckpt"
    with monkeypatch.context() as m:
        _crash_at_block(m, 3)
        with pytest.raises(Crash):
            calibrate(graph, x, cfg, checkpoint=ckpt)
    return reference, ckpt


def test_resume_after_a_crash_gives_the_same_bytes(tiny_graph_data, tmp_path, monkeypatch):
    graph, x = tiny_graph_data
    cfg = CalibConfig(**CFG)
    reference, ckpt = _reference_and_crashed_run(graph, x, cfg, tmp_path, monkeypatch)
    assert progress(ckpt) == (2, 4)
    torch.manual_seed(123)  # the resumed run must not depend on the RNG state it starts in
    resumed = calibrate(graph, x, cfg, checkpoint=ckpt, resume=True)
    assert [r.name for r in resumed.report] == [b.name for b in resumed.blocks]
    assert _save(resumed, tmp_path / "resumed.waps") == reference


def test_resume_restores_rng_state(tiny_graph_data, tmp_path, monkeypatch):
    """Without the stored RNG states the batches after the crash would differ: a resume
    whose checkpoint lost them must not reproduce the reference."""
    graph, x = tiny_graph_data
    cfg = CalibConfig(**CFG)
    reference, ckpt = _reference_and_crashed_run(graph, x, cfg, tmp_path, monkeypatch)
    ck = Checkpoint.load(ckpt)
    ck.rng["generator"] = torch.Generator().manual_seed(99).get_state()
    ck.save(ckpt)
    assert _save(calibrate(graph, x, cfg, checkpoint=ckpt, resume=True), tmp_path / "r.waps") != reference


def test_checkpoint_of_another_run_is_refused(tiny_graph_data, tmp_path, monkeypatch):
    graph, x = tiny_graph_data
    cfg = CalibConfig(**CFG)
    ckpt = tmp_path / "m.waps.ckpt"
    with monkeypatch.context() as m:
        _crash_at_block(m, 2)
        with pytest.raises(Crash):
            calibrate(graph, x, cfg, checkpoint=ckpt)
    before = ckpt.read_bytes()
    with pytest.raises(CheckpointError, match="other options"):
        calibrate(graph, x, CalibConfig(**{**CFG, "iters": 7}), checkpoint=ckpt, resume=True)
    with pytest.raises(CheckpointError, match="other calibration data"):
        calibrate(graph, x * 1.01, cfg, checkpoint=ckpt, resume=True)
    conv = next(n for n in graph.nodes if n.op == "conv2d")
    nudged = dataclasses.replace(conv, params={**conv.params, "bias": conv.params["bias"] + 1e-3})
    other = graph.replace([nudged if n is conv else n for n in graph.nodes])
    with pytest.raises(CheckpointError, match="other model"):
        calibrate(other, x, cfg, checkpoint=ckpt, resume=True)
    with pytest.raises(CheckpointError, match="add --resume"):  # never overwritten silently
        calibrate(graph, x, cfg, checkpoint=ckpt)
    assert ckpt.read_bytes() == before


def test_unreadable_checkpoint_is_one_line(tmp_path):
    bad = tmp_path / "m.waps.ckpt"
    bad.write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable calibration checkpoint"):
        Checkpoint.load(bad)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        Checkpoint.load(tmp_path / "absent.ckpt")
