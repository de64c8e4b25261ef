"""Calibration memory: peak RSS of a ResNet-18 / ResNet-50 calibration at 224×224.

Each measurement is a fresh process (so ``ru_maxrss`` is that calibration's peak):
torchvision architecture with random weights (BN statistics randomised so activations
look trained), N random images 3×224×224, ``waps`` W2A4, a few iterations per block
(memory does not depend on the iteration count: the cached activations and one batch's
autograd graph do), batch 32, on the CPU with 2 threads. Peak = a + b·N is fitted per
model through the measured N and extrapolated to the reference 1024 samples; the
results say which numbers are measured and which are extrapolated.

    python -m bench.calib_memory [--samples 64 256] [--models resnet18 resnet50] [--iters 2]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE_SAMPLES = 1024
LIMIT_GB = 24.0


def _shorten_range_searches(steps: int) -> None:
    """Fewer candidates in the L2.4 range searches. Memory-neutral: the candidates are
    tried one after another, each with temporaries of the same size (the activation
    search works on a subsample of at most 2M values), so only the time changes; on
    this shared 2-core machine one 100-candidate activation search took 94 s."""
    from calib import quantizers
    quantizers.init_act_range.__defaults__ = (steps,)
    quantizers.init_weight_scale.__defaults__ = (steps,)


def child(arch: str, samples: int, iters: int, search_steps: int = 0) -> dict:
    """One calibration in this process; returns its peak RSS and timings."""
    import torch

    from calib.config import CalibConfig
    from waps_tvm import api
    from waps_tvm.architectures import get_architecture

    torch.set_num_threads(2)
    if search_steps:
        _shorten_range_searches(search_steps)
    torch.manual_seed(0)
    net = get_architecture(arch).eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 1.5)
            m.running_mean.normal_(0, 0.1)
    x = torch.randn(samples, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    cfg = CalibConfig(wbits=2, abits=4, method="waps", iters=iters, batch=32, samples=samples,
                      device="cpu", progress=False)
    t0 = time.perf_counter()
    result, _ = api.quantize(net, x, cfg, input_shape=(3, 224, 224))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"model": arch, "samples": samples, "iters": iters, "search_steps": search_steps or "default",
            "blocks": len(result.blocks),
            "rss_before_gb": round(before, 3), "peak_rss_gb": round(peak, 3), "seconds": round(seconds, 1)}


def measure(arch: str, samples: int, iters: int, search_steps: int = 0) -> dict | None:
    p = subprocess.run([sys.executable, "-m", "bench.calib_memory", "--child", arch, str(samples), str(iters),
                        str(search_steps)],
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    if p.returncode != 0:
        print(f"{arch} N={samples} failed (exit {p.returncode}):\n{p.stderr[-2000:]}", flush=True)
        return None
    row = json.loads(p.stdout.strip().splitlines()[-1])
    print(f"{arch:9s} N={samples:5d}: peak {row['peak_rss_gb']:.2f} GB "
          f"(before calibrating {row['rss_before_gb']:.2f} GB), {row['seconds']:.0f} s", flush=True)
    return row


def fit(rows: list[dict]) -> tuple[float, float]:
    """Least-squares (a GB, b GB per sample) of peak = a + b·N."""
    n = [r["samples"] for r in rows]
    y = [r["peak_rss_gb"] for r in rows]
    mn, my = sum(n) / len(n), sum(y) / len(y)
    var = sum((v - mn) ** 2 for v in n)
    b = sum((v - mn) * (w - my) for v, w in zip(n, y)) / var if var else 0.0
    return my - b * mn, b


def write(rows: list[dict], args) -> Path:
    """Results so far: the measured rows and, per model with two or more, the fit."""
    fits = {}
    for arch in dict.fromkeys(r["model"] for r in rows):
        mine = sorted((r for r in rows if r["model"] == arch), key=lambda r: r["samples"])
        if len({r["samples"] for r in mine}) < 2:
            continue
        a, b = fit(mine)
        fits[arch] = {"base_gb": round(a, 3), "mb_per_sample": round(b * 1024, 2),
                      "extrapolated_peak_gb_at_1024": round(a + b * REFERENCE_SAMPLES, 2),
                      "measured_at": [r["samples"] for r in mine]}
    RESULTS.mkdir(exist_ok=True)
    stem = f"calib_memory{args.tag}"
    (RESULTS / f"{stem}.json").write_text(json.dumps({"rows": rows, "fit": fits, "limit_gb": LIMIT_GB}, indent=1))
    md = ["# Calibration peak memory (ResNet at 224×224, CPU)", "",
          f"`python -m bench.calib_memory {' '.join(sys.argv[1:])}`: one fresh process per row, peak RSS "
          "from `getrusage`, random weights and images, waps W2A4, batch 32, 2 threads. Measured on a "
          "2-core machine shared with other jobs (seconds are noisy; memory is not)."
          + (f" Range searches shortened to {args.search_steps} candidates (memory-neutral, see "
             "`_shorten_range_searches`): the seconds are not calibration times." if args.search_steps else ""), "",
          "| model | samples | peak RSS (GB) | RSS before calibrating (GB) | seconds |", "|---|---:|---:|---:|---:|"]
    md += [f"| {r['model']} | {r['samples']} | {r['peak_rss_gb']:.2f} | {r['rss_before_gb']:.2f} | {r['seconds']:.0f} |"
           for r in sorted(rows, key=lambda r: (r["model"], r["samples"]))]
    if fits:
        md += ["", f"Linear fit peak = a + b·N through the measured rows, **extrapolated** (not measured) to "
               f"{REFERENCE_SAMPLES} samples:", "",
               "| model | a (GB) | b (MB/sample) | peak at 1024 (GB, extrapolated) | under 24 GB |",
               "|---|---:|---:|---:|---|"]
        md += [f"| {k} | {f['base_gb']:.2f} | {f['mb_per_sample']:.2f} | {f['extrapolated_peak_gb_at_1024']:.1f} | "
               f"{'yes' if f['extrapolated_peak_gb_at_1024'] < LIMIT_GB else 'no'} |" for k, f in fits.items()]
    (RESULTS / f"{stem}.md").write_text("\n".join(md) + "\n")
    return RESULTS / f"{stem}.md"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=4, metavar=("ARCH", "N", "ITERS", "STEPS"), help=argparse.SUPPRESS)
    ap.add_argument("--samples", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--runs", nargs="+", metavar="ARCH:N", help="measure these pairs instead of models × samples")
    ap.add_argument("--search-steps", type=int, default=0,
                    help="candidates per L2.4 range search (default: calibration's own; fewer is faster "
                         "and does not change peak memory)")
    ap.add_argument("--jobs", type=int, default=1, help="measurements run side by side (each its own process)")
    ap.add_argument("--tag", default="", help="suffix of the result files (e.g. to keep a baseline)")
    args = ap.parse_args()
    if args.child:
        arch, n, iters, steps = args.child
        print(json.dumps(child(arch, int(n), int(iters), int(steps))))
        return
    from concurrent.futures import ThreadPoolExecutor, as_completed
    rows = []
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = ([(r.split(":")[0], int(r.split(":")[1])) for r in args.runs] if args.runs
                else [(arch, n) for arch in args.models for n in args.samples])
        jobs = [pool.submit(measure, arch, n, args.iters, args.search_steps) for arch, n in runs]
        path = None
        for job in as_completed(jobs):
            if job.result() is not None:
                rows.append(job.result())
                path = write(rows, args)  # after every row: a long run keeps what it measured
    print(f"wrote {path} and .json")


if __name__ == "__main__":
    main()
