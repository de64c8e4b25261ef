"""Top-1 against calibration iterations per block: how many a user needs to pay for.

For each benchmark model, method (BRECQ, BRECQ+WAPS) and iteration count, one W2A4
calibration (bench/accuracy.run_one: same calibration images per seed, artifact saved,
reloaded and evaluated on the full test set), its top-1, summed block loss and seconds.
The default rule: the smallest count whose top-1, averaged over models and methods, is
within ``--tolerance`` points of the best count's. Writes bench/results/iterations.json
(after every run, so an interrupted benchmark resumes), iterations.md and iterations.png.

    python -m bench.iterations [--models ...] [--iters 50 100 300 1000 3000] [--seeds 0]
                               [--samples 512] [--workers 2] [--tolerance 0.3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from bench.accuracy import LABEL, MODELS, _atomic_json, run_one

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("brecq", "waps")
CONFIG = "W2A4"


def key(r: dict) -> tuple:
    return r["model"], r["method"], r["iters"], r["seed"]


def mean_top1(runs: list[dict], iters: int, models: list[str]) -> float | None:
    """Top-1 % averaged over every (model, method, seed) run at ``iters``; None unless each
    model has a run there."""
    mine = [r for r in runs if r["iters"] == iters and r["model"] in models]
    if {r["model"] for r in mine} != set(models):
        return None
    return statistics.fmean(r["top1"] * 100 for r in mine)


def choose(runs: list[dict], models: list[str], tolerance: float) -> int | None:
    """The smallest iteration count within ``tolerance`` points of the best mean top-1."""
    means = {i: m for i in sorted({r["iters"] for r in runs}) if (m := mean_top1(runs, i, models)) is not None}
    if not means:
        return None
    best = max(means.values())
    return min(i for i, m in means.items() if m >= best - tolerance)


def render(res: dict) -> str:
    runs, models = res["runs"], res["models"]
    counts = sorted({r["iters"] for r in runs})
    lines = ["# Top-1 against iterations per block (W2A4)", "", res["setup"], "",
             "| model | method | " + " | ".join(str(i) for i in counts) + " |", "|---|---|" + "---|" * len(counts)]
    for m in models:
        for meth in METHODS:
            cells = []
            for i in counts:
                t = [r["top1"] * 100 for r in runs if (r["model"], r["method"], r["iters"]) == (m, meth, i)]
                cells.append(f"{statistics.fmean(t):.2f}" if t else "–")
            lines.append(f"| {m} | {LABEL[meth]} | " + " | ".join(cells) + " |")
    mean_row = [mean_top1(runs, i, models) for i in counts]
    lines.append("| **mean** | | " + " | ".join(f"**{v:.2f}**" if v is not None else "–" for v in mean_row) + " |")
    lines += ["", "Calibration seconds (one process, 1 thread, mean over models and methods):", "",
              "| iterations | " + " | ".join(str(i) for i in counts) + " |", "|---|" + "---|" * len(counts),
              "| seconds | " + " | ".join(f"{statistics.fmean(r['seconds'] for r in runs if r['iters'] == i):.0f}"
                                          for i in counts) + " |", ""]
    partial = [i for i, v in zip(counts, mean_row) if v is None]
    if partial:
        lines.append(f"Counts not run on every model ({', '.join(map(str, partial))}) are shown but take no "
                     "part in the choice.")
    if res.get("chosen") is not None:
        lines.append(f"Chosen default: **{res['chosen']} iterations per block**: the smallest count whose mean "
                     f"top-1 is within {res['tolerance']} points of the best count's.")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, m in enumerate(res["models"]):
        for meth, style in zip(METHODS, ("--", "-")):
            pts = sorted((r["iters"], r["top1"] * 100) for r in res["runs"] if (r["model"], r["method"]) == (m, meth))
            if pts:
                ax.plot(*zip(*pts), style, marker="o", color=f"C{i}", label=f"{m} {LABEL[meth]}")
    if res.get("chosen") is not None:
        ax.axvline(res["chosen"], color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("iterations per block")
    ax.set_ylabel("top-1 % (W2A4, full test set)")
    ax.set_title("Calibration iterations vs accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["fashion_resnet", "fashion_mobilenetv2"], choices=list(MODELS))
    p.add_argument("--iters", nargs="+", type=int, default=[50, 100, 300, 1000, 3000])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--lam", type=float, default=0.1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--tolerance", type=float, default=0.3, help="points of top-1 the default may give up")
    p.add_argument("--report-only", action="store_true", help="no runs: choose and render from iterations.json")
    args = p.parse_args(argv)
    from tqdm import tqdm

    out = RESULTS / "iterations.json"
    res = json.loads(out.read_text()) if out.exists() else {"runs": []}
    if args.report_only:
        res["chosen"] = choose(res["runs"], res["models"], res["tolerance"])
        _atomic_json(out, res)
        (RESULTS / "iterations.md").write_text(render(res))
        plot(res, RESULTS / "iterations.png")
        print(render(res))
        return 0
    res.update(models=args.models, tolerance=args.tolerance,
               setup=f"W2A4, {args.samples} calibration samples, batch 32, λ = {args.lam}, seeds {args.seeds}, "
                     f"{args.workers} worker processes × 1 thread on a 2-core CPU; largest counts first")
    done = {key(r) for r in res["runs"]}
    jobs = [(m, meth, i, s) for i in sorted(args.iters, reverse=True) for m in args.models for meth in METHODS
            for s in args.seeds if (m, meth, i, s) not in done]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool, tqdm(total=len(jobs), desc="iteration runs") as bar:
        futs = [pool.submit(run_one, m, CONFIG, meth, s, i, args.samples, args.lam) for m, meth, i, s in jobs]
        for f in as_completed(futs):
            r = f.result()
            r["block_loss"] = sum(b["after"] for b in r.pop("blocks"))
            res["runs"].append(r)
            _atomic_json(out, res)
            bar.update(1)
            bar.write(f"{r['model']} {LABEL[r['method']]} {r['iters']} it, seed {r['seed']}: "
                      f"{r['top1'] * 100:.2f} % ({r['seconds']:.0f} s)")
    res["chosen"] = choose(res["runs"], args.models, args.tolerance)
    res["seconds_this_run"] = round(time.perf_counter() - t0)
    _atomic_json(out, res)
    (RESULTS / "iterations.md").write_text(render(res))
    plot(res, RESULTS / "iterations.png")
    print(render(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
