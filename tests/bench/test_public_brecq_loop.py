"""bench/public_brecq_loop.py: the re-implemented public loop starts where AdaRound starts."""
import torch

from bench.public_brecq_loop import Conv, _AdaRoundConv, time_public_loop


def test_soft_rounding_starts_at_the_float_weight_and_the_loop_learns():
    g = torch.Generator().manual_seed(0)
    conv = Conv(torch.randn(8, 8, 3, 3, generator=g) * 0.1, torch.zeros(8), (1, 1), (1, 1))
    q = _AdaRoundConv(conv, bits=4)
    x_int = torch.floor(conv.weight / q.delta) + q.soft_targets()
    w0 = (torch.clamp(x_int + q.zero_point, 0, q.levels - 1) - q.zero_point) * q.delta
    v = conv.weight / q.delta + q.zero_point
    inside = (v >= 0) & (v <= q.levels - 1)          # weights the grid can hold (not clamped)
    assert inside.float().mean() > 0.9
    torch.testing.assert_close(w0[inside], conv.weight[inside], rtol=0, atol=1e-5)   # σ(α) = fractional part
    x = torch.randn(16, 8, 6, 6, generator=g).relu()
    y = torch.nn.functional.relu(torch.nn.functional.conv2d(
        torch.nn.functional.relu(torch.nn.functional.conv2d(x, conv.weight, None, 1, 1)), conv.weight, None, 1, 1) + x)
    short = time_public_loop(conv, conv, x, y, 2, 8, iters=3)
    long = time_public_loop(conv, conv, x, y, 2, 8, iters=200)
    assert 0 < short["min"] <= short["median"]
    assert long["loss"] < short["loss"]
