"""Calibrate a captured graph block by block: the engine behind ``waps-tvm calibrate``.

Float and quantized activations advance together, one block at a time: each
block is reconstructed from the *quantized* outputs of the blocks before it
towards the float model's outputs (BRECQ), and only tensors that later blocks
still read are kept, so memory is the frontier, not the whole network.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from calib.blocks import Block, find_blocks
from calib.config import CalibConfig
from calib.cwac import compensate_block
from calib.errors import DataError
from calib.graph import Graph
from calib.qmodel import QuantModel
from calib.reconstruct import block_loss, block_modules, reconstruct, run_block


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


def check_data(x: torch.Tensor) -> None:
    bad = (~torch.isfinite(x)).sum().item()
    if bad:
        raise DataError(f"calibration data holds {bad} NaN/Inf values")


def calibrate(graph: Graph, data: torch.Tensor, cfg: CalibConfig) -> CalibResult:
    """Quantize ``graph`` with calibration images ``data`` [N, C, H, W] (float32)."""
    cfg.validate()
    check_data(data)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    start = time.perf_counter()
    model = QuantModel(graph, cfg).eval()
    blocks = find_blocks(graph, residual=cfg.blockwise)
    result = CalibResult(model, blocks, cfg)

    readers = {}
    for i, b in enumerate(blocks):
        for v in b.inputs:
            readers[v] = i  # last block that reads v
    x = data.float().contiguous()
    model.input_quant.init_from(x)
    inp = graph.input.name
    with torch.no_grad():
        fp_env = {inp: x}
        q_env = {inp: model.input_quant(x)}

    for i, block in enumerate(blocks):
        t0 = time.perf_counter()
        fp_in = {k: fp_env[k] for k in block.inputs}
        q_in = {k: q_env[k] for k in block.inputs}
        model.set_quant(False)
        fp_out = run_block(model, block, fp_in)
        _init_act_ranges(model, block, fp_in)
        model.set_quant(True)
        before = block_loss(model, block, q_in, fp_out)
        layers, _ = block_modules(model, block)
        iters = cfg.iters if (cfg.method != "rtn" and layers) else 0
        if iters:
            bar = tqdm(total=iters, desc=f"block {i + 1}/{len(blocks)} {_source(graph, block)}",
                       disable=not cfg.progress, leave=False, mininterval=0.5)

            def step(t: int, loss: float) -> None:
                bar.update(1)
                if t % 50 == 0:
                    bar.set_postfix(loss=f"{loss:.4g}")

            reconstruct(model, block, q_in, fp_in, fp_out, cfg, gen, step)
            bar.close()
        else:
            for layer in layers:  # groups stay off: rtn has no WAPS search
                if layer.groups is not None:
                    layer.groups = None
        if cfg.cwac and layers:
            compensate_block(model, block, q_in, fp_in)
        after = block_loss(model, block, q_in, fp_out)
        with torch.no_grad():
            q_out = run_block(model, block, q_in)
        fp_env.update(fp_out)
        q_env.update(q_out)
        for env in (fp_env, q_env):
            for k in [k for k in env if readers.get(k, -1) <= i and k != graph.output]:
                del env[k]
        result.report.append(BlockReport(block.name, block.kind, _source(graph, block), len(layers),
                                         before, after, time.perf_counter() - t0, iters))
        if cfg.progress:
            tqdm.write(f"block {i + 1}/{len(blocks)} {block.kind:8s} {_source(graph, block):28s} "
                       f"loss {before:.4g} → {after:.4g}")
    result.seconds = time.perf_counter() - start
    return result


def _source(graph: Graph, block: Block) -> str:
    srcs = [graph[n].source for n in block.nodes if graph[n].op in ("conv2d", "linear", "add")]
    return (srcs[-1] if srcs else block.name) or block.name


@torch.no_grad()
def _init_act_ranges(model: QuantModel, block: Block, fp_in: dict[str, torch.Tensor], limit: int = 256) -> None:
    """Initialise the block's output quantizers from the float values they will see."""
    env = model.run(block.nodes, {k: v[:limit] for k, v in fp_in.items()})
    for name in block.nodes:
        if model.graph[name].op in ("conv2d", "linear", "add"):
            model.layer(name).out_quant.init_from(env[name])
