import pytest
import torch
from hypothesis import given, settings, strategies as st

from calib.quantizers import CODE_BITS, ActQuantizer, init_act_range, init_weight_scale, weight_range
from calib.rounding import AdaRound, BetaSchedule, binary_regulariser, nearest_codes, rectified_sigmoid


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from(CODE_BITS), seed=st.integers(0, 10_000))
def test_weight_codes_round_trip(bits, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 4, 3, 3, generator=g)
    s = init_weight_scale(w, bits)
    codes = nearest_codes(w, s, bits)
    lo, hi = weight_range(bits)
    assert codes.min() >= lo and codes.max() <= hi
    assert torch.equal(codes, codes.round())
    # dequantized codes quantize back to themselves
    deq = codes * s.reshape(-1, 1, 1, 1)
    assert torch.equal(nearest_codes(deq, s, bits), codes)
    # within the clipping range the error is at most half a step
    inside = (w / s.reshape(-1, 1, 1, 1)).abs() <= hi
    err = (deq - w).abs() / s.reshape(-1, 1, 1, 1)
    assert float(err[inside].max()) <= 0.5 + 1e-5


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from(CODE_BITS), shift=st.floats(-2, 2), seed=st.integers(0, 1000))
def test_activation_codes_round_trip(bits, shift, seed):
    x = torch.randn(1000, generator=torch.Generator().manual_seed(seed)) + shift
    q = ActQuantizer(bits)
    q.init_from(x)
    codes = q.codes(x)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    real = (codes - q.zero_point) * q.scale
    assert torch.allclose(q(x), real.detach(), atol=1e-6)
    assert torch.equal(q.codes(real.detach()), codes)       # codes → real → codes
    s, z = init_act_range(x, bits)
    assert abs(round(-0.0 / s) + z - z) == 0  # real zero is exactly representable
    assert 0 <= z <= 2**bits - 1


def test_act_quantizer_32_bits_is_identity_and_qdrop_mixes():
    x = torch.randn(10_000)
    assert torch.equal(ActQuantizer(32)(x), x)
    q = ActQuantizer(2)
    q.init_from(x)
    q.train()
    q.drop_prob = 0.5
    y = q(x)
    kept = (y == x).float().mean()
    assert 0.45 < kept < 0.6
    q.eval()
    assert not torch.equal(q(x), x)


def test_adaround_starts_at_the_float_weight_and_hardens_to_floor_or_ceil():
    w = torch.randn(16, 8)
    s = init_weight_scale(w, 4)
    r = AdaRound(w, s, 4)
    inside = (w / s[:, None]).abs() < 7
    assert torch.allclose(r()[inside], w[inside], atol=1e-3)
    r.hard = True
    codes = r.codes()
    floor = (w / s[:, None]).floor()
    assert torch.all((codes == floor) | (codes == floor + 1) | ~inside)


def test_rectified_sigmoid_and_regulariser():
    assert float(rectified_sigmoid(torch.tensor(-20.0))) == 0.0
    assert float(rectified_sigmoid(torch.tensor(20.0))) == 1.0
    assert float(binary_regulariser(torch.tensor([0.0, 1.0, 1.0]), 2.0)) == 0.0
    # h = 0.5 is the maximum: 1 - 0^β = 1 per element
    assert float(binary_regulariser(torch.tensor([0.5, 0.5]), 20.0)) == 2.0
    h = torch.tensor([0.3])
    assert abs(float(binary_regulariser(h, 2.0)) - (1 - 0.4**2)) < 1e-6


def test_beta_schedule_warmup_then_linear_decay():
    b = BetaSchedule(1000, warmup=0.2, start=20, end=2)
    assert not b.active(199) and b.active(200)
    assert b(0) == 20 and b(200) == 20
    assert abs(b(600) - 11) < 1e-9
    assert b(1000) == 2


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), zp=st.integers(0, 3), scale=st.floats(0.05, 0.5), seed=st.integers(0, 1000))
def test_fused_fake_quant_equals_the_unfused_expression_and_its_gradients(bits, zp, scale, seed):
    """Same values bit for bit; same ∂/∂x and ∂/∂s as autograd through the unfused form
    (including zero gradient where the code lands exactly on 0 or 2^A − 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 5, 5, generator=g) * 2
    x[0, 0, 0, :3] = torch.tensor([0.0, -zp * scale, (2**bits - 1 - zp) * scale])  # exact boundaries
    up = torch.randn(x.shape, generator=g)
    grads = []
    for fused in (False, True):
        q = ActQuantizer(bits)
        q.scale.data.fill_(scale)
        q.zero_point.fill_(zp)
        q.fused = fused
        xi = x.clone().requires_grad_(True)
        y = q(xi)
        (y * up).sum().backward()
        grads.append((y.detach(), xi.grad, q.scale.grad))
    (y0, gx0, gs0), (y1, gx1, gs1) = grads
    assert torch.equal(y0, y1)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gs1, gs0, rtol=1e-4, atol=1e-4)


def test_weight_scale_search_of_a_huge_layer_reads_a_strided_subset(monkeypatch):
    from calib import quantizers
    torch.manual_seed(0)
    w = torch.randn(32, 4096) * torch.rand(32, 1)
    exact = init_weight_scale(w, 3)
    monkeypatch.setattr(quantizers, "SCALE_SEARCH_ELEMENTS", 32 * 512)
    sub = init_weight_scale(w, 3)
    assert not torch.equal(sub, exact)                          # the subset was searched, not all weights
    def err(s):                                                 # the search's objective, on every weight
        q = (w / s[:, None]).round().clamp(*weight_range(3)) * s[:, None]
        return float((q - w).abs().pow(2.4).sum())
    assert err(sub) <= 1.03 * err(exact)                        # and its scales are as good on all of them
    small = torch.randn(8, 100)
    assert torch.equal(init_weight_scale(small, 3), quantizers.init_weight_scale(small, 3))


@pytest.mark.parametrize("native", [False, True])
def test_a_zero_point_0_quantizer_absorbs_the_relu_before_it(native):
    """q(x) = q(relu(x)) in values and in the gradients of x and the step, so
    qmodel.act_then_quant may skip the ReLU."""
    from calib.quantizers import ActQuantizer
    q = ActQuantizer(4)
    q.scale.data.fill_(0.25)
    q.native = native
    q.train()
    base = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2
    base[0, 0, 0, :3] = torch.tensor([-0.1, 0.0, -0.125])   # below half a step, zero, a tie
    grads = []
    for relu_first in (True, False):
        x = base.clone().requires_grad_(True)
        q.scale.grad = None
        y = q(torch.relu(x) if relu_first else x)
        y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
        grads.append((y.detach(), x.grad, q.scale.grad.clone()))
    assert q.absorbs_relu()
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    torch.testing.assert_close(grads[0][2], grads[1][2], rtol=1e-6, atol=1e-6)
    q.zero_point.fill_(2.0)
    assert not q.absorbs_relu()
    q.zero_point.fill_(0.0)
    q.fused = False          # the unfused clamp passes gradient at code 0: not the same
    assert not q.absorbs_relu()
    q.fused, q.drop_prob = True, 0.5
    assert not q.absorbs_relu()
