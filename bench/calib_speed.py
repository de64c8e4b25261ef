"""Calibration speed: seconds per reconstruction iteration of ResNet-18's layer1.0 block.

Same workload as the reference measurements in DESIGN.md (2 threads, batch 32, W2A4,
torchvision ResNet-18, layer1.0, inputs 32×32 and 224×224): the public BRECQ loop took
0.0037 s and 0.125 s per iteration on the machine of those measurements, QDrop's 0.008 s
and 0.32 s. The public BRECQ loop's AdaRound stage is also re-implemented op for op
(bench/public_brecq_loop.py) and timed here, beside ours, on the same block, data, batch
and threads: that ratio is the like-for-like one. Ours is measured for BRECQ, BRECQ+WAPS,
QDrop and QDrop+WAPS through the one engine.

Each block is timed with the levers of calib.reconstruct.Speedups added one at a time,
starting from the plain loop (all off), side by side in one process, with the final
block loss of each, so what each lever gains and that the result stays the same
(±2 %) are read from one table.

    python -m bench.calib_speed [--iters 20] [--rounds 3] [--sizes 32 224] [--methods brecq waps]
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from calib.blocks import Block, find_blocks
from calib.calibrate import _init_act_ranges
from calib.capture import capture, export_module
from calib.config import CalibConfig
from calib.device import native_bf16, uses_bf16
from calib.fold_bn import fold_batch_norm
from calib.fuse import fuse_activations
from calib.qmodel import QuantModel
from calib.frontier import producer_quantizer
from calib.reconstruct import Speedups, block_loss, block_modules, leading_glue, reconstruct, run_block
from bench.public_brecq_loop import Conv, time_public_loop
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


def measure_public(w: Workload, iters: int) -> dict:
    """The public BRECQ loop's AdaRound stage (bench/public_brecq_loop.py) on the same
    block, float inputs after the block's glue head (its cache holds them after the
    max-pool), float targets, batch and bit width."""
    layers, _ = block_modules(w.model, w.block)
    convs = [Conv(l.weight, l.bias, tuple(l.attrs["stride"]), tuple(l.attrs["padding"])) for l in layers]
    if len(convs) != 2:
        raise ValueError("the public loop is rebuilt for ResNet basic blocks without downsample only")
    lead = leading_glue(w.model, w.block)
    with torch.no_grad():
        env = w.model.run(lead, dict(w.fp_in)) if lead else dict(w.fp_in)
    x = env[lead[-1]] if lead else next(iter(w.fp_in.values()))
    (y,) = w.fp_out.values()
    return time_public_loop(convs[0], convs[1], x, y, w.cfg.wbits, w.cfg.batch, iters)


# cumulative levers, each row adds one to the row above (the first is the old loop)
_OFF = Speedups.none()
_STEPS = [("before (plain loop)", ()),
          ("+ glue head cached (max-pool once)", ("cache_glue",)),
          ("+ fused fake quantizer", ("fused_quant",)),
          ("+ fused squared error", ("fused_loss",)),
          ("+ one-pass C kernels", ("native",)),
          ("+ channels-last batches", ("channels_last",)),
          ("+ one-pass batch gather", ("native_gather",)),
          ("+ h(V) and group probabilities once per step", ("shared_soft",)),
          ("+ soft rounding, γ^y and regularisers in C (one node each)", ("native_soft",)),
          ("+ fused Adam (= --conv-dtype float32)", ("fused_adam",)),
          ("+ bf16 conv (--conv-dtype bfloat16)", ("bf16",)),
          ("+ bf16 kept from conv through quantizer to conv", ("bf16_boundaries",))]


def _levers() -> list[tuple[str, Speedups]]:
    rows, on = [], set()
    for label, fields in _STEPS:
        on |= set(fields)
        rows.append((label, replace(_OFF, **{f: True for f in on})))
    return rows


LEVERS = _levers()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--sizes", nargs="+", type=int, default=[32, 224])
    p.add_argument("--methods", nargs="+", default=["brecq", "waps"], choices=METHODS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of every lever and the public loop")
    p.add_argument("--bf16-rows", choices=("auto", "on", "off"), default="auto",
                   help="time the bfloat16 levers: auto = where the CPU runs bf16 convolutions natively "
                        "(elsewhere oneDNN falls back to a slow reference convolution: nothing to learn)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cpu_bf16 = native_bf16(torch.device("cpu"))
    with_bf16 = args.bf16_rows == "on" or (args.bf16_rows == "auto" and cpu_bf16)
    levers = [(label, speed) for label, speed in LEVERS if with_bf16 or not speed.bf16]
    # what `waps-tvm calibrate` runs on this machine by default (--conv-dtype auto)
    here = Speedups(bf16=uses_bf16(CalibConfig().conv_dtype, torch.device("cpu")))
    rows, public = [], {}
    for size in args.sizes:
        for method in args.methods:
            w = prepare(size, method, args.iters + 3)
            base = "qdrop" if method.startswith("qdrop") else "brecq"  # WAPS rides on its base loop
            ref = REFERENCE[(base, size)]
            # rounds interleave every lever and the public loop, so drift on a shared machine
            # falls on all of them alike; per lever: the median of the rounds' medians
            runs: dict[str, list[dict]] = {label: [] for label, _ in levers}
            pub: list[dict] = []
            for _ in range(args.rounds):
                for label, speed in levers:
                    runs[label].append(measure(w, speed=speed))
                if size not in public:
                    pub.append(measure_public(w, args.iters))
            if size not in public:
                public[size] = {"median": statistics.median(p["median"] for p in pub),
                                "min": min(p["min"] for p in pub), "loss": pub[-1]["loss"]}
                print(f"{size:>4} public BRECQ loop (re-implemented) {public[size]['median'] * 1000:8.2f} ms/iter "
                      f"(min {public[size]['min'] * 1000:.2f})", flush=True)
            first = None
            for label, speed in levers:
                m = {"median": statistics.median(r["median"] for r in runs[label]),
                     "min": min(r["min"] for r in runs[label]), "loss": runs[label][-1]["loss"]}
                first = first or m
                row = {"input": size, "method": method, "levers": label, "speed": asdict(speed),
                       "default": speed == here, "sec_per_iter": m["median"], "sec_per_iter_min": m["min"],
                       "final_block_loss": m["loss"],
                       "speedup_vs_before": first["median"] / m["median"],
                       "loss_vs_before": m["loss"] / first["loss"] - 1,
                       "reference_method": base, "reference_sec_per_iter": ref,
                       "public_loop_here_sec_per_iter": public[size]["median"],
                       "public_loop_here_over_ours": public[size]["median"] / m["median"]}
                rows.append(row)
                print(f"{size:>4} {method:10s} {label:36s} {m['median'] * 1000:8.2f} ms/iter (min {m['min'] * 1000:.2f}) "
                      f"×{row['speedup_vs_before']:.2f}  loss {m['loss']:.5g} ({row['loss_vs_before']:+.2%}) "
                      f"public÷ours ×{row['public_loop_here_over_ours']:.2f}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    meta = {"threads": args.threads, "batch": 32, "bits": "W2A4", "block": "resnet18 layer1.0",
            "iters_timed": args.iters, "rounds": args.rounds, "cpu": _cpu(), "load_average": _load(),
            "cpu_native_bf16": cpu_bf16, "bf16_rows": with_bf16,
            "public_loop_here": {str(k): v for k, v in public.items()}, "rows": rows}
    stem = result_stem(with_bf16)
    (RESULTS / f"{stem}.json").write_text(json.dumps(meta, indent=1))
    md = render(meta)
    (RESULTS / f"{stem}.md").write_text(md)
    print(md)
    return 0


def result_stem(with_bf16: bool) -> str:
    """calib_speed (every lever, bf16 included) or calib_speed_fp32 (a CPU without native bf16:
    float32 levers only), so that a run on either kind of machine keeps the other's record."""
    return "calib_speed" if with_bf16 else "calib_speed_fp32"


def render(meta: dict) -> str:
    """calib_speed.md from the JSON record."""
    rows = meta["rows"]
    md = [f"Per-iteration time of our loop on ResNet-18 layer1.0, W2A4, batch 32, {meta['threads']} threads, "
          f"{meta['iters_timed']} timed iterations after 3 warm-up ones, median over {meta['rounds']} interleaved rounds; "
          f"levers added one per row, all timed in one run on the same cached block (load average at the end {meta['load_average']}: the machine is shared, "
          "so read the ratios, not the absolute times). Final block loss after the timed iterations.", "",
          "The public BRECQ loop's AdaRound stage (bench/public_brecq_loop.py, re-implemented op for op, fp32, "
          "no activation quantization in that stage) runs in the same process on the same block, cached data, "
          "batch and threads; *public here ÷ ours* > 1 means ours is faster. The recorded reference "
          "(125 ms / 3.7 ms) was measured on another machine.", "",
          *([] if meta.get("bf16_rows", True) else
            [f"CPU: {meta.get('cpu', 'unknown')}, without native bfloat16 convolutions (no AVX512-BF16/AMX): the bf16 "
             "levers were not timed (`--bf16-rows on` times them anyway) and the float32 loop is the default here.", ""]),
          "| input | method | levers | ms/iter (median) | ms/iter (min) | speed-up vs before | final block loss (vs before) "
          "| public loop here (ms/iter) | public here ÷ ours | recorded public loop (ms/iter) |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['input']}×{r['input']} | {r['method']} | {r['levers']}{' **(default here: --conv-dtype auto)**' if r.get('default') else ''} | {r['sec_per_iter'] * 1000:.2f} | "
                  f"{r['sec_per_iter_min'] * 1000:.2f} | ×{r['speedup_vs_before']:.2f} | "
                  f"{r['final_block_loss']:.5g} ({r['loss_vs_before']:+.2%}) | "
                  f"{r['public_loop_here_sec_per_iter'] * 1000:.2f} | ×{r['public_loop_here_over_ours']:.2f} | "
                  f"{r['reference_method']}: {r['reference_sec_per_iter'] * 1000:.1f} |")
    return "\n".join(md) + "\n"


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
