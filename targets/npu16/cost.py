"""The npu16 cost model: integer operations and cycles per layer, from shapes alone.

A layer is a conv/linear ``LayerShape``: input channels c, output channels m, kernel
kh×kw, output pixels oh×ow, conv groups G, and the sizes of its WAPS groups (empty: none).
A linear layer is a 1×1 conv over one pixel.

Operations (the paper's Table 6 counting):
    MACs        m·oh·ow·(c/G)·kh·kw;  base integer ops = 2·MACs (multiply + add)
    WAPS ops    per output element, per *scaled* group (σ ≠ 0): one shift and one add
                (γ = 1 groups need neither) → 4 per output for the default g = 3
Cycles (one 16×16 array step = 16 input channels × 16 outputs of one pixel and tap):
    compute     oh·ow·kh·kw · Σ_p ⌈|G_p ∩ conv group|/16⌉ · ⌈out tiles/arrays⌉
                (groups split the reduction, so a group smaller than a tile or not a
                tile multiple wastes array rows: fragmentation); depthwise convs use one
                array row per output (⌈m/16⌉ tiles, one input channel each)
    waps        per output tile and pixel, W = waps_switch_cycles per non-empty group
                (D1 → scale → D2) + waps_merge_cycles (appendix B: 4 for g = 3).
                Serial: W per tile. Pipelined (default): the scaling of one tile overlaps
                the next tile's accumulation of S array steps, so a tile costs max(0, W − S)
                extra, plus W once per layer to drain the pipeline
    dma         (weights·wbits/8 + input·abits_in/8 + output·abits_out/8) / dma_bytes_per_cycle
    epilogue    m·oh·ow / epilogue_width  (requant, activation)
    total       max(compute + waps, dma, epilogue): the three units are pipelined
                (decoupled access/execute as in VTA), so the slowest one bounds a layer
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

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

    @property
    def depthwise(self) -> bool:
        return self.conv_groups > 1 and self.c == self.conv_groups

    @property
    def outputs(self) -> int:
        return self.m * self.oh * self.ow

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

    @property
    def cycles(self) -> int:
        return max(self.compute_cycles + self.waps_cycles, self.dma_cycles, self.epilogue_cycles)

    def to_json(self) -> dict:
        d = asdict(self)
        d["cycles"] = self.cycles
        return d


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def reduction_tiles(layer: LayerShape, tile: int) -> int:
    """Array steps along the reduction for one output tile, pixel and tap."""
    cg = layer.c // layer.conv_groups
    if layer.depthwise:
        return 1
    if not layer.group_sizes:
        return _ceil(cg, tile)
    if layer.conv_groups == 1:
        return sum(_ceil(s, tile) for s in layer.group_sizes if s)
    # grouped conv: each conv group's channels split by WAPS group (assume proportional)
    total = sum(layer.group_sizes)
    return sum(_ceil(max(1, round(s * cg / total)), tile) for s in layer.group_sizes if s)


def layer_cost(layer: LayerShape, npu: NPU16) -> LayerCost:
    t = npu.tile
    out_tiles = _ceil(layer.m, t)
    pix = layer.oh * layer.ow
    steps = pix * layer.kh * layer.kw * reduction_tiles(layer, t) * _ceil(out_tiles, npu.arrays)
    n_scaled = sum(1 for s, sc in zip(layer.group_sizes, layer.scaled) if s and sc)
    n_groups = sum(1 for s in layer.group_sizes if s)
    waps_cycles = 0
    if n_groups:
        per_tile = n_groups * npu.waps_switch_cycles + npu.waps_merge_cycles
        tiles = pix * _ceil(out_tiles, npu.arrays)
        if npu.waps_pipelined:
            steps_per_tile = layer.kh * layer.kw * reduction_tiles(layer, t)
            waps_cycles = tiles * max(0, per_tile - steps_per_tile) + per_tile
        else:
            waps_cycles = tiles * per_tile
    h, w = layer.h or layer.oh, layer.w or layer.ow
    bytes_ = {"weights": _ceil(layer.m * (layer.c // layer.conv_groups) * layer.kh * layer.kw * layer.wbits, 8),
              "input": _ceil(layer.c * h * w * layer.abits_in, 8),
              "output": _ceil(layer.outputs * layer.abits_out, 8)}
    dma = _ceil(sum(bytes_.values()), npu.dma_bytes_per_cycle)
    epi = _ceil(layer.outputs, npu.epilogue_width)
    return LayerCost(layer.name, layer.macs, 2 * layer.macs, 2 * n_scaled * layer.outputs,
                     n_scaled * layer.outputs, n_scaled * layer.outputs, steps, waps_cycles, dma, epi, bytes_)


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
