"""Channel concatenation: one quantizer shared with what it joins, or each input rescaled.

A ``cat`` in an integer model either shares one quantizer with the values it joins (the
compiled cat only moves codes; a DenseNet block is one quantizer) or keeps theirs and
requantizes each input to its own scale (a second rounding, but each producer keeps a
range of its own). ``--cat-quant`` picks one; this benchmark measures which loses less.

For each configuration, method and seed, both variants calibrate the concatenation-heavy
FashionCatNet (fire modules, a dense block, ceil-mode pooling; bench/models.py) from the
same images and batches: top-1 of the model rebuilt from the saved artifact on the full
Fashion-MNIST test set, and the summed per-block reconstruction loss. Seeds pair the
variants; a difference is "within noise" under two standard errors of the per-seed
differences (bench/eq15.paired). Seed 0's BRECQ+WAPS artifacts are also compiled for llvm
and run over the test set (top-1 and agreement with the fake-quant model).

    python -m bench.cat_quant [--configs W2A4 W4A4] [--methods rtn brecq waps] [--seeds 0 1 2]
                              [--iters 300] [--samples 512] [--workers 2]

Writes bench/results/cat_quant.json and cat_quant.md.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from bench.accuracy import CONFIGS, LABEL, compiled_accuracy, float_accuracy
from bench.eq15 import paired, verdict as paired_verdict

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "fashion_catnet"
VARIANTS = ("shared", "rescale")


def run_one(config: str, method: str, variant: str, seed: int, iters: int, samples: int, lam: float,
            compile: bool) -> dict:
    """Calibrate FashionCatNet with ``--cat-quant variant``, save, reload, evaluate."""
    import torch
    torch.set_num_threads(1)
    from bench.models import load_pretrained
    from calib import artifact
    from calib.config import CalibConfig
    from waps_tvm import api
    from waps_tvm.datasets import load_dataset

    calib = load_dataset("fashion-mnist", "calib", n=samples, seed=seed)
    test = load_dataset("fashion-mnist", "test")
    wb, ab = CONFIGS[config]
    cfg = CalibConfig(wbits=wb, abits=ab, method=method, iters=iters, samples=samples, seed=seed, lam=lam,
                      cat_quant=variant, progress=False)
    t0 = time.perf_counter()
    result, art = api.quantize(load_pretrained(MODEL), calib.x, cfg)
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        loaded = artifact.load(artifact.save(art, Path(d) / "m.waps"))
        acc = api.evaluate(loaded, test.x, test.y)
        compiled = compiled_accuracy(loaded, test.x, test.y) if compile else None
    row = {"model": MODEL, "config": config, "method": method, "variant": variant, "seed": seed,
           "top1": acc, "block_loss": sum(r.loss_after for r in result.report), "seconds": seconds,
           "shared_quantizers": len(result.model.tied)}
    if compiled is not None:
        row["compiled"] = compiled
    return row


def summarise(runs: list[dict]) -> dict:
    """Per (config, method): the paired comparison of top-1 and block loss."""
    out = {}
    for cm in dict.fromkeys((r["config"], r["method"]) for r in runs):
        mine = [r for r in runs if (r["config"], r["method"]) == cm]
        out[" ".join(cm)] = {k: paired(mine, MODEL, k, VARIANTS, "variant") for k in ("top1", "block_loss")}
    return out


def verdict(summary: dict) -> str:
    """The variant that loses less, by bench/eq15.verdict's rule; a tie goes to "shared"
    (one rounding fewer, and the compiled cat only moves codes)."""
    return paired_verdict(summary, VARIANTS)


def render(res: dict) -> str:
    lines = ["# Channel concatenation: shared quantizer vs rescaled inputs (FashionCatNet)", "", res["setup"], "",
             "| config | method | metric | shared | rescale | shared − rescale (paired, ± s.e.) | within noise |",
             "|---|---|---|---|---|---|---|"]
    for cm, s in res["summary"].items():
        config, method = cm.split(" ")
        for metric, scale, unit in (("top1", 100, " %"), ("block_loss", 1, "")):
            m = s[metric]
            lines.append(f"| {config} | {LABEL[method]} | {metric} | {m['shared'] * scale:.4g}{unit} ± "
                         f"{m['shared_std'] * scale:.2g} | {m['rescale'] * scale:.4g}{unit} ± "
                         f"{m['rescale_std'] * scale:.2g} | {m['diff'] * scale:+.3g} ± {m['diff_se'] * scale:.2g} | "
                         f"{'yes' if m['within_noise'] else 'no'} |")
    compiled = [r for r in res["runs"] if "compiled" in r]
    if compiled:
        lines += ["", "Compiled for llvm (fast form, TVM runtime, full test set), seed 0:", "",
                  "| config | method | variant | compiled top-1 | fake-quant top-1 | top-1 agreement |",
                  "|---|---|---|---|---|---|"]
        for r in compiled:
            c = r["compiled"]
            lines.append(f"| {r['config']} | {LABEL[r['method']]} | {r['variant']} | {c['compiled_top1']:.2f} | "
                         f"{c['fakequant_top1']:.2f} | {c['agreement']:.2f} % |")
    lines += ["", f"Float top-1 {res['float'] * 100:.2f} %. Default chosen: **{res['default']}** (rule: top-1 "
              "decides where it differs beyond noise in one direction, else the block loss, else shared). "
              "block_loss: the sum over blocks of the reconstruction loss after calibration (mean over "
              "samples of the summed squared error against the float block output)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["W2A4", "W4A4"], choices=list(CONFIGS))
    p.add_argument("--methods", nargs="+", default=["rtn", "brecq", "waps"], choices=["rtn", "brecq", "waps", "qdrop"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--lam", type=float, default=0.1)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    if len(args.seeds) < 2:
        p.error("at least two seeds are needed to tell a difference from noise")
    from tqdm import tqdm

    jobs = [(c, m, v, s) for c in args.configs for m in args.methods for s in args.seeds for v in VARIANTS]
    t0 = time.perf_counter()
    runs = []
    with ProcessPoolExecutor(args.workers) as pool, tqdm(total=len(jobs), desc="cat_quant runs") as bar:
        futs = [pool.submit(run_one, c, m, v, s, args.iters, args.samples, args.lam,
                            compile=(s == args.seeds[0] and m == "waps")) for c, m, v, s in jobs]
        for fut in futs:
            r = fut.result()
            runs.append(r)
            bar.update(1)
            bar.write(f"{r['config']} {r['method']:6s} {r['variant']:8s} seed {r['seed']}: top-1 "
                      f"{r['top1'] * 100:.2f} %, block loss {r['block_loss']:.4g} ({r['seconds']:.0f} s)")
    summary = summarise(runs)
    res = {"setup": f"{args.iters} iterations per block, {args.samples} calibration samples, batch 32, "
                    f"λ = {args.lam}, seeds {args.seeds}, {args.workers} worker processes × 1 thread (2-core "
                    f"CPU; {time.perf_counter() - t0:.0f} s in all). Both variants of a seed use the same "
                    "images and batches.",
           "iters": args.iters, "samples": args.samples, "lam": args.lam, "float": float_accuracy(MODEL, "fashion-mnist"),
           "runs": runs, "summary": summary, "default": verdict(summary)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cat_quant.json").write_text(json.dumps(res, indent=1))
    (RESULTS / "cat_quant.md").write_text(render(res))
    print(render(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
