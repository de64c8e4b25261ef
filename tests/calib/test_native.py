"""calib/native one-pass kernels against the PyTorch forms they replace."""
import pytest
import torch

from calib import native
from calib.quantizers import fake_quant
from calib.reconstruct import _ClippedSSE, _QuantizedSSE, _sse


@pytest.fixture(scope="module", autouse=True)
def built():
    assert native.kernels() is not None, "gcc is installed in CI: the kernels must build"


def _x(layout: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 6, 5, 7, generator=g) * 3
    x[0, 0, 0, :4] = torch.tensor([0.25, 0.75, -0.25, 3.75])  # exact ties of the step 0.5: half to even
    return x.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else x


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_fake_quant_values_bit_identical_and_gradients_equal(layout):
    s, z = torch.tensor(0.5, requires_grad=True), torch.tensor(3.0)
    outs, grads = [], []
    for use_native in (False, True):
        x = _x(layout).requires_grad_(True)
        s.grad = None
        y = fake_quant(x, s, z, 15, use_native)
        y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
        outs.append(y.detach())
        grads.append((x.grad, s.grad))
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-5)
    assert (outs[1] / 0.5 + 3).min() == 0 and (outs[1] / 0.5 + 3).max() == 15  # both clamps hit


@pytest.mark.parametrize("clip", [True, False])
def test_clipped_sse_matches_autograd(clip):
    t = _x("nhwc", seed=1)
    lo, hi = (torch.tensor(-1.0), torch.tensor(2.0)) if clip else (None, None)
    vals, grads = [], []
    for use_native in (False, True):
        x = _x("nhwc").requires_grad_(True)
        v = _ClippedSSE.apply(x, t, lo, hi, use_native)
        v.backward(torch.tensor(0.7))
        vals.append(v.detach())
        grads.append(x.grad)
    x = _x("nhwc").requires_grad_(True)
    ref = _sse(x.clamp(lo, hi) if clip else x, t)
    ref.backward(torch.tensor(0.7))
    for v, gx in zip(vals, grads):
        torch.testing.assert_close(v, ref.detach(), rtol=1e-5, atol=0)
        torch.testing.assert_close(gx, x.grad, rtol=1e-5, atol=1e-7)


def test_quantized_sse_matches_autograd_through_fake_quant():
    x, t = _x("nchw"), _x("nchw", seed=2)
    z = torch.tensor(3.0)
    s = torch.tensor(0.5, requires_grad=True)
    v = _QuantizedSSE.apply(s, x, t, z, 15)
    v.backward()
    ds = s.grad.clone()
    s.grad = None
    ref = _sse(fake_quant(x, s, z, 15), t)
    ref.backward()
    torch.testing.assert_close(v.detach(), ref.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(ds, s.grad, rtol=1e-4, atol=1e-4)


def test_tensors_the_kernels_cannot_walk_fall_back():
    x = torch.randn(4, 6, 5, 7)
    assert native.usable(x) and native.usable(x, torch.zeros_like(x))
    assert not native.usable(x[:, :, :, ::2])                    # strided view
    assert not native.usable(x, x.contiguous(memory_format=torch.channels_last))  # layouts differ
    assert not native.usable(x.double())
    s, z = torch.tensor(0.5), torch.tensor(3.0)
    torch.testing.assert_close(fake_quant(x[:, :, :, ::2], s, z, 15, True), fake_quant(x[:, :, :, ::2], s, z, 15))


def test_sums_do_not_depend_on_the_thread_count():
    x, t = torch.randn(8, 16, 40, 40), torch.randn(8, 16, 40, 40)   # many blocks of 4096
    s, z = torch.tensor(0.3), torch.tensor(7.0)
    before = torch.get_num_threads()
    vals = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            vals.append((float(_QuantizedSSE.apply(s, x, t, z, 15)), float(_ClippedSSE.apply(x, t, None, None, True))))
    finally:
        torch.set_num_threads(before)
    assert vals[0] == vals[1] == vals[2]
