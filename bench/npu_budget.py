"""Hardware-aware WAPS groups: top-1 against the measured npu16 WAPS overhead (issue 15 item 5).

For each benchmark model at W2A4 (BRECQ reconstruction, the accuracy benchmark's schedule):
no groups (BRECQ), the paper's fixed g = 3 (BRECQ+WAPS), and ``--npu-budget`` at several
budgets (per-layer g ∈ 1..4 and group shifts chosen by calib/group_search.py). Each artifact
is evaluated (fake-quant top-1 on the 10k test images) and compiled for npu16; the overhead is
the compiled report's (the simulator's counters: cycles with the groups against the same
layers without them). The npu16 configuration is ``bench/configs/npu16_serial.json``: WAPS
not pipelined behind the array (the paper's serial case), where groups cost cycles; on the
default pipelined npu16 they are almost free on these models.

    python -m bench.npu_budget [--models …] [--budgets 0.5 1 2 5] [--seeds 0 1] [--workers 2]

Writes bench/results/npu_budget.{json,md,png}; finished runs are kept and skipped when re-run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from bench.accuracy import MODELS, RESULTS, _atomic_json, float_accuracy, load_model

CONFIG = Path(__file__).resolve().parent / "configs" / "npu16_serial.json"
MODELS_DEFAULT = ["fashion_resnet", "fashion_mobilenetv2"]
BUDGETS = [0.5, 1.0, 2.0, 5.0]
FIXED = ("none", "g3")          # no groups (BRECQ), the paper's g = 3 everywhere (BRECQ+WAPS)


def run_one(model_name: str, point: str, seed: int, iters: int, samples: int, lam: float) -> dict:
    """Calibrate (W2A4) at ``point`` ('none', 'g3' or a budget in %), evaluate, compile for npu16."""
    import torch
    torch.set_num_threads(1)
    from calib.config import CalibConfig
    from calib.group_search import GroupBudget
    from targets.npu16.group_cost import NpuGroupCost
    from targets.npu16.params import load_config
    from waps_tvm import api
    from waps_tvm.compiler import compile_artifact
    from waps_tvm.datasets import load_dataset

    npu = load_config(CONFIG)
    data = MODELS[model_name]
    calib = load_dataset(data, "calib", n=samples, seed=seed)
    test = load_dataset(data, "test")
    method = "brecq" if point == "none" else "waps"
    cfg = CalibConfig(wbits=2, abits=4, method=method, iters=iters, samples=samples, seed=seed, lam=lam,
                      progress=False)
    budget = None if point in FIXED else GroupBudget(float(point) / 100, NpuGroupCost(npu))
    t0 = time.perf_counter()
    result, art = api.quantize(load_model(model_name), calib.x, cfg, group_budget=budget)
    seconds = time.perf_counter() - t0
    top1 = api.evaluate(art, test.x, test.y)
    with tempfile.TemporaryDirectory() as d:
        compile_artifact(art, Path(d) / "npu", "npu16", npu=npu)
        totals = json.loads((Path(d) / "npu" / "report.json").read_text())["totals"]
    plan = result.group_plan
    return {"model": model_name, "point": point, "seed": seed, "iters": iters, "samples": samples, "lam": lam,
            "top1": top1, "seconds": seconds, "overhead_pct": totals["waps_overhead_pct"],
            "cycles": totals["cycles"], "cycles_no_groups": totals["cycles_no_groups"],
            "estimated_pct": None if plan is None else plan.overhead_fraction * 100,
            "layer_groups": {c.name: len(c.gammas) for c in plan.layers} if plan else None,
            "grouped_layers": sum(1 for q in result.model.quant_layers().values() if q.groups is not None)}


def _key(r: dict) -> tuple:
    return r["model"], r["point"], r["seed"], r["iters"], r["samples"]


def _label(point: str) -> str:
    return {"none": "no groups (BRECQ)", "g3": "g = 3 everywhere (BRECQ+WAPS)"}.get(point, f"budget {point} %")


def summarise(results: dict) -> str:
    lines = ["# Hardware-aware WAPS groups: top-1 against npu16 WAPS overhead", "",
             results["setup"], "",
             "Overhead: the compiled npu16 report's WAPS overhead (simulator counters, all ops of the model) "
             "against the same model without groups; *estimated*: the search's worst case over group "
             "assignments, against the conv/linear layers' compute-unit cycles only (so never below the measured one).",
             ""]
    for m in results["models"]:
        rows = [r for r in results["runs"] if r["model"] == m]
        if not rows:
            continue
        lines += [f"## {m} (W2A4, float {results['float'][m] * 100:.2f} %)", "",
                  "| groups | top-1 % | WAPS overhead (measured) | estimated bound | layers with groups | seeds |",
                  "|---|---|---|---|---|---|"]
        for point in [*FIXED, *sorted({r["point"] for r in rows if r["point"] not in FIXED}, key=float)]:
            rs = [r for r in rows if r["point"] == point]
            if not rs:
                continue
            top = [r["top1"] * 100 for r in rs]
            top_s = f"{statistics.fmean(top):.2f}" + (f" ± {statistics.stdev(top):.2f}" if len(top) > 1 else "")
            ov = statistics.fmean(r["overhead_pct"] for r in rs)
            est = [r["estimated_pct"] for r in rs if r["estimated_pct"] is not None]
            lines.append(f"| {_label(point)} | {top_s} | {ov:+.2f} % | "
                         f"{'–' if not est else f'{max(est):.2f} %'} | {rs[0]['grouped_layers']} | "
                         f"{', '.join(str(r['seed']) for r in rs)} |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = [m for m in results["models"] if any(r["model"] == m for r in results["runs"])]
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, m in zip(axes[0], models):
        rows = [r for r in results["runs"] if r["model"] == m]
        points = sorted({r["point"] for r in rows}, key=lambda p: (p not in FIXED, float(p) if p not in FIXED else 0))
        for point in points:
            rs = [r for r in rows if r["point"] == point]
            x = statistics.fmean(r["overhead_pct"] for r in rs)
            y = statistics.fmean(r["top1"] * 100 for r in rs)
            style = {"none": ("s", "tab:gray"), "g3": ("D", "tab:red")}.get(point, ("o", "tab:blue"))
            ax.scatter([x], [y], marker=style[0], color=style[1], zorder=3)
            ax.annotate(_label(point), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        budget_rows = sorted((p for p in points if p not in FIXED), key=float)
        if budget_rows:
            xs = [statistics.fmean(r["overhead_pct"] for r in rows if r["point"] == p) for p in budget_rows]
            ys = [statistics.fmean(r["top1"] * 100 for r in rows if r["point"] == p) for p in budget_rows]
            ax.plot(xs, ys, color="tab:blue", alpha=0.5)
        lo, hi = ax.get_xlim()
        ax.set_xlim(lo, hi + 0.6 * (hi - lo))          # room for the labels right of the points
        ax.set_xlabel("npu16 WAPS overhead, measured (% cycles, serial WAPS)")
        ax.set_ylabel("top-1 % (W2A4)")
        ax.set_title(m)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=MODELS_DEFAULT, choices=list(MODELS))
    p.add_argument("--budgets", nargs="+", type=float, default=BUDGETS, help="in % of the npu16 cycles")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--lam", type=float, default=0.1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--report-only", action="store_true", help="rewrite the table and plot from the JSON")
    args = p.parse_args(argv)
    from tqdm import tqdm

    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "npu_budget.json"
    results = json.loads(out.read_text()) if out.exists() else {"runs": [], "float": {}}
    results["setup"] = (f"W2A4, BRECQ reconstruction, {args.iters} iterations per block, {args.samples} calibration "
                        f"samples, batch 32, λ = {args.lam}, tile 16; npu16 `{CONFIG.name}` (1 array, WAPS not "
                        f"pipelined); {args.workers} worker processes × 1 thread on a 2-core CPU")
    results["models"] = sorted(set(results.get("models", [])) | set(args.models), key=list(MODELS).index)
    for m in args.models:
        results["float"].setdefault(m, float_accuracy(m))
    points = [*FIXED, *[f"{b:g}" for b in args.budgets]]
    done = {_key(r) for r in results["runs"]}
    jobs = [] if args.report_only else [(m, pt, s) for s in args.seeds for m in args.models for pt in points
                                         if (m, pt, s, args.iters, args.samples) not in done]
    with ProcessPoolExecutor(args.workers) as pool, tqdm(total=len(jobs), desc="npu budget runs") as bar:
        futs = [pool.submit(run_one, *j, args.iters, args.samples, args.lam) for j in jobs]
        for f in as_completed(futs):
            row = f.result()
            results["runs"] = [r for r in results["runs"] if _key(r) != _key(row)] + [row]
            _atomic_json(out, results)
            bar.update(1)
            bar.set_postfix_str(f"{row['model']} {row['point']}: {row['top1'] * 100:.2f} %, "
                                f"{row['overhead_pct']:+.2f} %")
    (RESULTS / "npu_budget.md").write_text(summarise(results))
    plot(results, RESULTS / "npu_budget.png")
    print(summarise(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
