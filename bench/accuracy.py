"""Accuracy benchmark: every method of the calibration engine, like for like.

Models: the pretrained digit-recognizer CNN (PyPI, trained by nobody here) on the full
MNIST test set; FashionResNet, FashionMobileNetV2, FashionMobileNetV3 (hardswish,
squeeze-and-excitation) and FashionViT (a small torchvision VisionTransformer, W4A4 and W6A6
only; bench/train_fashion.py) on the full Fashion-MNIST test set. For
each bit configuration, method and seed: top-1 of the fake-quant model rebuilt from the
saved .waps artifact, per-block reconstruction loss, and calibration seconds per
block-iteration; with --compile, also the top-1 of the artifact compiled for llvm (the
integer program run by the TVM runtime) and its top-1 agreement with the fake-quant model.
Writes bench/results/accuracy.json (updated after every run, so an interrupted benchmark
resumes), accuracy.md and group_convergence.png (the paper's Fig. 8 for one layer).

    python -m bench.accuracy [--models ...] [--configs W2A4 ...] [--methods ...]
                             [--seeds 0 1 2] [--iters 300] [--samples 512] [--workers 2]
                             [--compile]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {"digit_recognizer": "mnist", "fashion_resnet": "fashion-mnist", "fashion_mobilenetv2": "fashion-mnist",
          "fashion_mobilenetv3": "fashion-mnist", "fashion_vit": "fashion-mnist"}
CONFIGS = {"W6A6": (6, 6), "W4A4": (4, 4), "W3A3": (3, 3), "W2A4": (2, 4), "W2A32": (2, 32)}
METHODS = ["rtn", "rtn+cwac", "brecq", "brecq+cwac", "waps", "waps+cwac", "qdrop", "qdrop+waps"]
# default plan: every method at W2A4 (the acceptance configuration); the main methods
# elsewhere; no QDrop without activation quantization (it would equal BRECQ)
PLAN = {"W2A4": METHODS, "W4A4": ["rtn", "brecq", "waps", "qdrop", "qdrop+waps"],
        "W3A3": ["rtn", "brecq", "waps", "qdrop", "qdrop+waps"], "W2A32": ["rtn", "rtn+cwac", "brecq", "waps"]}
# a model with its own plan runs only its configurations: the ViT at the paper's W6A6 and at W4A4
VIT_METHODS = ["brecq", "brecq+cwac", "waps", "qdrop", "qdrop+waps"]
PLAN_BY_MODEL = {"fashion_vit": {"W6A6": VIT_METHODS, "W4A4": VIT_METHODS}}
# the paper's figure beside a model it has no number for (a different model and dataset)
PAPER = {"fashion_vit": "The paper (§IV-A, text only: no table or figure) reports ViT-B on ImageNet at W6A6 "
                        "+0.64 %p top-1 for WAPS over its baseline (neither the baseline nor absolute top-1 "
                        "given); a different model and dataset from this one."}
LABEL = {"rtn": "RTN", "rtn+cwac": "RTN+CWAC", "brecq": "BRECQ", "brecq+cwac": "BRECQ+CWAC",
         "waps": "BRECQ+WAPS", "waps+cwac": "BRECQ+WAPS+CWAC", "qdrop": "QDrop", "qdrop+waps": "QDrop+WAPS"}


def plan(model: str, config: str) -> list[str]:
    """The methods run for ``model`` at ``config`` by default (none: the configuration is not its)."""
    return PLAN_BY_MODEL.get(model, PLAN).get(config, [])


def load_model(name: str):
    if name == "digit_recognizer":
        from waps_tvm.model_io import digit_recognizer
        return digit_recognizer()
    from bench.models import load_pretrained
    return load_pretrained(name)


def _atomic_json(path: Path, obj) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def compiled_accuracy(art, x, y, batch: int = 500, form: str = "fast") -> dict:
    """Compile ``art`` for llvm in ``form`` (default: the CLI's, what a user deploys; bit-exact
    with split and fused, ~9× faster than fused here) and run it on ``x`` float32 N×C×H×W
    (N a multiple of ``batch``): top-1 % of the compiled integer program and of the fake-quant
    model against int64 labels ``y``, and the % of images where their top-1 agree."""
    os.environ.setdefault("TVM_NUM_THREADS", "1")   # before TVM's pool exists: one core per worker
    import numpy as np
    import torch
    import tvm

    from calib.fakequant import build_fake_quant
    from waps_tvm.api import predict
    from waps_tvm.compiler import build, lower_artifact
    if len(x) % batch:
        raise ValueError(f"{len(x)} images is not a multiple of the batch {batch}")
    vm = tvm.runtime.vm.VirtualMachine(build(lower_artifact(art, batch, form, target="llvm"), "llvm"), tvm.cpu())
    got = np.concatenate([vm["main"](tvm.runtime.tensor(x[i:i + batch].numpy()))[0].numpy()
                          for i in range(0, len(x), batch)]).argmax(1)
    fq = predict(build_fake_quant(art), x).argmax(1).numpy()
    labels = y.numpy()
    return {"images": len(x), "compiled_top1": float((got == labels).mean() * 100),
            "fakequant_top1": float((fq == labels).mean() * 100), "agreement": float((got == fq).mean() * 100)}


def run_one(model_name: str, config: str, method: str, seed: int, iters: int, samples: int,
            lam: float, record_groups: bool = False, compile: bool = False, workers: int = 1) -> dict:
    """Calibrate, save, reload, evaluate one (model, config, method, seed); with ``compile``,
    also compile the reloaded artifact and evaluate that (row["compiled"]). ``workers``: how
    many such runs share the machine (recorded: it moves sec_per_iter)."""
    import torch
    torch.set_num_threads(1)
    from calib import artifact
    from calib.config import CalibConfig
    from waps_tvm import api
    from waps_tvm.datasets import load_dataset

    model = load_model(model_name)
    data = MODELS[model_name]
    calib = load_dataset(data, "calib", n=samples, seed=seed)
    test = load_dataset(data, "test")
    wb, ab = CONFIGS[config]
    base, cwac = method.split("+cwac")[0], method.endswith("+cwac")
    cfg = CalibConfig(wbits=wb, abits=ab, method=base, cwac=cwac, iters=iters, samples=samples,
                      seed=seed, lam=lam, progress=False)
    t0 = time.perf_counter()
    result, art = api.quantize(model, calib.x, cfg)
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        path = artifact.save(art, Path(d) / "m.waps")
        loaded = artifact.load(path)
        acc = api.evaluate(loaded, test.x, test.y)
        compiled = compiled_accuracy(loaded, test.x, test.y) if compile else None
    row = {"model": model_name, "config": config, "method": method, "seed": seed, "top1": acc,
           "seconds": seconds, "iters": iters, "samples": samples, "lam": lam, "workers": workers,
           "sec_per_iter": statistics.fmean([r.sec_per_iter for r in result.report if r.iters] or [0.0]),
           "blocks": [{"name": r.source, "kind": r.kind, "before": r.loss_before, "after": r.loss_after}
                      for r in result.report]}
    if compiled is not None:
        row["compiled"] = compiled
    if record_groups:
        layers = [(n, l) for n, l in result.model.quant_layers().items() if l.groups is not None and l.groups.history]
        name, layer = layers[len(layers) // 2]
        row["group_history"] = {"layer": result.model.graph[name].source,
                                "assignment": layer.groups.assignment.tolist(),
                                "probs": [h.tolist() for h in layer.groups.history]}
    return row


def float_accuracy(model_name: str, dataset: str | None = None) -> float:
    """Top-1 (fraction) of the float model on the full test split of ``dataset`` (default: its MODELS entry)."""
    import torch
    from waps_tvm.datasets import load_dataset
    test = load_dataset(dataset or MODELS[model_name], "test")
    with torch.no_grad():
        logits = torch.cat([load_model(model_name)(test.x[i:i + 1000]) for i in range(0, len(test.x), 1000)])
    return float((logits.argmax(1) == test.y).float().mean())


def key(r) -> tuple:
    return (r["model"], r["config"], r["method"], r["seed"])


def _mixed_workers(rows: list[dict]) -> str:
    """A sentence naming each seed's worker-process count when a model's runs recorded
    different ones (their time per iteration is then not comparable), else ''."""
    by_seed: dict[int, set] = {}
    for r in rows:
        by_seed.setdefault(r["seed"], set()).add(r.get("workers"))
    counts = {w for ws in by_seed.values() for w in ws}
    if len(counts) <= 1:
        return ""
    parts = {}
    for seed, ws in sorted(by_seed.items()):
        parts.setdefault("/".join("not recorded" if w is None else str(w) for w in sorted(ws, key=str)), []).append(seed)
    said = "; ".join(f"{w} (seed{'s' if len(ss) > 1 else ''} {', '.join(map(str, ss))})" for w, ss in parts.items())
    return f" Worker processes differed between seeds: {said}; times per iteration mix them."


def summarise(results: dict) -> str:
    runs = results["runs"]
    lines = [f"# Accuracy benchmark (top-1 %, mean ± std over seeds)", "",
             f"{results['setup']}", ""]
    for model in MODELS:
        mine = [r for r in runs if r["model"] == model]
        if not mine:
            continue
        configs = [c for c in CONFIGS if any(r["config"] == c for r in mine)]
        lines += [f"## {model} ({MODELS[model]} test, 10k images), float {results['float'][model] * 100:.2f} %", ""]
        own = results.get("setup_by_model", {}).get(model, results["setup"])
        seeds = ", ".join(str(s) for s in sorted({r["seed"] for r in mine}))
        lines += [f"Seeds {seeds}" + (f"; {own}" if own != results["setup"] else "") + "." + _mixed_workers(mine), "",
                  "| method | " + " | ".join(configs) + " |", "|---|" + "---|" * len(configs)]
        for m in METHODS:
            cells = []
            for c in configs:
                accs = [r["top1"] * 100 for r in mine if r["config"] == c and r["method"] == m]
                cells.append(_fmt(accs))
            if any(cell != "–" for cell in cells):
                lines.append(f"| {LABEL[m]} | " + " | ".join(cells) + " |")
        lines.append("")
        if model in PAPER:
            lines += [PAPER[model], ""]
    lines += ["## Block reconstruction loss: does WAPS lower it?", "",
              "Blocks (over all seeds) where the WAPS variant's loss after reconstruction is below its",
              "baseline's, each measured on its own quantized inputs.", "",
              "| model | config | BRECQ+WAPS < BRECQ | QDrop+WAPS < QDrop | s/iter BRECQ | s/iter BRECQ+WAPS | s/iter QDrop+WAPS |",
              "|---|---|---|---|---|---|---|"]
    for model in MODELS:
        for c in CONFIGS:
            row = [model, c]
            for a, b in (("waps", "brecq"), ("qdrop+waps", "qdrop")):
                win = tot = 0
                for ra in (r for r in runs if r["model"] == model and r["config"] == c and r["method"] == a):
                    rb = next((r for r in runs if key(r) == (model, c, b, ra["seed"])), None)
                    if rb:
                        for x, y in zip(ra["blocks"], rb["blocks"]):
                            win += x["after"] < y["after"]
                            tot += 1
                row.append(f"{win}/{tot}" if tot else "–")
            for m in ("brecq", "waps", "qdrop+waps"):
                t = [r["sec_per_iter"] * 1000 for r in runs if r["model"] == model and r["config"] == c and r["method"] == m]
                row.append(f"{statistics.fmean(t):.1f} ms" if t else "–")
            if any(v != "–" for v in row[2:]):
                lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines + compiled_section(runs)) + "\n"


def compiled_section(runs: list[dict] | None = None) -> list[str]:
    """The deployed model's accuracy: the compiled integer program (bench/cpu.py results,
    then the runs of this benchmark made with --compile)."""
    path = RESULTS / "cpu.json"
    out = _cpu_compiled(json.loads(path.read_text())["rows"]) if path.exists() else []
    mine = sorted((r for r in runs or [] if "compiled" in r),
                  key=lambda r: (list(MODELS).index(r["model"]), list(CONFIGS).index(r["config"]),
                                 METHODS.index(r["method"]), r["seed"]))
    if mine:
        out += ["", "## The compiled integer model, per method (`--compile`)", "",
                "Each artifact above that was run with `--compile`, compiled for llvm (fast form) and run",
                "by the TVM runtime over the full test set: its top-1, the fake-quant model's, and the",
                "fraction of images on which their top-1 agree.", "",
                "| model | config | method | seed | compiled top-1 | fake-quant top-1 | top-1 agreement |",
                "|---|---|---|---|---|---|---|"]
        for r in mine:
            c = r["compiled"]
            out.append(f"| {r['model']} | {r['config']} | {LABEL[r['method']]} | {r['seed']} | "
                       f"{c['compiled_top1']:.2f} | {c['fakequant_top1']:.2f} | {c['agreement']:.2f} % |")
    return out


def _cpu_compiled(rows: list[dict]) -> list[str]:
    out = ["", "## The compiled integer model (TVM llvm build of the .waps, BRECQ+WAPS, seed 0)", "",
           "What a user deploys: top-1 of the integer-only program (`waps-tvm compile`, run by the TVM",
           "runtime) over the full test set, beside the fake-quant model of the same artifact, and the",
           "fraction of images on which their top-1 agree (from `bench/cpu.py`).", "",
           "| model | config | compiled top-1 | fake-quant top-1 | top-1 agreement |", "|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['config']} | {r['compiled_top1']:.2f} | {r['fakequant_top1']:.2f} | "
                   f"{r['agreement']:.2f} % |")
    return out


def _fmt(v: list[float]) -> str:
    if not v:
        return "–"
    if len(v) == 1:
        return f"{v[0]:.2f}"
    return f"{statistics.fmean(v):.2f} ± {statistics.stdev(v):.2f}"


def plot_groups(row: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    h = row["group_history"]
    probs = np.array(h["probs"])                    # [snapshots, units, g]
    assigned = np.array(h["assignment"])
    steps = np.linspace(0, row["iters"] * 0.8, probs.shape[0])
    fig, ax = plt.subplots(figsize=(7, 4))
    for i in range(probs.shape[1]):
        ax.plot(steps, probs[:, i, assigned[i]], lw=0.8, color=f"C{assigned[i]}", alpha=0.7)
    ax.set_xlabel("calibration iteration")
    ax.set_ylabel("s(R) of the channel's final group")
    ax.set_title(f"WAPS group probabilities converging: {row['model']} {h['layer']} ({row['config']})")
    ax.set_ylim(-0.02, 1.02)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--methods", nargs="+", default=None, choices=METHODS,
                   help="default: each model's plan per config (PLAN, PLAN_BY_MODEL)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--lam", type=float, default=0.1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--fresh", action="store_true", help="ignore earlier results")
    p.add_argument("--compile", action="store_true",
                   help="also compile each run's artifact for llvm and record its top-1 and agreement")
    p.add_argument("--report-only", action="store_true",
                   help="no new runs: rewrite accuracy.md and the plot from accuracy.json")
    args = p.parse_args(argv)
    from tqdm import tqdm

    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "accuracy.json"
    results = json.loads(out.read_text()) if out.exists() and not args.fresh else {"runs": [], "float": {}}
    setup = (f"{args.iters} iterations per block (paper/BRECQ: 20k), {args.samples} calibration "
             f"samples, batch 32, λ = {args.lam}, γ^G = (1, 1−2⁻⁴, 1+2⁻⁴), tile 16, "
             f"{args.workers} worker processes × 1 thread on a 2-core CPU")
    if not args.report_only:
        # a run of some models only records its setup beside them, leaving the others' as it was
        if set(args.models) == set(MODELS) or "setup" not in results:
            results["setup"] = setup
        for m in args.models:
            results.setdefault("setup_by_model", {})[m] = setup
    for m in args.models:
        if m not in results["float"]:
            results["float"][m] = float_accuracy(m)
    done = {key(r) for r in results["runs"] if r["iters"] == args.iters and r["samples"] == args.samples
            and ("compiled" in r or not args.compile)}
    # W2A4 first (all seeds), then the other configurations seed by seed, slowest model
    # first, so an interrupted run still holds the acceptance table
    order = sorted(((0 if c == "W2A4" else 1 + s, s, c) for c in args.configs for s in args.seeds))
    jobs = [] if args.report_only else [(m, c, meth, s) for _, s, c in order for m in reversed(args.models)
            for meth in (args.methods or plan(m, c)) if (m, c, meth, s) not in done]
    with ProcessPoolExecutor(args.workers) as pool, tqdm(total=len(jobs), desc="accuracy runs") as bar:
        futs = {pool.submit(run_one, *j, args.iters, args.samples, args.lam, compile=args.compile,
                            workers=args.workers): j
                for j in jobs}
        for f in as_completed(futs):
            row = f.result()
            results["runs"] = [r for r in results["runs"] if key(r) != key(row)] + [row]
            _atomic_json(out, results)
            bar.update(1)
            bar.set_postfix_str(f"{row['model']} {row['config']} {row['method']} s{row['seed']}: {row['top1'] * 100:.2f}%")
    if "fashion_resnet" in args.models and "waps" in (args.methods or PLAN["W2A4"]):
        row = run_one("fashion_resnet", "W2A4", "waps", 0, args.iters, args.samples, args.lam, record_groups=True)
        plot_groups(row, RESULTS / "group_convergence.png")
    (RESULTS / "accuracy.md").write_text(summarise(results))
    print(summarise(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
