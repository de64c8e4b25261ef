"""The accelerator as data: every number the tiler, lowering, simulator and cost model use.

``load_config(path)`` reads a JSON config (``waps-tvm compile --npu-config FILE``) into an
``NPU16``; an omitted key keeps today's npu16. Keys (JSON → field):

    tile                 int, 1..MAX_TILE   MAC array side (input ch × output ch per step)
    arrays               int, 1..4          MAC arrays, each on its own output tile
    clock_mhz            number > 0
    dma_bytes_per_cycle  int >= 1           feature maps ↔ the NPU (and weights, unless ...)
    weight_bytes_per_cycle int >= 0         ... weights have their own port at this rate (0: none)
    epilogue_lanes       int >= 1           → epilogue_width (values per cycle)
    sram_kib             {"weights", "activations", "accumulators"}: ints >= 1 (KiB)
    waps_switch_cycles   int >= 0           waps_merge_cycles  int >= 0
    waps_pipelined       bool
    cycles_per_value     {"add", "mul", "pool", "lut", "row"}: numbers >= 0 (1/256 steps): each
                         unit's own throughput (Vela's output cycles per element; "row": per
                         value and pass of the row unit's softmax / layer norm); 0 or omitted:
                         the epilogue's lanes
    row_unit             bool               the row unit runs softmax and layer norm
                                            (SOFTMAX, LAYERNORM); false: they stay on the host
    row_cycles           int >= 1           the row unit's iterative stage, per row (a layer
                                            norm position, a softmax group at one position):
                                            the root and the divisor's reciprocal
    double_buffer        bool               a stripe uses half of each SRAM buffer and the next
                                            stripe's DMA overlaps its compute (False: all of it,
                                            DMA and compute take turns)
    first_layer_im2col   bool               convs with few input channels (c < tile, one conv
                                            group, no WAPS groups, kh·kw > 1) run im2col: the
                                            array's rows take (channel, ky, kx) products
                                            (targets/npu16/first_layer.py)
    cascade              bool               chains of npu16 ops run as one partition and keep
                                            their intermediates in the activation SRAM when
                                            they fit (codegen/npu16/cascade.py); false: every
                                            op is its own partition, DMA in and out
    host                 {"clock_mhz", "ops_per_cycle", "bytes_per_cycle", "div_ops"}: the host
                         CPU that runs what the NPU cannot (``Host``; an omitted key keeps the
                         default: a Cortex-A53-class core, targets/npu16/host_cost.py)
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from calib.errors import ConfigError

CPV_STEPS = 256        # cycles per value are kept in 1/CPV_STEPS cycle (registers CPV_*)
MAX_TILE = 64          # the simulator's accumulator registers (D1/D2) are sized for this


class NpuConfigError(ConfigError, ValueError):
    """An npu16 parameter or config file is invalid (also a ValueError: the dataclass checks)."""


@dataclass(frozen=True)
class Host:
    """The host CPU beside the NPU: it runs the ops the NPU cannot (placed on ``llvm`` with a
    reason, codegen/npu16/lower.py) on tensors in the DRAM it shares with the NPU's DMA.
    Its time for an op is a roofline, max(ops / ops_per_cycle, bytes / bytes_per_cycle) cycles
    at ``clock_mhz`` (targets/npu16/host_cost.py has the per-kind counts).

    clock_mhz        1200: a Cortex-A53 cluster as paired with a small NPU in i.MX 8M Plus-class
                     SoCs runs at 1.2–1.8 GHz; the low end, one core
    ops_per_cycle    1.0: scalar integer code on a dual-issue in-order core (the A53 issues at
                     most 2 per cycle; loads, table lookups and dependent chains keep compiled
                     scalar loops near 1); float quantize/dequantize counted the same way
    bytes_per_cycle  4.0: 4.8 GB/s at 1.2 GHz, what one in-order core streams from LPDDR4
                     (the DRAM itself offers more; one A53's load/store path does not)
    div_ops          20: one 64-bit integer division (or a float64 root) counted as this many
                     ops: an iterative, non-pipelined divider taking tens of cycles on Arm
                     application cores (an assumption to set per board, not a measurement)
    """

    clock_mhz: float = 1200.0
    ops_per_cycle: float = 1.0
    bytes_per_cycle: float = 4.0
    div_ops: int = 20

    def __post_init__(self):
        for name in ("clock_mhz", "ops_per_cycle", "bytes_per_cycle"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
                raise NpuConfigError(f"npu16 host.{name} must be a positive number, not {v!r}")
        if isinstance(self.div_ops, bool) or not isinstance(self.div_ops, int) or self.div_ops < 1:
            raise NpuConfigError(f"npu16 host.div_ops must be an integer at least 1, not {self.div_ops!r}")


@dataclass(frozen=True)
class NPU16:
    """A tile (input channels) × tile (output channels) int8 MAC array, 1–4 of them.

    arrays             MAC arrays; each computes a different output tile
    tile               MAC array side (input channels × output channels per cycle)
    clock_mhz          clock for converting cycles to time
    dma_bytes_per_cycle  bandwidth between the memory holding feature maps and the NPU's SRAM
    weight_bytes_per_cycle  0: weights share that DMA port; > 0: weights come from their own
                       memory (flash, DRAM) over their own port at this rate, in parallel
    epilogue_width     values per cycle through requant/activation (the paper's 8)
    waps_switch_cycles cycles per non-empty group switch (accumulate in D1, scale into D2)
    waps_merge_cycles  cycles to merge the group partial sums
    waps_pipelined     the D1→D2 scaling and merge of one output tile overlap the next
                       tile's accumulation (the paper's pipelined RTL, Table 8); False
                       serialises them (appendix B's 4 cycles on every output tile)
    sram_*_kib         on-chip buffers (weights, activations, accumulators); a conv/linear
                       is striped to fit them (targets/npu16/memory.py)
    *_cycles_per_value cycles per value through the add, mul, pool (max/sum/avg window taps),
                       lookup and row (softmax / layer norm, per pass over a row) units, in
                       steps of 1/256 cycle (``unit_q8``); 0: the unit is the epilogue's
                       lanes (⌈values / epilogue_width⌉)
    row_cycles         the row unit's iterative stage, per row: a layer norm position's integer
                       root and the reciprocal of its divisor, a softmax row's reciprocal of
                       S·2^k (64: a bit-serial root and a radix-2 reciprocal of 32 steps each);
                       it works on one row while the lanes stream the others (``row_cost``)
    row_unit           the machine has the row unit (False: an NPU without one, whose softmax
                       and layer norm run on the host)
    double_buffer      two halves per buffer: DMA of the next stripe overlaps this one's
                       compute, so a command takes its slowest unit; single-buffered, DMA
                       and compute take turns (cycles = DMA + the slower of array and epilogue)
    first_layer_im2col a conv with fewer input channels than the tile (the stem) runs with its
                       c·kh·kw products in the array's rows, ⌈c·kh·kw/T⌉ steps per output
                       tile and pixel instead of kh·kw·⌈c/T⌉ (targets/npu16/first_layer.py)
    cascade            chains of ops run as one partition, intermediates kept in the
                       activation SRAM when they fit (codegen/npu16/cascade.py)
    host               the host CPU that runs the ops the NPU cannot (``Host``): their time
                       in the report, apart from the NPU's
    """

    arrays: int = 1
    tile: int = 16
    clock_mhz: float = 800.0
    dma_bytes_per_cycle: int = 16
    weight_bytes_per_cycle: int = 0
    epilogue_width: int = 8
    waps_switch_cycles: int = 1
    waps_merge_cycles: int = 1
    waps_pipelined: bool = True
    sram_weight_kib: int = 256
    sram_act_kib: int = 512
    sram_acc_kib: int = 64
    add_cycles_per_value: float = 0.0
    mul_cycles_per_value: float = 0.0
    pool_cycles_per_value: float = 0.0
    lut_cycles_per_value: float = 0.0
    row_cycles_per_value: float = 0.0
    row_cycles: int = 64
    row_unit: bool = True
    double_buffer: bool = True
    first_layer_im2col: bool = False
    cascade: bool = True
    host: Host = Host()

    def __post_init__(self):
        if not isinstance(self.host, Host):
            raise NpuConfigError(f"npu16 host: expected Host, got {self.host!r}")
        for f in fields(self):
            if f.name == "host":
                continue
            v = getattr(self, f.name)
            want = {"bool": bool, "float": (int, float)}.get(f.type, int)
            if isinstance(v, bool) != (want is bool) or not isinstance(v, want):
                raise NpuConfigError(f"npu16 {f.name}: expected {f.type}, got {v!r}")
        if not 1 <= self.arrays <= 4:
            raise NpuConfigError(f"npu16 has 1 to 4 MAC arrays, not {self.arrays}")
        if not 1 <= self.tile <= MAX_TILE:
            raise NpuConfigError(f"npu16 tile must be 1 to {MAX_TILE}, not {self.tile}")
        if not (self.clock_mhz > 0 and math.isfinite(self.clock_mhz)):
            raise NpuConfigError(f"npu16 clock_mhz must be positive, not {self.clock_mhz}")
        for name in ("dma_bytes_per_cycle", "epilogue_width", "sram_weight_kib", "sram_act_kib", "sram_acc_kib",
                     "row_cycles"):
            if getattr(self, name) < 1:
                raise NpuConfigError(f"npu16 {name} must be at least 1, not {getattr(self, name)}")
        for unit in UNITS:
            v = getattr(self, f"{unit}_cycles_per_value")
            if not (v >= 0 and math.isfinite(v)) or (v > 0 and self.unit_q8(unit) < 1):
                raise NpuConfigError(f"npu16 {unit}_cycles_per_value must be 0 or at least 1/256, not {v}")
        for name in ("waps_switch_cycles", "waps_merge_cycles", "weight_bytes_per_cycle"):
            if getattr(self, name) < 0:
                raise NpuConfigError(f"npu16 {name} must not be negative, not {getattr(self, name)}")

    def unit_q8(self, unit: str) -> int:
        """Cycles per value of ``unit`` (one of UNITS) in 1/256 cycle; 0: the epilogue's lanes."""
        return round(getattr(self, f"{unit}_cycles_per_value") * CPV_STEPS)

    def unit_cycles(self, unit: str, values: int) -> int:
        """Cycles for ``values`` through ``unit`` ('epilogue' or one of UNITS); the one
        definition the simulator mirrors (npu16_unit_cycles)."""
        q = 0 if unit == "epilogue" else self.unit_q8(unit)
        return -(-values * q // CPV_STEPS) if q else -(-values // self.epilogue_width)

    def to_json(self) -> dict:
        return asdict(self)          # the host as a nested object

    def to_config(self) -> dict:
        """The JSON config that ``from_config`` reads back into this machine."""
        d = asdict(self)
        sram = {"weights": d.pop("sram_weight_kib"), "activations": d.pop("sram_act_kib"),
                "accumulators": d.pop("sram_acc_kib")}
        d["epilogue_lanes"] = d.pop("epilogue_width")
        d["cycles_per_value"] = {u: d.pop(f"{u}_cycles_per_value") for u in UNITS}
        return {**d, "sram_kib": sram}


_RENAMED = {"epilogue_lanes": "epilogue_width"}
_SRAM = {"weights": "sram_weight_kib", "activations": "sram_act_kib", "accumulators": "sram_acc_kib"}
UNITS = ("add", "mul", "pool", "lut", "row")   # units with their own throughput (cycles_per_value)
KEYS = ("tile", "arrays", "clock_mhz", "dma_bytes_per_cycle", "weight_bytes_per_cycle", "epilogue_lanes", "sram_kib",
        "waps_switch_cycles", "waps_merge_cycles", "waps_pipelined", "double_buffer", "cycles_per_value", "first_layer_im2col",
        "cascade", "row_unit", "row_cycles", "host")
HOST_KEYS = tuple(f.name for f in fields(Host))


def from_config(cfg: dict, base: NPU16 | None = None) -> NPU16:
    """A JSON config object → NPU16; omitted keys keep ``base`` (default: today's npu16)."""
    if not isinstance(cfg, dict):
        raise NpuConfigError(f"npu16 config must be a JSON object, not {type(cfg).__name__}")
    unknown = sorted(set(cfg) - set(KEYS))
    if unknown:
        raise NpuConfigError(f"npu16 config: unknown key(s) {', '.join(unknown)} (known: {', '.join(KEYS)})")
    changes = {}
    for key, value in cfg.items():
        if key == "sram_kib":
            if not isinstance(value, dict) or set(value) - set(_SRAM):
                raise NpuConfigError('npu16 config: sram_kib must be an object with keys among '
                                     f'{", ".join(_SRAM)} (KiB), not {json.dumps(value)}')
            changes.update({_SRAM[k]: v for k, v in value.items()})
        elif key == "cycles_per_value":
            if not isinstance(value, dict) or set(value) - set(UNITS):
                raise NpuConfigError('npu16 config: cycles_per_value must be an object with keys among '
                                     f'{", ".join(UNITS)}, not {json.dumps(value)}')
            changes.update({f"{k}_cycles_per_value": v for k, v in value.items()})
        elif key == "host":
            if not isinstance(value, dict) or set(value) - set(HOST_KEYS):
                raise NpuConfigError('npu16 config: host must be an object with keys among '
                                     f'{", ".join(HOST_KEYS)}, not {json.dumps(value)}')
            changes["host"] = value
        else:
            changes[_RENAMED.get(key, key)] = value
    base = base or DEFAULT
    try:
        if "host" in changes:
            changes["host"] = replace(base.host, **changes["host"])
        return replace(base, **changes)
    except NpuConfigError as e:          # name the key as the config spells it
        msg = str(e)
        for key, name in [*_RENAMED.items(), *((f"sram_kib.{k}", v) for k, v in _SRAM.items()),
                          *((f"cycles_per_value.{u}", f"{u}_cycles_per_value") for u in UNITS)]:
            msg = msg.replace(name, key)
        raise NpuConfigError(msg) from None


def load_config(path: str | Path) -> NPU16:
    """Read ``path`` (JSON) → NPU16. NpuConfigError (one line) on a missing file, bad JSON,
    an unknown key or a bad value."""
    try:
        cfg = json.loads(Path(path).read_text())
    except OSError as e:
        raise NpuConfigError(f"--npu-config {path}: cannot read ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NpuConfigError(f"--npu-config {path}: not JSON ({e})") from None
    try:
        return from_config(cfg)
    except NpuConfigError as e:
        raise NpuConfigError(f"--npu-config {path}: {e}") from None


DEFAULT = NPU16()
PAPER = NPU16(arrays=4, clock_mhz=800.0)      # the paper's RTL setup: four 16×16 arrays, 800 MHz
