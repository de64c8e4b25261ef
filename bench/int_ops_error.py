"""The integer transformer ops against float: how far each integer rule lands from the float op
quantized the way the fake-quant model does (round half to even, then clamp).

For each op and setting, activations drawn like a network's (per-channel offsets and spreads,
then quantized at the input's bits), the integer rule (calib/numerics.py, the one NumPy
definition every backend equals bit for bit) against torch's float op on the dequantized
input: the largest code difference, the share of codes equal, and the RMS difference in
output steps.

    python -m bench.int_ops_error [--positions 4096] [--seed 0]

Writes bench/results/int_ops_error.{json,md}; docs/numeric-contract.md quotes the table.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from calib import numerics as nx

RESULTS = Path(__file__).resolve().parent / "results"
# (channels, input bits, output bits): a ViT-B/ConvNeXt-T width, a small model's, and low bits
LAYER_NORM_CASES = ((768, 8, 8), (96, 8, 8), (768, 4, 4), (96, 4, 4), (16, 8, 8))
GELU_CASES = (8, 6, 4)
# (keys per softmax, input bits, output bits): ViT-B/16 at 224 (197 tokens), a small ViT's, low bits
SOFTMAX_CASES = ((197, 8, 8), (17, 8, 8), (197, 8, 4), (17, 4, 4), (50, 6, 6))
# (terms summed, input bits, output bits): a ViT-B head (64), 197 tokens, a small head
MATMUL_CASES = ((64, 8, 8), (197, 8, 8), (16, 4, 4))


def _codes(real: np.ndarray, bits: int) -> tuple[np.ndarray, float, int]:
    """Asymmetric min/max quantization of ``real``: (codes int64, scale, zero point)."""
    qmax = 2**bits - 1
    lo, hi = float(min(real.min(), 0)), float(max(real.max(), 0))
    scale = (hi - lo) / qmax
    zero = int(round(-lo / scale))
    return np.clip(np.rint(real / scale) + zero, 0, qmax).astype(np.int64), scale, zero


def _compare(got: np.ndarray, want: np.ndarray) -> dict:
    d = (got - want).astype(np.float64)
    return {"max_diff": int(np.abs(d).max()), "equal": float((d == 0).mean()), "rms": float(np.sqrt((d * d).mean()))}


def layer_norm_error(c: int, in_bits: int, out_bits: int, positions: int, rng) -> dict:
    """The integer layer norm (layer_norm_codes) against F.layer_norm of the dequantized input."""
    real = rng.normal(rng.normal(0, 1, c)[:, None], rng.uniform(0.2, 2, c)[:, None], (c, positions))
    x, s_in, z_in = _codes(real, in_bits)
    gamma, beta, eps = rng.normal(1, 0.3, c), rng.normal(0, 0.3, c), 1e-6
    t = torch.from_numpy(((x - z_in) * s_in).astype(np.float32)).T
    ref = F.layer_norm(t, (c,), torch.tensor(gamma, dtype=torch.float32), torch.tensor(beta, dtype=torch.float32),
                       eps).T.numpy()
    _, s_out, z_out = _codes(ref, out_bits)
    qmax = 2**out_bits - 1
    want = np.clip(np.rint(ref / np.float32(s_out)) + z_out, 0, qmax)
    k = nx.layer_norm_constants(gamma, beta, eps, s_in, 2**in_bits - 1, s_out)
    got = nx.layer_norm_codes(x[None], k.g, k.b, k.p, k.e, k.k, z_out, 0, qmax)[0]
    return {"op": "layer_norm", "channels": c, "in_bits": in_bits, "out_bits": out_bits,
            "prec": k.p, "frac": k.k, **_compare(got, want)}


def gelu_error(bits: int, rng) -> dict:
    """The GELU table (code_table) against F.gelu of every dequantized input code."""
    real = rng.normal(0, 2, 4096)
    x, s_in, z_in = _codes(real, bits)
    qmax = 2**bits - 1
    xs = np.arange(qmax + 1)
    ref = F.gelu(torch.from_numpy(((xs - z_in) * s_in).astype(np.float32))).numpy()
    _, s_out, z_out = _codes(ref, bits)
    table = nx.code_table(lambda v: F.gelu(torch.from_numpy(v)).numpy(), s_in, z_in, qmax, s_out, z_out, qmax)
    want = np.clip(np.rint(ref / np.float32(s_out)) + z_out, 0, qmax)
    return {"op": "gelu (table)", "channels": None, "in_bits": bits, "out_bits": bits,
            **_compare(nx.apply_table(table, xs).astype(np.int64), want)}


def softmax_error(keys: int, in_bits: int, out_bits: int, positions: int, rng) -> dict:
    """The integer softmax (softmax_codes: exp table, int64 sum, rounded quotient) against
    torch's softmax of the dequantized scores, output quantized on [0, 1] (zero point 0)."""
    real = rng.normal(rng.normal(0, 1, positions)[None], rng.uniform(0.5, 3, positions)[None], (keys, positions))
    x, s_in, _ = _codes(real, in_bits)
    qmax = 2**out_bits - 1
    s_out = 1.0 / qmax
    ref = torch.from_numpy(((x - x.min()) * s_in).astype(np.float32)).softmax(0).numpy()
    want = np.clip(np.rint(ref / np.float32(s_out)), 0, qmax)
    k = nx.softmax_constants(s_in, 2**in_bits - 1, s_out)
    got = nx.softmax_codes(x[None], k.table, 1, k.r, k.k, 0, 0, qmax)[0]
    return {"op": "softmax", "channels": keys, "in_bits": in_bits, "out_bits": out_bits, "frac": k.k,
            **_compare(got, want)}


def matmul_error(terms: int, in_bits: int, out_bits: int, positions: int, rng) -> dict:
    """The integer matmul (exact int32 sum of code products, one requantization) against the
    float product of the dequantized operands, output min/max quantized."""
    a, s_a, z_a = _codes(rng.normal(0, 1, (positions, terms)), in_bits)
    b, s_b, z_b = _codes(rng.normal(0.5, 1, (terms, 16)), in_bits)
    ref = (torch.from_numpy(((a - z_a) * s_a).astype(np.float32)) @
           torch.from_numpy(((b - z_b) * s_b).astype(np.float32))).numpy()
    _, s_out, z_out = _codes(ref, out_bits)
    qmax = 2**out_bits - 1
    want = np.clip(np.rint(ref / np.float32(s_out)) + z_out, 0, qmax)
    mult, shift = nx.quantize_multiplier(np.array([s_a * s_b / s_out]))
    got = nx.output_codes((a - z_a) @ (b - z_b), mult, shift, z_out, 0, qmax)
    return {"op": "matmul", "channels": terms, "in_bits": in_bits, "out_bits": out_bits, **_compare(got, want)}


def render(rows: list[dict], meta: dict) -> str:
    lines = ["# Integer ops against float (codes of the float op, rounded half to even)", "",
             f"{meta['positions']} positions per layer norm case, seed {meta['seed']}; activations drawn per channel "
             "(offset N(0, 1), spread U(0.2, 2)), min/max quantized. Computed in NumPy (the reference every backend "
             "equals bit for bit).", "",
             "channels: the layer norm's width, the softmax's keys, the matmul's summed terms.", "",
             "| op | channels | in bits | out bits | max Δ (codes) | codes equal | RMS Δ (steps) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['channels'] or '–'} | {r['in_bits']} | {r['out_bits']} | {r['max_diff']} | "
                     f"{100 * r['equal']:.3f} % | {r['rms']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--positions", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    rows = [layer_norm_error(c, i, o, args.positions, rng) for c, i, o in LAYER_NORM_CASES]
    rows += [gelu_error(b, rng) for b in GELU_CASES]
    rows += [softmax_error(k, i, o, args.positions, rng) for k, i, o in SOFTMAX_CASES]
    rows += [matmul_error(t, i, o, args.positions, rng) for t, i, o in MATMUL_CASES]
    meta = {"positions": args.positions, "seed": args.seed}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "int_ops_error.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (args.out / "int_ops_error.md").write_text(render(rows, meta))
    print(render(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
