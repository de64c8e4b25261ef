"""--conv-dtype bfloat16 against float32 reconstruction: block loss and top-1, paired by seed.

For each model and seed: BRECQ+WAPS at W2A4 calibrated twice, with the reconstruction
loop's convolutions in float32 and in bfloat16 (``--conv-dtype bfloat16``: autocast,
quantizers and losses in float32), the same calibration images and batches; the summed
per-block reconstruction loss after calibration, and top-1 of the model rebuilt from the
saved artifact on the full test set. A difference is "within noise" when its mean over
seeds is under two standard errors of the per-seed differences (bench/eq15.py's rule).

    python -m bench.bf16 [--models fashion_resnet fashion_mobilenetv2] [--seeds 0 1 2]
                         [--iters 200] [--samples 256] [--workers 2]

Writes bench/results/bf16.json and bf16.md.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from bench.accuracy import MODELS, load_model
from bench.calib_speed import _cpu
from bench.eq15 import paired, paired_rows

RESULTS = Path(__file__).resolve().parent / "results"
PRECISIONS = ("fp32", "bf16")


def run_one(model_name: str, precision: str, seed: int, iters: int, samples: int) -> dict:
    """Calibrate (W2A4, BRECQ+WAPS) with the loop's convolutions in ``precision``, save,
    reload, evaluate."""
    import torch
    torch.set_num_threads(1)
    from calib import artifact
    from calib.config import CalibConfig
    from waps_tvm import api
    from waps_tvm.datasets import load_dataset

    model = load_model(model_name)
    calib = load_dataset(MODELS[model_name], "calib", n=samples, seed=seed)
    test = load_dataset(MODELS[model_name], "test")
    cfg = CalibConfig(wbits=2, abits=4, method="waps", iters=iters, samples=samples, seed=seed,
                      conv_dtype="bfloat16" if precision == "bf16" else "float32", progress=False)
    t0 = time.perf_counter()
    result, art = api.quantize(model, calib.x, cfg)
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        acc = api.evaluate(artifact.load(artifact.save(art, Path(d) / "m.waps")), test.x, test.y)
    return {"model": model_name, "precision": precision, "seed": seed, "top1": acc, "seconds": seconds,
            "block_loss": sum(r.loss_after for r in result.report)}


def _native_bf16() -> str:
    import torch
    from calib.device import native_bf16
    return "yes" if native_bf16(torch.device("cpu")) else "no (emulated)"


def render(res: dict) -> str:
    lines = ["# Reconstruction in bfloat16 (`--conv-dtype bfloat16`) against float32", "", res["setup"], "",
             "| model | metric | float32 | bf16 | bf16 − float32 (paired, ± s.e.) | within noise |",
             "|---|---|---|---|---|---|"]
    lines += paired_rows(res["summary"], ("fp32", "bf16"), flip=True)
    lines += ["", f"Verdict: {res['verdict']}", "",
              "block_loss is the sum over blocks of the reconstruction loss after calibration (mean over "
              "samples of the summed squared error). Speed is measured in bench/results/calib_speed.md "
              "(these small models at 1 thread per worker say nothing about it)."]
    return "\n".join(lines) + "\n"


def verdict(summary: dict) -> str:
    worse = [f"{m} {k}" for m, s in summary.items() for k, sign in (("top1", 1), ("block_loss", -1))
             if not s[k]["within_noise"] and s[k]["diff"] * sign > 0]   # diff = fp32 − bf16
    return ("bf16 is worse beyond noise on " + ", ".join(worse)) if worse else \
        "bf16 is not worse beyond noise on any model in top-1 or block loss"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["fashion_resnet", "fashion_mobilenetv2"], choices=list(MODELS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    if len(args.seeds) < 2:
        p.error("at least two seeds are needed to tell a difference from noise")
    jobs = [(m, f, s) for m in args.models for s in args.seeds for f in PRECISIONS]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        futs = [pool.submit(run_one, m, f, s, args.iters, args.samples) for m, f, s in jobs]
        runs = []
        for fut in futs:
            r = fut.result()
            runs.append(r)
            print(f"{r['model']:20s} {r['precision']:5s} seed {r['seed']}: top-1 {r['top1'] * 100:.2f} %, "
                  f"block loss {r['block_loss']:.4g} ({r['seconds']:.0f} s)", flush=True)
    summary = {m: {k: paired(runs, m, k, PRECISIONS, "precision") for k in ("top1", "block_loss")}
               for m in args.models}
    res = {"setup": f"W2A4 BRECQ+WAPS, {args.iters} iterations per block, {args.samples} calibration samples, "
                    f"batch 32, seeds {args.seeds}, {args.workers} worker processes × 1 thread "
                    f"({time.perf_counter() - t0:.0f} s in all; {_cpu()}, native bf16 convolutions: "
                    f"{_native_bf16()})",
           "iters": args.iters, "samples": args.samples, "runs": runs, "summary": summary,
           "verdict": verdict(summary)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bf16.json").write_text(json.dumps(res, indent=1))
    (RESULTS / "bf16.md").write_text(render(res))
    print(render(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
