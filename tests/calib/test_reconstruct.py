import pytest
import torch

from calib.calibrate import calibrate
from calib.capture import capture, export_module
from calib.config import CalibConfig
from calib.cwac import fit_affine
from calib.fold_bn import fold_batch_norm
from calib.fuse import fuse_activations


def test_cwac_closed_form_recovers_a_known_affine():
    g = torch.Generator().manual_seed(0)
    y_q = torch.randn(64, 5, 4, 4, generator=g)
    a = torch.tensor([0.5, 1.0, 2.0, -1.0, 1.5])
    c = torch.tensor([0.1, -0.2, 0.0, 3.0, 1.0])
    y_fp = a.reshape(1, -1, 1, 1) * y_q + c.reshape(1, -1, 1, 1)
    got_a, got_c = fit_affine(y_q, y_fp)
    torch.testing.assert_close(got_a, a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_c, c, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def setup():
    from tests.conftest import TinyResNet, randomize_bn
    torch.manual_seed(0)
    net = randomize_bn(TinyResNet())
    graph = fuse_activations(fold_batch_norm(capture(export_module(net, (1, 16, 16)))))
    return graph, torch.randn(128, 1, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["brecq", "waps", "qdrop+waps"])
def test_reconstruction_lowers_block_loss_below_round_to_nearest(setup, method):
    graph, x = setup
    cfg = CalibConfig(wbits=2, abits=4, method=method, iters=150, batch=32, tile=8, lam=0.1, progress=False)
    report = calibrate(graph, x, cfg).report
    trained = [r for r in report if r.iters]
    assert sum(r.loss_after for r in trained) < 0.8 * sum(r.loss_before for r in trained)
    assert sum(r.loss_after < r.loss_before for r in trained) >= len(trained) - 1


def test_rtn_and_cwac_need_no_iterations(setup):
    graph, x = setup
    plain = calibrate(graph, x, CalibConfig(wbits=2, abits=4, method="rtn", progress=False)).report
    comp = calibrate(graph, x, CalibConfig(wbits=2, abits=4, method="rtn", cwac=True, progress=False)).report
    assert all(r.iters == 0 for r in plain + comp)
    assert sum(r.loss_after for r in comp) < sum(r.loss_after for r in plain)
