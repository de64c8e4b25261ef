"""calib/ runs where it is told: every tensor on cfg.device, the artifact from CPU copies."""
import io
import json
import zipfile

import pytest
import torch

from calib import artifact
from calib.calibrate import calibrate
from calib.config import CalibConfig
from calib.device import resolve_device
from calib.errors import ConfigError
from calib.export import to_artifact


def _bytes(graph, x, cfg, tmp_path, name) -> bytes:
    return artifact.save(to_artifact(calibrate(graph, x, cfg)), tmp_path / name).read_bytes()


def test_no_tensor_is_created_on_an_implicit_device(tiny_graph_data, tmp_path):
    """With torch's default device set to 'meta', any tensor calib/ creates without naming
    its device would be a meta tensor: mixing it with the real ones fails, or its value
    (.item(), .numpy()) cannot be read. The run must instead give the very same artifact."""
    graph, x = tiny_graph_data
    cfg = CalibConfig(wbits=2, abits=4, method="qdrop+waps", cwac=True, iters=6, batch=8, tile=8,
                      device="cpu", progress=False)
    expected = _bytes(graph, x, cfg, tmp_path, "a.waps")
    torch.set_default_device("meta")
    try:
        assert torch.empty(1).device.type == "meta"  # the trap is armed
        result = calibrate(graph, x, cfg)
    finally:
        torch.set_default_device(None)
    devices = {t.device.type for t in result.model.state_dict().values()}
    assert devices == {"cpu"}
    assert artifact.save(to_artifact(result), tmp_path / "b.waps").read_bytes() == expected


def test_artifact_records_the_recipe_not_the_device(tiny_graph_data, tmp_path):
    graph, x = tiny_graph_data
    cfg = CalibConfig(wbits=4, abits=4, method="waps", iters=2, batch=8, tile=8, device="cpu", progress=False)
    path = artifact.save(to_artifact(calibrate(graph, x, cfg)), tmp_path / "a.waps")
    with zipfile.ZipFile(path) as z:
        manifest = json.loads(z.read("manifest.json"))
    assert "device" not in manifest["config"] and "progress" not in manifest["config"]
    assert all("seconds" not in r for r in manifest["report"])


def test_same_calibration_gives_the_same_bytes(tiny_graph_data, tmp_path):
    """No timings in the report and fixed zip member timestamps (zip stores 2-second
    resolution: the second save is made at least 2 s after the first)."""
    import time
    graph, x = tiny_graph_data
    cfg = CalibConfig(wbits=4, abits=4, method="waps", iters=3, batch=8, tile=8, device="cpu", progress=False)
    t0 = time.time()
    first = _bytes(graph, x, cfg, tmp_path, "a.waps")
    time.sleep(max(0.0, 2.1 - (time.time() - t0)))
    assert _bytes(graph, x, cfg, tmp_path, "b.waps") == first


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_is_a_config_error(name):
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device(name)


@pytest.mark.parametrize("name", ["gpu", "cpu:0", "cuda:x", ""])
def test_unknown_device_names_are_refused(name):
    with pytest.raises(ConfigError, match="choose auto, cpu, cuda or cuda:N"):
        CalibConfig(device=name).validate()


def test_auto_and_cpu_resolve_here():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_calibration_writes_an_artifact_from_cpu_copies(tiny_graph_data, tmp_path):
    graph, x = tiny_graph_data
    cfg = CalibConfig(wbits=2, abits=4, method="qdrop+waps", cwac=True, iters=6, batch=8, tile=8,
                      device="cuda", progress=False)
    result = calibrate(graph, x, cfg)
    assert {t.device.type for t in result.model.state_dict().values()} == {"cuda"}
    art = artifact.load(artifact.save(to_artifact(result), tmp_path / "a.waps"))
    cpu = calibrate(graph, x, CalibConfig(**{**cfg.__dict__, "device": "cpu"}))
    # different RNG streams and kernels: the same meaning, not the same bits
    assert sum(r.loss_after for r in result.report) < 1.5 * sum(r.loss_after for r in cpu.report)
    assert set(art.layers) == set(to_artifact(cpu).layers)


def test_model_is_built_on_a_device_other_than_the_cpu(tiny_graph_data):
    """'meta' stands in for a GPU: any CPU tensor mixed into the construction (a range
    search grid, an initial step) raises, as it would on CUDA."""
    from calib.calibrate import build_model
    graph, _ = tiny_graph_data
    model = build_model(graph, CalibConfig(wbits=2, abits=4, method="qdrop+waps", tile=8), torch.device("meta"))
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert tensors and {t.device.type for t in tensors.values()} == {"meta"}


def test_conv_dtype_auto_follows_the_device_s_native_bf16():
    from calib.device import native_bf16, uses_bf16
    cpu = torch.device("cpu")
    assert uses_bf16("bfloat16", cpu) and not uses_bf16("float32", cpu)
    assert uses_bf16("auto", cpu) == native_bf16(cpu)
    with pytest.raises(ConfigError):
        uses_bf16("float16", cpu)
    with pytest.raises(ConfigError):
        CalibConfig(conv_dtype="half").validate()


def test_conv_dtype_reaches_the_loop(tiny_graph_data, monkeypatch):
    """calibrate passes the resolved precision to reconstruct: float32 and bfloat16 give
    different artifacts, and auto gives the one its device resolves to."""
    import calib.calibrate as C
    seen = []
    real = C.reconstruct
    monkeypatch.setattr(C, "reconstruct", lambda *a, **k: (seen.append(k["speed"].bf16), real(*a, **k))[1])
    graph, x = tiny_graph_data
    for dtype in ("float32", "bfloat16", "auto"):
        seen.clear()
        calibrate(graph, x, CalibConfig(wbits=2, abits=4, method="brecq", iters=2, batch=8, tile=8, device="cpu",
                                        conv_dtype=dtype, progress=False))
        from calib.device import native_bf16
        want = {"float32": False, "bfloat16": True, "auto": native_bf16(torch.device("cpu"))}[dtype]
        assert seen and set(seen) == {want}, (dtype, seen)
