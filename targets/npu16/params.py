"""The accelerator as data: every number the cost model uses, none in code."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class NPU16:
    """A 16 (input channels) × 16 (output channels) int8 MAC array, 1–4 of them.

    arrays             MAC arrays; each computes a different 16-output tile
    tile               MAC array side (input channels × output channels per cycle)
    clock_mhz          clock for converting cycles to time
    dma_bytes_per_cycle  off-chip ↔ SRAM bandwidth
    epilogue_width     values per cycle through requant/activation (the paper's 8)
    waps_switch_cycles cycles per group switch (accumulate in D1, scale into D2)
    waps_merge_cycles  cycles to merge the group partial sums
    waps_pipelined     the D1→D2 scaling and merge of one output tile overlap the next
                       tile's accumulation (the paper's pipelined RTL, Table 8); False
                       serialises them (appendix B's 4 cycles on every output tile)
    sram_*_kib         on-chip buffers (weights, activations, accumulators)
    """

    arrays: int = 1
    tile: int = 16
    clock_mhz: float = 800.0
    dma_bytes_per_cycle: int = 16
    epilogue_width: int = 8
    waps_switch_cycles: int = 1
    waps_merge_cycles: int = 1
    waps_pipelined: bool = True
    sram_weight_kib: int = 256
    sram_act_kib: int = 512
    sram_acc_kib: int = 64

    def __post_init__(self):
        if not 1 <= self.arrays <= 4:
            raise ValueError(f"npu16 has 1 to 4 MAC arrays, not {self.arrays}")
        if self.tile < 1 or self.dma_bytes_per_cycle < 1 or self.epilogue_width < 1:
            raise ValueError("tile, DMA width and epilogue width must be positive")

    def to_json(self) -> dict:
        return asdict(self)


DEFAULT = NPU16()
PAPER = NPU16(arrays=4, clock_mhz=800.0)      # the paper's RTL setup: four 16×16 arrays, 800 MHz
