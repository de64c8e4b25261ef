"""npu16 design sweep: SRAM size × MAC arrays on ResNet-18 and MobileNetV2 at 224×224.

What a hardware engineer asks of the model: how many cycles and how much off-chip traffic
does each design point cost? Every node of the captured graph (batch 1, int8, no WAPS groups)
is costed with the npu16 cost model (bench/graph_cost.py; tests hold it equal to the
simulator's counters) on the default npu16 with the weight and activation SRAM both set
to S KiB and A arrays. A layer whose smallest stripe does not fit S is counted as not
runnable (the compiler would leave it on the host) and the point is marked.

    python -m bench.npu16_sweep [--models resnet18 mobilenet_v2] [--sram 16 32 64 128 256 512 1024]
                                [--arrays 1 2 4] [--config FILE]
writes bench/results/npu16_sweep.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from bench.graph_cost import node_cost
from targets.npu16.memory import SramTooSmall
from targets.npu16.params import DEFAULT, load_config

RESULTS = Path(__file__).resolve().parent / "results"


def point(graph, npu) -> dict:
    """Totals of one design point: cycles, off-chip bytes, MAC utilisation, unrunnable layers."""
    cycles = read = write = macs = 0
    misfits = []
    for node in graph:
        try:
            c = node_cost(graph, node, npu)
        except SramTooSmall:
            misfits.append(node.name)
            continue
        if c is None:
            continue
        cycles += c.cycles
        read += c.bytes["weights"] + c.bytes["input"]
        write += c.bytes["output"]
        macs += c.macs
    return {"cycles": cycles, "time_ms": cycles / npu.clock_mhz / 1e3, "offchip_mb": (read + write) / 1e6,
            "utilisation": macs / max(cycles * npu.tile ** 2 * npu.arrays, 1), "misfits": misfits}


def sweep(model: str, base, srams: list[int], arrays: list[int]) -> list[dict]:
    from bench.vela import graph_of
    graph = graph_of(model, 224, 0)
    rows = []
    for a in arrays:
        for s in srams:
            npu = replace(base, arrays=a, sram_weight_kib=s, sram_act_kib=s)
            rows.append({"model": model, "arrays": a, "sram_kib": s, **point(graph, npu)})
    return rows


def markdown(rows: list[dict], base) -> str:
    out = ["# npu16 design sweep: SRAM × MAC arrays (224×224, batch 1, int8)", "",
           f"Base machine: {json.dumps(base.to_config())}; weight and activation SRAM both set to the "
           "column's size. Cycles and off-chip MB from the npu16 cost model over every node of the captured "
           "graph (`python -m bench.npu16_sweep`). A point where some layer's smallest stripe does not fit "
           "(one output row of every input channel, or one output tile's weights) shows how many.", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        srams = sorted({r["sram_kib"] for r in mine})
        out += [f"## {model}", "", "| arrays | " + " | ".join(f"{s} KiB" for s in srams) + " |",
                "|---|" + "---|" * len(srams)]
        for a in sorted({r["arrays"] for r in mine}):
            cells = []
            for s in srams:
                r = next(r for r in mine if r["arrays"] == a and r["sram_kib"] == s)
                if r["misfits"]:
                    cells.append(f"– ({len(r['misfits'])} layers do not fit)")
                else:
                    cells.append(f"{r['cycles'] / 1e6:.2f} M, {r['offchip_mb']:.1f} MB, {r['utilisation']:.0%}")
            out.append(f"| {a} | " + " | ".join(cells) + " |")
        out.append("")
    out.append("Cells: cycles, off-chip traffic, MAC utilisation.")
    return "\n".join(out) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 7), squeeze=False)
    for j, model in enumerate(models):
        for a in sorted({r["arrays"] for r in rows}):
            pts = sorted((r for r in rows if r["model"] == model and r["arrays"] == a and not r["misfits"]),
                         key=lambda r: r["sram_kib"])
            axes[0][j].semilogx([r["sram_kib"] for r in pts], [r["cycles"] / 1e6 for r in pts], "o-", base=2,
                                label=f"{a} array(s)")
            axes[1][j].semilogx([r["sram_kib"] for r in pts], [r["offchip_mb"] for r in pts], "o-", base=2,
                                label=f"{a} array(s)")
        axes[0][j].set_title(model)
        axes[0][j].set_ylabel("cycles (M)")
        axes[1][j].set_ylabel("off-chip traffic (MB)")
        axes[1][j].set_xlabel("SRAM per buffer (KiB)")
        axes[0][j].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    p.add_argument("--sram", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512, 1024])
    p.add_argument("--arrays", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--config", help="npu16 JSON config of the base machine (default: today's npu16)")
    args = p.parse_args(argv)
    base = load_config(args.config) if args.config else DEFAULT
    rows = [r for m in args.models for r in sweep(m, base, args.sram, args.arrays)]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "npu16_sweep.json").write_text(json.dumps({"base": base.to_config(), "rows": rows}, indent=1))
    (RESULTS / "npu16_sweep.md").write_text(markdown(rows, base))
    plot(rows, RESULTS / "npu16_sweep.png")
    print(markdown(rows, base))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
