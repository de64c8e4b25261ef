"""Cached block activations, stored compactly and evaluated in chunks.

Calibration keeps, for every sample, the float and the quantized values of the
tensors later blocks read (the frontier). Quantized values lie on their quantizer's
grid, x = s·(x̄ − z): they are kept as their uint8 codes x̄ (4× smaller) and decoded
on indexing with the very expression the quantizer evaluates, so the decoded
tensor equals the float one bit for bit. Each chunk is checked on encoding (decode
and compare); a value that is not on the grid (e.g. after an average pool) stays
float32. Float activations stay float32: fp16 would change the result.

Block outputs are written chunk by chunk into one preallocated buffer (no list of
chunks plus a concatenated copy), a chunk's intermediates are freed after their last
reader, and block losses are accumulated chunk by chunk, so a block's evaluation
never holds more than its inputs, its outputs and one chunk's live values. Float
outputs larger than the spill threshold live in memory-mapped files (calib/spill.py).
"""
from __future__ import annotations

from typing import Union

import torch

from calib import native
from calib.blocks import Block
from calib.qmodel import QuantModel, code_source
from calib.quantizers import ActQuantizer
from calib.spill import IN_MEMORY, Spill


class Codes:
    """Activation codes x̄ [N, ...] uint8 of one quantizer; ``codes[i]`` gives the float
    values s·(x̄ − z) (float32, same device), exactly what the quantizer produced."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor):
        self.codes, self.scale, self.zero_point = codes, scale, zero_point

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size()

    def __len__(self) -> int:
        return self.codes.shape[0]

    def __getitem__(self, index) -> torch.Tensor:
        return _decode(self.codes[index], self.scale, self.zero_point)


Stored = Union[torch.Tensor, Codes]
Tensors = dict[str, Stored]


def _decode(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    # the same operations, dtypes and order as ActQuantizer.forward: (q − z)·s
    return (codes.to(scale.dtype) - zero_point) * scale


def take(values: Stored, idx: torch.Tensor, channels_last: bool = False, use_native: bool = False) -> torch.Tensor:
    """``values[idx]`` (decoded where codes), as float32; 4-D results in channels-last memory
    order when ``channels_last``. ``use_native``: gathered, decoded and laid out in one pass
    (calib/native gather) where the kernel can walk the store, with the same values."""
    if use_native:
        if isinstance(values, Codes):
            out = native.gather(values.codes, idx, channels_last, float(values.scale), float(values.zero_point))
        else:
            out = native.gather(values, idx, channels_last)
        if out is not None:
            return out
    x = values[idx]
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


class _Sink:
    """Collects a block output chunk by chunk, as codes while every chunk is on the grid."""

    def __init__(self, n: int, quantizer: ActQuantizer | None, spill: Spill = IN_MEMORY):
        self.n, self.store, self.spill = n, None, spill
        self.coded = quantizer is not None and quantizer.enabled and quantizer.levels <= 255
        if self.coded:
            self.scale = quantizer.scale.detach().clone()
            self.zero_point = quantizer.zero_point.detach().clone()
            self.levels = quantizer.levels

    def put(self, start: int, y: torch.Tensor, rows: int = 32) -> None:
        if self.store is None:
            shape = (self.n, *y.shape[1:])
            self.store = (torch.empty(shape, dtype=torch.uint8, device=y.device) if self.coded
                          else self.spill.empty(shape, y.dtype, y.device))
        # encoded ``rows`` samples at a time: its temporaries stay small beside the chunk
        for i in range(0, len(y), rows):
            part = y[i:i + rows]
            if self.coded:
                q = ((part / self.scale).round_() + self.zero_point).clamp_(0, self.levels)
                if torch.equal(_decode(q, self.scale, self.zero_point), part):
                    self.store[start + i:start + i + len(part)] = q.to(torch.uint8)
                    continue
                self._to_float(start + i, y.dtype)
            self.store[start + i:start + i + len(part)] = part

    def _to_float(self, filled: int, dtype: torch.dtype) -> None:
        """A chunk off the grid: keep the whole tensor as floats from here on."""
        store = self.spill.empty(tuple(self.store.shape), dtype, self.store.device)
        store[:filled] = _decode(self.store[:filled], self.scale, self.zero_point)
        self.store, self.coded = store, False

    def result(self) -> Stored:
        return Codes(self.store, self.scale, self.zero_point) if self.coded else self.store


def producer_quantizer(model: QuantModel, value: str) -> ActQuantizer:
    """The quantizer whose grid ``value`` lies on if it is quantized: its producer's
    output quantizer, looking through parameter-free nodes (pooling, flatten, ReLU)."""
    src = code_source(model.graph, value)
    return model.input_quant if model.graph[src].op == "input" else model.layer(src).out_quant


@torch.no_grad()
def encode(x: torch.Tensor, quantizer: ActQuantizer, chunk: int = 256) -> Stored:
    """``x`` (quantized values) as codes of ``quantizer`` where exact, else as it is."""
    sink = _Sink(len(x), quantizer)
    if not sink.coded:
        return x
    for i in range(0, len(x), chunk):
        sink.put(i, x[i:i + chunk])
    return sink.result()


def count(inputs: Tensors) -> int:
    return next(iter(inputs.values())).shape[0]


@torch.no_grad()
def evaluate(model: QuantModel, block: Block, inputs: Tensors, compact: bool = False,
             chunk: int = 256, spill: Spill = IN_MEMORY) -> Tensors:
    """Block outputs for all samples (the model's current quant mode), chunk by chunk.
    ``compact``: store each output as codes of the quantizer that produced it where exact."""
    return evaluate_nodes(model, block.nodes, block.outputs, inputs, compact, chunk, spill)


@torch.no_grad()
def evaluate_nodes(model: QuantModel, nodes, outputs, inputs: Tensors, compact: bool = False,
                   chunk: int = 256, spill: Spill = IN_MEMORY) -> Tensors:
    """``outputs`` of running ``nodes`` on ``inputs``, for all samples; see ``evaluate``."""
    n, keep = count(inputs), set(outputs)
    sinks = {o: _Sink(n, producer_quantizer(model, o) if compact else None, spill) for o in outputs}
    for i in range(0, n, chunk):
        env = model.run(nodes, {k: v[i:i + chunk] for k, v in inputs.items()}, keep=keep)
        for o, sink in sinks.items():
            sink.put(i, env[o])
        del env
    return {o: s.result() for o, s in sinks.items()}


@torch.no_grad()
def loss(model: QuantModel, block: Block, q_in: Tensors, fp_out: Tensors, chunk: int = 256) -> float:
    """Mean over samples of the summed squared error of the block outputs (eval mode),
    accumulated chunk by chunk."""
    model.eval()
    n, total = count(q_in), 0.0
    for i in range(0, n, chunk):
        env = model.run(block.nodes, {k: v[i:i + chunk] for k, v in q_in.items()}, keep=set(block.outputs))
        total += sum(float((env[o] - fp_out[o][i:i + chunk]).pow_(2).sum()) for o in block.outputs)
    return total / n


def nbytes(values: Tensors) -> int:
    return sum(v.nbytes if isinstance(v, Codes) else v.numel() * v.element_size() for v in values.values())
