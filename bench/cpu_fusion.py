"""What epilogue fusion gains on the CPU: each residual add computed in the epilogue of the fast
conv that feeds it (codegen/cpu_fusion.py), measured alone and end to end.

Per model and precision (batch 1, llvm, this machine's dot product, all cores), side by side in
one process and in interleaved rounds so that a machine that speeds up or slows down moves both:
  * per fused pair: the fused kernel against the conv's kernel plus the add's kernel (each
    TIR PrimFunc of the built module run alone on random codes, median of its calls);
  * the whole model built with fusion against the same model built without it; the two
    builds' outputs are compared code for code on one input (``bit_exact``).
Models: torchvision ResNet-18 and MobileNetV2 at 224×224 (random weights, RTN-calibrated and
given random tile-granular WAPS groups as bench/cpu_ort.py does; latency only).
Writes bench/results/cpu_fusion.json, cpu_fusion.md and cpu_fusion.png.

    python -m bench.cpu_fusion [--models resnet18 mobilenet_v2] [--precisions W8A8 W4A4]
                               [--rounds 5] [--repeat 20]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("resnet18", "mobilenet_v2")


def _kernel(mod, name: str):
    """The PrimFunc ``name`` of ``mod`` compiled alone, with random arguments."""
    import tvm
    from targets.cpu import llvm_target
    from waps_tvm.tuning import _random_args
    func = next(f for gv, f in mod.functions.items() if gv.name_hint == name)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=llvm_target("llvm"))
    return lib.mod, _random_args(func, tvm.cpu())


def measure(name: str, precision: str, rounds: int, repeat: int) -> dict:
    """One model's row: its pairs (conv, add, ms of conv, add, fused, and fused ÷ (conv + add))
    and the fused and unfused whole-model ms (medians over ``rounds`` interleaved rounds)."""
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
        vm = relax.VirtualMachine(build(low, "llvm", fuse=fuse), tvm.cpu())
        xt = tvm.runtime.tensor(x)
        builds[fuse] = (low, vm, xt, [o.numpy() for o in vm["main"](xt)])
    fused_low = builds[True][0]
    exact = all(np.array_equal(a, b) for a, b in zip(builds[False][3], builds[True][3]))
    unfused_mod, fused_mod = builds[False][0].final, fused_low.final
    kernels = {}
    for f in fused_low.fusions:
        kernels[f] = (_kernel(unfused_mod, f"{f.conv}_kernel"), _kernel(unfused_mod, f"{f.add}_kernel"),
                      _kernel(fused_mod, f"{f.conv}_add_kernel"))
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
    for f, (conv, add, fused) in times.items():
        op = fused_low.program[f.conv]
        c, a, u = (float(np.median(t)) for t in (conv, add, fused))
        ratio = float(np.median([z / (x + y) for x, y, z in zip(conv, add, fused)]))
        pairs.append({"conv": f.conv, "add": f.add, "shape": list(op.shape), "groups": op.n_groups,
                      "conv_ms": c, "add_ms": a, "fused_ms": u, "ratio": ratio})
    unfused, fused = (float(np.median(model_ms[k])) for k in (False, True))
    ratios = [b / a for a, b in zip(model_ms[False], model_ms[True])]
    return {"model": name, "precision": precision, "bit_exact": exact, "pairs": pairs,
            "adds": sum(op.kind == "add" for op in fused_low.program.ops),
            "unfused_ms": unfused, "fused_ms": fused, "ratio": float(np.median(ratios)),
            "ratio_range": [float(min(ratios)), float(max(ratios))]}


def report(rows: list[dict], meta: dict) -> str:
    lines = ["# Residual adds fused into the conv epilogue (CPU, llvm fast form)", "",
             f"{meta['machine']}, batch 1, {meta['threads']} threads, 224×224 torchvision models (random weights, "
             "RTN, random tile-granular WAPS groups). Same precision on both sides of every ratio; the "
             f"fused and unfused builds are timed in the same process in {meta['rounds']} interleaved rounds "
             f"of {meta['repeat']} calls (median), fused and unfused in ABBA order; a ratio is the median of "
             "the rounds' ratios (range in brackets). < 1: fusion is faster.", "",
             "## Whole model", "",
             "| model | precision | adds | fused | unfused ms | fused ms | fused ÷ unfused | bit-exact |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['precision']} | {r['adds']} | {len(r['pairs'])} | {r['unfused_ms']:.3f} | "
                     f"{r['fused_ms']:.3f} | {r['ratio']:.3f} [{r['ratio_range'][0]:.3f}–{r['ratio_range'][1]:.3f}] | "
                     f"{'yes' if r['bit_exact'] else '**no**'} |")
    lines += ["", "Adds not fused: a conv output read by something else too, or with output channels not a "
              "multiple of 16 (MobileNetV2's 24-channel block).", "",
              "## Each pair alone", "",
              "| model | precision | conv → add | output (NCHW) | groups | conv ms | add ms | fused ms | fused ÷ (conv + add) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for p in r["pairs"]:
            shape = "×".join(str(d) for d in p["shape"][1:])
            lines.append(f"| {r['model']} | {r['precision']} | {p['conv']} → {p['add']} | {shape} | {p['groups']} | "
                         f"{p['conv_ms']:.4f} | {p['add_ms']:.4f} | {p['fused_ms']:.4f} | {p['ratio']:.3f} |")
    wins = sum(p["ratio"] < 1 for r in rows for p in r["pairs"])
    total = sum(len(r["pairs"]) for r in rows)
    lines += ["", f"Fused kernel faster than its two kernels in {wins} of {total} pairs.", "",
              "![fusion](cpu_fusion.png)", ""]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4))
    labels, values = [], []
    for r in rows:
        for p in r["pairs"]:
            labels.append(f"{r['model']} {r['precision']}\n{p['add']}")
            values.append(p["ratio"])
    ax.bar(range(len(values)), values, color=["tab:green" if v < 1 else "tab:red" for v in values])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(values)), labels, rotation=90, fontsize=6)
    ax.set_ylabel("fused ÷ (conv + add)")
    ax.set_title("Residual add in the conv epilogue, per pair (< 1: fusion wins)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    import tvm
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--precisions", nargs="+", default=["W8A8", "W4A4"])
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--repeat", type=int, default=20)
    args = p.parse_args(argv)
    from waps_tvm.runner import use_all_cores
    use_all_cores()
    from tqdm import tqdm
    rows = [measure(m, prec, args.rounds, args.repeat)
            for m, prec in tqdm([(m, p) for m in args.models for p in args.precisions], desc="fusion")]
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {tvm.target.codegen.llvm_get_system_cpu()}",
            "threads": len(os.sched_getaffinity(0)), "rounds": args.rounds, "repeat": args.repeat}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cpu_fusion.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (RESULTS / "cpu_fusion.md").write_text(report(rows, meta))
    plot(rows, RESULTS / "cpu_fusion.png")
    print(report(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
