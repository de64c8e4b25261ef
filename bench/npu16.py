"""The paper's hardware claims from architecture alone (torchvision graphs, 224×224, g = 3).

Table 6 (extra giga integer ops from WAPS groups) under two conventions:
  paper    the layers the paper counted (DESIGN.md): conv/linear layers that carry their
           own output quantizer in BRECQ's block wrappers, i.e. layers with a fused
           activation (not a BasicBlock's conv2/downsample, a Bottleneck's conv3/downsample,
           RegNet's f.c/proj, MobileNetV2's projection), every MnasNet layer (BRECQ wraps
           none); never the 8-bit first conv or the FC. Baseline 2·MACs of those layers,
           WAPS 4 ops per output element of their non-depthwise members.
  natural  every layer that gets groups in waps-tvm (non-depthwise, more than one tile of
           input channels, first/last included when they qualify), baseline all layers.
Table 7 (latency overhead of WAPS on the paper's NPU: four 16×16 arrays, 800 MHz) from the
npu16 cost model, and fragmentation: cycles with tile-aligned groups (appendix C, what
calibration produces) against equal, tile-unaligned groups.
Multi-op partitions (issue 15): every node of the graph (int8, batch 1) with cascading on and
off (codegen/npu16/cascade.py through bench/graph_cost.graph_chains): chains, ops merged,
intermediates kept in SRAM, off-chip activation bytes, DMA bytes saved and cycles.
Writes bench/results/npu16.json, npu16.md and npu16_cycles.png.

    python -m bench.npu16 [--models ...] [--npu-config FILE]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from targets.npu16.cost import LayerShape, even_sizes, layer_cost, tile_aligned_sizes
from dataclasses import replace

from targets.npu16.params import PAPER, load_config

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {"resnet18": ("resnet18", 0.006, 0.20), "resnet50": ("resnet50", 0.013, 0.24),
          "mobilenet_v2": ("mobilenet_v2", 0.014, 4.03), "regnet_x_600mf": ("regnet_x_600mf", 0.010, 1.28),
          "regnet_x_3_2gf": ("regnet_x_3_2gf", 0.030, 0.68), "mnasnet2_0": ("mnasnet2_0", 0.025, 1.11)}
TABLE7 = {"resnet50": (1762.0, 1780.0), "mobilenet_v2": (7994.0, 8187.0)}     # µs, BRECQ vs WAPS
SCALED = (False, True, True)          # default γ = (1, 1 − 2^-4, 1 + 2^-4): two scaled groups
TILE = 16


def build(name: str):
    import torch
    from waps_tvm.architectures import get_architecture
    if name == "mnasnet2_0":
        from torchvision.models import MNASNet
        return MNASNet(2.0).eval()
    torch.manual_seed(0)
    return get_architecture(name).eval()


def layers_of(name: str) -> list[dict]:
    """conv/linear layers of the architecture: shape, role, and whether each convention counts it."""
    from calib.graph import PARAM_OPS
    from calib.qmodel import layer_roles
    from waps_tvm.model_io import LoadedModel
    graph = LoadedModel(name, (3, 224, 224), module=build(name)).graph()
    first, last = layer_roles(graph)
    out = []
    for n in graph:
        if n.op not in PARAM_OPS:
            continue
        w = n.params["weight"]
        src = graph[n.inputs[0]].shape
        if n.op == "conv2d":
            m, cg, kh, kw = w.shape
            groups = n.attrs["groups"]
            _, oh, ow = n.shape
            h, wd = src[1], src[2]
            sh, ph, dh = n.attrs["stride"][0], n.attrs["padding"][0], n.attrs["dilation"][0]
        else:
            m, cg = w.shape
            kh = kw = oh = ow = h = wd = groups = sh = dh = 1
            ph = 0
        c = cg * groups
        edge = n.name in first or n.name in last
        shape = LayerShape(n.label(), c, m, oh, ow, kh, kw, groups, h=h, w=wd,
                           wbits=8 if edge else 4, abits_in=8 if n.name in first else 4,
                           abits_out=8 if n.name in last else 4, sh=sh, ph=ph, dh=dh)
        depthwise = shape.depthwise
        paper = not edge and (name.startswith("mnasnet") or n.attrs.get("act") is not None)
        natural = not depthwise and c > TILE
        out.append({"shape": shape, "paper": paper, "natural": natural, "depthwise": depthwise})
    return out


def other_cycles(name: str, npu) -> int:
    """Cycles of every node between the layers (adds, pools, means, pads, concats) at batch 1:
    the same with and without WAPS groups, so they dilute the overhead of a whole network."""
    from bench.graph_cost import node_cost
    from calib.graph import PARAM_OPS
    from waps_tvm.model_io import LoadedModel
    graph = LoadedModel(name, (3, 224, 224), module=build(name)).graph()
    costs = (node_cost(graph, n, npu) for n in graph if n.op not in PARAM_OPS)
    return sum(c.cycles for c in costs if c is not None)


def cascade(name: str, npu) -> dict:
    """Every node of ``name``'s graph (224×224, int8, batch 1) on ``npu`` with cascading on and
    off: chains, ops merged, links kept, activation bytes moved off chip, bytes saved, cycles."""
    from bench.graph_cost import graph_chains
    from waps_tvm.model_io import LoadedModel
    graph = LoadedModel(name, (3, 224, 224), module=build(name)).graph()
    out = {}
    for on in (True, False):
        chs, costs = graph_chains(graph, replace(npu, cascade=on))
        out["on" if on else "off"] = {
            "partitions": len(chs), "ops_merged": sum(len(c.ops) for c in chs),
            "links": sum(len(c.links) for c in chs), "links_kept": sum(lk.kept for c in chs for lk in c.links),
            "activation_bytes": sum(c.bytes["input"] + c.bytes["output"] for c in costs.values()),
            "weight_bytes": sum(c.bytes["weights"] for c in costs.values()),
            "saved_bytes": sum(c.bytes.get("saved", 0) for c in costs.values()),
            "dma_cycles": sum(c.dma_cycles for c in costs.values()), "cycles": sum(c.cycles for c in costs.values()),
            "chains": [list(c.ops) for c in chs] if on else []}
    on, off = out["on"], out["off"]
    out["dma_bytes_saved_pct"] = 100 * (1 - (on["activation_bytes"] + on["weight_bytes"])
                                        / (off["activation_bytes"] + off["weight_bytes"]))
    out["cycles_saved_pct"] = 100 * (1 - on["cycles"] / off["cycles"])
    return out


def with_groups(shape: LayerShape, sizes) -> LayerShape:
    from dataclasses import replace
    return replace(shape, group_sizes=tuple(sizes), scaled=SCALED)


def table6(rows: list[dict]) -> dict:
    res = {}
    for conv in ("paper", "natural"):
        if conv == "paper":
            base = sum(2 * r["shape"].macs for r in rows if r["paper"])
            extra = sum(4 * r["shape"].outputs for r in rows if r["paper"] and not r["depthwise"])
        else:
            base = sum(2 * r["shape"].macs for r in rows)
            extra = sum(4 * r["shape"].outputs for r in rows if r["natural"])
        res[conv] = {"base_gops": base / 1e9, "extra_gops": extra / 1e9, "extra_pct": 100 * extra / base}
    return res


def cycles(rows: list[dict], npu, grouping: str | None) -> tuple[int, list[int]]:
    per = []
    for r in rows:
        s = r["shape"]
        if grouping and r["natural"]:
            sizes = tile_aligned_sizes(s.c, 3, npu.tile) if grouping == "aligned" else even_sizes(s.c, 3)
            s = with_groups(s, sizes)
        per.append(layer_cost(s, npu).cycles)
    return sum(per), per


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--npu-config", help="npu16 JSON config (default: the paper's four 16x16 arrays at 800 MHz)")
    args = p.parse_args(argv)
    npu = load_config(args.npu_config) if args.npu_config else PAPER
    serial_npu = replace(npu, waps_pipelined=False)
    results = {"npu": npu.to_json(), "models": {}}
    for name in args.models:
        rows = layers_of(name)
        t6 = table6(rows)
        base, base_per = cycles(rows, npu, None)
        aligned, aligned_per = cycles(rows, npu, "aligned")
        even, _ = cycles(rows, npu, "even")
        serial, _ = cycles(rows, serial_npu, "aligned")
        other = other_cycles(name, npu)
        _, paper_gops, paper_pct = MODELS[name]
        results["models"][name] = {
            "table6": t6, "paper_extra_gops": paper_gops, "paper_extra_pct": paper_pct,
            "cycles_base": base, "cycles_waps_aligned": aligned, "cycles_waps_even": even,
            "waps_overhead_pct": 100 * (aligned - base) / base,
            "waps_overhead_serial_pct": 100 * (serial - base) / base,
            "fragmentation_pct": 100 * (even - aligned) / aligned,
            "cycles_other_ops": other,
            "waps_overhead_all_ops_pct": 100 * (aligned - base) / (base + other),
            "waps_overhead_all_ops_serial_pct": 100 * (serial - base) / (base + other),
            "latency_us_base": base / npu.clock_mhz, "latency_us_waps": aligned / npu.clock_mhz,
            "layers": [{"name": r["shape"].name, "base": b, "waps": a} for r, b, a in zip(rows, base_per, aligned_per)],
            "cascade": cascade(name, npu),
        }
        print(name, json.dumps({k: v for k, v in results["models"][name].items() if k != "layers"}), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "npu16.json").write_text(json.dumps(results, indent=1))
    (RESULTS / "npu16.md").write_text(report(results))
    plot(results, RESULTS / "npu16_cycles.png")
    print(report(results))
    return 0


def report(results: dict) -> str:
    L = ["# npu16: the paper's hardware claims from architecture alone (224×224, g = 3)", "",
         "## Table 6: extra integer operations of WAPS groups (GOPs, % of baseline)", "",
         "| model | paper | ours, paper's convention | ratio | ours, natural (every grouped layer) |",
         "|---|---|---|---|---|"]
    for name, r in results["models"].items():
        p, n = r["table6"]["paper"], r["table6"]["natural"]
        L.append(f"| {name} | +{r['paper_extra_gops']:.3f} (+{r['paper_extra_pct']:.2f} %) | "
                 f"+{p['extra_gops']:.4f} (+{p['extra_pct']:.2f} %) of {p['base_gops']:.3f} | "
                 f"{p['extra_gops'] / r['paper_extra_gops']:.2f}× | "
                 f"+{n['extra_gops']:.4f} (+{n['extra_pct']:.2f} %) of {n['base_gops']:.3f} |")
    L += ["", "## Table 7 and fragmentation: cycles on the paper's NPU (four 16×16 arrays, 800 MHz)", "",
          "npu16 WAPS is pipelined (the next tile accumulates while one is scaled into D2); the serial",
          "column charges appendix B's 4 cycles to every output tile of every pixel.", "",
          "| model | paper BRECQ → WAPS (µs) | paper overhead | npu16 base (µs) | npu16 WAPS (µs) | npu16 overhead | "
          "serial WAPS overhead | unaligned groups vs tile-aligned |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results["models"].items():
        t7 = TABLE7.get(name)
        paper = f"{t7[0]:.0f} → {t7[1]:.0f}" if t7 else "–"
        pov = f"+{100 * (t7[1] - t7[0]) / t7[0]:.1f} %" if t7 else "–"
        L.append(f"| {name} | {paper} | {pov} | {r['latency_us_base']:.0f} | {r['latency_us_waps']:.0f} | "
                 f"+{r['waps_overhead_pct']:.2f} % | +{r['waps_overhead_serial_pct']:.2f} % | "
                 f"+{r['fragmentation_pct']:.2f} % |")
    L += ["", "### Table 7 over the whole network (issue 15: SRAM striping and every op costed)", "",
          "The layers above, plus every node between them (residual adds, pools, means: their own units,",
          "the same cycles with and without groups, `bench/graph_cost.py`); conv/linear striped to the",
          "config's SRAM (`targets/npu16/memory.py`).", "",
          "| model | paper overhead | layers + other ops, base (µs) | other ops' share | WAPS overhead, pipelined | "
          "serial |", "|---|---|---|---|---|---|"]
    for name, r in results["models"].items():
        if "cycles_other_ops" not in r:
            continue
        t7 = TABLE7.get(name)
        pov = f"+{100 * (t7[1] - t7[0]) / t7[0]:.1f} %" if t7 else "–"
        total = r["cycles_base"] + r["cycles_other_ops"]
        L.append(f"| {name} | {pov} | {total / results['npu']['clock_mhz']:.0f} | "
                 f"{100 * r['cycles_other_ops'] / total:.1f} % | +{r['waps_overhead_all_ops_pct']:.2f} % | "
                 f"+{r['waps_overhead_all_ops_serial_pct']:.2f} % |")
    L += ["", "## Multi-op partitions (issue 15): cascading on vs off", "",
          "Every node (int8, batch 1, `bench/graph_cost.graph_chains`): chains of single-consumer",
          "conv/linear/add/max-pool edges run as one partition; an intermediate stays in the activation",
          "SRAM when `memory.keeps` says it fits next to both ops' stripes, else it spills by DMA.", "",
          "| model | partitions (ops merged) | intermediates kept / chained | DMA bytes off → on | saved | "
          "cycles off → on | saved |", "|---|---|---|---|---|---|---|"]
    for name, r in results["models"].items():
        c = r.get("cascade")
        if not c:
            continue
        on, off = c["on"], c["off"]
        L.append(f"| {name} | {on['partitions']} ({on['ops_merged']}) | {on['links_kept']} / {on['links']} | "
                 f"{(off['activation_bytes'] + off['weight_bytes']) / 1e6:.2f} MB → "
                 f"{(on['activation_bytes'] + on['weight_bytes']) / 1e6:.2f} MB | {c['dma_bytes_saved_pct']:.1f} % | "
                 f"{off['cycles']:,} → {on['cycles']:,} | {c['cycles_saved_pct']:.1f} % |")
    L += ["", "Why the Table 7 numbers differ: the paper's RTL pipelines the D1→D2 scaling (its Table 8",
          "shows the same conv latency with and without WAPS), so per-tile WAPS cycles hide behind the",
          "next tile's accumulation; npu16's pipelined model charges only what cannot hide (short",
          "reductions such as 1×1 convs over few channels) and the serial column charges all of",
          "appendix B's 4 cycles. The paper's +1.0 % / +2.4 % lie between the two. Its absolute",
          "latencies (1.76 ms for ResNet-50 at about 4.1 GMACs) need about 2.3 TMAC/s, roughly 3× the",
          "peak of four 16×16 int8 arrays at 800 MHz, so its NPU packs more MACs per PE or runs at",
          "another resolution; we compare overheads, not absolute times. RegNet's grouped convs",
          "split every 24-channel conv group three ways (one tile each), which is where its",
          "overhead comes from; each conv group also has its own output tiles (⌈24/16⌉ = 2, as",
          "the simulator runs it), so its base cycles are higher than a count over ⌈m/16⌉ tiles."]
    return "\n".join(L) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(results["models"])
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ov = [results["models"][n]["waps_overhead_pct"] for n in names]
    fr = [results["models"][n]["fragmentation_pct"] for n in names]
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], ov, 0.4, label="WAPS overhead (tile-aligned groups)")
    ax.bar([i + 0.2 for i in x], fr, 0.4, label="extra from unaligned groups")
    ax.set_xticks(list(x), names, rotation=20)
    ax.set_ylabel("% cycles")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
