"""The per-compile report: ``out/report.json``, ``out/report.md`` and its PNGs.

Written by ``waps-tvm compile`` for every target and re-rendered by ``waps-tvm report``.
One row per integer op of the lowered program: where it runs (llvm, c, npu16 or the
host of an npu16 build, with the reason), its output shape, MACs, the WAPS group sizes
with each group's shift γ_p = 1 + σ_p·2^−n_p, the fractional accumulator bits, whether a
gather feeds it; for npu16 builds also its npu16 cost (targets/npu16/report.py: ops and
cycles from the simulator's counters read out of the compiled module after a run, on the
npu16 config the build used), and for an op the NPU cannot run its host time
(targets/npu16/host_cost.py, on the config's host) in separate ``host`` fields, with the
totals' NPU time, host time, their sum and the host's share. When the compile was given
labelled data, the report also holds the compiled model's top-1, the fake-quant top-1
and how often their predictions agree.

Files are written to a temporary name and renamed, so a reader never sees half a report.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

FILES = ("report.json", "report.md", "report.csv", "groups.png", "cycles.png", "roofline.png")
# an npu16 op's report fields (targets/npu16/report.cost_row)
NPU16_COLUMNS = ("macs", "int_ops", "shift_ops", "compute", "waps", "dma", "epilogue", "cycles", "bound", "utilisation",
                 "sram", "offchip_read", "offchip_write", "weight_bytes", "time_us", "cycles_no_groups", "counted",
                 "counters", "query", "query_no_groups", "dma_saved_bytes", "dma_saved_cycles", "cycles_saved")
# a host op's report fields in an npu16 build (targets/npu16/host_cost.host_row)
HOST_COLUMNS = ("ops", "divisions", "work", "read_bytes", "write_bytes", "cycles", "bound", "time_us", "note", "query")


def build(program, placement: list[dict], target: str, npu=None, counters: dict | None = None) -> dict:
    """Report rows and totals of a lowered ``program`` (relay_passes.program.Program).
    npu16: ``npu`` the machine (params.NPU16, default today's), ``counters`` {op: simulator
    counters} (else the estimator's counts)."""
    from relay_passes.attrs import GatherAttrs
    from relay_passes.program import INPUT
    where = {p["op"]: p for p in placement}
    costs = {}
    if target == "npu16":
        from targets.npu16.params import DEFAULT
        from targets.npu16.report import op_costs
        costs = {r["op"]: r for r in op_costs(program, placement, npu or DEFAULT, counters)}
        npu = (npu or DEFAULT).to_config()       # the keys of --npu-config
    rows = []
    for op in program.ops:
        place = where.get(op.name, {"target": target, "reason": ""})
        a = op.attrs
        row = {"op": op.name, "kind": op.kind, "layer": a.layer or "", "target": place["target"],
               "reason": place.get("reason", ""), "shape": list(op.shape), "macs": layer_macs(op),
               "partition": place.get("partition", ""),          # npu16: the multi-op partition it is in
               "in_channels": _in_channels(op),
               "group_sizes": [], "sigma": [], "n": [], "frac_bits": getattr(a, "frac", 0),
               "gather_folded": "in_index" in op.params,     # fast form: read through the index
               "gather": isinstance(a, GatherAttrs),           # a channel gather (permutation or selection)
               "gathered": "in_index" in op.params
                           or any(isinstance(program[i].attrs, GatherAttrs) for i in op.inputs if i != INPUT)}
        if "groups" in op.params:
            labels = op.params["groups"]
            row["group_sizes"] = [int((labels == p).sum()) for p in range(op.n_groups)]
            row["sigma"], row["n"] = [s.sigma for s in op.group_scales], [s.n for s in op.group_scales]
        if "cycles" in costs.get(op.name, {}):
            c = costs[op.name]
            row["npu16"] = {k: c[k] for k in NPU16_COLUMNS}
        if "host" in costs.get(op.name, {}):
            row["host"] = {k: costs[op.name]["host"][k] for k in HOST_COLUMNS}
        rows.append(row)
    return {"target": target, "npu": npu, "ops": rows, "totals": _totals(rows), "accuracy": None}


def partitions(rows: list[dict]) -> list[dict]:
    """npu16 multi-op partitions (codegen/npu16/cascade.py): each one's ops in order and what
    cascading saved, summed over them (DMA bytes, DMA cycles, cycles)."""
    out: dict[str, dict] = {}
    for r in rows:
        if r.get("partition") and "npu16" in r:
            p = out.setdefault(r["partition"], {"partition": r["partition"], "ops": [], "dma_saved_bytes": 0,
                                                "dma_saved_cycles": 0, "cycles_saved": 0})
            p["ops"].append(r["op"])
            for k in ("dma_saved_bytes", "dma_saved_cycles", "cycles_saved"):
                p[k] += r["npu16"].get(k, 0)
    return list(out.values())


def program_macs(program) -> int:
    """The multiply-accumulates of every conv/linear of ``program`` (one batch)."""
    return sum(layer_macs(op) for op in program.ops)


def layer_macs(op) -> int:
    """A layer's multiply-accumulates: each output code reads w[k] minus its first axis
    ([cg, kh, kw] conv, [f] linear)."""
    from relay_passes.opset import is_layer      # here: ``waps-tvm report`` of a report.json loads no TVM
    if not is_layer(op):
        return 0
    return int(np.prod(op.shape)) * int(np.prod(op.params["w"].shape[1:]))


def _in_channels(op) -> int:
    """A layer's input channels: cg per conv group (linear: one group of f features)."""
    from relay_passes.opset import is_layer
    if not is_layer(op):
        return 0
    return int(op.params["w"].shape[1] * op.attrs.conv_groups)


def _totals(rows: list[dict]) -> dict:
    t = {"ops": len(rows), "macs": sum(r["macs"] for r in rows),
         "waps_layers": sum(1 for r in rows if len(r["group_sizes"]) > 1),
         "gathers": sum(1 for r in rows if r.get("gather") or r.get("gather_folded")),
         "by_target": {}}
    for r in rows:
        t["by_target"][r["target"]] = t["by_target"].get(r["target"], 0) + 1
    npu = [r["npu16"] for r in rows if "npu16" in r]
    if npu:
        for k in ("int_ops", "shift_ops", "compute", "waps", "dma", "epilogue", "cycles", "cycles_no_groups",
                  "offchip_read", "offchip_write", "weight_bytes"):
            t[k] = int(sum(c.get(k, 0) for c in npu))
        t["waps_overhead_pct"] = 100.0 * (t["cycles"] - t["cycles_no_groups"]) / max(t["cycles_no_groups"], 1)
        parts = partitions(rows)
        t["partitions"] = parts
        for k in ("dma_saved_bytes", "dma_saved_cycles", "cycles_saved"):
            t[k] = sum(p[k] for p in parts)
        t["sram_peak"] = {b: max((c.get("sram", {}).get(b, 0) for c in npu), default=0)
                          for b in ("weights", "activations")}
        t["bound"] = {}
        for c in npu:
            if "bound" in c:
                t["bound"][c["bound"]] = t["bound"].get(c["bound"], 0) + c["cycles"]
    if npu or any("host" in r for r in rows):
        t.update(_time_totals(rows))
    return t


def _time_totals(rows: list[dict]) -> dict:
    """NPU time, host time (ops the NPU cannot run, targets/npu16/host_cost.py), their sum and
    the host's share; host ops of a kind without a host model are counted (``host_unmodelled``)."""
    npu_us = sum(r["npu16"].get("time_us", 0.0) for r in rows if "npu16" in r)
    host = [r["host"] for r in rows if "host" in r]
    host_us = sum(h["time_us"] for h in host)
    total = npu_us + host_us
    return {"npu_time_us": npu_us, "host_cycles": int(sum(h["cycles"] for h in host)),
            "host_ops": int(sum(h["work"] for h in host)),
            "host_bytes": int(sum(h["read_bytes"] + h["write_bytes"] for h in host)),
            "host_time_us": host_us, "total_time_us": total,
            "host_share": host_us / total if total else 0.0,
            "host_unmodelled": [r["op"] for r in rows if r["target"] != "npu16" and "host" not in r]}


def recost(rep: dict, npu) -> dict:
    """``rep`` (an npu16 report.json) re-costed for another machine ``npu`` (params.NPU16) from
    each op's cost query, without the compiled module: every count is the estimator's
    (``counted`` false), and an op whose smallest stripe no longer fits the SRAM (or a softmax
    or layer norm on a machine without the row unit) moves to the host with its host time."""
    from targets.npu16.host_cost import host_row
    from targets.npu16.memory import SramTooSmall
    from targets.npu16.report import HOST_FROM_NPU, CostQuery, cost_row
    if rep.get("target") != "npu16":
        raise ValueError("only an npu16 report can be re-costed for another npu16 config")
    out = json.loads(json.dumps(rep))
    out["npu"], out["recosted_from"] = npu.to_config(), rep["npu"]
    for row in out["ops"]:
        if h := row.get("host"):           # counts are the machine's own; cycles and time the new host's
            row["host"] = {k: v for k, v in host_row(h["query"]["fn"], h["query"]["args"], npu.host).items()
                           if k in HOST_COLUMNS}
        c = row.get("npu16")
        if not c:
            continue
        if not npu.cascade:                  # every op its own partition on this machine
            row["partition"] = ""
        if "query" not in c:
            raise ValueError(f"{row['op']}: no cost query (compiled before 'report --npu-config' existed)")
        plain = CostQuery.from_json(c["query_no_groups"]) if c.get("query_no_groups") else None
        query = CostQuery.from_json(c["query"])
        reason = None
        if query.fn == "row" and not npu.row_unit:
            reason = "this npu16 has no row unit (row_unit false)"
        else:
            try:
                row["npu16"] = {k: v for k, v in cost_row(query, npu, None, plain).items() if k in NPU16_COLUMNS}
            except SramTooSmall as e:
                reason = f"does not fit this npu16: {e}"
        if reason is not None:
            del row["npu16"]
            row["target"], row["reason"] = "llvm", reason
            row["host"] = {k: v for k, v in host_row(*HOST_FROM_NPU[query.fn](query.args), npu.host).items()
                           if k in HOST_COLUMNS}           # its time on this machine's host
    out["totals"] = _totals(out["ops"])
    return out


def accuracy(data: str, labels: np.ndarray, compiled: np.ndarray, fake_quant: np.ndarray) -> dict:
    """Top-1 of both models and their agreement, from predicted classes [N] and labels [N]."""
    return {"data": data, "images": int(len(labels)),
            "compiled_top1": float((compiled == labels).mean()),
            "fake_quant_top1": float((fake_quant == labels).mean()),
            "agreement": float((compiled == fake_quant).mean()),
            "disagreements": int((compiled != fake_quant).sum())}


def _groups_cell(r: dict) -> str:
    if len(r["group_sizes"]) <= 1:
        return "–"
    parts = []
    for size, s, n in zip(r["group_sizes"], r["sigma"], r["n"]):
        gamma = "1" if s == 0 else f"1{'+' if s > 0 else '−'}2^-{n}"
        parts.append(f"{size}×{gamma}")
    return " · ".join(parts)


def _vela_cells(c: dict) -> list[str]:
    """bound, MAC utilisation, SRAM peaks, off-chip bytes and time of an npu16 op (reports
    written before these columns existed show dashes)."""
    if "bound" not in c:
        return ["–"] * 5
    return [c["bound"], f"{c['utilisation']:.0%}",
            f"{c['sram']['weights'] / 1024:.1f} / {c['sram']['activations'] / 1024:.1f}",
            f"{c['offchip_read'] / 1e3:,.1f} / {c['offchip_write'] / 1e3:,.1f}", f"{c['time_us']:,.2f}"]


CSV_COLUMNS = ("op", "kind", "layer", "target", "partition", "macs", "int_ops", "shift_ops", "compute", "waps", "dma", "epilogue",
               "cycles", "bound", "utilisation", "sram_weights", "sram_activations", "offchip_read", "offchip_write",
               "weight_bytes", "time_us", "cycles_no_groups", "dma_saved_bytes", "dma_saved_cycles",
               "host_ops", "host_bytes", "host_cycles", "host_time_us")


def csv_text(rep: dict) -> str:
    """One CSV row per op (npu16 columns empty for ops that do not run on it)."""
    import csv
    import io
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in rep["ops"]:
        c = dict(r.get("npu16") or {})
        if "sram" in c:
            c["sram_weights"], c["sram_activations"] = c["sram"]["weights"], c["sram"]["activations"]
        if h := r.get("host"):
            c.update(host_ops=h["work"], host_bytes=h["read_bytes"] + h["write_bytes"], host_cycles=h["cycles"],
                     host_time_us=h["time_us"])
        row = {**{k: r.get(k, "") for k in ("op", "kind", "layer", "target", "partition", "macs")}, **c}
        w.writerow([row.get(k, "") for k in CSV_COLUMNS])
    return buf.getvalue()


def markdown(rep: dict) -> str:
    """The report as Markdown (what ``waps-tvm report`` prints)."""
    npu = rep["npu"] is not None
    head = ["op", "kind", "runs on", "shape", "MACs", "groups (channels × γ)", "L", "gather in"]
    if npu:
        head += ["int ops", "shifts", "compute", "DMA", "epilogue", "cycles", "bound", "MAC util", "SRAM w/a (KiB)",
                 "off-chip r/w (KB)", "µs", "WAPS overhead", "host cycles", "host µs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rep["ops"]:
        runs = r["target"] if not r["reason"] else f"{r['target']}: {r['reason']}"
        cells = [r["op"], r["kind"], runs, "×".join(map(str, r["shape"])), f"{r['macs']:,}" if r["macs"] else "–",
                 _groups_cell(r), str(r["frac_bits"]) if r["macs"] else "–", "yes" if r["gathered"] else ""]
        if npu:
            c = r.get("npu16")
            if c:
                ov = 100.0 * (c["cycles"] - c["cycles_no_groups"]) / max(c["cycles_no_groups"], 1)
                cells += [f"{c['int_ops']:,}", f"{c['shift_ops']:,}", f"{c['compute']:,}", f"{c['dma']:,}",
                          f"{c['epilogue']:,}", f"{c['cycles']:,}", *_vela_cells(c), f"{ov:+.1f} %"]
            else:
                cells += ["–"] * 12
            h = r.get("host")
            cells += [f"{h['cycles']:,}", f"{h['time_us']:,.2f}"] if h else ["–", "–"]
        lines.append("| " + " | ".join(cells) + " |")
    t = rep["totals"]
    total = ["**total**", "", "", "", f"{t['macs']:,}", "", "", f"{t['gathers']} gathers"]
    if npu:
        total += [f"{t[k]:,}" for k in ("int_ops", "shift_ops", "compute", "dma", "epilogue", "cycles")]
        peak = rep["npu"].get("tile", 16) ** 2 * rep["npu"]["arrays"]
        sram = t.get("sram_peak", {})
        total += [max(t.get("bound", {"–": 0}), key=t.get("bound", {"–": 0}).get),
                  f"{t['macs'] / max(t['cycles'] * peak, 1):.0%}",
                  f"{sram.get('weights', 0) / 1024:.1f} / {sram.get('activations', 0) / 1024:.1f} (peak)",
                  f"{t.get('offchip_read', 0) / 1e3:,.1f} / {t.get('offchip_write', 0) / 1e3:,.1f}",
                  f"{t['cycles'] / rep['npu']['clock_mhz']:,.1f}"]
        total.append(f"{t['waps_overhead_pct']:+.2f} %")
        total += [f"{t['host_cycles']:,}", f"{t['host_time_us']:,.1f}"] if "host_cycles" in t else ["–", "–"]
    lines.append("| " + " | ".join(total) + " |")
    where = ", ".join(f"{k} {v}" for k, v in sorted(t["by_target"].items()))
    out = [f"# waps-tvm compile report ({rep['target']})", "",
           f"{t['ops']} integer ops ({where}); {t['macs']:,} MACs per batch; {t['waps_layers']} layers with "
           f"WAPS groups; {t['gathers']} gathers.", ""]
    if npu:
        clock = rep["npu"]["clock_mhz"]
        tile = rep["npu"].get("tile", 16)
        out += [f"npu16 ({rep['npu']['arrays']} {tile}×{tile} array(s), {clock:g} MHz): {t['cycles']:,} cycles = "
                f"{t['cycles'] / clock:.1f} µs per batch; WAPS groups cost {t['waps_overhead_pct']:+.2f} % against "
                f"the same layers without groups.", ""]
        if "host_time_us" in t:
            out += _time_lines(rep["npu"], t) + [""]
        parts = t.get("partitions") or []
        if parts:
            out += [f"Multi-op partitions (cascading): {len(parts)} chains of {sum(len(p['ops']) for p in parts)} ops "
                    f"keep {t['dma_saved_bytes']:,} DMA bytes on chip, saving {t['dma_saved_cycles']:,} DMA cycles and "
                    f"{t['cycles_saved']:,} cycles.", "", "| partition | ops merged | DMA bytes saved | DMA cycles saved "
                    "| cycles saved |", "|---|---|---|---|---|"]
            out += [f"| {p['partition']} | {' → '.join(p['ops'])} | {p['dma_saved_bytes']:,} | "
                    f"{p['dma_saved_cycles']:,} | {p['cycles_saved']:,} |" for p in parts] + [""]
    if acc := rep.get("accuracy"):
        out += [f"Accuracy on {acc['data']} ({acc['images']} labelled images): compiled integer model "
                f"{acc['compiled_top1'] * 100:.2f} %, fake-quant {acc['fake_quant_top1'] * 100:.2f} %, "
                f"predictions agree on {acc['agreement'] * 100:.2f} % ({acc['disagreements']} differ).", ""]
    out += lines + ["", "![group sizes per layer](groups.png)"]
    if npu:
        out += ["", "![npu16 cycles per op](cycles.png)"]
    return "\n".join(out) + "\n"


def _time_lines(cfg: dict, t: dict) -> list[str]:
    """The NPU / host / total time paragraph of an npu16 report (Vela's CPU-fallback split)."""
    from targets.npu16.params import Host
    host = {**vars(Host()), **(cfg.get("host") or {})}     # a report from before the host had none
    lines = [f"Time per batch: NPU {t['npu_time_us']:,.1f} µs + host {t['host_time_us']:,.1f} µs = "
             f"{t['total_time_us']:,.1f} µs; {100 * t['host_share']:.1f} % on the host ({host['clock_mhz']:g} MHz, "
             f"{host['ops_per_cycle']:g} ops and {host['bytes_per_cycle']:g} B per cycle, a 64-bit division = "
             f"{host['div_ops']} ops: {t['host_ops']:,} ops, {t['host_bytes']:,} DRAM bytes, "
             f"{t['host_cycles']:,} cycles for the ops the NPU cannot run)."]
    if t.get("host_unmodelled"):
        lines += ["", f"Host ops without a host time model (not in the host total): {', '.join(t['host_unmodelled'])}."]
    return lines


def write(folder: str | os.PathLike, rep: dict) -> list[Path]:
    """Write report.json, report.md, groups.png (and cycles.png for npu16) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = [_atomic(folder / "report.json", json.dumps(rep, indent=1).encode()),
               _atomic(folder / "report.md", markdown(rep).encode()),
               _atomic(folder / "report.csv", csv_text(rep).encode())]
    written.append(_plot(folder / "groups.png", lambda ax: _plot_groups(ax, rep["ops"])))
    if rep["npu"] is not None:
        written.append(_plot(folder / "cycles.png", lambda ax: _plot_cycles(ax, rep["ops"])))
        written.append(_plot(folder / "roofline.png", lambda ax: _plot_roofline(ax, rep)))
    return written


def _atomic(path: Path, data: bytes) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


def _plot(path: Path, draw) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 3.6))
    draw(ax)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def _plot_groups(ax, rows) -> None:
    layers = [r for r in rows if r["macs"]]
    colors = {0: "#4c72b0", 1: "#dd8452", -1: "#55a868"}
    seen = set()
    for i, r in enumerate(layers):
        sizes = r["group_sizes"] or [r["in_channels"]]
        sigmas = r["sigma"] or [0]
        bottom = 0
        for size, s in zip(sizes, sigmas):
            label = {0: "γ = 1", 1: "γ = 1 + 2^-n", -1: "γ = 1 − 2^-n"}[int(np.sign(s))]
            ax.bar(i, size, bottom=bottom, color=colors[int(np.sign(s))],
                   label=None if label in seen else label)
            seen.add(label)
            bottom += size
    ax.set_xticks(range(len(layers)), [r["op"] for r in layers], rotation=90, fontsize=6)
    ax.set_ylabel("input channels per group")
    ax.set_title("WAPS groups per layer")
    ax.legend(fontsize=7)


def _plot_cycles(ax, rows) -> None:
    npu = [r for r in rows if "npu16" in r]
    x = range(len(npu))
    base = [r["npu16"]["cycles_no_groups"] for r in npu]
    ax.bar(x, base, label="without groups")
    ax.bar(x, [r["npu16"]["cycles"] - b for r, b in zip(npu, base)], bottom=base, label="WAPS groups")
    ax.set_xticks(list(x), [r["op"] for r in npu], rotation=90, fontsize=6)
    ax.set_ylabel("npu16 cycles")
    ax.set_title("npu16 cycles per op")
    ax.legend(fontsize=7)


def _plot_roofline(ax, rep: dict) -> None:
    """Each npu16 op at (integer ops per off-chip byte, integer ops per cycle) under the roofs:
    the arrays' peak (2·T²·A ops per cycle) and the DMA's (bytes per cycle × intensity)."""
    cfg = rep["npu"]
    peak = 2 * cfg.get("tile", 16) ** 2 * cfg["arrays"]
    bw = cfg["dma_bytes_per_cycle"]
    pts = [(r["npu16"]["int_ops"] / max(r["npu16"]["offchip_read"] + r["npu16"]["offchip_write"], 1),
            r["npu16"]["int_ops"] / max(r["npu16"]["cycles"], 1), r["npu16"].get("bound", "compute"))
           for r in rep["ops"] if "npu16" in r and r["npu16"]["int_ops"]]
    if not pts:
        ax.set_title("npu16 roofline (no npu16 ops)")
        return
    xs = np.logspace(np.log10(min(p[0] for p in pts) / 2), np.log10(max(max(p[0] for p in pts) * 2, 2 * peak / bw)), 100)
    ax.loglog(xs, np.minimum(peak, bw * xs), "k-", lw=1, label=f"roof: {peak} ops/cycle, {bw} B/cycle")
    for bound, color in (("compute", "#4c72b0"), ("dma", "#dd8452"), ("epilogue", "#55a868")):
        sel = [p for p in pts if p[2] == bound]
        if sel:
            ax.loglog([p[0] for p in sel], [p[1] for p in sel], "o", ms=4, color=color, label=f"{bound}-bound")
    ax.set_xlabel("integer ops per off-chip byte")
    ax.set_ylabel("integer ops per cycle")
    ax.set_title("npu16 roofline per op")
    ax.legend(fontsize=7)
