"""An oracle that can catch the compiler: each integer op against the fake-quant model.

Backends are checked bit for bit against the NumPy reference, but they all run the program
the compiler built, so a mistake in building it (bias, multiplier, fractional bits, the pool
folding) would pass every bit-exact test. Here every quantization point of the program (conv,
linear, add, mul, concat, table, average pooling), fed the
fake-quant model's own input codes for that layer, is compared with the fake-quant model's
output codes for the same layer. They differ only by rounding (fake-quant rounds half to
even in float, the program half up in integers, with a 31-bit multiplier and a bias kept to
2^−L), so every code should be within 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from calib.artifact import WapsArtifact
from calib.fakequant import build_fake_quant
from relay_passes import reference
from relay_passes.quantize import TensorCodes
from waps_tvm.frontend import build_program


@dataclass(frozen=True)
class LayerAgreement:
    layer: str            # the graph node's label (name and place in the user's model)
    kind: str             # the graph op: conv2d | linear | add | mul | cat | elementwise | avg pooling
    max_diff: int         # largest |program code − fake-quant code|
    differing: float      # fraction of codes that differ at all
    count: int            # codes compared


def to_codes(value: torch.Tensor, codes: TensorCodes) -> np.ndarray:
    """A fake-quant tensor (dequantized, or a mean of such) in a program value's code domain."""
    q = np.round(value.detach().double().numpy() / codes.scale) + codes.zero_point
    return np.clip(q, 0, codes.qmax).astype(np.int64)


def layer_agreement(art: WapsArtifact, x: np.ndarray) -> list[LayerAgreement]:
    """Per quantization point of ``art``: the integer op on the fake-quant model's input codes
    against the fake-quant model's output codes, for float32 inputs ``x`` [N, C, H, W]."""
    program, values = build_program(art, len(x))
    model = build_fake_quant(art)
    g = art.graph
    with torch.no_grad():
        env = {g.input.name: model.input_quant(torch.from_numpy(np.asarray(x, np.float32)))}
        model.run([n.name for n in g if n is not g.input], env)
    rows = []
    for n in g:
        if n is g.input or n.name not in art.quant:      # only quantization points are compared
            continue
        op = program[values[n.name].name]
        sources = n.inputs or [g.input.name]           # a constant reads only the input's batch size
        ins = [np.broadcast_to(to_codes(env[i], values[i].codes), (len(x), *env[i].shape[1:]))   # constants: batch 1
               .astype(program.dtype_of(values[i].name)) for i in sources]
        got = reference.OPS[op.kind](op, *ins).astype(np.int64)
        want = to_codes(env[n.name], values[n.name].codes)
        diff = np.abs(got - want)
        rows.append(LayerAgreement(n.label(), n.op, int(diff.max(initial=0)), float((diff > 0).mean()), diff.size))
    return rows
