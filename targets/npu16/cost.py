"""The npu16 cost model: an analytical estimator of the simulator's counters, from shapes.

The simulator (npu16_sim.h) counts what runs; this module predicts the same numbers
without running anything, for architecture sweeps and the paper's tables. A hypothesis
test (tests/targets/test_npu16_cost.py) holds every counter equal to this estimate:
empty groups, pipelined and serial WAPS, 1–4 arrays, tiles 8/16/32, DMA.

A layer is a conv/linear ``LayerShape``: batch n, input channels c, output channels m,
kernel kh×kw, output pixels oh×ow, conv groups G, and the sizes of its WAPS groups
(empty: none). A linear layer is a 1×1 conv over one pixel. T = the array side (tile),
A = arrays, OT = ⌈(m/G)/T⌉ output tiles per conv group, T_p = input tiles of WAPS group p
(the maximum over conv groups; 0 for an empty group).

Operations (the paper's Table 6 counting):
    MACs        n·m·oh·ow·(c/G)·kh·kw;  base integer ops = 2·MACs (multiply + add)
    WAPS ops    per output element, per non-empty *scaled* group (σ ≠ 0): one shift and
                one add (γ = 1 groups need neither) → 4 per output for the default g = 3
Cycles (one array step = T input channels × T outputs of one pixel and tap):
    compute     S · n·G·oh·ow·⌈OT/A⌉ with S = kh·kw·Σ_p T_p array steps per output tile:
                the A arrays take consecutive output tiles in lockstep. Groups split the
                reduction, so a group smaller than a tile or not a tile multiple wastes
                array rows (fragmentation). Depthwise: S = kh·kw, channel tiles ⌈m/T⌉.
                im2col (first-layer mode): S = ⌈c·kh·kw/T⌉, weights OT·S·T²
    waps        with ≥ 2 groups, per output tile W = waps_switch_cycles per *non-empty*
                group (D1 → scale → D2; an empty group has no switch, appendix B) +
                waps_merge_cycles (4 for g = 3). Serial: W per tile. Pipelined (default):
                the scaling of one tile overlaps the next tile's S array steps, so a tile
                stalls max(0, W − S), plus W once per layer to drain the pipeline
    dma         (weight tiles as stored: n_tiles·T²·wbits/8, depthwise m·kh·kw·wbits/8, once
                when they fit the weight SRAM, else per row stripe or per sample; the input
                rows each row stripe reads ·C·W·abits_in/8, halos re-read, once or per weight
                stripe; output·abits_out/8), loop order and stripes from targets/npu16/memory.py;
                cycles memory.dma_cycles: one port at dma_bytes_per_cycle, or weights (and
                tables) over their own port at weight_bytes_per_cycle in parallel
    epilogue    Σ over output tiles and pixels of ⌈valid outputs/epilogue_width⌉
    total       max(compute + waps, dma, epilogue) when double-buffered: the units are
                decoupled (as in VTA), so the slowest one bounds a layer; single-buffered,
                dma + max(compute + waps, epilogue)
Element-wise ops (``add_cost``, ``pool_cost``, ``gather_cost``): add and pooling run
through their units (the epilogue's lanes unless the config gives the unit its own cycles
per value: params.NPU16.unit_cycles), a gather only through DMA. The ops of issue 13 (``pad_cost``, ``avg_pool_cost``,
``concat_cost``, ``lut_cost``, ``mul_cost``):
    pad         DMA only: input bytes in, padded bytes out
    avg_pool2d  epilogue: one value per window tap and one per output (requant); DMA: input,
                the int32 window table (2·OH + 2·OW + OH·OW) and D (mult, shift) pairs, output
    concat      one command per input (epilogue rescale, its bytes in and out); a
                multi-command op costs the sum of its commands' max(dma, epilogue)
    table       LUT unit in the epilogue: one value per code; DMA: codes + the 2^A-entry table
    mul         epilogue: one value per output; DMA: a, b (N·C when broadcast), output
    add         epilogue: one value per output; DMA: a, b (its own size × 1 or 4 bytes when broadcast), output
    resize      DMA: the int32 source table (3·OH + 3·OW) and the output; nearest: the DMA
                gathers each output code (one byte in per output), no epilogue; bilinear: the
                two source rows of each output row (2·W bytes per row and plane) in, five
                epilogue values per output (four weighted taps, one requant)
A matmul (``matmul_cost``: attention's Q·Kᵀ and probs·V, the MATMUL command) is per sample and
head g an [M × K]·[K × P] GEMM on the array, like a 1×1 conv of G groups whose weights come
from the second operand (IT = ⌈K/T⌉, OT = ⌈M/T⌉):
    MACs        n·G·P·M·K
    compute     n·G·P·⌈OT/A⌉·IT array steps of the lead array (n·G·P·OT·IT steps in all)
    epilogue    n·G·P·Σ_ot ⌈valid outputs/epilogue_width⌉ (the zero-point term and requant)
    dma         a (n·G·K·P), b (n·G·K·M, once per head, from the activation SRAM into the
                array's tiles: no weight port) and the output (n·G·M·P), each once, at
                dma_bytes_per_cycle; stripes of R positions (memory.matmul_plan)
    total       as a layer: max(compute, dma, epilogue), or dma + max(compute, epilogue)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from targets.npu16 import memory
from targets.npu16.first_layer import im2col_in_tiles
from targets.npu16.params import NPU16


@dataclass(frozen=True)
class LayerShape:
    name: str
    c: int
    m: int
    oh: int = 1
    ow: int = 1
    kh: int = 1
    kw: int = 1
    conv_groups: int = 1
    group_sizes: tuple[int, ...] = ()     # WAPS group sizes (input channels), empty = no groups
    scaled: tuple[bool, ...] = ()         # which groups have σ ≠ 0
    h: int = 0                            # input spatial size (for DMA); 0 = same as output
    w: int = 0
    wbits: int = 4
    abits_in: int = 4
    abits_out: int = 4
    n: int = 1                            # batch
    # [conv group][WAPS group] sizes when known exactly (grouped convs); else group_sizes
    # are assumed spread over the conv groups in proportion
    conv_group_sizes: tuple[tuple[int, ...], ...] = ()
    sh: int = 1                           # vertical stride, padding, dilation (row stripes' halos)
    ph: int = 0
    dh: int = 1
    im2col: bool = False                  # the first-layer mode (targets/npu16/first_layer.py):
                                          # the rows take (channel, ky, kx), no tap loop

    def __post_init__(self):
        if self.im2col and (self.conv_groups != 1 or self.group_sizes):
            raise ValueError(f"{self.name}: im2col takes one conv group and no WAPS groups")

    @property
    def depthwise(self) -> bool:
        return self.conv_groups == self.c == self.m > 1 and not self.group_sizes

    @property
    def outputs(self) -> int:
        return self.n * self.m * self.oh * self.ow

    @property
    def macs(self) -> int:
        return self.outputs * (self.c // self.conv_groups) * self.kh * self.kw


@dataclass
class LayerCost:
    name: str
    macs: int
    base_ops: int
    waps_ops: int
    shifts: int
    adds: int
    compute_cycles: int
    waps_cycles: int
    dma_cycles: int
    epilogue_cycles: int
    bytes: dict = field(default_factory=dict)
    array_steps: int = 0
    epilogue_values: int = 0
    commands: tuple = ()                  # per-command costs of an op run as several commands
    stripes: int = 0                      # row × weight stripes run (conv/linear; memory.py)
    overlap: bool = True                  # double-buffered: DMA overlaps compute
    sram: dict = field(default_factory=dict)   # peak bytes per SRAM buffer (striped layers)
    act_split: tuple = (0, 0)             # the activation peak's input rows and output rows

    @property
    def busy_cycles(self) -> int:
        """Cycles of the compute units alone (array + WAPS, or the epilogue): what the op takes
        however little its DMA moves (e.g. with its activations kept on chip by cascading)."""
        if self.commands:
            return sum(c.busy_cycles for c in self.commands)
        return max(self.compute_cycles + self.waps_cycles, self.epilogue_cycles)

    @property
    def cycles(self) -> int:
        if self.commands:                 # the simulator bounds each command by its slowest unit
            return sum(c.cycles for c in self.commands)
        busy = self.busy_cycles
        return max(busy, self.dma_cycles) if self.overlap else busy + self.dma_cycles

    def to_json(self) -> dict:
        d = asdict(self)
        d["cycles"] = self.cycles
        return d

    @property
    def bound(self) -> str:
        """The unit that bounds the op: 'compute' (array + WAPS), 'dma' or 'epilogue' (for an op
        of several commands, the unit with the most cycles summed over them)."""
        units = {"compute": self.compute_cycles + self.waps_cycles, "dma": self.dma_cycles,
                 "epilogue": self.epilogue_cycles}
        return max(units, key=units.get)

    def counters(self) -> dict:
        """The simulator's counters (targets/npu16/isa.COUNTERS) this estimate predicts."""
        return {"macs": self.macs, "array_steps": self.array_steps, "waps_cycles": self.waps_cycles,
                "shifts": self.shifts, "adds": self.adds, "epilogue_values": self.epilogue_values,
                "dma_in_bytes": self.bytes["weights"] + self.bytes["input"], "dma_out_bytes": self.bytes["output"],
                "compute_cycles": self.compute_cycles, "dma_cycles": self.dma_cycles,
                "epilogue_cycles": self.epilogue_cycles, "cycles": self.cycles, "stripes": self.stripes,
                "dma_weight_bytes": self.bytes["weights"], "dma_saved_bytes": self.bytes.get("saved", 0)}


def cascaded(cost: LayerCost, kept_in_bytes: int, keep_out: bool, npu: NPU16) -> LayerCost:
    """``cost`` of an op in a chain (codegen/npu16/cascade.py) whose kept inputs (``kept_in_bytes``
    of its input DMA) and, with ``keep_out``, output stay in the activation SRAM: those bytes
    move to ``bytes["saved"]`` (counter dma_saved_bytes) and the DMA cycles are recounted."""
    b = dict(cost.bytes)
    if not 0 <= kept_in_bytes <= b["input"]:
        raise ValueError(f"{cost.name}: {kept_in_bytes} kept input bytes of {b['input']}")
    saved = kept_in_bytes + (b["output"] if keep_out else 0)
    b["input"] -= kept_in_bytes
    b["output"] = 0 if keep_out else b["output"]
    b["saved"] = b.get("saved", 0) + saved
    return replace(cost, bytes=b, dma_cycles=memory.dma_cycles(b["weights"], b["input"] + b["output"], npu))


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def group_tiles(layer: LayerShape, tile: int) -> list[int]:
    """T_p: input tiles of each WAPS group per output tile (one entry when there are no
    groups); the maximum over conv groups, 0 for a group empty in every conv group."""
    cg = layer.c // layer.conv_groups
    if layer.depthwise:
        return [1]
    if layer.im2col:
        return [im2col_in_tiles(layer.c, layer.kh, layer.kw, tile)]
    if not layer.group_sizes:
        return [_ceil(cg, tile)]
    if layer.conv_group_sizes:
        return [max(_ceil(sizes[p], tile) for sizes in layer.conv_group_sizes) for p in range(len(layer.group_sizes))]
    if layer.conv_groups == 1:
        return [_ceil(s, tile) for s in layer.group_sizes]
    # grouped conv: each conv group's channels split by WAPS group (assume proportional)
    total = sum(layer.group_sizes)
    return [_ceil(max(1, round(s * cg / total)), tile) if s else 0 for s in layer.group_sizes]


def layer_cost(layer: LayerShape, npu: NPU16) -> LayerCost:
    t, a = npu.tile, npu.arrays
    pix = layer.n * layer.oh * layer.ow
    g = 1 if layer.depthwise else layer.conv_groups
    mg = layer.m // g
    ot = _ceil(mg, t)
    tiles_p = group_tiles(layer, t)
    steps_per_tile = (1 if layer.im2col else layer.kh * layer.kw) * sum(tiles_p)
    lead_tiles = pix * g * _ceil(ot, a)                # output tiles (× pixels) the lead array computes
    grouped = len(layer.group_sizes) > 1
    active = [p for p, n_t in enumerate(tiles_p) if n_t] if grouped else []
    n_scaled = sum(1 for p in active if layer.scaled[p])
    waps_cycles = 0
    if grouped:
        per_tile = len(active) * npu.waps_switch_cycles + npu.waps_merge_cycles
        if npu.waps_pipelined:
            waps_cycles = lead_tiles * max(0, per_tile - steps_per_tile) + (per_tile if lead_tiles else 0)
        else:
            waps_cycles = lead_tiles * per_tile
    h, w = layer.h or layer.oh, layer.w or layer.ow
    if layer.depthwise:
        weights, stripe_tiles, stripe_groups, tile_weights = layer.m * layer.kh * layer.kw, ot, 1, t * layer.kh * layer.kw
    else:
        weights, stripe_tiles, stripe_groups = g * ot * steps_per_tile * t * t, ot, g
        tile_weights = steps_per_tile * t * t
    weight_bytes = _ceil(weights * layer.wbits, 8)
    plan = memory.plan(h=h, oh=layer.oh, ow=layer.ow, kh=layer.kh, sh=layer.sh, ph=layer.ph, dh=layer.dh,
                       in_row_bytes=_ceil(layer.c * w * layer.abits_in, 8), tile=t, out_tiles=stripe_tiles,
                       conv_groups=stripe_groups, tile_weight_bytes=_ceil(tile_weights * layer.wbits, 8),
                       weight_bytes=weight_bytes, npu=npu)
    rows = memory.fetched_rows(plan, h, layer.oh, layer.kh, layer.sh, layer.ph, layer.dh) * plan.input_fetches()
    bytes_ = {"weights": weight_bytes * plan.weight_fetches(layer.n),
              "input": _ceil(layer.n * layer.c * rows * w * layer.abits_in, 8),
              "output": _ceil(layer.outputs * layer.abits_out, 8)}
    dma = memory.dma_cycles(bytes_["weights"], bytes_["input"] + bytes_["output"], npu)
    valid = [min(t, mg - o * t) for o in range(ot)]
    epi = pix * g * sum(_ceil(v, npu.epilogue_width) for v in valid)
    return LayerCost(layer.name, layer.macs, 2 * layer.macs, 2 * n_scaled * layer.outputs,
                     n_scaled * layer.outputs, n_scaled * layer.outputs, lead_tiles * steps_per_tile, waps_cycles,
                     dma, epi, bytes_, array_steps=pix * g * ot * steps_per_tile, epilogue_values=layer.outputs,
                     stripes=layer.n * plan.row_stripes * plan.weight_stripes, overlap=npu.double_buffer,
                     sram={"weights": plan.weight_sram, "activations": plan.act_sram},
                     act_split=(plan.act_in_sram, plan.act_sram - plan.act_in_sram))


def _unit_cost(name: str, bytes_in: int, bytes_out: int, values: int, npu: NPU16, weights: int = 0,
               unit: str = "epilogue") -> LayerCost:
    """One command through DMA and ``unit`` (the epilogue or one of params.UNITS; no MAC array)."""
    b = {"weights": weights, "input": bytes_in, "output": bytes_out}
    return LayerCost(name, 0, 0, 0, 0, 0, 0, 0, memory.dma_cycles(weights, bytes_in + bytes_out, npu),
                     npu.unit_cycles(unit, values), b, epilogue_values=values, overlap=npu.double_buffer)


def add_cost(name: str, in_elems: int, out_elems: int, npu: NPU16, b_bytes: int | None = None) -> LayerCost:
    """Two inputs of ``in_elems`` uint8 codes each (or a broadcast b of ``b_bytes``: uint8 or
    int32 pooled codes, read once), one epilogue value per output."""
    return _unit_cost(name, in_elems + (in_elems if b_bytes is None else b_bytes), out_elems, out_elems, npu,
                      unit="add")


def pool_cost(name: str, in_elems: int, out_elems: int, taps: int, out_bytes: int, npu: NPU16) -> LayerCost:
    """A max or sum pool: ``taps`` window values per output through the epilogue;
    ``out_bytes`` per output code (1; a sum pool writes int32: 4)."""
    return _unit_cost(name, in_elems, out_elems * out_bytes, out_elems * taps, npu, unit="pool")


def gather_cost(name: str, out_elems: int, elem_bytes: int, npu: NPU16) -> LayerCost:
    """DMA only: ``out_elems`` elements of ``elem_bytes`` each read and written."""
    return _unit_cost(name, out_elems * elem_bytes, out_elems * elem_bytes, 0, npu)


def pad_cost(name: str, in_elems: int, out_elems: int, npu: NPU16) -> LayerCost:
    return _unit_cost(name, in_elems, out_elems, 0, npu)


def avg_pool_cost(name: str, planes: int, in_elems: int, oh: int, ow: int, taps: int, requants: int,
                  npu: NPU16) -> LayerCost:
    """``planes`` = N·C, ``taps`` = Σ window sizes over the OH·OW outputs of one plane,
    ``requants`` = D (mult, shift) pairs."""
    return _unit_cost(name, in_elems, planes * oh * ow, planes * (taps + oh * ow), npu,
                      weights=4 * (2 * oh + 2 * ow + oh * ow) + 8 * requants, unit="pool")


def concat_cost(name: str, part_elems: list[int], npu: NPU16) -> LayerCost:
    parts = tuple(_unit_cost(name, e, e, e, npu) for e in part_elems)
    total = {k: sum(p.bytes[k] for p in parts) for k in ("weights", "input", "output")}
    return LayerCost(name, 0, 0, 0, 0, 0, 0, 0, sum(p.dma_cycles for p in parts),
                     sum(p.epilogue_cycles for p in parts), total, epilogue_values=sum(part_elems),
                     commands=parts, overlap=npu.double_buffer)


def lut_cost(name: str, elems: int, table_size: int, npu: NPU16) -> LayerCost:
    return _unit_cost(name, elems, elems, elems, npu, weights=table_size, unit="lut")


def mul_cost(name: str, elems: int, b_elems: int, npu: NPU16) -> LayerCost:
    return _unit_cost(name, elems + b_elems, elems, elems, npu, unit="mul")


def resize_cost(name: str, planes: int, w: int, oh: int, ow: int, bilinear: bool, npu: NPU16) -> LayerCost:
    """``planes`` = N·C of an input W wide resized to OH×OW."""
    outs = planes * oh * ow
    bytes_in = planes * oh * 2 * w if bilinear else outs
    return _unit_cost(name, bytes_in, outs, 5 * outs if bilinear else 0, npu, weights=4 * 3 * (oh + ow))


def matmul_cost(name: str, n: int, heads: int, k: int, m: int, positions: int, npu: NPU16) -> LayerCost:
    """A matmul of ``heads`` [m × k]·[k × positions] GEMMs per sample (codegen/npu16/lower.matmul_gemm)."""
    t, g, p = npu.tile, heads, positions
    ot, it = _ceil(m, t), _ceil(k, t)
    plan = memory.matmul_plan(k=k, m=m, positions=p, npu=npu)
    macs = n * g * p * m * k
    b = {"weights": 0, "input": n * g * k * (p + m), "output": n * g * m * p}
    epi = n * g * p * sum(_ceil(min(t, m - o * t), npu.epilogue_width) for o in range(ot))
    return LayerCost(name, macs, 2 * macs, 0, 0, 0, n * g * p * _ceil(ot, npu.arrays) * it, 0,
                     memory.dma_cycles(0, b["input"] + b["output"], npu), epi, b, array_steps=n * g * p * ot * it,
                     epilogue_values=n * g * m * p, stripes=n * g * plan.stripes, overlap=npu.double_buffer,
                     sram={"weights": 0, "activations": plan.act_sram},
                     act_split=(plan.act_in_sram, plan.act_sram - plan.act_in_sram))


ROW_PASSES = {"layer_norm": 2, "softmax": 3}     # the row unit's passes over each row (npu16_sim.h)


def row_cost(name: str, kind: str, n: int, channels: int, positions: int, groups: int, in_bytes: int,
             table_bytes: int, npu: NPU16) -> LayerCost:
    """A softmax (``groups`` rows per position) or layer norm (one) on the row unit: the codes
    of every channel at ``positions`` per sample (``in_bytes`` each) in and out once, the table
    (softmax exp table, norm g and b) over the weight port once; the lanes make ROW_PASSES
    passes, the iterative stage takes row_cycles per row beside them, plus one row's fill."""
    plan = memory.row_plan(channels=channels, positions=positions, in_bytes=in_bytes, npu=npu)
    elems = n * channels * positions
    lanes, stage = npu.unit_cycles("row", ROW_PASSES[kind] * elems), n * groups * positions * npu.row_cycles
    b = {"weights": table_bytes, "input": elems * in_bytes, "output": elems}
    return LayerCost(name, 0, 0, 0, 0, 0, 0, 0, memory.dma_cycles(table_bytes, b["input"] + b["output"], npu),
                     max(lanes, stage) + npu.row_cycles, b, epilogue_values=elems, stripes=n * plan.stripes,
                     overlap=npu.double_buffer, sram={"weights": table_bytes, "activations": plan.act_sram},
                     act_split=(plan.act_in_sram, plan.act_sram - plan.act_in_sram))


def tile_aligned_sizes(c: int, g: int, tile: int) -> tuple[int, ...]:
    """g group sizes in whole tiles (the last group takes the remainder), as calibration's
    appendix-C assignment produces them."""
    tiles = _ceil(c, tile)
    per = [tiles // g + (1 if i < tiles % g else 0) for i in range(g)]
    sizes = [p * tile for p in per]
    last = max(i for i, s in enumerate(sizes) if s)
    sizes[last] -= tiles * tile - c
    return tuple(sizes)


def even_sizes(c: int, g: int) -> tuple[int, ...]:
    """g groups of (nearly) equal size, ignoring tiles: the fragmentation case."""
    return tuple(c // g + (1 if i < c % g else 0) for i in range(g))
