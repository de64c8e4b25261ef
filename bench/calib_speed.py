"""Calibration speed: seconds per reconstruction iteration of ResNet-18's layer1.0 block.

Same workload as the reference measurements in DESIGN.md (2 threads, batch 32, W2A4,
torchvision ResNet-18, layer1.0, inputs 32×32 and 224×224): the public BRECQ loop takes
0.0037 s and 0.125 s per iteration there, QDrop's 0.008 s and 0.32 s. Those loops cannot be
fetched here (no internet), so their numbers are the recorded references; ours are
measured now for BRECQ, BRECQ+WAPS, QDrop and QDrop+WAPS through the one engine.

    python -m bench.calib_speed [--iters 20] [--sizes 32 224]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from calib.blocks import find_blocks
from calib.config import CalibConfig
from calib.qmodel import QuantModel
from calib.reconstruct import output_quantizer, reconstruct, run_block
from calib.calibrate import _init_act_ranges
from waps_tvm.architectures import get_architecture

RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE = {("brecq", 32): 0.0037, ("brecq", 224): 0.125, ("qdrop", 32): 0.008, ("qdrop", 224): 0.32}
METHODS = ("brecq", "waps", "qdrop", "qdrop+waps")


def measure(size: int, method: str, iters: int, warmup: int = 3, samples: int = 64) -> float:
    """Median seconds per iteration of ``reconstruct`` on layer1.0."""
    torch.manual_seed(0)
    net = get_architecture("resnet18").eval()
    for m in net.modules():  # non-trivial BN statistics so activations look trained
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 1.5)
            m.running_mean.normal_(0, 0.1)
    from calib.capture import capture, export_module
    from calib.fold_bn import fold_batch_norm
    from calib.fuse import fuse_activations
    g = fuse_activations(fold_batch_norm(capture(export_module(net, (3, size, size)))))
    cfg = CalibConfig(wbits=2, abits=4, method=method, iters=iters + warmup, batch=32, progress=False)
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
        q_in = {k: output_quantizer(model, k)(v) for k, v in fp_in.items()}
    stamps = []
    reconstruct(model, block, q_in, fp_in, fp_out, cfg, torch.Generator().manual_seed(0),
                lambda t, loss: stamps.append(time.perf_counter()))
    steps = [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1:])]
    return statistics.median(steps)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--sizes", nargs="+", type=int, default=[32, 224])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for size in args.sizes:
        for method in METHODS:
            sec = measure(size, method, args.iters)
            base = "qdrop" if method.startswith("qdrop") else "brecq"  # WAPS rides on its base loop
            ref = REFERENCE[(base, size)]
            rows.append({"input": size, "method": method, "sec_per_iter": sec,
                         "reference_method": base, "reference_sec_per_iter": ref,
                         "ratio_vs_reference": sec / ref if ref else None})
            print(f"{size:>4} {method:12s} {sec * 1000:8.2f} ms/iter  reference {ref * 1000:.1f} ms → ×{sec / ref:.2f}",
                  flush=True)
    RESULTS.mkdir(exist_ok=True)
    meta = {"threads": args.threads, "batch": 32, "bits": "W2A4", "block": "resnet18 layer1.0",
            "iters_timed": args.iters, "cpu": _cpu(), "rows": rows}
    (RESULTS / "calib_speed.json").write_text(json.dumps(meta, indent=1))
    md = ["| input | method | ours (ms/iter) | reference loop (ms/iter) | ours / reference |", "|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['input']}×{r['input']} | {r['method']} | {r['sec_per_iter'] * 1000:.2f} | "
                  f"{r['reference_method']}: {r['reference_sec_per_iter'] * 1000:.1f} | {r['ratio_vs_reference']:.2f} |")
    (RESULTS / "calib_speed.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


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
