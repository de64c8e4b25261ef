"""Layout chains (view/reshape/transpose/permute/flatten/split/slice …) as graph ops.

A chain of layout ops is not mapped op by op: it is replayed on an index tensor
``arange(C·H·W).view(1, C, H, W)`` of its base value, and the resulting tensor of
indices says what the chain does. If it equals ``base[:, index]`` for a list of
channels, the chain is a channel ``gather`` (chunk, split, narrow, channel shuffle);
if it equals a channel gather followed by ``flatten(1)``, it is a gather and a
flatten. Anything else (a spatial crop, NHWC) is not representable and is refused.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Pending:
    """A layout chain not yet materialised: ``index`` holds, for each element of the
    chain's result (batch 1), its flat position in ``base`` (shape (1, *base_shape))."""

    base: str
    index: torch.Tensor


def start(base: str, shape: tuple[int, ...]) -> Pending:
    """The identity chain on a value of shape ``shape`` (without batch)."""
    n = 1
    for d in shape:
        n *= d
    return Pending(base, torch.arange(n, dtype=torch.int64).view(1, *shape))


@dataclass(frozen=True)
class Resolved:
    """What a chain does: ``gather`` (channel list or None for identity), then
    ``flatten`` or not. ``None`` from :func:`resolve` means not representable."""

    gather: list[int] | None
    flatten: bool


def resolve(p: Pending, base_shape: tuple[int, ...]) -> Resolved | None:
    """Classify the chain's result against base ``base_shape`` (without batch)."""
    idx = p.index
    if idx.dim() < 1 or idx.shape[0] != 1 or len(base_shape) not in (1, 3):
        return None
    c = base_shape[0]
    inner = 1
    for d in base_shape[1:]:
        inner *= d
    flatten = False
    if idx.dim() == 2 and len(base_shape) == 3 and idx.shape[1] % inner == 0 and inner > 1:
        idx, flatten = idx.view(1, idx.shape[1] // inner, *base_shape[1:]), True
    elif idx.dim() == 2 and len(base_shape) == 3 and inner == 1:
        idx, flatten = idx.view(1, idx.shape[1], 1, 1), True
    if idx.dim() != len(base_shape) + 1 or tuple(idx.shape[2:]) != tuple(base_shape[1:]):
        return None
    index = (idx.reshape(1, idx.shape[1], -1)[0, :, 0] // inner).tolist()
    if any(not 0 <= i < c for i in index):
        return None
    base = torch.arange(c * inner, dtype=torch.int64).view(1, *base_shape)
    if not torch.equal(base[:, index], idx):
        return None
    return Resolved(None if index == list(range(c)) else index, flatten)


def channels_last(p: Pending, base_shape: tuple[int, ...]) -> Resolved | None:
    """The chain's result read as channels last: its last axis the base's channels (through a
    channel gather) and its leading axes the base's positions in order, e.g. NCHW → NHWC
    (permute(0, 2, 3, 1)) or [N, C, H·W] → [N, H·W, C] (a vision transformer's tokens). The
    gather (None: identity) that a channels-last op (linear, layer norm) applies to the base
    first; None when the chain is not of that form."""
    idx = p.index
    if idx.dim() < 2 or not base_shape:     # the batch (1 at export) may sit on any leading axis
        return None
    positions = 1
    for d in base_shape[1:]:
        positions *= d
    lead = 1
    for d in idx.shape[:-1]:
        lead *= d
    if lead != positions:
        return None
    feats = idx.shape[-1]
    planar = idx.reshape(1, positions, feats).transpose(1, 2)           # [1, F, positions]
    index = (planar[0, :, 0] // positions).tolist()
    if any(not 0 <= i < base_shape[0] for i in index):
        return None
    base = torch.arange(base_shape[0] * positions, dtype=torch.int64).view(1, base_shape[0], positions)
    if not torch.equal(base[:, index], planar):
        return None
    return Resolved(None if index == list(range(base_shape[0])) else index, False)


def channels_last_view(base: str, shape: tuple[int, ...], lead: tuple[int, ...]) -> Pending:
    """The chain that shows ``base`` (shape (M, *positions)) channels last with leading axes
    ``lead`` (the batch's 1 included, the others' product the number of positions): what a
    channels-last op returns."""
    m = shape[0]
    positions = 1
    for d in shape[1:]:
        positions *= d
    idx = torch.arange(m * positions, dtype=torch.int64).view(1, m, positions).transpose(1, 2)
    return Pending(base, idx.reshape(*lead, m).contiguous())


@dataclass(frozen=True)
class TokenMatrix:
    """A chain read as ``groups`` matrices (an attention head each; the chain's leading axes,
    batch included, flattened): ``rows × cols`` of the base's positions and channels. ``tokens_first``:
    rows are the base's positions in order and cols channels (Q, K, V, probabilities: [G, T, D]);
    else the transpose ([G, D, T], Kᵀ). ``gather``: the base channels of group g's columns (rows)
    at g·k … g·k + k − 1 (None: the identity), k = cols (rows)."""

    groups: int
    rows: int
    cols: int
    tokens_first: bool
    gather: list[int] | None


def token_matrix(p: Pending, base_shape: tuple[int, ...]) -> TokenMatrix | None:
    """``p``'s result (shape [..., R, S]) as per-group matrices over ``base_shape`` (C, *positions),
    or None when it is not one (see TokenMatrix)."""
    idx = p.index
    if idx.dim() < 2 or not base_shape:
        return None
    positions = 1
    for d in base_shape[1:]:
        positions *= d
    r, s = idx.shape[-2], idx.shape[-1]
    groups = idx.numel() // (r * s)
    base = torch.arange(base_shape[0] * positions, dtype=torch.int64).view(base_shape[0], positions)
    for tokens_first, (t, k) in ((True, (r, s)), (False, (s, r))):
        if t != positions:
            continue
        planar = idx.reshape(groups, r, s)
        planar = (planar.transpose(1, 2) if tokens_first else planar).reshape(groups * k, positions)
        index = (planar[:, 0] // positions).tolist()
        if any(not 0 <= i < base_shape[0] for i in index) or not torch.equal(base[index], planar):
            continue
        return TokenMatrix(groups, r, s, tokens_first, None if index == list(range(base_shape[0])) else index)
    return None


def crop_box(p: Pending, base_shape: tuple[int, ...]) -> tuple[tuple[int, int, int, int], Pending] | None:
    """The smallest box (top, left, height, width) of the base's H×W positions that ``p`` reads, and
    ``p`` re-indexed onto the base cropped to it, when the chain reads every position of the box
    and no other (a token select, a spatial slice); None otherwise or when it reads all positions."""
    if len(base_shape) != 3:
        return None
    _, h, w = base_shape
    pos = p.index % (h * w)
    rows, cols = pos // w, pos % w
    top, left = int(rows.min()), int(cols.min())
    bh, bw = int(rows.max()) - top + 1, int(cols.max()) - left + 1
    if (bh, bw) == (h, w) or torch.unique(pos).numel() != bh * bw:
        return None
    chan = p.index // (h * w)
    return (top, left, bh, bw), Pending(p.base, chan * (bh * bw) + (rows - top) * bw + (cols - left))


def token_view(base: str, shape: tuple[int, ...], view: tuple[int, ...]) -> Pending:
    """The chain that shows ``base`` (shape (G·n, *positions)) as per-head tokens × features of
    shape ``view`` ([..., G, T, n], leading axes the batch's 1): what a matmul returns."""
    n = view[-1]
    positions = 1
    for d in shape[1:]:
        positions *= d
    groups = shape[0] // n
    idx = torch.arange(shape[0] * positions, dtype=torch.int64).view(groups, n, positions).transpose(1, 2)
    return Pending(base, idx.reshape(view).contiguous())
