"""What kernel fusion gains on the CPU (codegen/cpu_fusion.py), measured alone and end to end:
residual adds computed in the epilogue of the fast conv that feeds them ('residual-adds'), and
each pointwise expansion run with the depthwise conv that reads it ('expand-depthwise').

Per fusion, model and precision (batch 1, llvm, this machine's dot product, all cores), side
by side in one process and in interleaved rounds so that a machine that speeds up or slows
down moves both:
  * per fused pair: the fused kernel against the pair's two kernels (each TIR PrimFunc of the
    built module run alone on random codes, median of its calls);
  * the whole model built with that fusion against the same model built without it; the two
    builds' outputs are compared code for code on one input (``bit_exact``).
Models: torchvision ResNet-18 (residual adds only: it has no depthwise conv) and MobileNetV2 at
224×224 (random weights, RTN-calibrated and given random tile-granular WAPS groups as
bench/cpu_ort.py does; latency only).
Writes bench/results/cpu_fusion.json, cpu_fusion.md and cpu_fusion.png.

    python -m bench.cpu_fusion [--fusions residual-adds expand-depthwise]
                               [--models resnet18 mobilenet_v2] [--precisions W8A8 W4A4]
                               [--rounds 12] [--repeat 20]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("resnet18", "mobilenet_v2")
FUSIONS = ("residual-adds", "expand-depthwise")
HAS_PAIRS = {"residual-adds": MODELS, "expand-depthwise": ("mobilenet_v2",)}     # models with such pairs


def _kernel(mod, name: str):
    """The PrimFunc ``name`` of ``mod`` compiled alone, with random arguments."""
    import tvm
    from targets.cpu import llvm_target
    from waps_tvm.tuning import _random_args
    func = next(f for gv, f in mod.functions.items() if gv.name_hint == name)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=llvm_target("llvm"))
    return lib.mod, _random_args(func, tvm.cpu())


def _pair(f) -> tuple[str, str, str]:
    """(first op, second op, the fused kernel's name) of a fused pair."""
    from codegen.cpu_fusion import ResidualFusion
    if isinstance(f, ResidualFusion):
        return f.conv, f.add, f"{f.conv}_add_kernel"
    return f.conv, f.depthwise, f"{f.conv}__{f.depthwise}_kernel"


def measure(fusion: str, name: str, precision: str, rounds: int, repeat: int) -> dict:
    """One row: its pairs (first and second op, ms of each kernel and of the fused one, and
    fused ÷ (first + second)) and the fused and unfused whole-model ms (medians over
    ``rounds`` interleaved rounds)."""
    import tvm
    from tvm import relax
    from bench.cpu import _time as median_ms
    from bench.cpu_ort import Calibration, artifact
    from waps_tvm.compiler import build, lower_artifact
    art = artifact(name, precision, Calibration())
    x = np.random.default_rng(0).random((1, 3, 224, 224)).astype("float32")
    builds = {}
    for fuse in (False, True):
        low = lower_artifact(art, 1, "fast")
        vm = relax.VirtualMachine(build(low, "llvm", fuse=(fusion,) if fuse else ()), tvm.cpu())
        xt = tvm.runtime.tensor(x)
        builds[fuse] = (low, vm, xt, [o.numpy() for o in vm["main"](xt)])
    fused_low = builds[True][0]
    exact = all(np.array_equal(a, b) for a, b in zip(builds[False][3], builds[True][3]))
    unfused_mod, fused_mod = builds[False][0].final, fused_low.final
    kernels = {}
    for f in fused_low.fusions:
        first, second, fused = _pair(f)
        kernels[f] = (_kernel(unfused_mod, f"{first}_kernel"), _kernel(unfused_mod, f"{second}_kernel"),
                      _kernel(fused_mod, fused))
    times = {f: ([], [], []) for f in kernels}
    model_ms = {False: [], True: []}
    for r in range(rounds):
        for f, ks in kernels.items():
            for (lib, args), acc in zip(ks, times[f]):
                acc.append(median_ms(lambda: lib["main"](*args), repeat))
        for fuse in ((False, True) if r % 2 == 0 else (True, False)):      # ABBA: drift cancels
            _, vm, xt, _ = builds[fuse]
            model_ms[fuse].append(median_ms(lambda: vm["main"](xt), repeat))
    pairs = []
    for f, (first, second, fused) in times.items():
        a, b, _ = _pair(f)
        op = fused_low.program[b]
        t1, t2, u = (float(np.median(t)) for t in (first, second, fused))
        ratio = float(np.median([z / (x + y) for x, y, z in zip(first, second, fused)]))
        pair = {"first": a, "second": b, "shape": list(op.shape), "groups": fused_low.program[a].n_groups,
                "first_ms": t1, "second_ms": t2, "fused_ms": u, "ratio": ratio}
        if fusion == "expand-depthwise":                   # the split the fused kernel was built with
            from relay_passes.fast_kernels import default_tasks
            conv = fused_low.program[a]
            tasks = default_tasks(conv, fused_low.program.shape_of(conv.inputs[0]), op)
            pair["tasks"] = [tasks.bands, tasks.chunks]
        pairs.append(pair)
    unfused, fused = (float(np.median(model_ms[k])) for k in (False, True))
    ratios = [b / a for a, b in zip(model_ms[False], model_ms[True])]
    second_kind = "add" if fusion == "residual-adds" else "conv2d"
    candidates = [o for o in fused_low.program.ops if o.kind == second_kind
                  and (fusion == "residual-adds" or o.attrs.conv_groups > 1)]
    return {"fusion": fusion, "model": name, "precision": precision, "bit_exact": exact, "pairs": pairs,
            "rounds": rounds, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "candidates": len(candidates),
            "unfused_ms": unfused, "fused_ms": fused, "ratio": float(np.median(ratios)),
            "ratio_range": [float(min(ratios)), float(max(ratios))]}


TITLES = {"residual-adds": ("Residual adds in the conv epilogue", "adds", "conv → add", "conv ms", "add ms"),
          "expand-depthwise": ("Pointwise expansion with its depthwise conv", "depthwise convs",
                               "expansion → depthwise", "expansion ms", "depthwise ms")}
NOT_FUSED = {"residual-adds": "Adds not fused: a conv output read by something else too, or with output channels "
                              "not a multiple of 16 (MobileNetV2's 24-channel block).",
             "expand-depthwise": "Depthwise convs not fused: MobileNetV2's first, which reads the stem's 3×3 conv "
                                 "(not a pointwise expansion)."}


def report(rows: list[dict], meta: dict) -> str:
    lines = ["# Kernel fusion on the CPU (llvm fast form)", "",
             f"{meta['machine']}, batch 1, {meta['threads']} threads, 224×224 torchvision models (random weights, "
             "RTN, random tile-granular WAPS groups). Same precision on both sides of every ratio; the "
             f"fused and unfused builds are timed in the same process in {meta['rounds']} interleaved rounds "
             f"of {meta['repeat']} calls (median), fused and unfused in ABBA order; a ratio is the median of "
             "the rounds' ratios (range in brackets). < 1: fusion is faster.", ""]
    for fusion in FUSIONS:
        mine = [r for r in rows if r["fusion"] == fusion]
        if not mine:
            continue
        title, what, pair, first, second = TITLES[fusion]
        lines += [f"## {title} (`--fuse {fusion}`)", "", "### Whole model", "",
                  f"| model | precision | {what} | fused | unfused ms | fused ms | fused ÷ unfused | bit-exact |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in mine:
            lines.append(f"| {r['model']} | {r['precision']} | {r['candidates']} | {len(r['pairs'])} | "
                         f"{r['unfused_ms']:.3f} | {r['fused_ms']:.3f} | {r['ratio']:.3f} "
                         f"[{r['ratio_range'][0]:.3f}–{r['ratio_range'][1]:.3f}] | "
                         f"{'yes' if r['bit_exact'] else '**no**'} |")
        split = fusion == "expand-depthwise"
        lines += ["", NOT_FUSED[fusion], "", "### Each pair alone", "",
                  f"| model | precision | {pair} | output (NCHW) | groups |{' bands × chunks |' if split else ''} "
                  f"{first} | {second} | fused ms | fused ÷ (sum) |", "|" + "---|" * (9 + split)]
        for r in mine:
            for p in r["pairs"]:
                shape = "×".join(str(d) for d in p["shape"][1:])
                tasks = f" {p['tasks'][0]} × {p['tasks'][1]} |" if split else ""
                lines.append(f"| {r['model']} | {r['precision']} | {p['first']} → {p['second']} | {shape} | "
                             f"{p['groups']} |{tasks} {p['first_ms']:.4f} | {p['second_ms']:.4f} | "
                             f"{p['fused_ms']:.4f} | {p['ratio']:.3f} |")
        wins = sum(p["ratio"] < 1 for r in mine for p in r["pairs"])
        total = sum(len(r["pairs"]) for r in mine)
        lines += ["", f"Fused kernel faster than its two kernels in {wins} of {total} pairs.", ""]
    lines += ["![fusion](cpu_fusion.png)", ""]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(FUSIONS), 1, figsize=(9, 7))
    for ax, fusion in zip(axes, FUSIONS):
        labels, values = [], []
        for r in rows:
            if r["fusion"] != fusion:
                continue
            for p in r["pairs"]:
                labels.append(f"{r['model']} {r['precision']}\n{p['second']}")
                values.append(p["ratio"])
        ax.bar(range(len(values)), values, color=["tab:green" if v < 1 else "tab:red" for v in values])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(values)), labels, rotation=90, fontsize=5)
        ax.set_ylabel("fused ÷ (sum)")
        ax.set_title(f"--fuse {fusion}, per pair (< 1: fusion wins)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _merged(rows: list[dict], path: Path) -> list[dict]:
    """``rows`` and the rows of ``path`` (an earlier run) that they do not replace (same fusion,
    model and precision), in the order fusion, model, precision."""
    key = lambda r: (r["fusion"], r["model"], r["precision"])        # noqa: E731
    old = json.loads(path.read_text())["rows"] if path.exists() else []
    new = {key(r): r for r in rows}
    kept = [r for r in old if "fusion" in r and key(r) not in new]
    order = {f: i for i, f in enumerate(FUSIONS)}
    wbits = lambda r: -int(r["precision"][1:].split("A")[0])             # noqa: E731 (W8A8 first)
    return sorted(kept + rows, key=lambda r: (order[r["fusion"]], MODELS.index(r["model"]), wbits(r)))


def main(argv=None) -> int:
    import tvm
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fusions", nargs="+", default=list(FUSIONS), choices=FUSIONS)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--precisions", nargs="+", default=["W8A8", "W4A4"])
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--repeat", type=int, default=20)
    args = p.parse_args(argv)
    from waps_tvm.runner import use_all_cores
    use_all_cores()
    from tqdm import tqdm
    runs = [(f, m, p) for f in args.fusions for m in args.models if m in HAS_PAIRS[f] for p in args.precisions]
    rows = [measure(f, m, prec, args.rounds, args.repeat) for f, m, prec in tqdm(runs, desc="fusion")]
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {tvm.target.codegen.llvm_get_system_cpu()}",
            "threads": len(os.sched_getaffinity(0)), "rounds": args.rounds, "repeat": args.repeat}
    RESULTS.mkdir(exist_ok=True)
    rows = _merged(rows, RESULTS / "cpu_fusion.json")
    (RESULTS / "cpu_fusion.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (RESULTS / "cpu_fusion.md").write_text(report(rows, meta))
    plot(rows, RESULTS / "cpu_fusion.png")
    print(report(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
