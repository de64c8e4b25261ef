"""The one reconstruction loop, for single layers and residual blocks alike (eq. 16).

loss = mean_batch Σ (Ẑ − Z)² + λ·(Σ rounding reg + Σ group reg), the regulariser off
during the warm-up; Adam on AdaRound V, WAPS logits R and γ^z/φ^z; activation
steps with their own Adam and cosine-decayed learning rate. QDrop mixes the
block's quantized and float inputs elementwise and drops inside the block.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from calib.blocks import Block
from calib.config import CalibConfig
from calib import frontier, native
from calib.frontier import producer_quantizer
from calib.graph import PARAM_OPS, QUANT_OPS
from calib.quantizers import flat_view as _flat
from calib.qmodel import QuantLayer, QuantModel, QuantOp
from calib.quantizers import ActQuantizer
from calib.rounding import BetaSchedule, cosine_lr
from calib.spill import IN_MEMORY, Spill

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Speedups:
    """Per-iteration speed levers of the reconstruction loop; each keeps the result
    (final block loss within ±2 %) and can be switched off to time it against the
    plain path (bench/calib_speed.py). Defaults: all on."""
    cache_glue: bool = True     # parameter-free nodes that read only block inputs run once, not per step
    fused_quant: bool = True    # one autograd node per activation quantizer (quantizers.fake_quant)
    fused_loss: bool = True     # clipped squared error as one autograd node (_ClippedSSE)
    channels_last: bool = True  # each batch in NHWC memory order: oneDNN's fast conv layout
    native: bool = True         # quantizer and losses through one-pass C kernels (calib/native)
    bf16: bool = False          # conv/linear in bfloat16 (CPU autocast), outputs back in float32
    native_gather: bool = True  # each batch gathered from the cache, decoded and laid out in one pass (calib/native)
    bf16_boundaries: bool = True  # with bf16: a conv's bf16 output read as it is by the native quantizer, whose
                                  # output is stored in bf16 where only convs/linears read it (same values)
    fused_adam: bool = True     # Adam's update of all parameters of a group in one kernel (torch's fused=True)
    shared_soft: bool = True    # h(V) and group probabilities made once per step for forward and regulariser
    native_soft: bool = True    # with shared_soft: soft weights, WAPS γ^y and both regularisers by C kernels,
                                # one autograd node each per layer (own exp/log: equal up to ~1e-7 relative)

    @classmethod
    def none(cls) -> "Speedups":
        return cls(**{f: False for f in cls.__dataclass_fields__})


@dataclass
class ReconStats:
    iters: int
    seconds: float


def block_modules(model: QuantModel, block: Block) -> tuple[list[QuantLayer], list[QuantOp]]:
    """(conv/linear layers, parameter-free ops with their own quantizer) of the block."""
    layers, ops = [], []
    for name in block.nodes:
        op = model.graph[name].op
        if op in ("conv2d", "linear"):
            layers.append(model.layer(name))
        elif op in QUANT_OPS:
            ops.append(model.layer(name))
    return layers, ops


def run_block(model: QuantModel, block: Block, inputs: Tensors, chunk: int = 256) -> Tensors:
    """Block outputs for all samples, evaluated in chunks without gradients."""
    n = next(iter(inputs.values())).shape[0]
    outs: dict[str, list[torch.Tensor]] = {o: [] for o in block.outputs}
    with torch.no_grad():
        for i in range(0, n, chunk):
            env = model.run(block.nodes, {k: v[i:i + chunk] for k, v in inputs.items()})
            for o in block.outputs:
                outs[o].append(env[o])
    return {o: torch.cat(v) for o, v in outs.items()}


def block_loss(model: QuantModel, block: Block, q_in: Tensors, fp_out: Tensors) -> float:
    """Mean over samples of the summed squared error of the block outputs."""
    model.eval()
    out = run_block(model, block, q_in)
    n = next(iter(fp_out.values())).shape[0]
    return float(sum(((out[o] - fp_out[o]) ** 2).sum() for o in block.outputs) / n)


def _sse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the per-sample summed squared error."""
    return ((a - b) ** 2).flatten(1).sum(1).mean()


class _ClippedSSE(torch.autograd.Function):
    """Σ (clamp(x, lo, hi) − t)² / batch as one autograd node: the value of
    ``_sse(x.clamp(lo, hi), t)`` up to summation order, and its gradient as autograd gives
    it, 2/batch·(clamp(x) − t)·[lo ≤ x ≤ hi] (torch's clamp passes the bounds).
    Why: clamp with tensor bounds and mse_loss each take several full-size passes
    backward; this keeps one difference tensor and makes the mask once."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, t: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                use_native: bool = False) -> torch.Tensor:
        ctx.use_native = use_native and native.usable(x, t)
        if ctx.use_native:
            d, acc = native.clipped_sse_forward(x, t, (float(lo), float(hi)) if lo is not None else None)
            ctx.save_for_backward(x, d, lo, hi)
            return torch.tensor(acc / x.shape[0], dtype=x.dtype, device=x.device)
        d = torch.clamp(x, lo, hi).sub_(t) if lo is not None else x - t
        ctx.save_for_backward(x, d, lo, hi)
        flat = _flat(d)
        return torch.dot(flat, flat) / x.shape[0]

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, d, lo, hi = ctx.saved_tensors
        c = g * (2.0 / x.shape[0])
        if ctx.use_native:
            gx = native.clipped_sse_backward(x, d, (float(lo), float(hi)) if lo is not None else None, float(c))
            return gx, None, None, None, None
        gx = d.mul(c)
        if lo is not None:
            gx.mul_((x >= lo).logical_and_(x <= hi))
        return gx, None, None, None, None


class _QuantizedSSE(torch.autograd.Function):
    """Σ (q(x) − t)² / batch with q the fake quantizer of step ``scale`` (zero point z,
    codes 0…L), differentiated in ``scale`` only (x is detached: the LSQ term that
    teaches an output step), in one read pass (calib/native lsq_sse). The value is that
    of ``_sse(fake_quant(x), t)`` and the step gradient that of autograd through
    fake_quant's LSQ backward, up to summation order."""

    @staticmethod
    def forward(ctx, scale: torch.Tensor, x: torch.Tensor, t: torch.Tensor, zero_point: torch.Tensor,
                levels: int) -> torch.Tensor:
        acc, ds = native.quantized_sse(x, t, float(scale), float(zero_point), float(levels))
        ctx.ds = ds / x.shape[0]
        ctx.shape = scale.shape
        return torch.tensor(acc / x.shape[0], dtype=x.dtype, device=x.device)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return (g * ctx.ds).reshape(ctx.shape), None, None, None, None


def _sse_fused(a: torch.Tensor, b: torch.Tensor, bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
               use_native: bool = False) -> torch.Tensor:
    """_sse of ``a`` (clamped to ``bounds`` if given) in one autograd node."""
    lo, hi = bounds if bounds is not None else (None, None)
    return _ClippedSSE.apply(a, b.to(a.dtype), lo, hi, use_native)


def _step_loss(q: ActQuantizer, x: torch.Tensor, t: torch.Tensor, speed: "Speedups") -> torch.Tensor:
    """The LSQ term that teaches output quantizer ``q``'s step: sse(q(x.detach()), t)."""
    x = x.detach()
    if speed.native and speed.fused_loss and not (q.training and q.drop_prob > 0) and native.usable(x, t):
        return _QuantizedSSE.apply(q.scale, x, t, q.zero_point, q.levels)
    return (_sse_fused if speed.fused_loss else _sse)(q(x), t)


def reduced_outputs(model: QuantModel, block: Block, nodes: tuple[str, ...] | list[str]) -> list[ActQuantizer]:
    """Output quantizers of ``nodes`` whose values only conv/linear layers of the block read
    (not a block output): under bf16 autocast those readers cast the value to bfloat16
    first, so the quantizer may store it so. A quantizer shared by several values
    qualifies when all of them do."""
    users = model.graph.consumers()
    inside = set(nodes)
    quantizers: dict[int, ActQuantizer] = {}
    refused: set[int] = set()
    for name in nodes:
        if model.graph[name].op not in PARAM_OPS and model.graph[name].op not in QUANT_OPS:
            continue
        q = model.layer(name).out_quant
        quantizers[id(q)] = q
        readers = users.get(name, [])
        if name in block.outputs or not readers or \
                not all(r in inside and model.graph[r].op in PARAM_OPS for r in readers):
            refused.add(id(q))
    return [q for k, q in quantizers.items() if k not in refused and q.enabled]


def _nhwc(ts: Tensors) -> Tensors:
    """4-D tensors of ``ts`` in channels-last memory order (same values and shapes)."""
    return {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v for k, v in ts.items()}


def leading_glue(model: QuantModel, block: Block) -> list[str]:
    """The block's first nodes that are parameter-free and read only block inputs (or
    each other), e.g. ResNet's max-pool before layer1.0: nothing in them learns, so
    their outputs can be computed once for all samples instead of every iteration."""
    lead, known = [], set(block.inputs)
    for name in block.nodes:
        n = model.graph[name]
        if n.op in QUANT_OPS or not set(n.inputs) <= known:
            break
        lead.append(name)
        known.add(name)
    return [] if set(lead) & set(block.outputs) else lead


def _precompute(model: QuantModel, block: Block, lead: list[str], q_in: Tensors, fp_in: Tensors,
                chunk: int = 256, spill: Spill = IN_MEMORY) -> tuple[tuple[str, ...], Tensors, Tensors]:
    """(remaining nodes, their quantized inputs, their float inputs) with ``lead`` evaluated.
    The quantized ones are kept as codes where exact (glue such as max-pool keeps values
    on the grid); the float ones only where ``fp_in`` is given (QDrop reads them)."""
    rest = tuple(n for n in block.nodes if n not in lead)
    produced = set(rest)
    needed = [v for v in dict.fromkeys(i for n in rest for i in model.graph[n].inputs) if v not in produced]
    q = frontier.evaluate_nodes(model, lead, needed, q_in, compact=True, chunk=chunk, spill=spill)
    fp = frontier.evaluate_nodes(model, lead, needed, fp_in, chunk=chunk, spill=spill) if fp_in else {}
    return rest, q, fp


def reconstruct(model: QuantModel, block: Block, q_in: Tensors, fp_in: Tensors, fp_out: Tensors,
                cfg: CalibConfig, generator: torch.Generator, on_step=None,
                speed: Speedups = Speedups(), spill: Spill = IN_MEMORY) -> None:
    """Learn rounding (and WAPS groups, γ^z/φ^z) of one block in place, then freeze it.
    ``q_in`` may hold codes (frontier.Codes); ``fp_in`` is read only with QDrop and may
    then be empty."""
    layers, adds = block_modules(model, block)
    quantizers = list({id(m.out_quant): m.out_quant for m in (*layers, *adds) if m.out_quant.enabled}.values())
    learned = [q for q in quantizers if not q.range_fixed]
    weight_params, group_params, affine_params = [], [], []
    for layer in layers:
        layer.start_rounding()
        layer.rounding.native = speed.native_soft
        if layer.groups is not None:
            layer.groups.native = speed.native_soft
        weight_params.append(layer.rounding.v)
        if cfg.uses_waps:
            layer.gamma_z.requires_grad_(True)
            layer.phi_z.requires_grad_(True)
            affine_params += [layer.gamma_z, layer.phi_z]
            if layer.groups is not None and not layer.groups.hard:
                group_params.append(layer.groups.r)
    param_groups = [{"params": weight_params, "lr": cfg.round_lr}]
    if group_params:
        param_groups.append({"params": group_params, "lr": cfg.lr_groups})
    if affine_params:
        param_groups.append({"params": affine_params, "lr": cfg.lr_affine})
    adam = dict(fused=True) if speed.fused_adam else {}
    opt = torch.optim.Adam(param_groups, **adam)
    act_opt = torch.optim.Adam([q.scale for q in learned], lr=cfg.lr_act, **adam) if learned else None
    for q in quantizers:
        q.drop_prob = cfg.drop_prob if cfg.uses_qdrop else 0.0

    out_quants = [producer_quantizer(model, o) for o in block.outputs]
    out_enabled = [q.enabled for q in out_quants]
    # WAPS: a joint soft phase, then groups and rounding are fixed and γ^z/φ^z (and
    # the steps) are fine-tuned against the hard weights (appendix C). Without WAPS
    # there is nothing to fine-tune, so rounding learns for all iterations.
    for q in quantizers:
        q.fused = speed.fused_quant
        q.native = speed.native
    nodes = block.nodes
    lead = leading_glue(model, block) if speed.cache_glue else []
    if lead:
        nodes, q_in, fp_in = _precompute(model, block, lead, q_in, fp_in if cfg.uses_qdrop else {},
                                         spill=spill)
    if speed.bf16 and speed.bf16_boundaries and speed.native and speed.fused_quant:
        for q in reduced_outputs(model, block, nodes):
            q.out_dtype = torch.bfloat16
    gather = dict(channels_last=speed.channels_last, use_native=speed.native_gather)
    harden_step = int(cfg.harden_at * cfg.iters) if cfg.uses_waps else cfg.iters
    schedule = BetaSchedule(harden_step, cfg.warmup, *cfg.beta)
    n = next(iter(q_in.values())).shape[0]
    lam = cfg.regulariser_weight
    grouped = [l for l in layers if l.groups is not None and not l.groups.hard]
    model.train()
    for t in range(cfg.iters):
        if t == harden_step:
            for layer in grouped:
                layer.groups.harden(cfg.tile)
            grouped = []
            for layer in layers:
                layer.freeze()
            opt = torch.optim.Adam(affine_params, lr=cfg.lr_affine, **adam) if affine_params else None
        idx = torch.randint(0, n, (min(cfg.batch, n),), generator=generator, device=generator.device)
        inputs = {}
        for k, v in q_in.items():
            x = frontier.take(v, idx, **gather)
            if cfg.uses_qdrop:
                keep_fp = torch.rand(x.shape, generator=generator, device=x.device) < cfg.drop_prob
                x = torch.where(keep_fp, frontier.take(fp_in[k], idx, **gather), x)
            inputs[k] = x
        target = {o: frontier.take(fp_out[o], idx, **gather) for o in block.outputs}
        if speed.channels_last:
            inputs, target = _nhwc(inputs), _nhwc(target)
        regularised = t < harden_step and schedule.active(t) and lam > 0
        beta = schedule(t) if regularised else None
        if speed.shared_soft:
            for layer in layers:
                layer.begin_step(beta)
        for q in out_quants:
            q.enabled = False
        with torch.autocast(inputs[next(iter(inputs))].device.type, torch.bfloat16, enabled=speed.bf16):
            env = model.run(nodes, inputs)
        for q, on in zip(out_quants, out_enabled):
            q.enabled = on
        # Rounding, groups and γ^z/φ^z learn from the block output clipped to its
        # quantizer's range but not rounded: the STE through a coarse output rounding
        # biases them (it reads rounding error as a mismatch to fix). The output steps
        # learn from the quantized output (LSQ).
        if speed.fused_loss:
            rec = sum(_sse_fused(env[o], target[o], q.clip_bounds(), speed.native)
                      for q, o in zip(out_quants, block.outputs))
        else:
            rec = sum(_sse(q.clip(env[o]), target[o]) for q, o in zip(out_quants, block.outputs))
        loss = rec + sum(_step_loss(out_quants[i], env[o], target[o], speed) for i, o in enumerate(block.outputs)
                         if out_enabled[i])
        if regularised:
            reg = sum(l.rounding.regulariser(beta) for l in layers)
            reg = reg + sum(l.groups.regulariser(beta) for l in grouped)
            loss = loss + lam * reg
        if opt:
            opt.zero_grad(set_to_none=True)
        if act_opt:
            act_opt.zero_grad(set_to_none=True)
            for g in act_opt.param_groups:
                g["lr"] = cosine_lr(t, cfg.iters, cfg.lr_act)
        if loss.requires_grad:
            loss.backward()
        for layer in layers:
            layer.end_step()
        if opt:
            opt.step()
        if act_opt:
            act_opt.step()
            for q in learned:
                q.scale.data.clamp_(min=1e-8)
        for layer in grouped:
            layer.groups.track(t, record=t % max(cfg.iters // 100, 1) == 0)
        if on_step:
            on_step(t, float(rec.detach()))

    for layer in layers:
        if layer.groups is not None:
            layer.groups.native = False
        if layer.groups is not None and not layer.groups.hard:
            layer.groups.harden(cfg.tile)
        layer.freeze()
        layer.gamma_z.requires_grad_(False)
        layer.phi_z.requires_grad_(False)
    for q in quantizers:
        q.drop_prob = 0.0
        q.fused = True
        q.native = False
        q.out_dtype = torch.float32
    model.eval()
