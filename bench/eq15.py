"""Eq. 15 as printed (sigmoid ratio) against the softmax reading: block loss and top-1.

For each model, seed and group-probability form: BRECQ+WAPS at W2A4 (few iterations
and samples so the whole comparison fits in about 15 minutes of two CPU cores), the
summed per-block reconstruction loss after calibration, and top-1 of the model rebuilt
from the saved artifact on the full test set. Seeds pair the two forms (same calibration
images, same batches), so the verdict uses the per-seed differences: a difference is
"within noise" when its mean is under two standard errors of those differences. Top-1
decides where it differs beyond noise, else the block loss, else the paper's form wins.

    python -m bench.eq15 [--models digit_recognizer fashion_resnet fashion_mobilenetv2] [--seeds 0 1 2]
                         [--iters 200] [--samples 256] [--workers 2]

Writes bench/results/eq15.json and eq15.md.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from bench.accuracy import MODELS, load_model

RESULTS = Path(__file__).resolve().parent / "results"
FORMS = ("sigmoid", "softmax")


def run_one(model_name: str, form: str, seed: int, iters: int, samples: int, lam: float) -> dict:
    """Calibrate (W2A4, BRECQ+WAPS, ``form``), save, reload, evaluate."""
    import torch
    torch.set_num_threads(1)
    from calib import artifact
    from calib.config import CalibConfig
    from waps_tvm import api
    from waps_tvm.datasets import load_dataset

    model = load_model(model_name)
    calib = load_dataset(MODELS[model_name], "calib", n=samples, seed=seed)
    test = load_dataset(MODELS[model_name], "test")
    cfg = CalibConfig(wbits=2, abits=4, method="waps", iters=iters, samples=samples, seed=seed, lam=lam,
                      group_prob=form, progress=False)
    t0 = time.perf_counter()
    result, art = api.quantize(model, calib.x, cfg)
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        acc = api.evaluate(artifact.load(artifact.save(art, Path(d) / "m.waps")), test.x, test.y)
    return {"model": model_name, "form": form, "seed": seed, "top1": acc, "seconds": seconds,
            "block_loss": sum(r.loss_after for r in result.report),
            "blocks": [r.loss_after for r in result.report]}


def paired(runs: list[dict], model: str, metric: str, forms: tuple[str, str] = FORMS, field: str = "form") -> dict:
    """Mean of each of the two ``forms`` (values of ``field`` in a run) and the per-seed
    difference forms[0] − forms[1] with its verdict: "within noise" when its mean is under
    two standard errors of the differences."""
    a, b = forms
    by = {(r[field], r["seed"]): r[metric] for r in runs if r["model"] == model}
    seeds = sorted({s for f, s in by if (a, s) in by and (b, s) in by})
    diffs = [by[(a, s)] - by[(b, s)] for s in seeds]
    mean = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("inf")
    return {"seeds": seeds, a: statistics.fmean(by[(a, s)] for s in seeds),
            b: statistics.fmean(by[(b, s)] for s in seeds),
            f"{a}_std": statistics.pstdev([by[(a, s)] for s in seeds]),
            f"{b}_std": statistics.pstdev([by[(b, s)] for s in seeds]),
            "diff": mean, "diff_se": se, "within_noise": abs(mean) < 2 * se}


def verdict(summary: dict, forms: tuple[str, str] = FORMS) -> str:
    """The better of two ``forms`` compared by ``paired``: top-1 decides where it differs
    beyond noise (and no model disagrees); else the summed block loss does (lower is
    better) under the same rule; if neither tells them apart, forms[0] (here the paper's)."""
    for metric, sign in (("top1", 1), ("block_loss", -1)):
        beyond = [s[metric]["diff"] * sign for s in summary.values() if not s[metric]["within_noise"]]
        if beyond and all(d > 0 for d in beyond):
            return forms[0]
        if beyond and all(d < 0 for d in beyond):
            return forms[1]
    return forms[0]


def paired_rows(summary: dict, forms: tuple[str, str], flip: bool = False) -> list[str]:
    """Table rows per model and metric (top-1 %, block loss) of ``paired`` summaries: each
    form's mean ± std, the paired difference forms[0] − forms[1] (forms[1] − forms[0] with
    ``flip``) ± its standard error, and whether it is within noise."""
    rows, sign = [], -1 if flip else 1
    for model, s in summary.items():
        for metric, scale, unit in (("top1", 100, " %"), ("block_loss", 1, "")):
            m = s[metric]
            a, b = (f"{m[f] * scale:.4g}{unit} ± {m[f + '_std'] * scale:.2g}" for f in forms)
            rows.append(f"| {model} | {metric} | {a} | {b} | {sign * m['diff'] * scale:+.3g} ± "
                        f"{m['diff_se'] * scale:.2g} | {'yes' if m['within_noise'] else 'no'} |")
    return rows


def render(res: dict) -> str:
    lines = ["# Eq. 15: sigmoid ratio (as printed) vs softmax", "", res["setup"], "",
             "| model | metric | sigmoid (eq. 15) | softmax | sigmoid − softmax (paired, ± s.e.) | within noise |",
             "|---|---|---|---|---|---|"]
    lines += paired_rows(res["summary"], FORMS)
    lines += ["", f"Default chosen: **{res['default']}** (rule: top-1 decides where it differs beyond noise, "
              "else the block loss, else the paper's form). block_loss is the sum over blocks of the "
              "reconstruction loss after calibration (mean over samples of the summed squared error)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--lam", type=float, default=0.1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--resummarise", action="store_true",
                   help="recompute summary and verdict from the runs in bench/results/eq15.json (no calibration)")
    args = p.parse_args(argv)
    if args.resummarise:
        res = json.loads((RESULTS / "eq15.json").read_text())
        models = list(dict.fromkeys(r["model"] for r in res["runs"]))
        res["summary"] = {m: {k: paired(res["runs"], m, k) for k in ("top1", "block_loss")} for m in models}
        res["default"] = verdict(res["summary"])
        (RESULTS / "eq15.json").write_text(json.dumps(res, indent=1))
        (RESULTS / "eq15.md").write_text(render(res))
        print(render(res))
        return 0
    if len(args.seeds) < 2:
        p.error("at least two seeds are needed to tell a difference from noise")
    jobs = [(m, f, s) for m in args.models for s in args.seeds for f in FORMS]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        futs = [pool.submit(run_one, m, f, s, args.iters, args.samples, args.lam) for m, f, s in jobs]
        runs = []
        for fut in futs:
            r = fut.result()
            runs.append(r)
            print(f"{r['model']:20s} {r['form']:8s} seed {r['seed']}: top-1 {r['top1'] * 100:.2f} %, "
                  f"block loss {r['block_loss']:.4g} ({r['seconds']:.0f} s)", flush=True)
    summary = {m: {k: paired(runs, m, k) for k in ("top1", "block_loss")} for m in args.models}
    res = {"setup": f"W2A4 BRECQ+WAPS, {args.iters} iterations per block, {args.samples} calibration samples, "
                    f"batch 32, λ = {args.lam}, seeds {args.seeds}, {args.workers} worker processes × 1 thread "
                    f"(2-core CPU shared with other jobs; {time.perf_counter() - t0:.0f} s in all)",
           "iters": args.iters, "samples": args.samples, "lam": args.lam, "runs": runs, "summary": summary}
    res["default"] = verdict(summary)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "eq15.json").write_text(json.dumps(res, indent=1))
    (RESULTS / "eq15.md").write_text(render(res))
    print(render(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
