"""CPU benchmark of the compiled integer models (llvm, this machine), one run, ratios.

For each benchmark model (calibrated W2A4 BRECQ+WAPS like the accuracy table, and W4A4):
  * latency at batch 1: PyTorch fp32 eager, TVM fp32 (the float Relax import built
    for llvm), the TVM integer model with WAPS groups in split and fused form, and the
    same integer model without groups (the artifact with its groups removed);
  * the compiled model's own top-1 on the full test set (what a user deploys), the
    fake-quant model's, and their top-1 agreement.
Writes bench/results/cpu.json and cpu.md.

    python -m bench.cpu [--models ...] [--iters 300] [--repeat 50]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from bench.accuracy import MODELS, load_model

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(__file__).resolve().parent / ".cache"
CONFIGS = {"W2A4": (2, 4), "W4A4": (4, 4), "W8A8": (8, 8)}
DEFAULT_CONFIGS = ("W2A4", "W4A4")     # what bench/results/cpu.md reports; W8A8 is for bench/cpu_ort.py


def artifact_for(name: str, config: str, iters: int, samples: int):
    """Calibrated artifact (BRECQ+WAPS, seed 0), cached under bench/.cache."""
    from calib.artifact import load
    from calib.config import CalibConfig
    from waps_tvm import api
    from waps_tvm.datasets import load_dataset
    path = CACHE / f"{name}_{config}_{iters}.waps"
    if path.exists():
        return load(path)
    model = load_model(name)
    wb, ab = CONFIGS[config]
    lam = 0.1 if config == "W2A4" else None
    data = load_dataset(MODELS[name], "calib", n=samples, seed=0, input_shape=(1, 28, 28))
    _, art = api.quantize(model, data.x, CalibConfig(wbits=wb, abits=ab, method="waps", iters=iters,
                                                     samples=samples, lam=lam, progress=True))
    api.save_artifact(art, path)
    return art


def without_groups(art):
    plain = copy.deepcopy(art)
    for rec in plain.layers.values():
        rec.groups, rec.group_scales = None, []
    return plain


def _time(fn, repeat: int, warmup: int = 1) -> float:
    """Median milliseconds of ``repeat`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1000


def _vm(ex):
    import tvm
    return tvm.runtime.vm.VirtualMachine(ex, tvm.cpu())


def latency(name: str, art, repeat: int) -> dict:
    import tvm
    from tvm import relax

    from targets.cpu import llvm_target
    from waps_tvm.compiler import build, lower_artifact
    from waps_tvm.frontend import to_relax
    shape = (1, *art.graph.input.attrs["shape"])
    x = np.random.default_rng(0).normal(size=shape).astype("float32")
    xt = tvm.runtime.tensor(x)
    row = {}
    module = load_model(name).eval()
    with torch.no_grad():
        xs = torch.from_numpy(x)
        row["pytorch_fp32_ms"] = _time(lambda: module(xs), repeat)
    with tvm.transform.PassContext(opt_level=3):
        fp32 = _vm(relax.build(to_relax(art, 1), target=llvm_target("llvm")))
    row["tvm_fp32_ms"] = _time(lambda: fp32["main"](xt), repeat)
    for label, a, form in (("int_split", art, "split"), ("int_fused", art, "fused"),
                           ("int_nogroups", without_groups(art), "split")):
        low = lower_artifact(a, 1, form)
        vm = _vm(build(low))
        row[f"tvm_{label}_ms"] = _time(lambda: vm["main"](xt), repeat)
        if label == "int_split":
            row["gathers"] = low.permute.gathers
            row["waps_layers"] = low.legalize.legalized
    return row


def accuracy(name: str, art, batch: int = 500) -> dict:
    import tvm

    from calib.fakequant import build_fake_quant
    from waps_tvm.compiler import build, lower_artifact
    from waps_tvm.datasets import load_dataset
    test = load_dataset(MODELS[name], "test", input_shape=tuple(art.graph.input.attrs["shape"]))
    vm = _vm(build(lower_artifact(art, batch, "fused")))
    n = len(test.x) // batch * batch
    got = np.concatenate([vm["main"](tvm.runtime.tensor(test.x[i:i + batch].numpy()))[0].numpy()
                          for i in range(0, n, batch)])
    with torch.no_grad():
        fq = torch.cat([build_fake_quant(art)(test.x[i:i + 1000]) for i in range(0, n, 1000)]).numpy()
    y = test.y[:n].numpy()
    return {"images": n, "compiled_top1": float((got.argmax(1) == y).mean() * 100),
            "fakequant_top1": float((fq.argmax(1) == y).mean() * 100),
            "agreement": float((got.argmax(1) == fq.argmax(1)).mean() * 100)}


def report(rows: list[dict]) -> str:
    lines = ["# CPU latency and compiled accuracy (llvm, batch 1, this machine)", "",
             "Median of the runs; ratios are against the TVM integer model without groups (same "
             "artifact, groups removed) and against TVM fp32 of the same float model. Top-1 on the "
             "full test set: the compiled integer model, the fake-quant PyTorch model, and their "
             "top-1 agreement.", "",
             "| model | config | PyTorch fp32 ms | TVM fp32 ms | TVM int no-groups ms | WAPS split ms | "
             "WAPS fused ms | split/no-groups | fused/no-groups | int/fp32 TVM | gathers | "
             "compiled top-1 | fake-quant top-1 | agreement |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ng = r["tvm_int_nogroups_ms"]
        best = min(r["tvm_int_split_ms"], r["tvm_int_fused_ms"])
        lines.append(
            f"| {r['model']} | {r['config']} | {r['pytorch_fp32_ms']:.3f} | {r['tvm_fp32_ms']:.3f} | {ng:.3f} | "
            f"{r['tvm_int_split_ms']:.3f} | {r['tvm_int_fused_ms']:.3f} | {r['tvm_int_split_ms'] / ng:.2f}× | "
            f"{r['tvm_int_fused_ms'] / ng:.2f}× | {best / r['tvm_fp32_ms']:.2f}× | {r['gathers']} | "
            f"{r['compiled_top1']:.2f} | {r['fakequant_top1']:.2f} | {r['agreement']:.2f} % |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), choices=list(CONFIGS))
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--repeat", type=int, default=50)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    from waps_tvm.runner import use_all_cores
    use_all_cores()
    CACHE.mkdir(exist_ok=True)
    rows = []
    for name in args.models:
        for config in args.configs:
            art = artifact_for(name, config, args.iters, args.samples)
            row = {"model": name, "config": config, **latency(name, art, args.repeat), **accuracy(name, art)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    RESULTS.mkdir(exist_ok=True)
    meta = {"machine": f"{os.cpu_count()} cores", "torch_threads": 2, "iters": args.iters,
            "repeat": args.repeat}
    (RESULTS / "cpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (RESULTS / "cpu.md").write_text(report(rows))
    print(report(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
