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
    if idx.dim() < 2 or idx.shape[0] != 1 or not base_shape:
        return None
    positions = 1
    for d in base_shape[1:]:
        positions *= d
    lead = 1
    for d in idx.shape[1:-1]:
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
    ``lead`` (whose product is the number of positions): what a channels-last op returns."""
    m = shape[0]
    positions = 1
    for d in shape[1:]:
        positions *= d
    idx = torch.arange(m * positions, dtype=torch.int64).view(1, m, positions).transpose(1, 2)
    return Pending(base, idx.reshape(1, *lead, m).contiguous())
