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


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_fake_quant_on_bfloat16_is_the_cast_float32_path(layout, out_dtype):
    """A bf16 conv output through the native quantizer: the values of quantizing its float32
    copy, cast to ``out_dtype``; the input gradient that path's cast backward gives (bf16)
    and its step gradient, from the gradient in either type and layout."""
    s, z = torch.tensor(0.5, requires_grad=True), torch.tensor(3.0)
    x16 = _x(layout).to(torch.bfloat16)
    g = torch.linspace(-1, 1, x16.numel()).reshape(x16.shape).to(out_dtype)     # NCHW: laid out unlike x
    x = x16.clone().requires_grad_(True)
    y = fake_quant(x, s, z, 15, True, out_dtype)
    y.backward(g)
    got = (y.detach(), x.grad, s.grad.clone())
    s.grad = None
    xr = x16.clone().requires_grad_(True)
    yr = fake_quant(xr.float(), s, z, 15).to(out_dtype)
    yr.backward(g)
    assert y.dtype == out_dtype and x.grad.dtype == torch.bfloat16
    assert y.stride() == x16.stride()
    assert torch.equal(got[0], yr.detach())
    assert torch.equal(got[1], xr.grad)
    torch.testing.assert_close(got[2], s.grad, rtol=1e-5, atol=1e-5)


def test_bfloat16_store_rounds_to_nearest_even_as_torch_casts():
    from calib.native import fake_quant_forward
    x = torch.randn(1 << 16) * 7                  # step 2**-20: outputs keep up to 23 bits
    got = fake_quant_forward(x, 2.0 ** -20, 0.0, 2.0 ** 24 - 1, torch.bfloat16)
    want = fake_quant(x, torch.tensor(2.0 ** -20), torch.tensor(0.0), 2 ** 24 - 1).to(torch.bfloat16)
    assert torch.equal(got, want)


@pytest.mark.parametrize("shape", [(9, 6, 5, 7), (9, 12), (9, 4, 10)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gather_is_indexing_then_decoding(shape, channels_last):
    from calib.frontier import Codes, take
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, shape, generator=g, dtype=torch.uint8)
    values = torch.randn(shape, generator=g)
    stored = Codes(codes, torch.tensor(0.37), torch.tensor(5.0))
    idx = torch.tensor([8, 0, 3, 3, 7])
    for src, want in ((stored, stored[idx]), (values, values[idx])):
        got = take(src, idx, channels_last, use_native=True)
        plain = take(src, idx, channels_last)
        assert torch.equal(got, want) and torch.equal(plain, want)
        assert got.stride() == plain.stride()
        if channels_last and len(shape) == 4:
            assert got.is_contiguous(memory_format=torch.channels_last)
    assert native.gather(values[:, ::2], idx, True) is None                # a view it cannot walk: None


def test_fake_quant_step_gradient_alone_equals_the_one_with_the_input_gradient():
    """fq_backward without an input gradient (a separate loop) sums the same step gradient."""
    x, g = _x("nchw"), _x("nchw", seed=3)
    with_x = native.fake_quant_backward(g, x, 0.5, 3.0, 15.0, True)
    alone = native.fake_quant_backward(g, x, 0.5, 3.0, 15.0, False)
    assert alone[0] is None and alone[1] == with_x[1]


def _adaround_pair(beta_spread: float = 8.0):
    from calib.rounding import AdaRound
    g = torch.Generator().manual_seed(4)
    w = torch.randn(16, 8, 3, 3, generator=g) * 0.05
    s = w.abs().amax((1, 2, 3)) / 1.5
    fast, ref = AdaRound(w, s, 2), AdaRound(w, s, 2)
    fast.v.data.mul_(torch.rand(fast.v.shape, generator=g) * beta_spread)   # h reaches 0 and 1 in places
    ref.v.data.copy_(fast.v.data)
    fast.native = True
    return fast, ref


@pytest.mark.parametrize("beta", [None, 2.0, 7.3, 20.0])
def test_soft_rounding_and_regulariser_match_the_torch_form(beta):
    """_SoftRound's weights, regulariser and V-gradient (loss Σ g·w + c·reg) equal autograd
    through rectified_sigmoid / binary_regulariser up to its own exp and log (~1e-7 relative)."""
    fast, ref = _adaround_pair()
    g = torch.linspace(-1, 1, fast.v.numel()).reshape(fast.v.shape)
    results = []
    for a in (fast, ref):
        a.begin_step(beta)
        w = a()
        reg = a.regulariser(beta) if beta is not None else torch.zeros(())
        ((w * g).sum() + 0.37 * reg).backward()
        results.append((w.detach(), reg.detach(), a.v.grad))
        a.end_step()
    assert fast._step is None and ref._step is None
    (wf, rf, gf), (wr, rr, gr) = results
    torch.testing.assert_close(wf, wr, rtol=0, atol=1e-7)
    torch.testing.assert_close(rf, rr, rtol=1e-5, atol=0)
    torch.testing.assert_close(gf, gr, rtol=0, atol=1e-6 * float(gr.abs().max()))
    h = ref.h().detach()
    assert (h == 0).any() and (h == 1).any() and ((h > 0) & (h < 1)).any()     # both clamps and the inside
    assert (ref.floor + h > ref.qmax).any()                                     # the code clamp too


def test_soft_rounding_regulariser_weighs_its_gradient():
    """Regulariser off in the loss (greg = 0) and on give different V-gradients, each as torch's."""
    grads = []
    for c in (0.0, 5.0):
        fast, _ = _adaround_pair()
        fast.begin_step(4.0)
        (fast().sum() + c * fast.regulariser(4.0)).backward()
        grads.append(fast.v.grad)
    assert not torch.allclose(grads[0], grads[1])


@pytest.mark.parametrize("form", ["softmax", "sigmoid"])
@pytest.mark.parametrize("beta", [None, 3.0, 20.0])
def test_soft_groups_match_the_torch_forms(form, beta):
    """_SoftGroups' γ^y, regulariser and R-gradient (loss Σ g·γ^y + c·reg) equal autograd
    through group_probabilities / gamma_y / binary_regulariser, for both eq. 15 forms."""
    from calib.product_groups import ProductGroups
    g = torch.Generator().manual_seed(5)
    r = torch.randn(24, 4, generator=g) * 3
    r[0] = torch.tensor([9.0, -9.0, -9.0, -9.0])                 # settled: s one-hot, clamps hit
    gammas = [0.5, 1.0, 1.5, 2.0]
    weights = torch.linspace(-1, 1, 24)
    results = []
    for use_native in (True, False):
        pg = ProductGroups(24, gammas, form)
        pg.r.data.copy_(r)
        pg.native = use_native
        pg.begin_step(beta)
        gy = pg.gamma_y()
        reg = pg.regulariser(beta) if beta is not None else torch.zeros(())
        ((gy * weights).sum() + 0.37 * reg).backward()
        results.append((gy.detach(), reg.detach(), pg.r.grad))
        assert (pg._step is not None) == use_native
        pg.end_step()
    (gf, rf, grf), (gt, rt, grt) = results
    torch.testing.assert_close(gf, gt, rtol=2e-6, atol=0)
    torch.testing.assert_close(rf, rt, rtol=1e-5, atol=0)
    torch.testing.assert_close(grf, grt, rtol=0, atol=2e-6 * float(grt.abs().max()))
    assert (grt[0] == 0).all() == (grf[0] == 0).all()


@pytest.mark.parametrize("form", ["softmax", "sigmoid"])
def test_group_tracking_matches_the_torch_form(form):
    """The native track settles, keeps and unsettles units as the torch form does."""
    from calib.product_groups import ProductGroups
    g = torch.Generator().manual_seed(6)
    r = torch.randn(32, 4, generator=g) * 2
    r[:8] = torch.tensor([12.0, -12.0, -12.0, -12.0])       # settled from the start
    pgs = []
    for use_native in (True, False):
        pg = ProductGroups(32, [0.5, 1.0, 1.5, 2.0], form)
        pg.r.data.copy_(r)
        pg.native = use_native
        pg.settled_at[8:12] = 3                                # settled before, no longer one-hot
        pgs.append(pg)
    for step in (5, 6):
        for pg in pgs:
            pg.track(step, record=step == 6)
        pgs[0].r.data[12:16] = torch.tensor([12.0, -12.0, -12.0, -12.0])
        pgs[1].r.data[12:16] = torch.tensor([12.0, -12.0, -12.0, -12.0])
    assert torch.equal(pgs[0].settled_at, pgs[1].settled_at)
    assert (pgs[0].settled_at[:8] == 5).all() and (pgs[0].settled_at[8:12] == -1).all()
    assert (pgs[0].settled_at[12:16] == 6).all()
    np = pytest.importorskip("numpy")
    np.testing.assert_allclose(pgs[0].history[-1], pgs[1].history[-1], rtol=2e-6, atol=1e-7)
