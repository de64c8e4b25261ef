"""ViT-B/16 on npu16: where the inference time goes, with and without the row unit.

torchvision's ViT-B/16 (random weights, seed 0, 10 classes) at 224×224 is calibrated W8A8
(BRECQ+WAPS, 1 iteration on 2 random samples: only the integer program's shapes matter here)
and compiled for npu16; the report (``waps_tvm.report.build``, the cost model the tests hold
equal to the simulator's counters) is then re-costed (``report.recost``) for the default
machine and the paper's four arrays, each with the row unit (softmax and layer norm on the
NPU, docs/npu16.md) and without it (they run on the modelled host, targets/npu16/host_cost.py).

    python -m bench.vit_npu16            # → bench/results/vit_npu16.{md,json,png}

Batch 1. Times are model estimates at the configs' clocks (NPU 800 MHz, host 1200 MHz), not
measurements.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SIZE = 224


def program():
    """The integer program of the calibrated ViT-B/16 (npu16 lowering, batch 1)."""
    import torch
    from torchvision.models.vision_transformer import VisionTransformer

    from tests.compile_helpers import calibrated
    from waps_tvm.compiler import lower_artifact
    torch.manual_seed(0)
    model = VisionTransformer(image_size=SIZE, patch_size=16, num_layers=12, num_heads=12, hidden_dim=768,
                              mlp_dim=3072, num_classes=10).eval()
    art = calibrated(model, (3, SIZE, SIZE), wbits=8, abits=8, iters=1, samples=2)
    return lower_artifact(art, 1, "split", target="npu16").program


def run(prog=None, model: str = "torchvision vit_b_16, random weights, 224×224, W8A8, batch 1") -> dict:
    """Rows per machine and row unit for ``prog`` (default: ``program()``, ViT-B/16)."""
    from codegen.npu16.byoc import placement
    from targets.npu16.params import DEFAULT, PAPER
    from waps_tvm import report
    prog = prog if prog is not None else program()
    base = report.build(prog, placement(None, DEFAULT, prog), "npu16", DEFAULT)
    rows = []
    for machine, npu in (("default (1 array)", DEFAULT), ("paper (4 arrays)", PAPER)):
        for unit in (True, False):
            rep = report.recost(json.loads(json.dumps(base)), replace(npu, row_unit=unit))
            t = rep["ops"]
            norms = [r for r in t if r["kind"] in ("softmax", "layer_norm")]
            norm_us = sum(r["npu16"]["time_us"] if "npu16" in r else r["host"]["time_us"] for r in norms)
            tot = rep["totals"]
            rows.append({"machine": machine, "row_unit": unit, "npu_us": tot["npu_time_us"],
                         "host_us": tot["host_time_us"], "total_us": tot["total_time_us"],
                         "host_share": tot["host_share"], "softmax_norm_us": norm_us,
                         "softmax_norm_ops": len(norms),
                         "host_kinds": sorted({r["kind"] for r in t if r["target"] != "npu16"})})
    for r in rows:
        off = next(o for o in rows if o["machine"] == r["machine"] and not o["row_unit"])
        r["speedup_vs_no_row_unit"] = off["total_us"] / r["total_us"]
    return {"model": model, "rows": rows}


def render(res: dict) -> str:
    head = ["machine", "row unit", "NPU ms", "host ms", "total ms", "on the host", "softmax + layer norm ms",
            "ops on the host", "total vs no row unit"]
    body = [[r["machine"], "yes" if r["row_unit"] else "no", f"{r['npu_us'] / 1e3:.2f}", f"{r['host_us'] / 1e3:.2f}",
             f"{r['total_us'] / 1e3:.2f}", f"{100 * r['host_share']:.1f} %", f"{r['softmax_norm_us'] / 1e3:.2f}",
             ", ".join(r["host_kinds"]), f"×{r['speedup_vs_no_row_unit']:.2f}"] for r in res["rows"]]
    return (f"# ViT-B/16 on npu16: the row unit\n\n{res['model']}; the cost model's estimate per inference "
            f"(`python -m bench.vit_npu16`). Without the row unit the {res['rows'][0]['softmax_norm_ops']} softmaxes "
            "and layer norms run on the modelled host (a Cortex-A53-class core, `params.Host`).\n\n"
            + "\n".join(f"| {' | '.join(r)} |" for r in [head, ["---"] * len(head), *body]) + "\n")


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = res["rows"]
    labels = [f"{r['machine']}\n{'row unit' if r['row_unit'] else 'no row unit'}" for r in rows]
    npu = [r["npu_us"] / 1e3 for r in rows]
    host = [r["host_us"] / 1e3 for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(labels, npu, label="NPU")
    ax.bar(labels, host, bottom=npu, label="host")
    ax.set_ylabel("ms per inference")
    ax.set_title("ViT-B/16 224×224 W8A8 on npu16 (cost model)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    res = run()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vit_npu16.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / "vit_npu16.md").write_text(render(res))
    plot(res, args.out / "vit_npu16.png")
    print(render(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
