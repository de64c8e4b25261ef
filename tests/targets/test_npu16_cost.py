"""npu16 cost model against small cases computed by hand, fragmentation, and Table 6."""
from dataclasses import replace

import pytest

from targets.npu16.cost import LayerShape, even_sizes, layer_cost, tile_aligned_sizes
from targets.npu16.params import NPU16


def test_plain_conv_by_hand():
    # 32→32 channels, 3×3, 4×4 output pixels, one array: 2 in-tiles × 9 taps × 16 pixels × 2 out-tiles
    layer = LayerShape("c", 32, 32, 4, 4, 3, 3, wbits=4, abits_in=4, abits_out=4)
    c = layer_cost(layer, NPU16(arrays=1, dma_bytes_per_cycle=16, epilogue_width=8))
    assert c.macs == 32 * 16 * 32 * 9 and c.base_ops == 2 * c.macs
    assert c.compute_cycles == 2 * 9 * 16 * 2 == 576
    assert c.waps_cycles == 0 and c.waps_ops == 0
    assert c.bytes == {"weights": 32 * 32 * 9 // 2, "input": 32 * 16 // 2, "output": 32 * 16 // 2}
    assert c.dma_cycles == (4608 + 256 + 256) // 16
    assert c.epilogue_cycles == 32 * 16 // 8
    assert c.cycles == 576
    assert layer_cost(layer, NPU16(arrays=2)).compute_cycles == 288      # out tiles split over arrays


def test_waps_ops_and_cycles_by_hand():
    layer = LayerShape("c", 48, 16, 2, 2, 1, 1, group_sizes=(16, 16, 16), scaled=(False, True, True))
    serial = layer_cost(layer, NPU16(waps_pipelined=False))
    # ops: 2 scaled groups × (shift + add) per output; 16·4 outputs
    assert serial.waps_ops == 4 * 64 and serial.shifts == 128 and serial.adds == 128
    # appendix B: 3 switches + 1 merge = 4 cycles per output tile and pixel
    assert serial.compute_cycles == 4 * 3 and serial.waps_cycles == 4 * 4
    piped = layer_cost(layer, NPU16())
    # 3 array steps per tile hide 3 of the 4 cycles; plus one drain
    assert piped.waps_cycles == 4 * (4 - 3) + 4


def test_fragmentation_costs_array_steps():
    aligned = LayerShape("c", 64, 16, 1, 1, group_sizes=tile_aligned_sizes(64, 3, 16), scaled=(False, True, True))
    uneven = replace(aligned, group_sizes=even_sizes(64, 3))
    assert aligned.group_sizes == (32, 16, 16) and sum(uneven.group_sizes) == 64
    npu = NPU16()
    assert layer_cost(aligned, npu).compute_cycles == 4           # = ⌈64/16⌉: no fragmentation
    assert layer_cost(uneven, npu).compute_cycles == 6            # 22, 21, 21 → 2 + 2 + 2 tiles
    assert tile_aligned_sizes(24, 3, 16) == (16, 8, 0)


def test_depthwise_uses_one_input_row():
    dw = LayerShape("dw", 32, 32, 8, 8, 3, 3, conv_groups=32)
    assert dw.depthwise and dw.macs == 32 * 64 * 9
    assert layer_cost(dw, NPU16()).compute_cycles == 64 * 9 * 1 * 2


def test_bad_npu_parameters():
    with pytest.raises(ValueError, match="1 to 4"):
        NPU16(arrays=5)


@pytest.mark.slow
def test_table6_reproduces_the_paper_convention():
    from bench.npu16 import MODELS, layers_of, table6
    for name in ("resnet50", "mobilenet_v2", "regnet_x_600mf"):
        got = table6(layers_of(name))["paper"]["extra_gops"]
        assert abs(got / MODELS[name][1] - 1) <= 0.15, (name, got)
    assert abs(table6(layers_of("resnet18"))["paper"]["extra_gops"] * 2 / MODELS["resnet18"][1] - 1) <= 0.15
