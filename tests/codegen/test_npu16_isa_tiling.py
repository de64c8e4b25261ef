"""npu16 instruction encoding round trip and weight tiling of awkward channel counts."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from codegen.npu16.tiling import tile_weights, tile_weights_im2col, untile_weights, untile_weights_im2col
from targets.npu16.isa import Instr, Op, Reg, decode, encode, set_


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(list(Op)), st.integers(0, 255), st.integers(-(2**63), 2**63 - 1)),
                max_size=20))
def test_encoding_round_trip(items):
    stream = [Instr(op, reg, v) for op, reg, v in items]
    words = encode(stream)
    assert words.dtype == np.uint32 and words.shape == (len(stream), 4)
    assert decode(words) == stream


def test_encoding_layout_and_limits():
    w = encode([set_(Reg.KA, -2), Instr(Op.CONV)])
    assert list(w[0]) == [1 | (int(Reg.KA) << 8), 0xFFFFFFFE, 0xFFFFFFFF, 0]
    assert list(w[1]) == [int(Op.CONV), 0, 0, 0]
    with pytest.raises(ValueError):
        encode([Instr(Op.SET, 300, 0)])


@pytest.mark.parametrize("m,c,conv_groups,n_groups", [(20, 37, 1, 3), (16, 16, 1, 1), (5, 3, 1, 0),
                                                      (48, 48, 2, 3), (24, 40, 1, 3)])
def test_tiling_round_trip_for_non_multiples_of_16(m, c, conv_groups, n_groups):
    rng = np.random.default_rng(m + c)
    w = rng.integers(-8, 8, (m, c // conv_groups, 3, 3)).astype(np.int8)
    groups = rng.integers(0, n_groups, c).astype(np.int8) if n_groups else None
    tiles, table, in_tiles = tile_weights(w, groups, conv_groups, max(n_groups, 1))
    assert tiles.shape[-2:] == (16, 16) and tiles.shape[1] == -(-(m // conv_groups) // 16)
    np.testing.assert_array_equal(untile_weights(tiles, table, m, conv_groups), w)
    # every input channel appears exactly once per conv group's table, padding is -1
    assert sorted(table[table >= 0].tolist()) == list(range(c))
    if groups is not None and conv_groups == 1:
        for p in range(n_groups):
            assert in_tiles[p] == -(-int((groups == p).sum()) // 16)


@pytest.mark.parametrize("m,c,k,tile", [(20, 3, 7, 16), (16, 1, 3, 16), (5, 3, 3, 8), (40, 4, 5, 32), (8, 2, 3, 9)])
def test_im2col_tiling_round_trip(m, c, k, tile):
    """First-layer mode: tile rows run over the (channel, ky, kx) products, taps dimensions 1."""
    w = np.random.default_rng(m + c + k).integers(-128, 128, (m, c, k, k)).astype(np.int8)
    tiles, rows, in_tiles = tile_weights_im2col(w, tile)
    it = -(-c * k * k // tile)
    assert tiles.shape == (1, -(-m // tile), 1, it, 1, 1, tile, tile) and rows.shape == (1, 1, it, tile)
    assert in_tiles.tolist() == [it]
    np.testing.assert_array_equal(untile_weights_im2col(tiles, rows, m, c, k, k), w)
    # every product exactly once, in (channel, ky, kx) order, padding rows -1 and zero weights
    flat = rows.ravel()
    assert flat[:c * k * k].tolist() == list(range(c * k * k)) and (flat[c * k * k:] == -1).all()
    assert not tiles.reshape(-1, it * tile, tile)[:, c * k * k:].any()
    ch, ky, kx = 1 % c, (k - 1), 0                     # the row of one product reads w[:, ch, ky, kx]
    r = (ch * k + ky) * k + kx
    np.testing.assert_array_equal(tiles[0, 0, 0, r // tile, 0, 0, r % tile, :min(m, tile)], w[:tile, ch, ky, kx])


def test_c_isa_header_is_generated_from_python_and_the_simulator_has_no_copy():
    import re
    from pathlib import Path

    from targets.npu16.isa import COUNTERS, MAX_GROUPS, c_header
    h = c_header()
    for r in Reg:
        assert re.search(rf"\bR_\w+ = {int(r)}\b", h), r
    assert all(f"NPU16_{o.name} = {int(o)}" in h for o in Op)
    assert f"#define NPU16_MAX_GROUPS {MAX_GROUPS}" in h and ", ".join(COUNTERS) in h
    sim = (Path(__file__).resolve().parents[2] / "targets" / "npu16" / "npu16_sim.h").read_text()
    code = re.sub(r"/\*.*?\*/", "", sim, flags=re.S)
    assert "enum" not in code and "int64_t macs" not in code          # opcodes, registers, counters
    assert not re.findall(r"\b(16|256)\b", code), "the array size written into the simulator"
