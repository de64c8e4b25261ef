"""The first-layer (im2col) mode of npu16: which convs run it, and their array steps.

A conv's array step normally takes T input channels of one kernel tap, so a 3-channel
stem fills 3 of T rows for kh·kw steps. With ``NPU16.first_layer_im2col`` a conv with few
input channels puts (channel, ky, kx) triples in the T rows instead (row r of the layer's
c·kh·kw products reads channel ⌊r/(kh·kw)⌋ at tap ((r/kw) mod kh, r mod kw)), as real NPUs
run their stems: ⌈c·kh·kw/T⌉ steps per output tile and pixel instead of kh·kw·⌈c/T⌉.

``runs_im2col`` is the one decision, used by the lowering (codegen/npu16/lower.py), the
report's cost shapes (targets/npu16/report.py) and bench/vela_compare.py.
"""
from __future__ import annotations

from targets.npu16.params import NPU16


def runs_im2col(npu: NPU16, *, c: int, conv_groups: int, kh: int, kw: int, waps_groups: bool) -> bool:
    """Whether a conv of ``c`` input channels runs im2col on ``npu``: the mode is on, one conv
    group, no WAPS groups (their D1/D2 switches split the reduction by channel), a kernel
    with more than one tap, and fewer input channels than the array has rows."""
    return (npu.first_layer_im2col and conv_groups == 1 and not waps_groups and kh * kw > 1
            and c < npu.tile)


def im2col_in_tiles(c: int, kh: int, kw: int, tile: int) -> int:
    """Array steps per output tile and pixel of an im2col conv: ⌈c·kh·kw / T⌉."""
    return -(-c * kh * kw // tile)
