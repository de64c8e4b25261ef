"""The public BRECQ loop's AdaRound stage, re-implemented for side-by-side timing.

bench/calib_speed.py times our loop against this one on the same machine, block, cached
data, batch and threads, so the ratio is like for like. What one iteration does follows
yhhhli/BRECQ (MIT; `quant/block_recon.py` `block_reconstruction` with act_quant=False,
`quant/adaptive_rounding.py` `AdaRoundQuantizer` in 'learned_hard_sigmoid' mode,
`quant/quant_block.py` `QuantBasicBlock.forward`, `quant/quant_layer.py` `lp_loss`),
written here from that description, op for op:

- a random permutation of the cached samples, the first ``batch`` taken, inputs and
  float targets indexed (``.to(device)`` is a no-op on the CPU);
- per conv: x_floor = floor(W/Δ), x_int = x_floor + clamp(σ(α)(ζ−γ)+γ, 0, 1),
  W_q = (clamp(x_int + z, 0, 2^b−1) − z)·Δ, recomputed from the float weight every step;
- conv1 → ReLU → conv2, ``+=`` residual, ReLU; no activation quantization in this stage;
- loss = lp_loss(p=2) = (pred − tgt).abs().pow(2).sum(1).mean(), plus after the warm-up
  λ·Σ(1 − |2h − 1|^β) with β decayed linearly (20 → 2);
- ``backward(retain_graph=True)``, Adam step (lr 1e-3, the public default).

Only ResNet basic blocks without a downsample branch (e.g. layer1.0) are rebuilt: that is
the block the reference times were measured on.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

GAMMA, ZETA = -0.1, 1.1


@dataclass
class Conv:
    """One conv of the block: float weight [m, c, k, k], bias [m], stride, padding."""
    weight: torch.Tensor
    bias: torch.Tensor
    stride: tuple[int, int]
    padding: tuple[int, int]


class _AdaRoundConv(torch.nn.Module):
    def __init__(self, conv: Conv, bits: int):
        super().__init__()
        self.conv = conv
        w = conv.weight
        m = w.shape[0]
        lo = w.reshape(m, -1).min(1).values.clamp(max=0)
        hi = w.reshape(m, -1).max(1).values.clamp(min=0)
        self.levels = 2 ** bits
        self.delta = ((hi - lo) / (self.levels - 1)).clamp(min=1e-8).reshape(m, 1, 1, 1)
        self.zero_point = (-lo.reshape(m, 1, 1, 1) / self.delta).round()
        rest = w / self.delta - torch.floor(w / self.delta)
        self.alpha = torch.nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))

    def soft_targets(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.conv.weight
        x_int = torch.floor(w / self.delta) + self.soft_targets()
        x_quant = torch.clamp(x_int + self.zero_point, 0, self.levels - 1)
        wq = (x_quant - self.zero_point) * self.delta
        return F.conv2d(x, wq, self.conv.bias, self.conv.stride, self.conv.padding)


def time_public_loop(conv1: Conv, conv2: Conv, inputs: torch.Tensor, targets: torch.Tensor, bits: int,
                     batch: int, iters: int, warmup_iters: int = 3, weight: float = 0.01,
                     warmup: float = 0.2) -> dict:
    """Median and minimum seconds per iteration of the public loop over ``iters`` timed
    iterations after ``warmup_iters``, and its final reconstruction loss (lp_loss)."""
    q1, q2 = _AdaRoundConv(conv1, bits), _AdaRoundConv(conv2, bits)
    opt = torch.optim.Adam([q1.alpha, q2.alpha])
    total = iters + warmup_iters
    start_decay = warmup * total
    stamps = []
    rec = torch.zeros(())
    for count in range(1, total + 1):
        idx = torch.randperm(inputs.size(0))[:batch]
        cur_inp, cur_out = inputs[idx], targets[idx]
        opt.zero_grad()
        out = F.relu(q1(cur_inp))
        out = q2(out)
        out += cur_inp
        out = F.relu(out)
        rec = (out - cur_out).abs().pow(2).sum(1).mean()
        loss = rec
        if count >= start_decay:
            b = 2 + (20 - 2) * max(0.0, 1 - (count - start_decay) / (total - start_decay))
            for q in (q1, q2):
                h = q.soft_targets()
                loss = loss + weight * (1 - ((h - .5).abs() * 2).pow(b)).sum()
        loss.backward(retain_graph=True)
        opt.step()
        stamps.append(time.perf_counter())
    steps = [b - a for a, b in zip(stamps[warmup_iters - 1:], stamps[warmup_iters:])]
    steps.sort()
    return {"median": steps[len(steps) // 2], "min": steps[0], "loss": float(rec.detach())}
