"""Weights in T×T MAC tiles (T = the array side, params.NPU16.tile), and the channel table
each tile row reads.

For a conv/linear with conv groups G, output tiles of T channels within each conv group,
and WAPS groups p (channel lists in the input's memory order; contiguous after
PermuteChannels), the tiled weights are

    tiles[g, ot, p, it, ky, kx, i, j] = w[g·MG + ot·T + j, chan_p,g[it·T + i] − g·CG, ky, kx]

zero where the output j or the row i is past the end (a group that is not a tile multiple
pads its last tile: fragmentation). ``channels[g, p, it, i]`` is the input channel tile row
i reads (−1 for a padded row). Every (g, p) has the same number of in-tiles T_p (the
maximum over conv groups), so the layout is a dense array.

im2col (``tile_weights_im2col``, the first-layer mode of targets/npu16/first_layer.py): one
conv group, no WAPS groups, and the tile rows run over the c·kh·kw products of a pixel, so
the tap dimensions are 1:

    tiles[0, ot, 0, it, 0, 0, i, j] = w[ot·T + j, ch, ky, kx]   with (ch·KH + ky)·KW + kx = it·T + i

and ``rows[0, 0, it, i]`` = (ch·KH + ky)·KW + kx (−1 past c·kh·kw).
"""
from __future__ import annotations

import math

import numpy as np

from targets.npu16.params import DEFAULT

TILE = DEFAULT.tile


def group_channels(groups: np.ndarray | None, c: int, conv_groups: int, n_groups: int) -> list[list[np.ndarray]]:
    """[conv group][WAPS group] → input channels (global indices) in memory order."""
    cg = c // conv_groups
    out = []
    for g in range(conv_groups):
        chans = np.arange(g * cg, (g + 1) * cg)
        if groups is None:
            out.append([chans])
        else:
            out.append([chans[groups[chans] == p] for p in range(n_groups)])
    return out


def tile_weights(w: np.ndarray, groups: np.ndarray | None, conv_groups: int, n_groups: int, tile: int = TILE):
    """→ (tiles int8 [G, OT, P, IT, KH, KW, tile, tile], channels int32 [G, P, IT, tile], in_tiles [P])."""
    if w.ndim == 2:
        w = w[:, :, None, None]
    m, cg, kh, kw = w.shape
    c = cg * conv_groups
    mg = m // conv_groups
    chans = group_channels(groups, c, conv_groups, n_groups if groups is not None else 1)
    n_p = len(chans[0])
    in_tiles = [max(math.ceil(len(chans[g][p]) / tile) for g in range(conv_groups)) for p in range(n_p)]
    it_max = max(max(in_tiles), 1)
    ot = math.ceil(mg / tile)
    tiles = np.zeros((conv_groups, ot, n_p, it_max, kh, kw, tile, tile), np.int8)
    table = np.full((conv_groups, n_p, it_max, tile), -1, np.int32)
    for g in range(conv_groups):
        wg = w[g * mg:(g + 1) * mg]
        for p in range(n_p):
            ch = chans[g][p]
            nt = math.ceil(len(ch) / tile)
            if nt == 0:
                continue
            rows = np.full(nt * tile, -1, np.int32)
            rows[:len(ch)] = ch
            table[g, p, :nt] = rows.reshape(nt, tile)
            padded = np.zeros((ot * tile, nt * tile, kh, kw), np.int8)              # [o·T + j, it·T + i, ky, kx]
            padded[:mg, :len(ch)] = wg[:, ch - g * cg]
            tiles[g, :, p, :nt] = padded.reshape(ot, tile, nt, tile, kh, kw).transpose(0, 2, 4, 5, 3, 1)
    return tiles, table, np.array(in_tiles, np.int32)


def untile_weights(tiles: np.ndarray, table: np.ndarray, m: int, conv_groups: int) -> np.ndarray:
    """Inverse of tile_weights (for tests): → w [m, c/G, kh, kw]."""
    g_, ot, n_p, it_max, kh, kw, tile, _ = tiles.shape
    mg = m // conv_groups
    cg = int(table.max() + 1) // conv_groups if table.max() >= 0 else 0
    w = np.zeros((m, cg, kh, kw), np.int8)
    for g in range(conv_groups):
        for o in range(ot):
            for p in range(n_p):
                for it in range(it_max):
                    for i in range(tile):
                        c = table[g, p, it, i]
                        if c < 0:
                            continue
                        for j in range(tile):
                            k = g * mg + o * tile + j
                            if k < (g + 1) * mg:
                                w[k, c - g * cg] = tiles[g, o, p, it, :, :, i, j]
    return w


def tile_weights_im2col(w: np.ndarray, tile: int = TILE):
    """w int8 [m, c, kh, kw] → (tiles int8 [1, OT, 1, IT, 1, 1, tile, tile], rows int32 [1, 1, IT, tile],
    in_tiles [1]) with IT = ⌈c·kh·kw / tile⌉; a row's entry is (ch·kh + ky)·kw + kx, −1 for padding."""
    m, c, kh, kw = w.shape
    k = c * kh * kw
    ot, it = math.ceil(m / tile), math.ceil(k / tile)
    flat = np.zeros((ot * tile, it * tile), np.int8)
    flat[:m, :k] = w.reshape(m, k)                             # column (ch·kh + ky)·kw + kx
    tiles = flat.reshape(ot, tile, it, tile).transpose(0, 2, 3, 1)          # [ot, it, i, j]
    rows = np.full(it * tile, -1, np.int32)
    rows[:k] = np.arange(k)
    return (np.ascontiguousarray(tiles.reshape(1, ot, 1, it, 1, 1, tile, tile)), rows.reshape(1, 1, it, tile),
            np.array([it], np.int32))


def untile_weights_im2col(tiles: np.ndarray, rows: np.ndarray, m: int, c: int, kh: int, kw: int) -> np.ndarray:
    """Inverse of tile_weights_im2col (for tests): → w [m, c, kh, kw]."""
    _, ot, _, it, _, _, tile, _ = tiles.shape
    w = np.zeros((m, c, kh, kw), np.int8)
    for o in range(ot):
        for t in range(it):
            for i in range(tile):
                r = rows[0, 0, t, i]
                if r < 0:
                    continue
                ch, ky, kx = r // (kh * kw), (r // kw) % kh, r % kw
                for j in range(min(tile, m - o * tile)):
                    w[o * tile + j, ch, ky, kx] = tiles[0, o, 0, t, 0, 0, i, j]
    return w
