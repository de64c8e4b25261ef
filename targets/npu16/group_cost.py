"""npu16 as the cost of WAPS groups for calibration's hardware-aware group search
(calib/group_search.py ``GroupCost``), and the one mapping of a captured graph's conv/linear
node to the cost model's ``LayerShape`` (batch 1, int8 codes as npu16 stores them)."""
from __future__ import annotations

from dataclasses import dataclass, replace

from targets.npu16.cost import LayerShape, layer_cost, tile_aligned_sizes
from targets.npu16.first_layer import runs_im2col
from targets.npu16.memory import SramTooSmall
from targets.npu16.params import NPU16


def layer_shape(graph, node, npu: NPU16) -> LayerShape:
    """The npu16 shape of conv2d/linear ``node`` of a calib Graph, without WAPS groups."""
    w = node.params["weight"]
    if w.ndim == 2:                                   # a linear's [m, F] (a conv's is [m, cg, kh, kw])
        m, c = w.shape
        return LayerShape(node.name, c, m, wbits=8, abits_in=8, abits_out=8)
    m, cg, kh, kw = w.shape
    a = node.attrs
    _, h, wd = graph[node.inputs[0]].shape
    c = cg * a["groups"]
    return LayerShape(node.name, c, m, node.shape[1], node.shape[2], kh, kw, a["groups"], h=h, w=wd,
                      wbits=8, abits_in=8, abits_out=8, sh=a["stride"][0], ph=a["padding"][0], dh=a["dilation"][0],
                      im2col=runs_im2col(npu, c=c, conv_groups=a["groups"], kh=kh, kw=kw, waps_groups=False))


@dataclass(frozen=True)
class NpuGroupCost:
    """A layer's npu16 compute-unit cycles (``LayerCost.busy_cycles``) with g WAPS groups of
    whole tiles, none empty (the most any assignment of calibration costs: an empty group has
    no switch). Without the DMA, so the budget holds whatever the DMA does: the groups' extra
    cycles can only shrink behind DMA (max(a, d) − max(b, d) ≤ a − b), and a layer takes at
    least its busy cycles, cascaded (its activations kept on chip) or not."""
    npu: NPU16

    def cycles(self, graph, node, groups: int, tile: int) -> int | None:
        shape = layer_shape(graph, node, self.npu)
        if groups > 1:
            shape = replace(shape, group_sizes=tile_aligned_sizes(shape.c, groups, tile),
                            scaled=(False,) + (True,) * (groups - 1), im2col=False)
        try:
            return layer_cost(shape, self.npu).busy_cycles
        except SramTooSmall:        # the compiler leaves it on the host
            return None
