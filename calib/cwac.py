"""Channel-wise affine compensation (QwT-v2's CWAC), closed form per output channel.

For each quantized layer, in block order, fit  y_fp ≈ a_k·y_q + c_k  by least
squares over calibration samples and positions, where y_q is the quantized layer's
pre-activation output on quantized inputs (with γ^z/φ^z applied) and y_fp the float
layer's on float inputs. Folded into the same output affine WAPS learns:
γ^z ← a·γ^z, φ^z ← a·φ^z + c, so it costs nothing at inference.
"""
from __future__ import annotations

import torch

from calib.blocks import Block
from calib.qmodel import QuantModel

Tensors = dict[str, torch.Tensor]


def _channels_last(y: torch.Tensor) -> torch.Tensor:
    """[N, m, ...] → [N·…, m]."""
    return y.transpose(0, 1).reshape(y.shape[1], -1).T


@torch.no_grad()
def fit_affine(y_q: torch.Tensor, y_fp: torch.Tensor, ridge: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (a, c) minimising Σ (a·y_q + c − y_fp)²; a = 1, c = mean gap for constant y_q."""
    q, f = _channels_last(y_q).double(), _channels_last(y_fp).double()
    mq, mf = q.mean(0), f.mean(0)
    var = ((q - mq) ** 2).mean(0)
    cov = ((q - mq) * (f - mf)).mean(0)
    a = torch.where(var > ridge, cov / (var + ridge), torch.ones_like(var))
    return a.float(), (mf - a * mq).float()


@torch.no_grad()
def compensate_block(model: QuantModel, block: Block, q_in: Tensors, fp_in: Tensors, limit: int = 512) -> None:
    q_env = {k: v[:limit] for k, v in q_in.items()}
    fp_env = {k: v[:limit] for k, v in fp_in.items()}
    for name in block.nodes:
        node = model.graph[name]
        if node.op in ("conv2d", "linear"):
            layer = model.layer(name)
            layer.quant = False
            y_fp = layer.preact(fp_env[node.inputs[0]])
            layer.quant = True
            y_q = layer.preact(q_env[node.inputs[0]])
            a, c = fit_affine(y_q, y_fp)
            layer.gamma_z.mul_(a)
            layer.phi_z.mul_(a).add_(c)
        model.set_quant(False)
        model.run([name], fp_env)
        model.set_quant(True)
        model.run([name], q_env)
