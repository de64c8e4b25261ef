"""npu16 beside Arm Vela, layer by layer, on the same graphs and a machine described alike.

Vela's side is bench/results/vela.json (``python -m bench.vela``: Vela 5.2.0 on int8 TFLite
translations of our captured graphs, Ethos-U55-256, Vela's default system config). npu16's
side costs the same captured graph (BN folded, activations fused, batch 1, int8 weights and
activations, no WAPS groups: Vela has none) node by node with the npu16 cost model
(targets/npu16/cost.py, which tests hold equal to the simulator's counters) for the machine
in ``bench/configs/ethos_u55_256.json``. Every number in that config is Vela's description of
the same machine (its vela.ini and architecture_features.py), not fitted to its results:

    tile 16, arrays 1            256 MACs per cycle (ethos-u55-256)
    clock_mhz 500                core clock of Ethos_U55_High_End_Embedded
    dma_bytes_per_cycle 8        SRAM (feature maps, memory mode Shared_Sram): 3.73 GB/s at 500 MHz
    weight_bytes_per_cycle 1     off-chip flash (weights): 0.47 GB/s at 500 MHz, its own AXI port
    epilogue_lanes 4             conv/FC output: 0.25 cycles per element
    cycles_per_value             add 0.75 (advanced add), pool 0.125 (max pool), mul 0.375
    sram_kib                     activations 96: the U55-256's SHRAM is 48 KB, but it stages input
                                 blocks of 32 channels while npu16 stages whole rows of every
                                 input channel (no reduction split), so 48 KiB does not hold one
                                 output row of ResNet-50's layer1 3×3 conv, and 64 KiB not one of
                                 MobileNetV2's 112-wide rows; 96 KiB runs every layer of both,
                                 weights 256 (the weight stream buffer in SRAM; Vela sizes its own
                                 in an SRAM arena it does not limit)

A node's bound is the unit with the most cycles: npu16 ``compute`` (array + WAPS),
``weights`` (the weight port), ``feature maps`` (the DMA port), ``unit`` (epilogue / add /
pool unit); Vela's ``npu``, ``sram``, ``off_chip_flash``.

    python -m bench.vela_compare [--config bench/configs/ethos_u55_256.json]
writes bench/results/vela_compare.{json,md} and vela_compare.png.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench.graph_cost import node_cost
from targets.npu16.cost import LayerCost
from targets.npu16.memory import dma_port_cycles
from targets.npu16.params import NPU16, load_config

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CONFIG = HERE / "configs" / "ethos_u55_256.json"
DIFFER = 0.25            # a node whose cycles differ by more than this gets an explanation
VELA_BOUND = {"npu": "compute", "sram": "feature maps", "off_chip_flash": "weights", "dram": "feature maps",
              "on_chip_flash": "weights"}


@dataclass
class NodeRow:
    node: str
    source: str
    op: str
    macs: int
    npu16: int                    # cycles
    npu16_parts: dict             # compute, weights, feature maps, unit
    npu16_bound: str
    vela: int
    vela_parts: dict
    vela_bound: str
    why: str = ""

    @property
    def ratio(self) -> float:
        return self.npu16 / self.vela if self.vela else math.inf


def parts(cost: LayerCost, npu: NPU16) -> dict:
    """Cycles per unit of an npu16 cost: array, weight port, feature-map port, element unit."""
    wc, ac = dma_port_cycles(cost.bytes["weights"], cost.bytes["input"] + cost.bytes["output"], npu)
    return {"compute": cost.compute_cycles + cost.waps_cycles, "weights": wc, "feature maps": ac,
            "unit": cost.epilogue_cycles}


def layer_role(graph, node) -> str:
    """'first' (≤ 4 input channels), 'depthwise', 'conv' or the node's op."""
    if node.op != "conv2d":
        return node.op
    c = graph[node.inputs[0]].shape[0]
    if node.attrs["groups"] == c > 1:
        return "depthwise"
    return "first" if c <= 4 else "conv"


def explain(r: NodeRow, role: str, im2col: bool = False) -> str:
    """Why npu16 and Vela differ on a node, from which unit bounds each and by how much."""
    nb, vb = r.npu16_bound, r.vela_bound
    nv = {"compute": r.vela_parts.get("npu", 0), "feature maps": r.vela_parts.get("sram", 0),
          "weights": r.vela_parts.get("off_chip_flash", 0)}
    same = f"both {nb}-bound: npu16 {r.npu16_parts[nb]:,} vs Vela {nv.get(vb, r.vela):,} cycles"
    util = r.macs / max(r.npu16_parts["compute"], 1) / 256
    vutil = r.macs / max(nv["compute"], 1) / 256
    if role == "first" and im2col:
        return (f"first layer, im2col (first_layer_im2col): npu16 packs the stem's c·kh·kw products into its array "
                f"rows ({util:.0%} utilisation), Vela's U55 {vutil:.0%}")
    if role == "first":
        return (f"first layer, 3 input channels: npu16 fills 3 of its 16 array rows ({util:.0%} utilisation), Vela's "
                f"U55 packs the stem better ({vutil:.0%}); the config's first_layer_im2col is off")
    if role == "depthwise":
        return (f"depthwise: npu16 runs one tap of 16 channels per array step ({util:.0%} of its MACs), Vela's U55 "
                f"depthwise kernel reaches {vutil:.0%}")
    if r.op in ("global_avg_pool", "avg_pool2d"):
        return (f"mean: npu16's pool unit sums {r.npu16_parts['unit']:,} cycles' worth of taps at 8 per cycle "
                f"(bound by reading the map, {r.npu16_parts['feature maps']:,}), Vela runs it on the array as an "
                f"average pool ({nv['compute']:,} cycles)")
    if vb == "feature maps" and nb != "feature maps":
        return (f"Vela reads feature maps for {nv['feature maps']:,} SRAM cycles (it re-reads the input once per "
                f"output-depth block), npu16 {r.npu16_parts['feature maps']:,} (input once per row stripe); npu16 is "
                f"{nb}-bound at {r.npu16_parts[nb]:,}")
    if nb == vb == "weights":
        return (same + "; Vela's flash cycles include burst/latency overhead and its encoded weights "
                "(scales and biases interleaved), npu16 moves the raw int8 weights at 1 B/cycle")
    if nb == vb == "compute":
        return (same + f"; array utilisation npu16 {util:.0%}, Vela {vutil:.0%}: Vela's U55 runs output blocks "
                "(e.g. 8 rows × 8 columns × 16 channels) whose edge blocks waste MACs differently from npu16's "
                "per-pixel 16×16 tiles, and its depthwise/first-layer kernels use the array differently")
    if nb == vb == "feature maps":
        return (same + "; Vela re-reads the input feature map once per output-depth block from SRAM, npu16 "
                "once per weight stripe of the loop order it chose")
    if nb == "unit" or vb == "compute" and r.op in ("add", "max_pool2d", "avg_pool2d", "global_avg_pool"):
        return (f"npu16 {nb}-bound ({r.npu16_parts[nb]:,}), Vela {vb}-bound ({nv.get(vb, r.vela):,}); element-wise "
                "op: npu16 charges its unit rate per output only, Vela per output block with its memory latency")
    return (f"npu16 {nb}-bound ({r.npu16_parts[nb]:,} cycles), Vela {vb}-bound ({nv.get(vb, r.vela):,}); "
            f"npu16's {vb} cycles {r.npu16_parts.get(vb, 0):,}: the two models put this layer's bottleneck "
            "in different units")


def compare(record: dict, npu: NPU16, graph=None) -> dict:
    """One model's node-by-node comparison; ``graph`` defaults to the architecture ``record`` names."""
    if graph is None:
        from bench.vela import graph_of
        graph = graph_of(record["model"], record["size"], record["seed"])
    vela = {n["node"]: n for n in record["nodes"]}
    rows: list[NodeRow] = []
    for node in graph:
        cost = node_cost(graph, node, npu)
        v = vela.get(node.name)
        if cost is None and v is None:
            continue
        p = parts(cost, npu) if cost else {"compute": 0, "weights": 0, "feature maps": 0, "unit": 0}
        vp = v["cycles"] if v else {}
        row = NodeRow(node.name, node.source, node.op, int(v["macs"]) if v else 0, cost.cycles if cost else 0, p,
                      max(p, key=p.get), int(v["op_cycles"]) if v else 0, vp,
                      VELA_BOUND.get(v["bound"], v["bound"]) if v else "")
        if row.vela and abs(row.ratio - 1) > DIFFER:
            row.why = explain(row, layer_role(graph, node), npu.first_layer_im2col)
        rows.append(row)
    total_n, total_v = sum(r.npu16 for r in rows), sum(r.vela for r in rows)

    def share(rs, key):
        tot = {}
        for r in rs:
            tot[getattr(r, key + "_bound")] = tot.get(getattr(r, key + "_bound"), 0) + getattr(r, key)
        return {k: v / max(sum(tot.values()), 1) for k, v in sorted(tot.items())}
    return {"model": record["model"], "size": record["size"], "npu16_cycles": total_n, "vela_cycles": total_v,
            "vela_total_reported": record["totals"]["cycles_total"], "ratio": total_n / total_v,
            "npu16_time_ms": total_n / npu.clock_mhz / 1e3, "vela_time_ms": record["totals"]["inference_time"] * 1e3,
            "npu16_bound_share": share(rows, "npu16"), "vela_bound_share": share(rows, "vela"),
            "differing": sum(1 for r in rows if r.why), "nodes": [asdict(r) | {"ratio": r.ratio} for r in rows]}


def markdown(results: list[dict], npu: NPU16, config: Path) -> str:
    out = ["# npu16 beside Arm Vela (Ethos-U55-256), node by node", "",
           f"Same captured graphs, batch 1, int8, 224×224, random weights (seed 0), no WAPS groups. Vela: "
           f"`bench/results/vela.json` (`python -m bench.vela`). npu16: the cost model (held equal to the "
           f"simulator's counters by tests) for `{config.relative_to(HERE.parent)}` "
           f"({npu.tile}×{npu.tile} array, {npu.clock_mhz:g} MHz, feature maps {npu.dma_bytes_per_cycle} B/cycle, "
           f"weights {npu.weight_bytes_per_cycle} B/cycle on their own port, SRAM {npu.sram_act_kib} KiB activations / "
           f"{npu.sram_weight_kib} KiB weights, double-buffered). Made by `python -m bench.vela_compare`.", "",
           "| model | npu16 cycles | Vela cycles | npu16 / Vela | npu16 ms | Vela ms | nodes differing > 25 % |",
           "|---|---|---|---|---|---|---|"]
    for r in results:
        out.append(f"| {r['model']} | {r['npu16_cycles']:,} | {r['vela_cycles']:,} | {r['ratio']:.3f} | "
                   f"{r['npu16_time_ms']:.2f} | {r['vela_time_ms']:.2f} | {r['differing']} of {len(r['nodes'])} |")
    for r in results:
        out += ["", f"## {r['model']}", "",
                "Share of cycles by bounding unit: npu16 " + ", ".join(f"{k} {v:.0%}" for k, v in r["npu16_bound_share"].items())
                + "; Vela " + ", ".join(f"{k} {v:.0%}" for k, v in r["vela_bound_share"].items()) + ".", "",
                "| node | source | op | npu16 cycles | bound | Vela cycles | bound | npu16/Vela | why they differ (> 25 %) |",
                "|---|---|---|---|---|---|---|---|---|"]
        for n in r["nodes"]:
            out.append(f"| {n['node']} | {n['source']} | {n['op']} | {n['npu16']:,} | {n['npu16_bound']} | {n['vela']:,} | "
                       f"{n['vela_bound']} | {n['ratio']:.2f} | {n['why']} |")
    return "\n".join(out) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 5))
    for ax, r in zip(np.atleast_1d(axes), results):
        v = np.array([n["vela"] for n in r["nodes"]], float)
        n = np.array([n["npu16"] for n in r["nodes"]], float)
        ax.loglog(v, n, "o", ms=4)
        lim = [max(min(v.min(), n.min()), 1), max(v.max(), n.max())]
        ax.plot(lim, lim, "k-", lw=0.8, label="equal")
        ax.plot(lim, [x * 1.25 for x in lim], "k:", lw=0.8, label="±25 %")
        ax.plot(lim, [x / 1.25 for x in lim], "k:", lw=0.8)
        ax.set_xlabel("Vela cycles per node")
        ax.set_ylabel("npu16 cycles per node")
        ax.set_title(f"{r['model']}: total npu16/Vela = {r['ratio']:.2f}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="npu16 beside Vela, node by node")
    p.add_argument("--config", type=Path, default=CONFIG)
    p.add_argument("--vela", type=Path, default=RESULTS / "vela.json")
    args = p.parse_args(argv)
    npu = load_config(args.config)
    records = json.loads(args.vela.read_text())["models"]
    results = [compare(rec, npu) for rec in records]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "vela_compare.json").write_text(json.dumps({"npu": npu.to_config(), "results": results}, indent=1))
    (RESULTS / "vela_compare.md").write_text(markdown(results, npu, args.config.resolve()))
    plot(results, RESULTS / "vela_compare.png")
    for r in results:
        print(f"{r['model']}: npu16 {r['npu16_cycles']:,} cycles, Vela {r['vela_cycles']:,}, ratio {r['ratio']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
