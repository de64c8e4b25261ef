"""The cached frontier: quantized activations as exact uint8 codes, chunked evaluation."""
import pytest
import torch

from calib import frontier
from calib.blocks import find_blocks
from calib.calibrate import _init_act_ranges
from calib.capture import capture, export_module
from calib.config import CalibConfig
from calib.fold_bn import fold_batch_norm
from calib.fuse import fuse_activations
from calib.qmodel import QuantModel
from calib.quantizers import ActQuantizer
from calib.reconstruct import block_loss, run_block


def test_quantized_values_round_trip_through_codes_bit_for_bit():
    q = ActQuantizer(4)
    x = torch.randn(70, 3, 5, 5, generator=torch.Generator().manual_seed(0)) * 3
    q.init_from(x)
    xq = q(x).detach()
    stored = frontier.encode(xq, q, chunk=32)
    assert isinstance(stored, frontier.Codes) and stored.codes.dtype == torch.uint8
    assert stored.nbytes * 4 == xq.numel() * xq.element_size()
    assert torch.equal(stored[:], xq)
    idx = torch.tensor([5, 0, 69, 5])
    assert torch.equal(stored[idx], xq[idx])
    assert stored.shape == xq.shape and len(stored) == 70


def test_values_off_the_grid_stay_float():
    q = ActQuantizer(4)
    x = torch.randn(70, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    q.init_from(x)
    xq = q(x).detach()
    off = xq.clone()
    off[40, 0, 0, 0] += q.scale.detach() / 3  # one value in the second chunk leaves the grid
    stored = frontier.encode(off, q, chunk=32)
    assert isinstance(stored, torch.Tensor) and torch.equal(stored, off)
    assert frontier.encode(x, ActQuantizer(32)) is x  # a float "quantizer": nothing to encode


@pytest.fixture(scope="module")
def tiny():
    from tests.conftest import TinyResNet, randomize_bn
    torch.manual_seed(0)
    graph = fuse_activations(fold_batch_norm(capture(export_module(randomize_bn(TinyResNet(16)), (1, 8, 8)))))
    model = QuantModel(graph, CalibConfig(wbits=4, abits=4, method="brecq", progress=False)).eval()
    x = torch.randn(300, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    model.input_quant.init_from(x)
    return graph, model, x


def test_block_outputs_match_the_plain_evaluation_and_are_stored_as_codes(tiny):
    graph, model, x = tiny
    blocks = find_blocks(graph)
    model.set_quant(True)
    env = {graph.input.name: model.input_quant(x).detach()}
    coded = 0
    for b in blocks:
        inputs = {k: env[k] for k in b.inputs}
        model.set_quant(False)
        _init_act_ranges(model, b, inputs)  # this block's output steps, as calibration sets them
        model.set_quant(True)
        plain = run_block(model, b, inputs)
        compact = frontier.evaluate(model, b, {k: frontier.encode(v, frontier.producer_quantizer(model, k))
                                               for k, v in inputs.items()}, compact=True)
        for o in b.outputs:
            got = compact[o][:] if isinstance(compact[o], frontier.Codes) else compact[o]
            assert torch.equal(got, plain[o])
            coded += isinstance(compact[o], frontier.Codes)
        assert frontier.loss(model, b, inputs, plain) == pytest.approx(block_loss(model, b, inputs, plain),
                                                                        rel=1e-5, abs=1e-9)
        env.update(plain)
    assert coded >= len(blocks) - 1  # every block but the logits (8-bit codes too, when on the grid)
