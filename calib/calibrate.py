"""Calibrate a captured graph block by block: the engine behind ``waps-tvm calibrate``.

Float and quantized activations advance together, one block at a time: each
block is reconstructed from the *quantized* outputs of the blocks before it
towards the float model's outputs (BRECQ), and only tensors that later blocks
still read are kept, so memory is the frontier, not the whole network; quantized
activations are kept as their integer codes (calib/frontier.py), a block's float
inputs are dropped once its float outputs exist (unless QDrop or CWAC read them), and
large float activations live in memory-mapped files (calib/spill.py).
Everything runs on one device (``cfg.device``); after each block the state can be
checkpointed and a run resumed from it (calib/checkpoint.py).
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from calib import frontier, group_search
from calib.blocks import Block, find_blocks
from calib.checkpoint import Checkpoint, Fingerprint, progress
from calib.config import CalibConfig
from calib.cwac import compensate_block
from calib.device import resolve_device, uses_bf16
from calib.errors import CheckpointError, ConfigError, DataError
from calib.graph import QUANT_OPS, Graph
from calib.group_search import GroupBudget, GroupPlan
from calib.qmodel import QuantModel, takes_groups
from calib.quantizers import init_act_range
from calib.frontier import Tensors
from calib.reconstruct import Speedups, block_modules, reconstruct
from calib.spill import Spill


@dataclass
class BlockReport:
    name: str
    kind: str
    source: str
    layers: int
    loss_before: float   # round-to-nearest weights, initial activation ranges
    loss_after: float
    seconds: float
    iters: int

    @property
    def sec_per_iter(self) -> float:
        return self.seconds / self.iters if self.iters else 0.0


@dataclass
class CalibResult:
    model: QuantModel
    blocks: list[Block]
    config: CalibConfig
    report: list[BlockReport] = field(default_factory=list)
    seconds: float = 0.0
    spilled: int = 0     # bytes of cached activations that went to spill files (calib/spill.py)
    group_plan: GroupPlan | None = None   # the hardware-aware group search's choice, when asked for


def check_data(x: torch.Tensor) -> None:
    bad = (~torch.isfinite(x)).sum().item()
    if bad:
        raise DataError(f"calibration data holds {bad} NaN/Inf values")


def calibrate(graph: Graph, data: torch.Tensor, cfg: CalibConfig,
              checkpoint: str | os.PathLike | None = None, resume: bool = False,
              group_budget: GroupBudget | None = None) -> CalibResult:
    """Quantize ``graph`` with calibration images ``data`` [N, C, H, W] (float32, any device).

    Runs on ``cfg.device``. With ``checkpoint`` (a path), the state after every block is
    written there atomically; ``resume`` continues from it and gives the same result,
    bit for bit, as an uninterrupted run. Without ``resume`` an existing checkpoint is
    refused rather than overwritten (it may hold hours of work). The caller deletes it
    once the result is safely stored.

    With ``group_budget`` (a WAPS method), each layer's groups are chosen first by the
    hardware-aware search (calib/group_search.py); the choice becomes ``cfg.layer_gammas``
    of the result's config, so the artifact records it."""
    cfg.validate()
    check_data(data)
    device = resolve_device(cfg.device)
    speed = Speedups(bf16=uses_bf16(cfg.conv_dtype, device))
    # the artifact and checkpoint record the precision the loop ran in, not "auto"
    cfg = dataclasses.replace(cfg, conv_dtype="bfloat16" if speed.bf16 else "float32")
    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    if group_budget is not None and not cfg.uses_waps:
        raise ConfigError(f"an NPU budget chooses WAPS groups: method {cfg.method} has none (use waps or qdrop+waps)")
    spill = Spill.from_config(cfg.spill_gb, cfg.spill_dir)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    start = time.perf_counter()
    model = build_model(graph, cfg, device)
    plan = None
    if group_budget is not None:
        plan = group_search.search(model, graph, data, group_budget, cfg.tile,
                                   lambda n: takes_groups(graph, n, cfg))
        cfg = dataclasses.replace(cfg, layer_gammas=plan.gammas(), npu_budget=group_budget.fraction)
        model.set_groups(cfg.layer_gammas, cfg.group_prob)
    saved = _open_checkpoint(ckpt_path, resume, graph, data, cfg, device)
    blocks = find_blocks(graph, residual=cfg.blockwise)
    result = CalibResult(model, blocks, cfg, group_plan=plan)

    readers = {}
    for i, b in enumerate(blocks):
        for v in b.inputs:
            readers[v] = i  # last block that reads v
    x = data.to(device=device, dtype=torch.float32).contiguous()
    model.input_quant.init_from(x)
    if saved is None:           # a checkpoint restores shared ranges with the rest of the state
        _init_shared_ranges(model, x)
    inp = graph.input.name
    with torch.no_grad():
        fp_env: Tensors = {inp: x}
        q_env: Tensors = {inp: frontier.encode(model.input_quant(x), model.input_quant)}
    del x  # a device copy of the data lives only as long as the frontier holds it

    def advance(i: int, fp_out: dict, q_out: dict) -> None:
        """Move the frontier past block i: add its outputs, drop what no later block reads."""
        fp_env.update(fp_out)
        q_env.update(q_out)
        for env in (fp_env, q_env):
            for k in [k for k in env if readers.get(k, -1) <= i and k not in graph.outputs]:
                del env[k]

    first = 0
    if saved is not None:
        saved.restore(model, gen)
        result.report = [BlockReport(**r) for r in saved.report]
        first = saved.blocks_done
        if first < len(blocks):
            for i in range(first):  # rebuild the frontier: the evaluation that produced it
                block = blocks[i]
                model.set_quant(False)
                fp_out = frontier.evaluate(model, block, {k: fp_env[k] for k in block.inputs}, spill=spill)
                model.set_quant(True)
                q_out = frontier.evaluate(model, block, {k: q_env[k] for k in block.inputs}, compact=True,
                                          spill=spill)
                advance(i, fp_out, q_out)
        if cfg.progress:
            tqdm.write(f"resuming after block {first}/{len(blocks)} from {ckpt_path}")
    fingerprint = saved.fingerprint if saved is not None else (
        Fingerprint.of(graph, data, cfg, device) if ckpt_path is not None else None)
    earlier = saved.seconds if saved is not None else 0.0

    for i in range(first, len(blocks)):
        block = blocks[i]
        t0 = time.perf_counter()
        fp_in = {k: fp_env[k] for k in block.inputs}
        q_in = {k: q_env[k] for k in block.inputs}
        model.set_quant(False)
        fp_out = frontier.evaluate(model, block, fp_in, spill=spill)
        _init_act_ranges(model, block, fp_in)
        if not (cfg.uses_qdrop or cfg.cwac):  # nothing reads this block's float inputs any more
            fp_in = {}
            for k in [k for k in block.inputs if readers.get(k, -1) <= i and k not in graph.outputs]:
                fp_env.pop(k, None)
        model.set_quant(True)
        before = frontier.loss(model, block, q_in, fp_out)
        layers, _ = block_modules(model, block)
        iters = cfg.iters if (cfg.method != "rtn" and layers) else 0
        if iters:
            bar = tqdm(total=iters, desc=f"block {i + 1}/{len(blocks)} {_source(graph, block)}",
                       disable=not cfg.progress, leave=False, mininterval=0.5)

            def step(t: int, loss: float) -> None:
                bar.update(1)
                if t % 50 == 0:
                    bar.set_postfix(loss=f"{loss:.4g}")

            reconstruct(model, block, q_in, fp_in, fp_out, cfg, gen, step, spill=spill, speed=speed)
            bar.close()
        else:
            for layer in layers:  # groups stay off: rtn has no WAPS search
                if layer.groups is not None:
                    layer.groups = None
        if cfg.cwac and layers:
            compensate_block(model, block, q_in, fp_in)
        after = frontier.loss(model, block, q_in, fp_out)
        q_out = frontier.evaluate(model, block, q_in, compact=True, spill=spill)
        del fp_in, q_in
        advance(i, fp_out, q_out)
        del fp_out, q_out
        result.report.append(BlockReport(block.name, block.kind, _source(graph, block), len(layers),
                                         before, after, time.perf_counter() - t0, iters))
        if ckpt_path is not None:
            Checkpoint.capture(model, fingerprint, i + 1, len(blocks), [asdict(r) for r in result.report],
                               gen, earlier + time.perf_counter() - start).save(ckpt_path)
        if cfg.progress:
            tqdm.write(f"block {i + 1}/{len(blocks)} {block.kind:8s} {_source(graph, block):28s} "
                       f"loss {before:.4g} → {after:.4g}")
    result.seconds = earlier + time.perf_counter() - start
    result.spilled = spill.bytes
    return result


def build_model(graph: Graph, cfg: CalibConfig, device: torch.device) -> QuantModel:
    """The QuantModel with every tensor on ``device``: the float parameters are moved
    first and the quantizer state is created there, so nothing (a range search, an
    initial step) ever mixes devices."""
    nodes = [dataclasses.replace(n, params={k: v.to(device) for k, v in n.params.items()}) for n in graph]
    with torch.device(device):
        model = QuantModel(graph.replace(nodes), cfg)
    return model.to(device).eval()


def _open_checkpoint(path: Path | None, resume: bool, graph: Graph, data: torch.Tensor,
                     cfg: CalibConfig, device: torch.device) -> Checkpoint | None:
    """The checkpoint to continue from (checked against this run), or None to start afresh."""
    if path is None:
        if resume:
            raise ConfigError("resuming needs a checkpoint path")
        return None
    if not resume:
        if path.exists():
            done = progress(path)
            what = f"{done[0]} of {done[1]} blocks of an interrupted calibration" if done else "a checkpoint"
            raise CheckpointError(f"{path} holds {what}: add --resume to continue it, or delete it to start over")
        try:  # fail now, not after the first block
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"cannot write {path}: {e.strerror or e}") from None
        return None
    saved = Checkpoint.load(path)
    saved.check(Fingerprint.of(graph, data, cfg, device), path)
    return saved


def _source(graph: Graph, block: Block) -> str:
    srcs = [graph[n].source for n in block.nodes if graph[n].op in QUANT_OPS]
    return (srcs[-1] if srcs else block.name) or block.name


@torch.no_grad()
def _init_act_ranges(model: QuantModel, block: Block, fp_in: dict[str, torch.Tensor], limit: int = 256) -> None:
    """Initialise the block's output quantizers from the float values they will see.

    Node by node, in block order, each value freed after its last reader: quantizers are
    off here, so no output depends on a range set before it."""
    env = {k: v[:limit] for k, v in fp_in.items()}
    keep = set(block.outputs)
    for name in block.nodes:
        model.run([name], env)
        if model.graph[name].op in QUANT_OPS:
            model.layer(name).out_quant.init_from(env[name])
        for v in [v for v in env if v not in keep and not _read_after(model, block, name, v)]:
            del env[v]


def _read_after(model: QuantModel, block: Block, name: str, value: str) -> bool:
    """Whether a node of ``block`` after ``name`` reads ``value``."""
    later = block.nodes[block.nodes.index(name) + 1:]
    return any(value in model.graph[n].inputs for n in later)


@torch.no_grad()
def _init_shared_ranges(model: QuantModel, x: torch.Tensor, limit: int = 256, cap: int = 2**22) -> None:
    """Set each shared cat quantizer (model.tied) once, from the float values of every cat in
    its class: a cat's output holds the codes it joins, so the range covers all members.

    One float pass over ``limit`` samples that frees each value after its last reader;
    each cat output is strided down to at most ``cap`` values for the range search."""
    if not model.tied:
        return
    graph = model.graph
    cats = {m for members in model.tied for m in members if graph[m].op == "cat"}
    readers = {k: len(v) for k, v in graph.consumers().items()}
    env: Tensors = {graph.input.name: x[:limit]}
    seen: dict[str, torch.Tensor] = {}
    model.set_quant(False)
    for n in graph:
        if n.op == "input":
            continue
        model.run([n.name], env)
        if n.name in cats:
            flat = env[n.name].flatten()
            seen[n.name] = flat[::-(-flat.numel() // cap)]
        for v in n.inputs:
            readers[v] -= 1
            if readers[v] == 0:
                env.pop(v, None)
    model.set_quant(True)
    for members in model.tied:
        q = model.layer(members[-1]).out_quant
        s, z = init_act_range(torch.cat([seen[m] for m in members if m in cats]), q.bits)
        q.scale.data.fill_(s)
        q.zero_point.fill_(z)
