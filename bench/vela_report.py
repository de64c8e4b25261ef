"""Read Vela's outputs and attribute its per-layer cycles to the project graph's nodes.

Inputs of one Vela run (``vela NET.tflite --verbose-performance --enable-debug-db
--show-cpu-operations --output-dir D``):
  ``D/NET_summary_<system config>.csv``  one row of totals (cycles_*, *_bytes, inference_time, …)
  ``D/NET_per-layer.csv``                one row per Vela (NNG) operator: Target (NPU/CPU), Op Cycles,
                                         NPU cycles, SRAM/DRAM/OnFlash/OffFlash access cycles, MACs
  ``D/NET_debug.xml``                    debug database: table ``perf`` (same rows, same order, with
                                         ``source_id``) and ``source`` (source_id → ``ext_key``, the
                                         TFLite operator index)
plus bench/vela_tflite.py's ``tflite_ops.json`` (TFLite operator index → output tensor names, which
carry the Keras layer names ``<node>__<role>``).

Op Cycles of a row is the largest of its NPU and memory-access cycles; the unit that attains
it is the row's *bound*. Vela's ``cycles_total`` (summary) is the network's total.
"""
from __future__ import annotations

import csv
import io
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from calib.errors import WapsError

# per-layer CSV access-cycle columns → our unit names (bound candidates besides "npu")
ACCESS = {"SRAM AC": "sram", "DRAM AC": "dram", "OnFlash AC": "on_chip_flash", "OffFlash AC": "off_chip_flash"}
UNITS = ("npu", *ACCESS.values())
ROLES = ("op", "pad", "sum", "nchw")  # bench/vela_tflite.ROLES
_LAYER = re.compile(r"(?<![A-Za-z0-9_])([A-Za-z0-9_]+?)__(?:" + "|".join(ROLES) + r")(?:_\d+)?(?=/)")
COMPUTE_OPS = ("conv2d", "linear")


class VelaOutputError(WapsError):
    """Vela's output files are missing or disagree with each other."""


@dataclass
class VelaOp:
    """One row of Vela's per-layer table. ``source``: TFLite operator index (None: Vela-made)."""
    original: str               # the TFLite operator type as Vela names it (Conv2D, Pad, …)
    operator: str               # what Vela runs (Conv2D, MemoryCopy, Relu, Passthrough, …)
    target: str                 # NPU or CPU
    name: str
    source: int | None
    op_cycles: int
    npu_cycles: int
    access: dict[str, int]      # UNITS[1:] → access cycles
    macs: int
    staging_usage: int

    @property
    def cycles(self) -> dict[str, int]:
        return {"npu": self.npu_cycles, **self.access}

    @property
    def bound(self) -> str:
        """The unit whose cycles equal Op Cycles ('' for a zero-cycle row); NPU wins ties."""
        return bound_of(self.cycles)


def bound_of(cycles: dict[str, int]) -> str:
    best = max(cycles.values(), default=0)
    return next((u for u in UNITS if cycles.get(u, 0) == best), "") if best > 0 else ""


@dataclass
class NodeCost:
    """Vela's rows attributed to one graph node (summed). ``nodes``: every graph node the TFLite
    operator's tensor names mention (e.g. a conv and its fused ReLU node); ``node`` the main one."""
    node: str
    nodes: list[str]
    tflite_ops: list[int]
    tflite_types: list[str]
    targets: list[str]
    op_cycles: int = 0
    cycles: dict[str, int] = field(default_factory=lambda: {u: 0 for u in UNITS})
    macs: int = 0
    vela_ops: int = 0

    @property
    def bound(self) -> str:
        return bound_of(self.cycles)


def nodes_in(tensor_name: str) -> list[str]:
    """Graph node names in a TFLite tensor name, in order of appearance (each once).

    The converter joins the scopes of fused ops with ';': ``m_1/conv2d_3__op_1/Relu;m_1/conv2d_3__op_1/
    convolution;;m_1/conv2d_3__pad_1/Pad`` → ['conv2d_3']. Keras appends ``_<k>`` to a layer's scope.
    """
    return list(dict.fromkeys(m.group(1) for m in _LAYER.finditer(tensor_name)))


def parse_summary(path: Path) -> dict[str, float | str]:
    """The summary CSV's single row; numeric fields as int/float."""
    rows = list(csv.reader(path.read_text().splitlines()))
    if len(rows) != 2:
        raise VelaOutputError(f"{path}: expected a header and one row, found {len(rows)} rows")
    return {k: _number(v) for k, v in zip(rows[0], rows[1])}


def parse_per_layer(csv_path: Path, debug_xml: Path) -> list[VelaOp]:
    """Per-layer rows joined with the debug database's source ids (rows must agree one to one)."""
    table = list(csv.DictReader(csv_path.read_text().splitlines()))
    perf = _db_table(debug_xml, "perf")
    source = {int(r["id"]): int(r["ext_key"]) for r in _db_table(debug_xml, "source")}
    if len(table) != len(perf):
        raise VelaOutputError(f"{csv_path.name} has {len(table)} rows, {debug_xml.name} perf has {len(perf)}")
    ops = []
    for i, (r, p) in enumerate(zip(table, perf)):
        if (r["NNG Operator"], r["Name"].strip(), int(r["Op Cycles"])) != (p["operator"], p["name"],
                                                                           int(p["op_cycles"])):
            raise VelaOutputError(f"row {i}: per-layer CSV ({r['NNG Operator']} {r['Name']}) and debug "
                                  f"database ({p['operator']} {p['name']}) disagree")
        sid = p.get("source_id", "")
        ops.append(VelaOp(r["Original Operator"], r["NNG Operator"], r["Target"], r["Name"].strip(),
                          source.get(int(sid)) if sid not in ("", "-1") else None, int(r["Op Cycles"]),
                          int(r["NPU"]), {u: int(r[c]) for c, u in ACCESS.items()}, int(r["MAC Count"]),
                          int(r["Staging Usage"])))
    return ops


def attribute(ops: list[VelaOp], tflite_ops: list[dict], graph_nodes: dict[str, str],
              output: str) -> tuple[list[NodeCost], list[VelaOp]]:
    """Sum Vela's rows per graph node, in TFLite operator order.

    ``tflite_ops``: bench/vela_tflite.tflite_ops rows; ``graph_nodes``: node name → op; ``output``:
    the graph's output node (the converter renames the output tensor, so the operator producing a
    model output is attributed to it). Returns the per-node costs and the rows no node claims.
    """
    owner: dict[int, list[str]] = {}
    for t in tflite_ops:
        names = [n for out in t["outputs"] for n in nodes_in(out) if n in graph_nodes]
        names = list(dict.fromkeys(names)) or ([output] if t["model_output"] else [])
        owner[t["index"]] = names
    types = {t["index"]: t["op"] for t in tflite_ops}
    costs: dict[str, NodeCost] = {}
    stray: list[VelaOp] = []
    for op in ops:
        names = owner.get(op.source, []) if op.source is not None else []
        if not names:
            stray.append(op)
            continue
        main = next((n for n in names if graph_nodes[n] in COMPUTE_OPS), names[0])
        c = costs.get(main)
        if c is None:
            c = costs[main] = NodeCost(main, list(names), [], [], [])
        for n in names:
            if n not in c.nodes:
                c.nodes.append(n)
        if op.source not in c.tflite_ops:
            c.tflite_ops.append(op.source)
            c.tflite_types.append(types[op.source])
        if op.target not in c.targets:
            c.targets.append(op.target)
        c.op_cycles += op.op_cycles
        c.macs += op.macs
        c.vela_ops += 1
        for u, v in op.cycles.items():
            c.cycles[u] += v
    order = {t["index"]: i for i, t in enumerate(tflite_ops)}
    return sorted(costs.values(), key=lambda c: order.get(c.tflite_ops[0], 0)), stray


def cpu_operators(vela_stdout: str) -> list[tuple[str, str]]:
    """(operator, name) of the ``CPU: Op = name (outputs …)`` lines of ``--show-cpu-operations``."""
    pat = re.compile(r"^\s*CPU: (\S+) = (.*?)(?: \(outputs [^)]*\))?\s*$")
    return [(m.group(1), m.group(2)) for m in map(pat.match, vela_stdout.splitlines()) if m]


def system_config(vela_stdout: str) -> dict[str, str]:
    """``key = value`` lines of ``--verbose-config`` (system configuration and memory mode)."""
    out = {}
    section = ""
    for line in vela_stdout.splitlines():
        m = re.match(r"^(System Configuration|Memory Mode) \((.+)\):$", line)
        if m:
            section = m.group(1)
            out[section] = m.group(2)
            continue
        m = re.match(r"^\s{3}(\w+) = (.+?)\s*$", line)
        if m and section:
            out[m.group(1)] = m.group(2)
        elif not line.startswith("   "):
            section = ""
    return out


def _db_table(path: Path, name: str) -> list[dict[str, str]]:
    root = ET.parse(path).getroot()
    for t in root.iter("table"):
        if t.get("name") == name:
            text = (t.text or "").strip()
            return list(csv.DictReader(io.StringIO(text)))
    raise VelaOutputError(f"{path}: no table '{name}' (run Vela with --enable-debug-db)")


def _number(v: str):
    try:
        return int(v)
    except ValueError:
        try:
            return float(v)
        except ValueError:
            return v
