"""Arm Vela's per-layer cycle estimate for the same architectures npu16 models (issue 15, item 6).

For each model: torchvision architecture (random weights, seed 0) → captured graph (BN folded,
activations fused) → description (bench/vela_describe.py, this venv) → Keras → full-int8 TFLite
(bench/vela_tflite.py, in the Vela venv) → ``vela --accelerator-config ethos-u55-256`` with Vela's
default system config and memory mode → per-layer rows attributed to graph nodes
(bench/vela_report.py). Writes bench/results/vela.json and vela.md.

    python -m bench.vela --models resnet50 mobilenet_v2 --size 224 [--vela-python PATH]

The Vela venv is separate (TensorFlow and Vela are not project dependencies, not in CI):
``python3.11 -m venv /work/vela-venv && /work/vela-venv/bin/python -m pip install -r
bench/vela_requirements.txt``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from bench import vela_describe, vela_report

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
CACHE = ROOT / ".cache" / "vela"
DEFAULT_PYTHON = Path("/work/vela-venv/bin/python")
ACCELERATOR = "ethos-u55-256"
# the earlier Vela figures (random weights, int8, 224×224): total cycles
REFERENCE = {"mobilenet_v2": 6.05e6, "resnet50": 38.1e6}
SUMMARY_KEYS = ("cycles_total", "cycles_npu", "cycles_sram_access", "cycles_dram_access",
                "cycles_on_chip_flash_access", "cycles_off_chip_flash_access", "inference_time",
                "inferences_per_second", "nn_macs", "sram_memory_used", "off_chip_flash_memory_used",
                "sram_total_bytes", "off_chip_flash_total_bytes", "off_chip_flash_weight_read_bytes",
                "off_chip_flash_feature_map_read_bytes", "total_original_weights", "total_npu_encoded_weights",
                "passes_after_fusing")
MATCHED_OPS = ("conv2d", "linear", "add", "max_pool2d", "avg_pool2d", "global_avg_pool", "cat")
CONFIG_KEYS = ("accelerator_configuration", "system_config", "memory_mode", "core_clock", "arena_cache_size",
               "sram_bandwidth", "off_chip_flash_bandwidth", "weights_storage_area", "feature_map_storage_area")


class VelaRunError(vela_report.WapsError):
    """A step in the Vela venv failed (its stderr tail is in the message)."""


def graph_of(model: str, size: int, seed: int, reference: bool = False):
    """The captured graph of architecture ``model``; with ``reference``, also (x, net(x)) for one
    seeded standard-normal input (what the Keras side must reproduce in float)."""
    import torch

    from calib.capture import capture, export_module
    from calib.fold_bn import fold_batch_norm
    from calib.fuse import fuse_activations
    from waps_tvm.architectures import get_architecture
    torch.manual_seed(seed)
    net = get_architecture(model).eval()
    graph = fuse_activations(fold_batch_norm(capture(export_module(net, (3, size, size)))))
    if not reference:
        return graph
    return graph, reference_pair(net, (3, size, size), seed)


def reference_pair(net, shape: tuple[int, ...], seed: int) -> tuple:
    import torch
    x = torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return x.numpy(), net.eval()(x).numpy()


def run_model(model: str, size: int, seed: int, vela_python: Path, work: Path, samples: int = 8) -> dict:
    """Describe, convert and compile architecture ``model``; the result record for vela.json."""
    graph, ref = graph_of(model, size, seed, reference=True)
    compile_graph(graph, model, vela_python, work, seed, samples, reference=ref)
    return collect(graph, model, size, seed, samples, work)


def compile_graph(graph, name: str, vela_python: Path, work: Path, seed: int = 0, samples: int = 8,
                  vela_args: tuple[str, ...] = (), reference: tuple | None = None) -> None:
    """Write into ``work``: graph.json + weights.npz, NAME.tflite + tflite_ops.json (Vela venv),
    vela/ (Vela's outputs), vela_stdout.txt and vela_version.txt. ``vela_args`` are added to the
    Vela command (e.g. ``--ignore-ops``); ``reference`` (x, y) makes the Keras side check its
    float model against torch (float_check.json)."""
    desc_path = vela_describe.write(vela_describe.describe(graph, name), work)
    (work / "float_check.json").unlink(missing_ok=True)
    (work / "reference.npz").unlink(missing_ok=True)
    if reference is not None:
        import numpy as np
        np.savez(work / "reference.npz", x=reference[0], y=reference[1])
    tflite = work / f"{name}.tflite"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1",
           "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    _run([str(vela_python), str(ROOT / "vela_tflite.py"), str(desc_path), str(tflite), "--ops",
          str(work / "tflite_ops.json"), "--samples", str(samples), "--seed", str(seed)], env, "TFLite conversion")
    stdout = _run([str(vela_python), "-m", "ethosu.vela", str(tflite), *vela_command_args(work / "vela"),
                   *vela_args], env, "vela")
    (work / "vela_stdout.txt").write_text(stdout)
    version = _run([str(vela_python), "-m", "ethosu.vela", "--version"], env, "vela --version").strip()
    (work / "vela_version.txt").write_text(version + "\n")


def vela_command_args(out: Path) -> list[str]:
    """Vela's options here: no --system-config/--memory-mode/--config, so Vela's defaults apply."""
    return ["--accelerator-config", ACCELERATOR, "--output-dir", str(out), "--verbose-performance",
            "--verbose-config", "--show-cpu-operations", "--enable-debug-db"]


def collect(graph, name: str, size: int, seed: int, samples: int, work: Path) -> dict:
    """The vela.json record of ``graph`` from the files compile_graph left in ``work``."""
    out = work / "vela"
    stdout = (work / "vela_stdout.txt").read_text()
    summary_csv = next(out.glob(f"{name}_summary_*.csv"), None)
    if summary_csv is None:
        raise vela_report.VelaOutputError(f"{out}: no {name}_summary_*.csv")
    summary = vela_report.parse_summary(summary_csv)
    ops = vela_report.parse_per_layer(out / f"{name}_per-layer.csv", out / f"{name}_debug.xml")
    tops = json.loads((work / "tflite_ops.json").read_text())
    by_name = {n.name: n for n in graph.nodes}
    costs, stray = vela_report.attribute(ops, tops, {n.name: n.op for n in graph.nodes}, graph.output)
    claimed = {n for c in costs for n in c.nodes}
    # these nodes must each own Vela rows; activations, pads and flattens fuse into them
    missing = [n.name for n in graph.nodes if n.op in MATCHED_OPS and n.name not in claimed]
    total = int(summary["cycles_total"])
    nodes = []
    for c in costs:
        g = by_name[c.node]
        nodes.append({"node": c.node, "op": g.op, "source": g.source, "shape": list(g.shape), "nodes": c.nodes,
                      "tflite_ops": c.tflite_ops, "tflite_types": c.tflite_types, "targets": c.targets,
                      "op_cycles": c.op_cycles, "share": c.op_cycles / total if total else 0.0,
                      "cycles": c.cycles, "bound": c.bound, "macs": c.macs, "vela_ops": c.vela_ops})
    return {
        "model": name, "size": size, "seed": seed, "vela_version": (work / "vela_version.txt").read_text().strip(),
        "representative_samples": samples,
        "command": " ".join(["vela", f"{name}.tflite", *vela_command_args(Path("OUT"))]),
        "config": {**{k: summary[k] for k in CONFIG_KEYS}, "verbose_config": vela_report.system_config(stdout)},
        "totals": {k: summary[k] for k in SUMMARY_KEYS},
        "sum_of_layer_op_cycles": sum(o.op_cycles for o in ops),
        "tflite_operators": len(tops), "vela_operators": len(ops),
        "cpu_operators": [{"operator": o, "name": n, "nodes": vela_report.nodes_in(n)}
                          for o, n in vela_report.cpu_operators(stdout)],
        "graph_nodes_without_vela_rows": missing,
        "unattributed_vela_ops": [asdict(o) for o in stray],
        "nodes": nodes,
        "vela_ops": [{**asdict(o), "bound": o.bound} for o in ops],
        "reference_cycles_total": REFERENCE.get(name),
        "float_check": json.loads(fc.read_text()) if (fc := work / "float_check.json").exists() else None,
    }


def _run(cmd: list[str], env: dict, what: str) -> str:
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        raise VelaRunError(f"{what} failed ({p.returncode}): " + " | ".join(tail))
    return p.stdout


def markdown(records: list[dict], top: int = 15) -> str:
    md = ["# Arm Vela on the npu16 benchmark architectures", "",
          "Random weights (torch seed 0; BN folded, activations fused), full-int8 TFLite (per-channel int8 "
          "weights, int8 activations calibrated on random normal inputs), Vela's default system config and "
          "memory mode. Per-layer rows are Vela's, summed per graph node (`bench/vela_report.py`); `bound` is "
          "the unit with the most cycles (NPU compute or a memory's access cycles). Made by "
          "`python -m bench.vela`; raw rows in `vela.json`.", ""]
    for r in records:
        c, t = r["config"], r["totals"]
        cycles = t["cycles_total"]
        md += [f"## {r['model']} ({r['size']}×{r['size']})", "",
               f"Vela {r['vela_version']}, {c['accelerator_configuration']}, system config "
               f"`{c['system_config']}` (core clock {c['core_clock'] / 1e6:.0f} MHz, SRAM "
               f"{c['sram_bandwidth']:.2f} GB/s, off-chip flash {c['off_chip_flash_bandwidth']:.2f} GB/s), memory "
               f"mode `{c['memory_mode']}` (weights in {c['weights_storage_area']}, feature maps in "
               f"{c['feature_map_storage_area']}). " + _config_details(c["verbose_config"]), "",
               "| total cycles | NPU cycles | SRAM access | off-chip flash access | inference | MACs | SRAM used "
               "| flash used | off-chip flash bytes | CPU ops |", "|---|---|---|---|---|---|---|---|---|---|",
               f"| {cycles / 1e6:.2f} M | {t['cycles_npu'] / 1e6:.2f} M | {t['cycles_sram_access'] / 1e6:.2f} M | "
               f"{t['cycles_off_chip_flash_access'] / 1e6:.2f} M | {t['inference_time'] * 1e3:.2f} ms | "
               f"{t['nn_macs'] / 1e9:.3f} G | {t['sram_memory_used']:.1f} KiB | "
               f"{t['off_chip_flash_memory_used']:.1f} KiB | {t['off_chip_flash_total_bytes'] / 1e6:.2f} MB | "
               f"{len(r['cpu_operators'])} |", ""]
        if r.get("reference_cycles_total"):
            ref = r["reference_cycles_total"]
            md += [f"The issue's earlier Vela figure: {ref / 1e6:.2f} M cycles; this run {cycles / 1e6:.2f} M "
                   f"({cycles / ref - 1:+.1%}).", ""]
        by_bound: dict[str, list[int]] = {}
        for n in r["nodes"]:
            b = by_bound.setdefault(n["bound"] or "none", [0, 0])
            b[0] += 1
            b[1] += n["op_cycles"]
        md += ["Nodes by bounding unit: " + ", ".join(f"{b} {k[0]} nodes ({k[1] / cycles:.1%} of cycles)"
                                                      for b, k in sorted(by_bound.items())), ""]
        fc = r.get("float_check")
        md += [f"Translation: {r['tflite_operators']} TFLite operators, {r['vela_operators']} Vela rows on "
               f"{len(r['nodes'])} graph nodes; graph nodes with no rows: "
               f"{r['graph_nodes_without_vela_rows'] or 'none'}; rows owned by no node: "
               f"{len(r['unattributed_vela_ops'])}; sum of rows {r['sum_of_layer_op_cycles']:,} = total "
               f"{cycles:,}: {r['sum_of_layer_op_cycles'] == cycles}"
               + (f"; float Keras vs torch output max rel. error {fc['rel']:.1e}." if fc else "."), ""]
        md += [f"Top {top} nodes by cycles:", "",
               "| node | source | TFLite | MACs | cycles | share | NPU | SRAM AC | flash AC | bound |",
               "|---|---|---|---|---|---|---|---|---|---|"]
        for n in sorted(r["nodes"], key=lambda n: -n["op_cycles"])[:top]:
            cy = n["cycles"]
            md.append(f"| {n['node']} | {n['source']} | {'+'.join(n['tflite_types'])} | {n['macs'] / 1e6:.1f} M | "
                      f"{n['op_cycles']:,} | {n['share']:.1%} | {cy['npu']:,} | {cy['sram']:,} | "
                      f"{cy['off_chip_flash']:,} | {n['bound']} |")
        md.append("")
    return "\n".join(md)


def _config_details(v: dict) -> str:
    """The memory parameters of --verbose-config that set Vela's bandwidths and the SRAM budget."""
    if not v:
        return ""
    keys = ("Sram_clock_scales", "Sram_burst_length", "Sram_read_latency", "Sram_write_latency",
            "OffChipFlash_clock_scales", "OffChipFlash_burst_length", "OffChipFlash_read_latency", "arena_cache_size")
    return "Config: " + ", ".join(f"{k} {v[k]}" for k in keys if k in v) + "."


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v2"])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=8, help="representative inputs for int8 calibration")
    p.add_argument("--vela-python", type=Path, default=DEFAULT_PYTHON,
                   help=f"python of the Vela venv (default {DEFAULT_PYTHON})")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if not args.vela_python.exists():
        print(f"bench.vela: error: no Vela venv python at {args.vela_python} (create it: python3.11 -m venv "
              "/work/vela-venv && /work/vela-venv/bin/python -m pip install -r bench/vela_requirements.txt)",
              file=sys.stderr)
        return 2
    records = []
    try:
        for model in args.models:
            records.append(run_model(model, args.size, args.seed, args.vela_python,
                                     CACHE / f"{model}_{args.size}", args.samples))
            t = records[-1]["totals"]
            print(f"{model}: {t['cycles_total'] / 1e6:.2f} M cycles, {t['inference_time'] * 1e3:.2f} ms", flush=True)
    except vela_report.WapsError as e:
        print(f"bench.vela: error: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vela.json").write_text(json.dumps({"accelerator": ACCELERATOR, "models": records}, indent=1))
    (args.out / "vela.md").write_text(markdown(records))
    print(markdown(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
