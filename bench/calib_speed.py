"""Calibration speed: seconds per reconstruction iteration of ResNet-18's layer1.0 block.

Same workload as the reference measurements in DESIGN.md (2 threads, batch 32, W2A4,
torchvision ResNet-18, layer1.0, inputs 32×32 and 224×224): the public BRECQ loop takes
0.0037 s and 0.125 s per iteration there, QDrop's 0.008 s and 0.32 s. Those loops cannot be
fetched here (no internet), so their numbers are the recorded references; ours are
measured now for BRECQ, BRECQ+WAPS, QDrop and QDrop+WAPS through the one engine.

Each block is timed with the levers of calib.reconstruct.Speedups added one at a time,
starting from the plain loop (all off), side by side in one process, with the final
block loss of each, so what each lever gains and that the result stays the same
(±2 %) are read from one table.

    python -m bench.calib_speed [--iters 20] [--sizes 32 224] [--methods brecq waps]
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from calib.blocks import Block, find_blocks
from calib.calibrate import _init_act_ranges
from calib.capture import capture, export_module
from calib.config import CalibConfig
from calib.fold_bn import fold_batch_norm
from calib.fuse import fuse_activations
from calib.qmodel import QuantModel
from calib.frontier import producer_quantizer
from calib.reconstruct import Speedups, block_loss, reconstruct, run_block
from waps_tvm.architectures import get_architecture

RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE = {("brecq", 32): 0.0037, ("brecq", 224): 0.125, ("qdrop", 32): 0.008, ("qdrop", 224): 0.32}
METHODS = ("brecq", "waps", "qdrop", "qdrop+waps")


@dataclass
class Workload:
    """ResNet-18 layer1.0 at ``size``×``size``, its cached inputs and float target."""
    model: QuantModel
    block: Block
    q_in: dict
    fp_in: dict
    fp_out: dict
    cfg: CalibConfig


def prepare(size: int, method: str, iters: int, samples: int = 64) -> Workload:
    torch.manual_seed(0)
    net = get_architecture("resnet18").eval()
    for m in net.modules():  # non-trivial BN statistics so activations look trained
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 1.5)
            m.running_mean.normal_(0, 0.1)
    g = fuse_activations(fold_batch_norm(capture(export_module(net, (3, size, size)))))
    cfg = CalibConfig(wbits=2, abits=4, method=method, iters=iters, batch=32, progress=False)
    model = QuantModel(g, cfg)
    blocks = find_blocks(g)
    target = next(i for i, b in enumerate(blocks) if any(g[n].source == "layer1.0.conv1" for n in b.nodes))
    x = torch.randn(samples, 3, size, size)
    model.set_quant(False)
    env = {g.input.name: x}
    with torch.no_grad():
        for b in blocks[:target]:
            env.update(run_block(model, b, {k: env[k] for k in b.inputs}))
    block = blocks[target]
    fp_in = {k: env[k] for k in block.inputs}
    fp_out = run_block(model, block, fp_in)
    _init_act_ranges(model, block, fp_in)
    model.set_quant(True)
    with torch.no_grad():
        q_in = {k: producer_quantizer(model, k)(v) for k, v in fp_in.items()}
    return Workload(model, block, q_in, fp_in, fp_out, cfg)


def measure(w: Workload, warmup: int = 3, speed: Speedups = Speedups()) -> dict:
    """Seconds per iteration of ``reconstruct`` on a fresh copy of the block (median and
    minimum over the timed iterations: on a shared machine the minimum is the least
    disturbed) and the final block loss."""
    model = copy.deepcopy(w.model)
    stamps = []
    reconstruct(model, w.block, w.q_in, w.fp_in, w.fp_out, w.cfg, torch.Generator().manual_seed(0),
                lambda t, loss: stamps.append(time.perf_counter()), speed=speed)
    steps = [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1:])]
    return {"median": statistics.median(steps), "min": min(steps),
            "loss": block_loss(model, w.block, w.q_in, w.fp_out)}


# cumulative levers, each row adds one to the row above (the first is the old loop)
LEVERS = [("before (plain loop)", Speedups.none()),
          ("+ glue head cached (max-pool once)", Speedups(cache_glue=True, fused_quant=False, fused_loss=False)),
          ("+ fused fake quantizer", Speedups(cache_glue=True, fused_quant=True, fused_loss=False)),
          ("+ fused squared error (= default)", Speedups())]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--sizes", nargs="+", type=int, default=[32, 224])
    p.add_argument("--methods", nargs="+", default=["brecq", "waps"], choices=METHODS)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for size in args.sizes:
        for method in args.methods:
            w = prepare(size, method, args.iters + 3)
            base = "qdrop" if method.startswith("qdrop") else "brecq"  # WAPS rides on its base loop
            ref = REFERENCE[(base, size)]
            first = None
            for label, speed in LEVERS:
                m = measure(w, speed=speed)
                first = first or m
                row = {"input": size, "method": method, "levers": label, "speed": asdict(speed),
                       "sec_per_iter": m["median"], "sec_per_iter_min": m["min"], "final_block_loss": m["loss"],
                       "speedup_vs_before": first["median"] / m["median"],
                       "loss_vs_before": m["loss"] / first["loss"] - 1,
                       "reference_method": base, "reference_sec_per_iter": ref}
                rows.append(row)
                print(f"{size:>4} {method:10s} {label:36s} {m['median'] * 1000:8.2f} ms/iter (min {m['min'] * 1000:.2f}) "
                      f"×{row['speedup_vs_before']:.2f}  loss {m['loss']:.5g} ({row['loss_vs_before']:+.2%})", flush=True)
    RESULTS.mkdir(exist_ok=True)
    meta = {"threads": args.threads, "batch": 32, "bits": "W2A4", "block": "resnet18 layer1.0",
            "iters_timed": args.iters, "cpu": _cpu(), "load_average": _load(), "rows": rows}
    (RESULTS / "calib_speed.json").write_text(json.dumps(meta, indent=1))
    md = [f"Per-iteration time of our loop on ResNet-18 layer1.0, W2A4, batch 32, {args.threads} threads, "
          f"{args.iters} timed iterations after 3 warm-up ones; levers added one per row, all timed in one run "
          f"on the same cached block (load average at the end {meta['load_average']}: the machine is shared, "
          "so read the ratios, not the absolute times). Final block loss after the timed iterations.", "",
          "| input | method | levers | ms/iter (median) | ms/iter (min) | speed-up vs before | final block loss (vs before) "
          "| public loop (ms/iter) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['input']}×{r['input']} | {r['method']} | {r['levers']} | {r['sec_per_iter'] * 1000:.2f} | "
                  f"{r['sec_per_iter_min'] * 1000:.2f} | ×{r['speedup_vs_before']:.2f} | "
                  f"{r['final_block_loss']:.5g} ({r['loss_vs_before']:+.2%}) | "
                  f"{r['reference_method']}: {r['reference_sec_per_iter'] * 1000:.1f} |")
    (RESULTS / "calib_speed.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
