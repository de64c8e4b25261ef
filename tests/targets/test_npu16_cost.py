"""npu16 cost model against small cases computed by hand, fragmentation, Table 6, and the
simulator's counters (hypothesis)."""
import ctypes
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calib.numerics import GroupScale
from relay_passes.attrs import ConvAttrs
from targets.npu16.cost import LayerShape, even_sizes, layer_cost, tile_aligned_sizes
from targets.npu16.first_layer import runs_im2col
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


# --- the estimator against the simulator's counters -------------------------------------



@pytest.fixture(scope="module")
def simulator(tmp_path_factory):
    """The simulator behind a ctypes driver; the ISA header generated from isa.py."""
    from tests.compile_helpers import npu16_simulator
    return npu16_simulator(tmp_path_factory.mktemp("sim"))


def _simulate(lib, low, x, m, out_shape):
    from targets.npu16.isa import COUNTERS
    out = np.zeros(out_shape, np.uint8)
    bias = np.arange(m, dtype=np.int32) - m // 2
    mult = np.full(m, 2**30, np.int32)
    shift = np.full(m, 6, np.int32)
    cnt = np.zeros(len(COUNTERS), np.int64)
    tiles = low.tiles if low.tiles is not None else np.zeros(1, np.int8)
    table = low.table if low.table is not None else np.zeros(1, np.int32)
    p = lambda a: a.ctypes.data_as(ctypes.c_void_p)                              # noqa: E731
    rc = lib.run(p(np.ascontiguousarray(low.words)), p(x), p(out), p(tiles), p(table), p(bias), p(mult),
                 p(shift), p(cnt))
    assert rc == 0
    return out, dict(zip(COUNTERS, (int(v) for v in cnt)))


@st.composite
def _layers(draw):
    # stem: few input channels and a 3×3/5×5/7×7 kernel, the first-layer (im2col) mode's layers
    kind = draw(st.sampled_from(["conv", "grouped", "depthwise", "linear", "stem", "stem"]))
    g = {"conv": 1, "linear": 1, "grouped": 2, "depthwise": None, "stem": 1}[kind]
    c = draw(st.integers(2 if kind == "depthwise" else 1, 5 if kind == "stem" else 40)) * (2 if kind == "grouped" else 1)
    if kind == "depthwise":
        g = m = c
    else:
        m = draw(st.integers(1, 40)) * (2 if kind == "grouped" else 1)
    k = 1 if kind == "linear" else draw(st.sampled_from([3, 5, 7] if kind == "stem" else [1, 3]))
    stride, pad = (draw(st.sampled_from([1, 2])), draw(st.integers(0, k // 2))) if k > 1 else (1, 0)
    hw = 1 if kind == "linear" else draw(st.integers(max(1, k - 2 * pad), 6 if k < 7 else 9))
    n = draw(st.integers(1, 2))
    groups = None
    if kind != "depthwise" and draw(st.integers(0, 3 if kind == "stem" else 1)) == 0:   # stems: mostly ungrouped
        p = draw(st.integers(2, 4))
        # sizes with empty groups likely: labels drawn from a subset of the groups
        used = draw(st.lists(st.integers(0, p - 1), min_size=1, max_size=p, unique=True))
        groups = np.array([used[draw(st.integers(0, len(used) - 1))] for _ in range(c)], np.int8)
        if draw(st.booleans()):
            groups = np.sort(groups)                       # contiguous, as after PermuteChannels
        sigma = [draw(st.sampled_from([-1, 0, 1])) for _ in range(p)]
        shifts = [draw(st.integers(1, 6)) for _ in range(p)]
    else:
        sigma, shifts = [0], [0]
    scales = [GroupScale(s, n) for s, n in zip(sigma, shifts)]
    npu = NPU16(tile=draw(st.sampled_from([8, 16, 32])), arrays=draw(st.integers(1, 4)),
                dma_bytes_per_cycle=draw(st.integers(1, 32)), epilogue_width=draw(st.integers(1, 16)),
                waps_switch_cycles=draw(st.integers(0, 2)), waps_merge_cycles=draw(st.integers(0, 2)),
                waps_pipelined=draw(st.booleans()), double_buffer=draw(st.booleans()),
                weight_bytes_per_cycle=draw(st.sampled_from([0, 0, 1, 3])),
                sram_weight_kib=draw(st.sampled_from([1, 2, 8, 256])), sram_act_kib=draw(st.sampled_from([1, 2, 8, 512])),
                first_layer_im2col=draw(st.sampled_from([False, True, True])))
    return dict(kind=kind, c=c, m=m, g=g, k=k, hw=hw, n=n, groups=groups, scales=scales, npu=npu,
                stride=stride, pad=pad, seed=draw(st.integers(0, 2**16)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_layers())
def test_estimator_equals_the_simulator_counters(simulator, L):
    """Every counter of a random conv/linear/depthwise layer on a random machine: empty WAPS
    groups, pipelined and serial WAPS, 1–4 arrays, tiles 8/16/32, DMA and epilogue widths,
    SRAM from 1 KiB (striped: halos and weights re-fetched, either loop order) up, single or
    double buffered, weights over the shared DMA or their own port, the first-layer (im2col)
    mode on few-channel 3×3/5×5/7×7 convs.
    The outputs do not depend on the machine (equal to the default npu16's)."""
    from codegen.npu16.lower import NotOnNpu, lower_op
    from targets.npu16.memory import SramTooSmall
    rng = np.random.default_rng(L["seed"])
    c, m, g, k, hw, n = L["c"], L["m"], L["g"], L["k"], L["hw"], L["n"]
    w = rng.integers(-8, 8, (m, c // g, k, k)).astype(np.int8)
    attrs = ConvAttrs(conv_groups=g, stride=[L["stride"]] * 2, padding=[L["pad"]] * 2, dilation=[1, 1],
                      z_in=3, z_out=2, lo=0, hi=255, frac=1, group_scales=L["scales"])
    params = {"w": w} if L["groups"] is None else {"w": w, "groups": L["groups"]}
    oh = (hw + 2 * L["pad"] - k) // L["stride"] + 1
    try:
        low = lower_op("conv2d", attrs, [(n, c, hw, hw)], ["uint8"], params, L["npu"])
    except NotOnNpu as e:                          # the smallest stripe does not fit the SRAM
        assert "SRAM" in str(e)
        low = None
    x = rng.integers(0, 16, (n, c, hw, hw)).astype(np.uint8)
    sizes, scaled, per_group = (), (), ()
    if L["groups"] is not None:
        labels, p = L["groups"], len(L["scales"])
        sizes = tuple(int((labels == q).sum()) for q in range(p))
        scaled = tuple(bool(s.sigma) for s in L["scales"])
        cg = c // g
        per_group = tuple(tuple(int((labels[i * cg:(i + 1) * cg] == q).sum()) for q in range(p)) for i in range(g))
    im2col = runs_im2col(L["npu"], c=c, conv_groups=g, kh=k, kw=k, waps_groups=L["groups"] is not None)
    shape = LayerShape("l", c, m, oh, oh, k, k, g, sizes, scaled, hw, hw, wbits=8, abits_in=8, abits_out=8, n=n,
                       conv_group_sizes=per_group if g > 1 else (), sh=L["stride"], ph=L["pad"], im2col=im2col)
    if low is None:
        with pytest.raises(SramTooSmall):
            layer_cost(shape, L["npu"])
        return
    out, counted = _simulate(simulator, low, x, m, (n, m, oh, oh))
    assert layer_cost(shape, L["npu"]).counters() == counted
    ref_out, _ = _simulate(simulator, lower_op("conv2d", attrs, [(n, c, hw, hw)], ["uint8"], params), x, m,
                           (n, m, oh, oh))
    np.testing.assert_array_equal(out, ref_out)


def test_im2col_stem_packs_the_array_rows(simulator):
    """Issue 15: a 3-channel 7×7 stride-2 stem on a 16-wide array, first_layer_im2col on: 10 array
    steps (⌈147/16⌉) per output tile and pixel instead of 49 (7·7 taps × 1 in-tile), the same
    MACs, the estimator equal to the counters and the outputs bit-exact."""
    from codegen.npu16.lower import lower_op
    rng = np.random.default_rng(3)
    c, m, hw, oh = 3, 20, 16, 8                          # 2 output tiles, 8×8 output pixels
    w = rng.integers(-128, 128, (m, c, 7, 7)).astype(np.int8)
    x = rng.integers(0, 256, (1, c, hw, hw)).astype(np.uint8)
    attrs = ConvAttrs(conv_groups=1, stride=(2, 2), padding=(3, 3), dilation=(1, 1), z_in=128, z_out=0, lo=0, hi=255,
                      frac=0)
    runs = {}
    for on in (False, True):
        npu = NPU16(first_layer_im2col=on)
        out, counted = _simulate(simulator, lower_op("conv2d", attrs, [x.shape], ["uint8"], {"w": w}, npu), x, m,
                                 (1, m, oh, oh))
        shape = LayerShape("stem", c, m, oh, oh, 7, 7, h=hw, w=hw, wbits=8, abits_in=8, abits_out=8, sh=2, ph=3,
                           im2col=on)
        assert layer_cost(shape, npu).counters() == counted
        runs[on] = out, counted
    (plain, before), (packed, after) = runs[False], runs[True]
    assert before["array_steps"] == 2 * 64 * 49 and after["array_steps"] == 2 * 64 * 10
    assert after["macs"] == before["macs"] == m * 64 * c * 49
    assert after["dma_weight_bytes"] == 2 * 10 * 256 < before["dma_weight_bytes"] == 2 * 49 * 256
    np.testing.assert_array_equal(packed, plain)
    assert len(np.unique(packed)) > 10                   # requantized values, not a clamped constant


def test_im2col_only_for_few_channel_single_group_convs():
    on = NPU16(first_layer_im2col=True)
    assert runs_im2col(on, c=3, conv_groups=1, kh=7, kw=7, waps_groups=False)
    assert not runs_im2col(NPU16(), c=3, conv_groups=1, kh=7, kw=7, waps_groups=False)
    assert not runs_im2col(on, c=16, conv_groups=1, kh=3, kw=3, waps_groups=False)        # a full tile of rows
    assert not runs_im2col(on, c=3, conv_groups=1, kh=1, kw=1, waps_groups=False)         # no taps to pack
    assert not runs_im2col(on, c=3, conv_groups=1, kh=3, kw=3, waps_groups=True)
    assert not runs_im2col(on, c=4, conv_groups=2, kh=3, kw=3, waps_groups=False)
    with pytest.raises(ValueError, match="im2col"):
        LayerShape("l", 4, 4, kh=3, kw=3, conv_groups=2, im2col=True)


def test_empty_group_costs_nothing(simulator):
    """Issue 12's 32-channel layer with groups 16/16/0: no D1→D2 switch, no shifts for the
    empty (scaled) group — appendix B's 3 cycles (2 switches + merge), one shift per output."""
    from codegen.npu16.lower import lower_op
    w = np.ones((16, 32, 1, 1), np.int8)
    groups = np.repeat([0, 1], 16).astype(np.int8)
    attrs = ConvAttrs(conv_groups=1, stride=(1, 1), padding=(0, 0), dilation=(1, 1), z_in=0, z_out=0, lo=0, hi=255,
                      group_scales=[GroupScale(0, 0), GroupScale(-1, 4), GroupScale(1, 4)])
    npu = NPU16(waps_pipelined=False)
    low = lower_op("conv2d", attrs, [(1, 32, 6, 6)], ["uint8"], {"w": w, "groups": groups}, npu)
    _, counted = _simulate(simulator, low, np.ones((1, 32, 6, 6), np.uint8), 16, (1, 16, 6, 6))
    assert counted["waps_cycles"] == 36 * 3 and counted["shifts"] == 16 * 36
    est = layer_cost(LayerShape("l", 32, 16, 6, 6, group_sizes=(16, 16, 0), scaled=(False, True, True)), npu)
    assert est.waps_cycles == 108 and est.shifts == 576


def test_smaller_sram_moves_more_bytes_identically(simulator):
    """Issue 15: shrinking sram_kib stripes a layer; its DMA bytes and cycles grow, equally in
    the simulator and the cost model, and the outputs stay those of the unstriped layer."""
    from codegen.npu16.lower import lower_op
    rng = np.random.default_rng(0)
    c, m, hw = 48, 40, 12
    w = rng.integers(-8, 8, (m, c, 3, 3)).astype(np.int8)
    attrs = ConvAttrs(conv_groups=1, stride=(1, 1), padding=(1, 1), dilation=(1, 1), z_in=3, z_out=2, lo=0, hi=255,
                      frac=0)
    x = rng.integers(0, 16, (1, c, hw, hw)).astype(np.uint8)
    shape = LayerShape("l", c, m, hw, hw, 3, 3, h=hw, w=hw, wbits=8, abits_in=8, abits_out=8, ph=1)
    runs = []
    # 20.7 KB of weights (6.9 KB per output tile), 6.9 KB of input (576 B per row)
    for w_kib, a_kib in ((256, 512), (32, 16), (16, 8), (14, 4)):
        npu = NPU16(sram_weight_kib=w_kib, sram_act_kib=a_kib)
        out, counted = _simulate(simulator, lower_op("conv2d", attrs, [x.shape], ["uint8"], {"w": w}, npu), x, m,
                                 (1, m, hw, hw))
        assert layer_cost(shape, npu).counters() == counted
        runs.append((out, counted))
    for out, _ in runs[1:]:
        np.testing.assert_array_equal(out, runs[0][0])
    moved = [cnt["dma_in_bytes"] for _, cnt in runs]
    cycles = [cnt["dma_cycles"] for _, cnt in runs]
    stripes = [cnt["stripes"] for _, cnt in runs]
    assert moved[0] == 48 * 144 + 3 * 9 * 3 * 256 and stripes == [1, 4, 12, 36]      # each tensor once
    # 2 row stripes (14 input rows: 2 halo rows re-read) × 2 weight stripes (2 + 1 tiles): weights
    # once and the input rows per weight stripe (2·8064 B) beats the rows once and the weights per
    # row stripe (2·20736 B)
    assert moved[1] == 20736 + 2 * 14 * 576
    assert moved == sorted(moved) and moved[-1] > moved[1] > moved[0], moved
    assert cycles == sorted(cycles) and cycles[-1] > cycles[0]
    assert stripes == sorted(stripes) and stripes[-1] > stripes[1] > 1


def test_single_buffering_serialises_dma(simulator):
    """double_buffer False: a layer takes DMA + compute; True: the slower of the two."""
    layer = LayerShape("c", 32, 32, 4, 4, 3, 3, wbits=8, abits_in=8, abits_out=8, ph=1, h=4, w=4)
    both = layer_cost(layer, NPU16(double_buffer=True)), layer_cost(layer, NPU16(double_buffer=False))
    assert both[0].cycles == max(both[0].compute_cycles, both[0].dma_cycles, both[0].epilogue_cycles)
    assert both[1].cycles == both[1].compute_cycles + both[1].dma_cycles


def test_loop_order_moves_the_fewest_bytes():
    """A 3×3 conv whose weights do not fit keeps each weight stripe and re-reads input rows
    (weights once over a 1 B/cycle flash port, feature maps at 8); a 1×1 conv over a wide map
    with few weights keeps each row stripe and re-fetches the weights instead."""
    conv3 = LayerShape("l", 64, 64, 16, 16, 3, 3, h=16, w=16, wbits=8, abits_in=8, abits_out=8, ph=1)
    flash = NPU16(sram_weight_kib=32, sram_act_kib=16, dma_bytes_per_cycle=8, weight_bytes_per_cycle=1)
    a = layer_cost(conv3, flash)
    w = 64 * 64 * 9
    assert a.bytes["weights"] == w and a.bytes["input"] > 64 * 256          # weights once, input re-read
    assert a.dma_cycles == max(w, -(-(a.bytes["input"] + a.bytes["output"]) // 8))
    conv1 = LayerShape("l", 64, 64, 56, 56, h=56, w=56, wbits=8, abits_in=8, abits_out=8)
    b = layer_cost(conv1, NPU16(sram_weight_kib=2, sram_act_kib=16))
    assert b.bytes["input"] == 64 * 56 * 56 and b.bytes["weights"] == 56 * 4096   # rows once, weights per row
    assert b.dma_cycles == -(-sum(b.bytes.values()) // 16)
