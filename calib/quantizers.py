"""Uniform quantizers: weights symmetric per output channel, activations asymmetric per tensor.

Weight codes w̄ ∈ [-2^(b-1), 2^(b-1) - 1], w ≈ s_w[k]·w̄. Activation codes
x̄ ∈ [0, 2^A - 1], x ≈ s_x·(x̄ − z_x). Rounding is round-half-to-even (torch.round)
for round-to-nearest; AdaRound replaces it for weights (calib/rounding.py).
Ranges are initialised by an Lp search (p = 2.4, as BRECQ/QDrop) over clipping ratios.
"""
from __future__ import annotations

import torch
from torch import nn

from calib import native

FLOAT_BITS = 32  # "A32": the tensor stays float (weight-only quantization)
# integer code widths of weights and activations; every backend holds codes in int8/uint8
# lanes and sums them in int32 (CheckOverflow proves each layer), so any width up to 8 works
CODE_BITS = (2, 3, 4, 5, 6, 7, 8)
LP_NORM = 2.4


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through gradient."""
    return (x.round() - x).detach() + x


class _FakeQuant(torch.autograd.Function):
    """``ActQuantizer``'s training forward/backward as one autograd node.

    Values are bit-identical to the unfused expression (clamp(round(x/s) + z, 0, L) − z)·s;
    gradients are those of that expression under autograd (STE through the rounding,
    clamp gradient zero where the code is 0 or L, boundaries included, as torch's clamp
    gives): ∂/∂x = g·[0 < v < L], ∂/∂s = Σ g·(x̂ − x·[0 < v < L])/s. Why: the unfused form
    makes ~8 full-size tensors per quantizer and as many more in backward; this keeps one
    float output and a one-byte mask, and the native kernels keep neither (their backward
    recomputes both from x). Through the native kernels x may be bfloat16 (a conv's output
    under autocast) and the output may be stored as bfloat16 (``dtype``: what a conv reading
    it under autocast would cast it to); the gradient of x then is bfloat16, as the cast's
    backward would give it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, levels: int,
                use_native: bool = False, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        ctx.use_native = use_native and native.usable(x, bf16=True)
        ctx.levels = levels
        if ctx.use_native:  # the same values in one pass (calib/native)
            ctx.save_for_backward(x, scale, zero_point)
            return native.fake_quant_forward(x, float(scale), float(zero_point), float(levels), dtype)
        ctx.in_dtype = x.dtype
        v = x.float() / scale
        v.round_().add_(zero_point)
        inside = (v > 0).logical_and_(v < levels)
        v.clamp_(0, levels).sub_(zero_point).mul_(scale)
        ctx.save_for_backward(x, scale, zero_point, v, inside)
        return v

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        want_x, want_s = ctx.needs_input_grad[:2]
        if ctx.use_native:
            x, scale, zero_point = ctx.saved_tensors
            if not native.usable(x, g, bf16=True):   # the gradient in x's memory layout
                g = torch.empty_like(x, dtype=g.dtype).copy_(g)
            gx, acc = native.fake_quant_backward(g, x, float(scale), float(zero_point), float(ctx.levels), want_x)
            gs = (torch.tensor(acc, dtype=scale.dtype, device=scale.device) / scale).reshape(scale.shape) if want_s else None
            return gx, gs, None, None, None, None
        x, scale, _, out, inside = ctx.saved_tensors
        x = x.float()
        gx = (g * inside).to(ctx.in_dtype) if want_x else None
        gs = None
        if want_s:
            e = x * inside
            torch.sub(out, e, out=e)
            gf = g.float()
            if gf.stride() != e.stride():          # one memory order for the flat dot product
                gf = torch.empty_like(e).copy_(gf)
            gs = torch.dot(flat_view(gf), flat_view(e)).div(scale).reshape(scale.shape)
        return gx, gs, None, None, None, None


def flat_view(t: torch.Tensor) -> torch.Tensor:
    """``t``'s elements as a 1-D view in memory order (no copy for NCHW or NHWC layouts)."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(-1)
    return t.reshape(-1)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, levels: int,
               use_native: bool = False, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Fused fake quantization with LSQ gradients (see _FakeQuant); x float32 (or bfloat16),
    scale and zero_point 0-dim, same values as ``ActQuantizer`` unfused. ``use_native``:
    one-pass C kernels (calib/native) where the tensors allow, else PyTorch ops; ``dtype``:
    the output's type on the native path (float32 elsewhere)."""
    return _FakeQuant.apply(x, scale, zero_point, levels, use_native, dtype)


def weight_range(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


SCALE_SEARCH_ELEMENTS = 1 << 20     # weights the scale search reads per layer, at most


def init_weight_scale(w: torch.Tensor, bits: int, steps: int = 80) -> torch.Tensor:
    """Per-output-channel scale s_w [m] minimising Σ|w − s·clamp(round(w/s))|^2.4.

    Candidates are s = r·max|w_k| / 2^(b-1) for r on a grid in (0.2, 1.0]; the
    grid search is vectorised over channels. A layer with more than
    SCALE_SEARCH_ELEMENTS weights is searched on an evenly strided subset of each
    channel's weights (max|w_k| still from all of them): a 25088×4096 linear costs what
    a 1M-weight layer does, and smaller layers are searched exactly as before."""
    qmin, qmax = weight_range(bits)
    flat = w.detach().reshape(w.shape[0], -1)
    amax = flat.abs().amax(1).double().clamp_min(1e-8)
    if flat.numel() > SCALE_SEARCH_ELEMENTS:
        flat = flat[:, ::-(-flat.numel() // SCALE_SEARCH_ELEMENTS)]
    flat = flat.double()
    best_err = torch.full_like(amax, float("inf"))
    best = amax / -qmin
    for r in torch.linspace(0.2, 1.0, steps, dtype=torch.float64):
        s = r * amax / -qmin
        q = flat / s[:, None]           # in place from here: the same values, no new buffers
        q.round_().clamp_(qmin, qmax).mul_(s[:, None]).sub_(flat).abs_().pow_(LP_NORM)
        err = q.sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s, best)
    return best.float()


def init_act_range(x: torch.Tensor, bits: int, steps: int = 100) -> tuple[float, int]:
    """(scale, zero_point) for an asymmetric A-bit quantizer of samples ``x``.

    Searches shrunken [min, max] ranges (BRECQ's L2.4 search) keeping 0 representable."""
    x = x.detach().flatten()
    if x.numel() > 2_000_000:  # a strided subsample keeps the search fast on big tensors
        x = x[:: x.numel() // 2_000_000 + 1]
    x = x.double()  # after subsampling: a float64 copy of all of x would be 2x its size
    lo0, hi0 = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    levels = 2**bits - 1
    best, best_err = None, float("inf")
    for i in range(steps):
        f = 1.0 - i / steps * 0.8
        lo, hi = lo0 * f, hi0 * f
        s = max((hi - lo) / levels, 1e-8)
        z = int(round(-lo / s))
        q = x / s                       # in place from here: the same values, no new buffers
        q.round_().add_(z).clamp_(0, levels).sub_(z).mul_(s).sub_(x).abs_().pow_(LP_NORM)
        err = float(q.mean())
        if err < best_err:
            best, best_err = (s, z), err
    return best


class ActQuantizer(nn.Module):
    """Per-tensor asymmetric fake quantizer with a learned step (LSQ-style STE).

    ``bits = 32`` makes it the identity. ``drop_prob`` > 0 (QDrop) keeps each
    element's full-precision value with that probability, in training mode only.
    ``range_fixed``: one quantizer shared by several values (a cat and what it joins) was
    set once from all of them; per-value initialisation and learning leave it alone."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0.0))
        self.enabled = bits < FLOAT_BITS
        self.drop_prob = 0.0
        self.fused = True  # training forward through fake_quant (same values, fewer passes)
        self.native = False  # ... through its one-pass C kernels (reconstruct's Speedups.native)
        # ... storing its output as this type: bfloat16 where every reader is a conv/linear
        # under autocast, which would cast it so (reconstruct's Speedups.bf16_boundaries)
        self.out_dtype = torch.float32
        self.range_fixed = False

    @property
    def levels(self) -> int:
        return 2**self.bits - 1

    def init_from(self, x: torch.Tensor) -> None:
        if not self.enabled or self.range_fixed:
            return
        s, z = init_act_range(x, self.bits)
        self.scale.data.fill_(s)
        self.zero_point.fill_(z)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes x̄ (as float) of a real tensor: clamp(round(x/s) + z, 0, 2^A − 1),
        round half to even. ``forward`` computes exactly this (with an STE)."""
        return ((x / self.scale).round() + self.zero_point).clamp(0, self.levels)

    def absorbs_relu(self) -> bool:
        """True when this quantizer applied to x equals it applied to relu(x), values and
        gradients: zero point 0 (codes below 0 clamp to 0, as relu's outputs quantize),
        the fused form or no gradients (its STE mask 0 < code < L gives x < 0 no gradient,
        as relu; the unfused clamp passes code 0's), and no QDrop mixing (which would keep
        the float value of x, not of relu(x))."""
        return (self.enabled and (self.fused or not torch.is_grad_enabled())
                and not (self.training and self.drop_prob > 0) and bool(self.zero_point == 0))

    def absorbs(self, act: str | None) -> bool:
        """True when ``act`` then this quantizer is this quantizer alone: no activation, or a
        ReLU it absorbs (``absorbs_relu``)."""
        return act is None or (act == "relu" and self.absorbs_relu())

    def reads_reduced(self, act: str | None) -> bool:
        """True when ``act`` then this quantizer can take a bfloat16 input as it is (the
        native fused path, which computes in float32 from it): an activation it absorbs and
        no QDrop mixing (which keeps the input's own values)."""
        return (self.enabled and self.fused and self.native and torch.is_grad_enabled()
                and not (self.training and self.drop_prob > 0) and self.absorbs(act))

    def clip_bounds(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(lowest, highest) representable value, 0-dim and detached; None when disabled."""
        if not self.enabled:
            return None
        s = self.scale.detach()
        return -self.zero_point * s, (self.levels - self.zero_point) * s

    def clip(self, x: torch.Tensor) -> torch.Tensor:
        """The quantizer without its rounding: x clamped to the representable range."""
        bounds = self.clip_bounds()
        return x if bounds is None else x.clamp(*bounds)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        s = self.scale
        if self.fused and torch.is_grad_enabled():
            xq = fake_quant(x, s, self.zero_point, self.levels, self.native,
                            self.out_dtype if not (self.training and self.drop_prob > 0) else torch.float32)
        else:
            q = (round_ste(x / s) + self.zero_point).clamp(0, self.levels)
            xq = (q - self.zero_point) * s
        if self.training and self.drop_prob > 0:
            keep_fp = torch.rand_like(x) < self.drop_prob
            return torch.where(keep_fp, x, xq)
        return xq
