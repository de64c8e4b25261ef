"""The README's generated blocks, each rendered from bench/results/ alone.

One function per block; each takes the results folder and returns the block's text (a
``Block.inline`` one is a phrase inside a sentence, the others whole paragraphs/tables).
Numbers are formatted here and nowhere else, so a rerun benchmark changes the README only
through `python -m bench.readme`.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bench.mdtables import table, tables

NAMES = {"digit_recognizer": "digit-recognizer", "fashion_resnet": "FashionResNet",
         "fashion_mobilenetv2": "FashionMobileNetV2", "fashion_mobilenetv3": "FashionMobileNetV3", "fashion_vit": "FashionViT",
         "resnet18": "ResNet-18", "resnet50": "ResNet-50", "mobilenet_v2": "MobileNetV2",
         "regnet_x_600mf": "RegNet-600MF", "regnet_x_3_2gf": "RegNet-3.2GF", "mnasnet2_0": "MnasNet-2.0"}
# what the accuracy table says about a model besides its name
ABOUT = {"digit_recognizer": "MNIST", "fashion_mobilenetv3": "hardswish, SE"}
ACCURACY_METHODS = ("RTN", "BRECQ", "BRECQ+WAPS", "QDrop", "QDrop+WAPS")


@dataclass(frozen=True)
class Block:
    name: str
    render: Callable[[Path], str]
    inline: bool = False


def _json(results: Path, name: str):
    return json.loads((results / name).read_text())


def _name(model: str) -> str:
    return NAMES.get(model, model)


def _span(values: list[float], fmt: str, sep: str = "–") -> str:
    """'a–b' of the formatted min and max, or one value when they format alike."""
    lo, hi = format(min(values), fmt), format(max(values), fmt)
    return lo if lo == hi else f"{lo}{sep}{hi}"


def _signed_pct(x: float) -> str:
    return f"{'+' if x >= 0 else '−'}{abs(x):.1f} %"


def _ms(x: float) -> str:
    """Milliseconds as the README prints them: 2 decimals from 1 ms up, 3 below."""
    return f"{x:.2f}" if x >= 1 else f"{x:.3f}"


# --- accuracy (bench/accuracy.py) ---------------------------------------------------------

@dataclass(frozen=True)
class Setup:
    """A model's W2A4 calibration runs: seeds, iterations per block, samples, λ."""
    seeds: tuple[int, ...]
    iters: int
    samples: int
    lam: float | None


def _setups(runs: list[dict]) -> dict[str, Setup]:
    by_model: dict[str, list[dict]] = {}
    for r in runs:
        if r["config"] == "W2A4" and r["method"] != "rtn":
            by_model.setdefault(r["model"], []).append(r)
    out = {}
    for model, rs in by_model.items():
        one = {(r["iters"], r["samples"], r.get("lam")) for r in rs}
        if len(one) != 1:
            raise ValueError(f"accuracy.json: {model} W2A4 runs mix setups {sorted(one, key=str)}")
        iters, samples, lam = one.pop()
        out[model] = Setup(tuple(sorted({r["seed"] for r in rs})), iters, samples, lam)
    return out


def accuracy(results: Path) -> str:
    setups = _setups(_json(results, "accuracy.json")["runs"])
    common = Counter(setups.values()).most_common(1)[0][0]
    rows = []
    for t in tables(results / "accuracy.md"):
        model = t.heading.split(" (")[0]
        if model not in setups or "W2A4" not in t.header or "method" not in t.header:
            continue
        cell = {r["method"]: r["W2A4"] for r in t.rows}
        about = [ABOUT[model]] if model in ABOUT else []
        s = setups[model]
        if s != common:
            about.append(f"seed{'s' if len(s.seeds) > 1 else ''} {', '.join(map(str, s.seeds))}, "
                         f"{s.iters} iterations, {s.samples} samples")
        label = _name(model) + (f" ({'; '.join(about)})" if about else "")
        flt = t.heading.rsplit("float ", 1)[1].rstrip(" %")
        vals = [cell.get(m, "–") for m in ACCURACY_METHODS]
        vals = [f"**{v}**" if m.endswith("+WAPS") and v != "–" else v for m, v in zip(ACCURACY_METHODS, vals)]
        rows.append(f"| {label} | {flt} | " + " | ".join(vals) + " |")
    lower = table(results / "accuracy.md", "Block reconstruction loss")
    won = {"BRECQ": [0, 0], "QDrop": [0, 0]}
    models = [m for m, s in setups.items() if s == common]
    for r in lower.rows:
        if r["config"] != "W2A4" or r["model"] not in models:
            continue
        for base in won:
            a, _, b = r[f"{base}+WAPS < {base}"].partition("/")
            if b:
                won[base][0] += int(a)
                won[base][1] += int(b)
    # no-break spaces keep "λ = 0.1" on one line
    lam = f", λ\u00a0=\u00a0{common.lam:g}" if common.lam is not None else ""
    return "\n".join([
        f"Measured on this project's 2-core x86 machine, {common.iters} iterations per block, "
        f"{common.samples} samples{lam}, top-1 % of the fake-quant model reloaded from the `.waps`, "
        f"mean ± std over {len(common.seeds)} seeds:", "",
        "| W2A4 | float | " + " | ".join(ACCURACY_METHODS) + " |",
        "|---" * (len(ACCURACY_METHODS) + 2) + "|", *rows, "",
        f"At W2A4, WAPS lowered the block reconstruction loss on {won['BRECQ'][0]} of {won['BRECQ'][1]} "
        f"blocks ({len(common.seeds)} seeds, {len(models)} models) against BRECQ and on {won['QDrop'][0]} "
        f"of {won['QDrop'][1]} against QDrop."])


def _mean(values: list[float]) -> str:
    return f"{sum(values) / len(values):.2f}" if values else "–"


def vit_accuracy(results: Path) -> str:
    """FashionViT (bench/accuracy.py's PLAN_BY_MODEL) per method at its configurations: the
    fake-quant top-1, the compiled (llvm) one and their agreement, means over its seeds."""
    from bench.accuracy import LABEL, PAPER, PLAN_BY_MODEL
    model = "fashion_vit"
    data = _json(results, "accuracy.json")
    runs = [r for r in data["runs"] if r["model"] == model]
    configs = [c for c in PLAN_BY_MODEL[model] if any(r["config"] == c for r in runs)]
    head, rows = ["method"], []
    for c in configs:
        head += [f"{c} fake-quant", f"{c} compiled", f"{c} agree"]
    for m in LABEL:
        cells = []
        for c in configs:
            mine = [r for r in runs if r["config"] == c and r["method"] == m]
            comp = [r["compiled"] for r in mine if "compiled" in r]
            cells += [_mean([r["top1"] * 100 for r in mine]), _mean([x["compiled_top1"] for x in comp]),
                      _mean([x["agreement"] for x in comp]) + (" %" if comp else "")]
        if any(v != "–" for v in cells):
            rows.append(f"| {LABEL[m]} | " + " | ".join(cells) + " |")
    one = {(r["iters"], r["samples"], r.get("lam")) for r in runs}
    if len(one) != 1:
        raise ValueError(f"accuracy.json: {model} runs mix setups {sorted(one, key=str)}")
    iters, samples, lam = one.pop()
    seeds = sorted({r["seed"] for r in runs})
    return "\n".join([
        f"{_name(model)} (torchvision's VisionTransformer in small: 7×7 patches, 4 layers of 4 heads, 64 wide; "
        f"float {data['float'][model] * 100:.2f} % on the Fashion-MNIST test set), {iters} iterations per block, "
        f"{samples} samples, λ\u00a0=\u00a0{lam:g}, seed{'s' if len(seeds) > 1 else ''} "
        f"{', '.join(map(str, seeds))}: top-1 % of the fake-quant model, of the compiled integer program "
        "(llvm, TVM runtime, 10k images) and the images on which their top-1 agree:", "",
        "| " + " | ".join(head) + " |", "|---" * len(head) + "|", *rows, "", PAPER[model]])


# --- calibration speed (bench/calib_speed.py) ---------------------------------------------

BF16_ONLY = ("bf16", "bf16_boundaries")     # levers that act only with bfloat16 convolutions


def _all_levers(r: dict, bf16: bool) -> bool:
    """The row with every float32 lever on (``bf16`` False) or also the bf16 ones."""
    speed = r["speed"]
    return (all(v for k, v in speed.items() if k not in BF16_ONLY)
            and all(speed.get(k, bf16) == bf16 for k in BF16_ONLY))


def _lever_speedups(results: Path) -> dict[int, list[float]]:
    """{input size: speed-ups of the float32 loop with every lever over the plain one, per method}."""
    out: dict[int, list[float]] = {}
    for r in _json(results, "calib_speed.json")["rows"]:
        if _all_levers(r, bf16=False):
            out.setdefault(r["input"], []).append(r["speedup_vs_before"])
    return out


def calib_speed(results: Path) -> str:
    """'×1.37–1.65 faster at 224×224 and ×1.19–1.20 at 32×32'."""
    s = sorted(_lever_speedups(results).items(), reverse=True)
    parts = [f"×{_span(v, '.2f')} faster at {n}×{n}" if i == 0 else f"×{_span(v, '.2f')} at {n}×{n}"
             for i, (n, v) in enumerate(s)]
    return " and ".join(parts)


def calib_speed_gain(results: Path) -> str:
    """'×1.37–1.65 at 224×224 (×1.19–1.20 at 32×32)'."""
    (big, vb), *rest = sorted(_lever_speedups(results).items(), reverse=True)
    small = "; ".join(f"×{_span(v, '.2f')} at {n}×{n}" for n, v in rest)
    return f"×{_span(vb, '.2f')} at {big}×{big}" + (f" ({small})" if small else "")


def calib_speed_public(results: Path, name: str = "calib_speed.json") -> str:
    """Ours in float32 and in bfloat16 against the public BRECQ loop re-implemented and
    timed beside it, per input size."""
    rows = _json(results, name)["rows"]
    parts = []
    for n in sorted({r["input"] for r in rows}, reverse=True):
        fp32 = [r for r in rows if r["input"] == n and _all_levers(r, bf16=False)]
        bf16 = [r for r in rows if r["input"] == n and _all_levers(r, bf16=True)]
        if not fp32 or "public_loop_here_sec_per_iter" not in fp32[0]:
            continue
        pub = fp32[0]["public_loop_here_sec_per_iter"] * 1000
        text = (f"at {n}×{n} the public loop takes {pub:.{0 if pub >= 10 else 1}f} ms per iteration, ours (BRECQ, "
                f"BRECQ+WAPS) {_span([r['sec_per_iter'] * 1000 for r in fp32], '.0f' if pub >= 10 else '.1f')} ms "
                f"in float32 (×{_span([r['public_loop_here_over_ours'] for r in fp32], '.2f')} its speed)")
        if bf16:
            text += (f" and {_span([r['sec_per_iter'] * 1000 for r in bf16], '.0f' if pub >= 10 else '.1f')} ms "
                     f"with bfloat16 convolutions (×{_span([r['public_loop_here_over_ours'] for r in bf16], '.2f')})")
        parts.append(text)
    return "; ".join(parts)


def calib_speed_fp32_public(results: Path) -> str:
    """calib_speed_public from the run on a CPU without native bf16 convolutions, with the CPU named."""
    meta = _json(results, "calib_speed_fp32.json")
    return f"on {meta['cpu']} (AVX2, no native bfloat16), " + calib_speed_public(results, "calib_speed_fp32.json")


def calib_speed_lever_gain(results: Path, lever: str = "native_soft", name: str = "calib_speed_fp32.json") -> str:
    """What the row that turns ``lever`` on gains over the row above it, per size and method."""
    rows = _json(results, name)["rows"]
    parts = []
    for prev, row in zip(rows, rows[1:]):
        if row["speed"].get(lever) and not prev["speed"].get(lever, True) \
                and (prev["input"], prev["method"]) == (row["input"], row["method"]):
            label = "BRECQ+WAPS" if row["method"] == "waps" else row["method"].upper()
            parts.append(f"{label} ×{prev['sec_per_iter'] / row['sec_per_iter']:.2f} at {row['input']}×{row['input']}")
    return ", ".join(parts)


def calib_time_estimate(results: Path) -> str:
    """ResNet-18 at 224×224 with the default iterations per block, estimated from the
    layer1.0 time per iteration: nine blocks of about its cost (the stem and eight basic
    blocks; the fc is small); the slower of BRECQ and BRECQ+WAPS, beside the public loop's
    20k iterations at its time from the same run."""
    from calib.config import CalibConfig
    rows = [r for r in _json(results, "calib_speed.json")["rows"] if r["input"] == 224]
    iters = CalibConfig().iters
    fp32 = max(r["sec_per_iter"] for r in rows if _all_levers(r, bf16=False))
    bf16 = [r["sec_per_iter"] for r in rows if _all_levers(r, bf16=True)]
    public = rows[0]["public_loop_here_sec_per_iter"]
    ours = (f"9 × {iters} × {max(bf16) * 1000:.0f} ms ≈ {9 * iters * max(bf16) / 60:.0f} minutes with bfloat16 "
            f"convolutions ({9 * iters * fp32 / 60:.0f} in float32)" if bf16
            else f"9 × {iters} × {fp32 * 1000:.0f} ms ≈ {9 * iters * fp32 / 60:.0f} minutes")
    return (f"{ours}, against 9 × 20000 × {public * 1000:.0f} ms ≈ {9 * 20000 * public / 3600:.1f} hours for the "
            "public BRECQ loop timed in the same run")


def bf16_accuracy(results: Path) -> str:
    """Top-1 of bfloat16 against float32 reconstruction, per model (bench/bf16.py)."""
    res = _json(results, "bf16.json")
    parts = [f"{_name(m)} {s['top1']['bf16'] * 100:.2f} % vs {s['top1']['fp32'] * 100:.2f} %"
             for m, s in res["summary"].items()]
    return (f"{'; '.join(parts)} top-1 at W2A4 (BRECQ+WAPS, {len(res['summary'][next(iter(res['summary']))]['top1']['seeds'])}"
            f" seeds, paired; {res['verdict']})")


# --- the compiled integer model (bench/cpu.py) ---------------------------------------------

CPU_FORMS = ("split", "fused", "fast")


def cpu(results: Path) -> str:
    data = _json(results, "cpu.json")
    meta, rows = data["meta"], data["rows"]
    forms = [f for f in CPU_FORMS if all(f"tvm_int_{f}_ms" in r for r in rows)]
    head = ["model", "config", "compiled top-1", "fake-quant top-1", "agreement", "PyTorch fp32",
            "TVM fp32", "TVM int, no groups", *[f"WAPS {f}" for f in forms]]
    lines = [f"Each model calibrated once (BRECQ+WAPS, {meta['iters']} iterations per block, seed 0), "
             f"compiled for llvm, run by the TVM runtime over the full test set; latency at batch 1, "
             f"median of {meta['repeat']} runs, all columns from one run (full table: `bench/results/cpu.md`):",
             "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        ng = r["tvm_int_nogroups_ms"]
        waps = [f"{r[f'tvm_int_{f}_ms']:.2f} ms ({r[f'tvm_int_{f}_ms'] / ng:.2f}×)" for f in forms]
        lines.append(f"| {_name(r['model'])} | {r['config']} | {r['compiled_top1']:.2f} | "
                     f"{r['fakequant_top1']:.2f} | {r['agreement']:.2f} % | {r['pytorch_fp32_ms']:.2f} ms | "
                     f"{r['tvm_fp32_ms']:.2f} ms | {ng:.2f} ms | " + " | ".join(waps) + " |")
    # rounded to whole percent first, so that a −0.3 % cost prints as +0, not -0
    cost = {f: [round((r[f"tvm_int_{f}_ms"] / r["tvm_int_nogroups_ms"] - 1) * 100) for r in rows] for f in forms}
    lines += ["", "The integer program is bit-exact against the NumPy reference and agrees with the "
              f"fake-quant model on top-1 for {_span([r['agreement'] for r in rows], '.2f')} % of test "
              "images: the deployed accuracy equals the calibrated one. Against the same integer model "
              "without groups, the groups cost " +
              "; ".join(f"{_span(v, '+d', ' to ')} % in {f} form" for f, v in cost.items()) + "."]
    if "fast" not in forms:
        ort = {r["model"]: r for r in _json(results, "cpu_ort.json")["rows"]}
        same = [m for m in dict.fromkeys(r["model"] for r in rows) if m in ort]
        configs = list(dict.fromkeys(r["config"] for r in rows))
        fast = ", ".join(f"{_name(m)} " + ", ".join(f"{c} {_ms(ort[m]['builds'][c]['fast_ms'])} ms"
                                                    for c in configs if c in ort[m]["builds"]) for m in same)
        lines += ["", f"These latencies are the {' and '.join(forms)} forms only: TVM's unscheduled default "
                  "lowering, slower than the default `fast` form, which `bench/cpu.py` does not time. "
                  "The fast form is measured in the ONNX Runtime comparison below" +
                  (f" ({fast}, WAPS, batch 1)." if fast else ".")]
    return "\n".join(lines)


# --- against ONNX Runtime (bench/cpu_ort.py) -----------------------------------------------

def _ort_label(r: dict) -> str:
    return f"{_name(r['model'])} {r['input'][-1]}²"


def _peak_clause(peak: dict) -> str:
    """'64 MACs per `vpdpbusd zmm` × 1.98 per cycle × 2.79 GHz × 2 cores = 707 GMAC/s' (the best
    per-core rate, bench/cpu_peak.Peak)."""
    clock = f" × {peak['clock_ghz']:.2f} GHz" if peak.get("clock_ghz") else ""
    best = max(peak["single_core_instr_per_s"], peak["all_core_instr_per_s_per_core"])       # per core
    ipc = f" × {best / 1e9 / peak['clock_ghz']:.2f} per cycle" if peak.get("clock_ghz") else ""
    return (f"{peak['macs_per_instruction']} MACs per `{peak['instruction']}`{ipc}{clock} × {peak['cores']} cores "
            f"= {peak['peak_gmacs']:.0f} GMAC/s")


def cpu_ort(results: Path) -> str:
    """Two tables: latency of ORT and of waps-tvm's builds at each precision (the headline
    precision against ORT int8 like for like), and GMAC/s against the measured peak."""
    data = _json(results, "cpu_ort.json")
    meta, rows = data["meta"], data["rows"]
    ps, top = meta["precisions"], meta["headline"]
    low = [p for p in ps if p != top]
    ort = ".".join(meta["onnxruntime"].split(".")[:2])
    tuned = meta["tune_trials"] > 0
    dots = sorted({r["dot"].upper() if r["dot"] == "vnni" else f"`{r['dot']}`" for r in rows})
    exact = [r for r in rows if all(ok for b in r["builds"].values() for ok in b["bit_exact"].values())]
    builds = sum(len(b["bit_exact"]) for r in rows for b in r["builds"].values())
    exact_text = (f"All {builds} TVM builds are" if len(exact) == len(rows) else
                  f"The TVM builds of {len(exact)} of {len(rows)} models "
                  f"({', '.join(_ort_label(r) for r in exact) or 'none'}) are")
    head = ["model", "PyTorch fp32", "ORT fp32", f"ORT int8 ({top})", f"TVM split {top} (before)",
            f"TVM fast {top}, no groups", f"TVM fast {top}", f"**{top}/ORT int8**", f"groups ({top})"]
    head += [h for p in low for h in (f"TVM fast {p}", f"{p}/ORT int8")]
    head += [h for p in ps if tuned for h in (f"TVM tuned {p}", f"tuned {p}/ORT int8")]
    peak = meta["peak"]
    lines = [f"Batch 1, median ms of {meta['repeat']} runs. ORT {ort} runs static QDQ int8 — {top}: uint8 "
             f"activations, per-channel int8 weights — and fp32, with {meta['ort_threads']} threads. waps-tvm's "
             f"`fast` form runs with {' and '.join(dots)} and {meta['tvm_threads']} threads, untuned (the default "
             f"schedules), built at {', '.join(ps)}: the {top} build is the like-for-like comparison, "
             f"{' and '.join(low)} show what fewer bits buy on the same CPU"
             + (f"; tuned with `waps-tvm tune`, {meta['tune_trials']} trials per model and precision" if tuned
                else "; not tuned here (`--tune-trials 0`)")
             + ". The torchvision models have random weights, RTN calibration and random tile-granular WAPS "
             f"groups (latency only); the 28×28 models: {meta['calibration']['bench']}. {exact_text} bit-exact "
             "against the NumPy reference (`bench/results/cpu_ort.md`, `cpu_ort.png`).", "",
             "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        b, h = r["builds"], r["builds"][top]
        cells = [_ort_label(r), _ms(r["pytorch_fp32_ms"]), _ms(r["ort_fp32_ms"]), _ms(r["ort_int8_ms"]),
                 _ms(h["split_ms"]) if "split_ms" in h else "–¹", _ms(h["nogroups_ms"]), _ms(h["fast_ms"]),
                 f"**{h['vs_ort_int8']:.2f}×**", _signed_pct(h["groups_cost_pct"])]
        cells += [c for p in low for c in (_ms(b[p]["fast_ms"]), f"{b[p]['vs_ort_int8']:.2f}×")]
        cells += [c for p in ps if tuned for c in (_ms(b[p]["tuned_ms"]), f"{b[p]['tuned_vs_ort_int8']:.2f}×")]
        lines.append("| " + " | ".join(cells) + " |")
    head = ["model", "integer MACs", f"ORT int8 ({top})", *[f"TVM fast {p}" for p in ps]]
    lines += ["", f"Throughput, GMAC/s and % of this CPU's peak: the compiled program's conv/linear MACs ÷ latency "
              f"(ORT on the same count). Peak measured by `bench/cpu_peak.py`: {_peak_clause(peak)}; every build "
              "runs on that instruction (2- and 4-bit codes sit in int8 lanes).", "",
              "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        b = r["builds"]
        cells = [_ort_label(r), f"{b[top]['macs'] / 1e6:.1f} M",
                 f"{r['ort_int8_gmacs']:.1f} ({r['ort_int8_pct_of_peak']:.1f} %)"]
        cells += [f"{b[p]['gmacs']:.1f} ({b[p]['pct_of_peak']:.1f} %)" for p in ps]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ort_ratio(results: Path) -> str:
    """'0.95× on ResNet-18 and 1.02× on MobileNetV2 (our W8A8 build)': the headline precision's
    untuned fast build ÷ ORT int8 at 224²."""
    data = _json(results, "cpu_ort.json")
    top = data["meta"]["headline"]
    rows = [r for r in data["rows"] if r["input"][-1] >= 224]
    return (" and ".join(f"{r['builds'][top]['vs_ort_int8']:.2f}× on {_name(r['model'])}" for r in rows)
            + f" (our {top} build)")


# --- npu16 beside Vela (bench/vela_compare.py) ----------------------------------------------

def vela_compare(results: Path) -> str:
    t = tables(results / "vela_compare.md")[0]
    head = ["model", "npu16 cycles", "Vela cycles", "npu16 / Vela", "nodes differing > 25 %"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in t.rows:
        lines.append(f"| {_name(r['model'])} | " + " | ".join(r[h] for h in head[1:]) + " |")
    return "\n".join(lines)


def _vela_ratios(results: Path, why: Callable[[dict], bool]) -> str:
    """'a–b×': npu16/Vela cycle ratios of the nodes (all models) whose row ``why`` accepts."""
    vals = [float(r["npu16/Vela"]) for t in tables(results / "vela_compare.md")[1:]
            if "npu16/Vela" in t.header for r in t.rows if why(r)]
    if not vals:
        raise ValueError("vela_compare.md: no node of this kind")
    return _span(vals, ".2f") + "×"


_WHY = "why they differ (> 25 %)"


def vela_refetch(results: Path) -> str:
    """Nodes where Vela re-reads its input per output-depth block (SRAM-bound)."""
    return _vela_ratios(results, lambda r: "re-reads the input" in r[_WHY])


def vela_stem(results: Path) -> str:
    return _vela_ratios(results, lambda r: r[_WHY].startswith("first layer"))


def vela_depthwise(results: Path) -> str:
    return _vela_ratios(results, lambda r: r[_WHY].startswith("depthwise"))


def vela_mean(results: Path) -> str:
    return _vela_ratios(results, lambda r: r["op"] == "global_avg_pool")


# --- npu16 from architecture (bench/npu16.py) ------------------------------------------------

_GOPS = re.compile(r"([+−-][\d.]+) \(([+−-][\d.]+ %)\)")


def npu16_table6(results: Path) -> str:
    """Table 6 (paper's counting convention) beside the paper; models off by > 10 % said apart."""
    t = table(results / "npu16.md", "Table 6")
    close, off = [], []
    for r in t.rows:
        ours, paper = _GOPS.match(r["ours, paper's convention"]), _GOPS.match(r["paper"])
        ratio = float(r["ratio"].rstrip("×"))
        if 0.9 <= ratio <= 1.1:
            unit = " GOPs" if not close else ""
            lead = "paper " if not close else ""
            close.append(f"{_name(r['model'])} {ours[1]}{unit} ({ours[2]}; {lead}{paper[1]}, {paper[2]})")
        else:
            off.append(f"{_name(r['model'])} gives {ours[1]} ({ours[2]}), {ratio:.2f}× the paper's {paper[1]}")
    return ", ".join(close) + "".join(f". {o}" for o in off)


def npu16_table7(results: Path) -> str:
    """Per-layer Table 7 overheads of the models the paper measured, pipelined and serial."""
    t = table(results / "npu16.md", "Table 7 and fragmentation")
    rows = [r for r in t.rows if r["paper overhead"] != "–"]
    names = [_name(r["model"]) for r in rows]
    pipe = " and ".join(f"{r['npu16 overhead']} ({n})" for r, n in zip(rows, names))
    serial = " / ".join(r["serial WAPS overhead"] for r in rows)
    paper = " and ".join(r["paper overhead"] for r in rows)
    return (f"{pipe} when the D1→D2 scaling is pipelined, and {serial} when appendix B's 4 cycles are "
            f"charged serially to every output tile. The paper measured {paper}")


# --- npu16 design sweep (bench/npu16_sweep.py) ------------------------------------------------

_COUNT = {1: "one", 2: "two", 4: "four", 8: "eight"}


def _sweep(results: Path) -> list[tuple[str, str, dict[str, list[float]]]]:
    """Per model: the smallest SRAM column where every layer fits, and per array count the
    cycles (M) of the columns from there on."""
    out = []
    for t in tables(results / "npu16_sweep.md"):
        if "arrays" not in t.header:
            continue
        cols = [c for c in t.header[1:] if not any(r[c].startswith("–") for r in t.rows)]
        cycles = {r["arrays"]: [float(r[c].split(" M")[0]) for c in cols] for r in t.rows}
        out.append((t.heading, cols[0] if cols else "", cycles))
    return out


def npu16_sweep_fit(results: Path) -> str:
    """'ResNet-18 needs 256 KiB per buffer and MobileNetV2 128 KiB'."""
    parts = [f"{_name(m)} needs {c} per buffer" if i == 0 else f"{_name(m)} {c}"
             for i, (m, c, _) in enumerate(_sweep(results))]
    return " and ".join(parts)


def npu16_sweep_cycles(results: Path) -> str:
    """'ResNet-18 9.48 M cycles on one array, 2.83 M on four; MobileNetV2 2.84 M and 1.44–1.48 M'."""
    parts = []
    for i, (m, _, cycles) in enumerate(_sweep(results)):
        lo, hi = min(cycles, key=int), max(cycles, key=int)
        a, b = _span(cycles[lo], ".2f"), _span(cycles[hi], ".2f")
        parts.append(f"{_name(m)} {a} M cycles on {_COUNT.get(int(lo), lo)} array{'s' * (int(lo) > 1)}, "
                     f"{b} M on {_COUNT.get(int(hi), hi)}" if i == 0 else f"{_name(m)} {a} M and {b} M")
    return "; ".join(parts)


# --- calibration memory (bench/calib_memory.py) -----------------------------------------------

def calib_memory(results: Path) -> str:
    """Peak RSS and anonymous memory of each model's largest run (the latest one at that size)."""
    best: dict[str, dict] = {}
    for r in _json(results, "calib_memory.json")["rows"]:
        if r.get("status", "done") == "done" and r["samples"] >= best.get(r["model"], {"samples": 0})["samples"]:
            best[r["model"]] = r
    # the sentence around the marker names the sample count; say it here only when models differ
    say_n = len({r["samples"] for r in best.values()}) > 1
    parts = []
    for i, (m, r) in enumerate(sorted(best.items())):
        anon = f" ({r['peak_anon_gb']:.1f} GB anonymous)" if r.get("peak_anon_gb") is not None else ""
        n = f" with {r['samples']} samples" if say_n else ""
        parts.append(f"{_name(m)} {'peaks at' if i == 0 else 'at'} {r['peak_rss_gb']:.1f} GB RSS{anon}{n}")
    return " and ".join(parts)


# --- hardware-aware WAPS groups (bench/npu_budget.py) -------------------------------------

def npu_budget(results: Path) -> str:
    """Per model: top-1 and the compiled npu16 WAPS overhead of no groups, g = 3 everywhere and
    each --npu-budget (means over seeds)."""
    d = _json(results, "npu_budget.json")
    fixed = {"none": "no groups (BRECQ)", "g3": "g = 3 everywhere (BRECQ+WAPS)"}
    head = ["model", "groups", "top-1 % (W2A4)", "npu16 WAPS overhead (measured)"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for m in d["models"]:
        rows = [r for r in d["runs"] if r["model"] == m]
        points = [p for p in fixed if any(r["point"] == p for r in rows)]
        points += sorted({r["point"] for r in rows} - set(fixed), key=float)
        for p in points:
            rs = [r for r in rows if r["point"] == p]
            top = sum(r["top1"] for r in rs) / len(rs) * 100
            ov = sum(r["overhead_pct"] for r in rs) / len(rs)
            lines.append(f"| {_name(m)} | {fixed.get(p, f'`--npu-budget {p}%`')} | {top:.2f} | {ov:+.2f} % |")
    return "\n".join(lines)


# --- Faster R-CNN FPN backbone, per-level SQNR (bench/fpn_sqnr.py) -----------------------

def fpn_sqnr(results: Path) -> str:
    """Per FPN level: SQNR (dB) of the compiled integer program against the float backbone, per
    precision and method (mean over seeds), and a setup line."""
    from bench.fpn_sqnr import METHODS, PRECISIONS, level_db
    d = _json(results, "fpn_sqnr.json")
    runs, m = d["runs"], d["meta"]
    cols = [(p, k) for p in PRECISIONS for k in METHODS if any((r["precision"], r["method"]) == (p, k) for r in runs)]
    head = ["level", *(f"{p} {METHODS[k]}" for p, k in cols)]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for level in [*runs[0]["levels"], "all"]:
        cells = []
        for p, k in cols:
            dbs = [level_db(r, level) for r in runs if (r["precision"], r["method"]) == (p, k)]
            cells.append("∞" if any(x == float("inf") for x in dbs) else f"{sum(dbs) / len(dbs):.2f}")
        lines.append(f"| {f'`{level}`' if level != 'all' else 'all levels'} | " + " | ".join(cells) + " |")
    seeds = sorted({r["seed"] for r in runs})
    setup = (f"SQNR in dB, {m['px']}×{m['px']} inputs, {m['samples']} calibration and {m['eval']} evaluation "
             f"images, {m['iters']} iterations per block, seed{'s' if len(seeds) > 1 else ''} "
             f"{', '.join(map(str, seeds))}.")
    return "\n".join(lines) + "\n\n" + setup


def vit_npu16(results: Path) -> str:
    """ViT-B/16 on npu16 with and without the row unit: total time, host share, the ratio."""
    rows = _json(results, "vit_npu16.json")["rows"]
    parts = []
    for machine in dict.fromkeys(r["machine"] for r in rows):
        on, off = (next(r for r in rows if r["machine"] == machine and r["row_unit"] is u) for u in (True, False))
        parts.append(f"on the {machine.split(' (')[0]} machine ({machine.split(' (')[1].rstrip(')')}) "
                     f"{on['total_us'] / 1e3:.2f} ms per inference with the row unit "
                     f"({100 * on['host_share']:.1f} % on the host) against {off['total_us'] / 1e3:.2f} ms without it "
                     f"({100 * off['host_share']:.1f} % on the host), ×{on['speedup_vs_no_row_unit']:.1f}")
    return "; ".join(parts)


def cpu_fusion(results: Path) -> str:
    """Kernel fusions (bench/cpu_fusion.py), per fusion: each pair alone, then the whole model,
    fused ÷ unfused per model and precision."""
    rows = _json(results, "cpu_fusion.json")["rows"]
    parts = []
    for fusion, pair in (("residual-adds", "conv and add"), ("expand-depthwise", "expansion and depthwise")):
        mine = [r for r in rows if r["fusion"] == fusion]
        pairs = [p["ratio"] for r in mine for p in r["pairs"]]
        whole = ", ".join(f"{_name(r['model'])} {r['precision']} {r['ratio']:.3f}× "
                          f"({r['ratio_range'][0]:.2f}–{r['ratio_range'][1]:.2f} over rounds)" for r in mine)
        parts.append(f"`--fuse {fusion}`: each fused kernel alone takes {_span(pairs, '.2f')}× the time of its "
                     f"{pair} kernels ({sum(p < 1 for p in pairs)} of {len(pairs)} pairs faster); whole models "
                     f"{whole}")
    return "; ".join(parts)


BLOCKS: tuple[Block, ...] = (
    Block("accuracy", accuracy),
    Block("vit_accuracy", vit_accuracy),
    Block("calib_speed", calib_speed, inline=True),
    Block("calib_speed_gain", calib_speed_gain, inline=True),
    Block("calib_speed_public", calib_speed_public, inline=True),
    Block("calib_speed_fp32_public", calib_speed_fp32_public, inline=True),
    Block("calib_speed_native_soft", calib_speed_lever_gain, inline=True),
    Block("calib_time_estimate", calib_time_estimate, inline=True),
    Block("bf16_accuracy", bf16_accuracy, inline=True),
    Block("cpu", cpu),
    Block("cpu_ort", cpu_ort),
    Block("ort_ratio", ort_ratio, inline=True),
    Block("vela_compare", vela_compare),
    Block("vela_refetch", vela_refetch, inline=True),
    Block("vela_stem", vela_stem, inline=True),
    Block("vela_depthwise", vela_depthwise, inline=True),
    Block("vela_mean", vela_mean, inline=True),
    Block("npu16_table6", npu16_table6, inline=True),
    Block("npu16_table7", npu16_table7, inline=True),
    Block("npu16_sweep_fit", npu16_sweep_fit, inline=True),
    Block("npu16_sweep_cycles", npu16_sweep_cycles, inline=True),
    Block("calib_memory", calib_memory, inline=True),
    Block("npu_budget", npu_budget),
    Block("fpn_sqnr", fpn_sqnr),
    Block("vit_npu16", vit_npu16, inline=True),
    Block("cpu_fusion", cpu_fusion, inline=True),
)
