"""Multi-op npu16 partitions (issue 15, codegen/npu16/cascade.py): chain forming, the SRAM
decision (targets/npu16/memory.keeps), and small random chains compiled through the BYOC path
(one partition per chain) run bit-exactly against the NumPy reference with cascading on and
off, the simulator's counters equal to the cost model's, and fewer DMA bytes when kept."""
from __future__ import annotations

import numpy as np
import pytest

from codegen.npu16.cascade import Node, form
from relay_passes import reference
from calib.numerics import layer_norm_constants, quantize_multiplier, softmax_constants
from relay_passes.attrs import (AddAttrs, ConvAttrs, DequantizeAttrs, LayerNormAttrs, MatmulAttrs, MaxPoolAttrs,
                                QuantizeAttrs, SoftmaxAttrs)
from relay_passes.program import INPUT, Op, Program, emit
from targets.npu16 import memory
from targets.npu16.cost import LayerShape, cascaded, layer_cost
from targets.npu16.params import NPU16, from_config


def _node(name, inputs, nbytes=100, sram_in=0, sram_out=0, chainable=True):
    return Node(name, tuple(inputs), nbytes, sram_in, sram_out, chainable)


def test_chains_follow_single_consumer_edges():
    # x → a → b → c → add(c, a'): a' = a has two consumers, so the chain is b → c → add
    nodes = [_node("a", ["x"]), _node("b", ["a"]), _node("c", ["b"]), _node("add", ["c", "a"]), _node("d", ["add"])]
    chs = form(nodes, {"d"}, NPU16())
    assert [c.ops for c in chs] == [("b", "c", "add", "d")]
    assert [lk.input_index for lk in chs[0].links] == [0, 0, 0]
    assert form(nodes, {"d"}, NPU16(cascade=False)) == []
    # an op that cannot be chained (on the host, or not a chainable command) cuts the chain
    nodes[2] = _node("c", ["b"], chainable=False)
    assert [c.ops for c in form(nodes, {"d"}, NPU16())] == [("add", "d")]
    # a model output is never an intermediate
    assert form([_node("a", ["x"]), _node("b", ["a"])], {"a", "b"}, NPU16()) == []


def test_an_add_of_two_chainable_producers_continues_the_later_one():
    nodes = [_node("p", ["x"]), _node("q", ["x"]), _node("add", ["p", "q"])]
    (ch,) = form(nodes, set(), NPU16())
    assert ch.ops == ("q", "add") and ch.links[0].input_index == 1


def test_keep_decision_is_memory_keeps():
    npu = NPU16(sram_act_kib=1)
    # the producer's input rows and the consumer's output rows count, next to the kept tensor
    assert memory.keeps(600, 400, 0, npu) and not memory.keeps(600, 500, 0, npu)
    assert memory.keeps(600, 0, 400, npu) and not memory.keeps(600, 0, 500, npu)
    assert not memory.keeps(600, 0, 0, npu, held=500)
    assert memory.keeps(600, 900, 0, npu, held=400)        # a kept input replaces the input rows
    nodes = [_node("a", ["x"], 600), _node("b", ["a"], 600), _node("c", ["b"], 10)]
    ch = form(nodes, set(), npu)[0]
    # a → b kept (600 B); b → c: b's input (600) + its output (600) > 1 KiB: spilled
    assert [lk.kept for lk in ch.links] == [True, False]
    assert ch.keep_out("a") and ch.keep_in("b") == (0,) and not ch.keep_out("b") and ch.keep_in("c") == ()


def test_cascaded_cost_moves_bytes_to_saved():
    npu = NPU16()
    base = layer_cost(LayerShape("l", 16, 16, 4, 4, 3, 3, h=4, w=4, wbits=8, abits_in=8, abits_out=8, ph=1), npu)
    kept = cascaded(base, base.bytes["input"], True, npu)
    assert kept.bytes["input"] == 0 and kept.bytes["output"] == 0
    assert kept.bytes["saved"] == base.bytes["input"] + base.bytes["output"] == 256 + 256
    assert kept.dma_cycles == -(-base.bytes["weights"] // npu.dma_bytes_per_cycle) < base.dma_cycles
    with pytest.raises(ValueError):
        cascaded(base, base.bytes["input"] + 1, False, npu)


def test_cost_query_keeps_as_compiled_unless_the_machine_does_not_cascade():
    from targets.npu16.report import CostQuery
    args = {"name": "a", "in_elems": 64, "out_elems": 64}
    kept, alone = CostQuery("add", args, {"inputs": [1], "output": True}), CostQuery("add", args)
    assert kept.cost(NPU16()).bytes == {"weights": 0, "input": 64, "output": 0, "saved": 128}
    assert CostQuery.from_json(kept.to_json()) == kept and "keep" not in alone.to_json()
    assert kept.cost(NPU16(cascade=False)).bytes == alone.cost(NPU16()).bytes == {"weights": 0, "input": 128,
                                                                                 "output": 64}


def test_config_key_cascade():
    assert NPU16().cascade and not from_config({"cascade": False}).cascade
    assert "cascade" in NPU16().to_config()


# --- small random chains through the BYOC path -------------------------------------------

def _conv(rng, name, src, c, m, k, n, hw, g=1, stride=1):
    pad = k // 2
    oh = (hw + 2 * pad - k) // stride + 1
    attrs = ConvAttrs(conv_groups=g, stride=[stride] * 2, padding=[pad] * 2, dilation=[1, 1],
                      z_in=int(rng.integers(0, 8)), z_out=int(rng.integers(0, 8)), lo=0, hi=255)
    params = {"w": rng.integers(-3, 4, (m, c // g, k, k)).astype(np.int8),
              "bias": rng.integers(-60, 60, m).astype(np.int32),
              "mult": rng.integers(2**29, 2**31 - 1, m).astype(np.int32), "shift": np.full(m, 9, np.int32)}
    return Op("conv2d", name, [src], attrs, params, shape=(n, m, oh, oh))


def chain_program(kind: str, seed: int) -> Program:
    """quantize → the chain → dequantize, random channels/sizes: 'conv_conv' (k×k conv → k×k
    conv), 'inverted' (1×1 expansion → depthwise 3×3 → 1×1 projection + residual add of the
    chain's input), 'conv_pool' (conv → max pool), 'attention' (scores = Q·Kᵀ → per-head
    softmax → probs·V, K = V a strided 1×1 conv of the input), 'norm' (conv → layer norm → 1×1 conv)."""
    rng = np.random.default_rng([seed, len(kind)])
    n, c, hw = int(rng.integers(1, 3)), int(rng.integers(2, 20)), int(rng.integers(3, 9))
    ops = [Op("quantize", "q", [INPUT], QuantizeAttrs(scale=1.0, zero_point=0.0, qmax=255), shape=(n, c, hw, hw))]
    if kind == "conv_conv":
        m = int(rng.integers(1, 40))
        ops.append(_conv(rng, "c1", "q", c, m, int(rng.choice([1, 3])), n, hw, stride=int(rng.integers(1, 3))))
        ops.append(_conv(rng, "c2", "c1", m, int(rng.integers(1, 40)), int(rng.choice([1, 3])), n, ops[-1].shape[2]))
    elif kind == "inverted":
        e = c * int(rng.integers(2, 7))
        ops += [_conv(rng, "expand", "q", c, e, 1, n, hw), _conv(rng, "dw", "expand", e, e, 3, n, hw, g=e),
                _conv(rng, "project", "dw", e, c, 1, n, hw)]
        ops.append(Op("add", "add", ["project", "q"], AddAttrs(za=int(rng.integers(0, 8)), zb=0, ka=int(rng.integers(1, 9)),
                                                                kb=int(rng.integers(1, 9)), t=3, z_out=2, lo=0, hi=255),
                      shape=(n, c, hw, hw)))
    elif kind == "attention":
        g = int(rng.choice([h for h in (1, 2, 3, 4) if c % h == 0]))
        ops.append(_conv(rng, "kv", "q", c, c, 1, n, hw, stride=int(rng.integers(1, 4))))   # two users: not chained
        lp = ops[-1].shape[2]
        zv = ops[-1].attrs.z_out                  # the conv's codes spread a few steps around its zero point
        mult, shift = (int(v[0]) for v in quantize_multiplier(np.array([rng.uniform(0.04, 0.16) / np.sqrt(c // g)])))
        ops.append(Op("matmul", "scores", ["q", "kv"], MatmulAttrs(heads=g, contract="channels", za=128, zb=zv,
                                                                   z_out=128, lo=0, hi=255, mult=mult, shift=shift),
                      shape=(n, g * lp * lp, hw, hw)))
        k8 = softmax_constants(float(rng.uniform(0.02, 0.1)), 255, 1 / 255)
        ops.append(Op("softmax", "probs", ["scores"], SoftmaxAttrs(groups=g, mult=k8.r, frac=k8.k, z_out=0, lo=0,
                                                                   hi=255), {"exp": k8.table}, shape=ops[-1].shape))
        mult, shift = (int(v[0]) for v in quantize_multiplier(np.array([rng.uniform(0.02, 0.08)])))
        ops.append(Op("matmul", "pv", ["probs", "kv"], MatmulAttrs(heads=g, contract="positions", za=0, zb=zv,
                                                                   z_out=128, lo=0, hi=255, mult=mult, shift=shift),
                      shape=(n, c, hw, hw)))
    elif kind == "norm":
        m = int(rng.integers(1, 40))
        ops.append(_conv(rng, "c1", "q", c, m, int(rng.choice([1, 3])), n, hw))
        nc = layer_norm_constants(rng.normal(1, 0.5, m), rng.normal(0, 0.5, m), 1e-6, 0.05, 255, 0.03)
        ops.append(Op("layer_norm", "ln", ["c1"], LayerNormAttrs(prec=nc.p, eps=nc.e, frac=nc.k, z_out=128, lo=0,
                                                                 hi=255), {"g": nc.g, "b": nc.b}, shape=ops[-1].shape))
        ops.append(_conv(rng, "c2", "ln", m, int(rng.integers(1, 40)), 1, n, hw))
    else:
        m = int(rng.integers(1, 40))
        ops.append(_conv(rng, "c1", "q", c, m, 3, n, hw))
        k, s = int(rng.integers(2, 4)), int(rng.integers(1, 3))
        oh = (hw + 2 * (k // 2) - k) // s + 1
        ops.append(Op("max_pool2d", "pool", ["c1"], MaxPoolAttrs(kernel=(k, k), stride=(s, s), padding=(k // 2, k // 2)),
                      shape=(n, m, oh, oh)))
    last = ops[-1]
    ops.append(Op("dequantize", "dq", [last.name], DequantizeAttrs(scale=0.5, zero_point=3.0), shape=last.shape,
                  dtype="float32"))
    return Program((n, c, hw, hw), ops, ["dq", last.name])


def run_npu16(prog: Program, npu: NPU16, folder):
    """Compile ``prog`` through the npu16 BYOC path on ``npu`` → (output codes on a random
    input, the reference's, placement rows, counters by op, cost model's counters by op)."""
    import tvm
    from tvm import relax

    from codegen.npu16.byoc import counter_symbols, offload
    from targets.npu16.counters import read
    from targets.npu16.report import CostQuery, query
    mod, where = offload(emit(prog), npu)
    lib_path = folder / f"m_{npu.cascade}_{npu.sram_act_kib}.so"
    relax.build(mod, target="llvm").export_library(str(lib_path))
    lib = tvm.runtime.load_module(str(lib_path))
    x = np.random.default_rng(1).integers(0, 256, prog.input_shape).astype(np.float32)
    syms = counter_symbols(where)
    read(lib, syms, reset=True)
    out = tvm.runtime.vm.VirtualMachine(lib, tvm.cpu())["main"](tvm.runtime.tensor(x))
    counted = read(lib, syms)
    got, est = {}, {}
    for r in where:
        if r.get("symbol"):
            q = query(prog, prog[r["op"]], npu)
            if r.get("partition"):
                q = CostQuery(q.fn, q.args, {"inputs": r["keep_in"], "output": r["keep_out"]})
            got[r["op"]], est[r["op"]] = counted[r["symbol"]], q.cost(npu).counters()
    return out[1].numpy(), reference.run(prog, x)[1], where, got, est


def _moved(counters: dict) -> int:
    return sum(c["dma_in_bytes"] + c["dma_out_bytes"] for c in counters.values())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", ["conv_conv", "inverted", "conv_pool", "attention", "norm"])
def test_chain_bit_exact_and_saves_dma(kind, seed, tmp_path):
    prog = chain_program(kind, seed)
    on_codes, ref, where, on, on_est = run_npu16(prog, NPU16(), tmp_path)
    off_codes, _, where_off, off, off_est = run_npu16(prog, NPU16(cascade=False), tmp_path)
    np.testing.assert_array_equal(on_codes, ref)
    np.testing.assert_array_equal(off_codes, ref)
    assert on == on_est and off == off_est                 # simulator = cost model, cascading on and off
    chained = [r for r in where if r.get("partition")]
    ops = [o.name for o in prog.ops if o.kind not in ("quantize", "dequantize") and o.name != "kv"]  # kv: 2 users
    assert [r["op"] for r in chained] == ops and len({r["partition"] for r in chained}) == 1   # one partition
    assert not any(r.get("partition") for r in where_off)
    saved = sum(c["dma_saved_bytes"] for c in on.values())
    assert saved > 0 and _moved(on) == _moved(off) - saved  # every byte kept is a byte not moved
    assert sum(c["cycles"] for c in on.values()) <= sum(c["cycles"] for c in off.values())


def test_chain_that_does_not_fit_spills_and_stays_one_partition(tmp_path):
    prog = chain_program("inverted", 7)                 # 2 × 56 × 7 × 7 = 5488 B intermediates
    npu = NPU16(sram_act_kib=4, sram_weight_kib=8)
    codes, ref, where, got, est = run_npu16(prog, npu, tmp_path)
    np.testing.assert_array_equal(codes, ref)
    assert got == est
    chained = [r for r in where if r.get("partition")]
    assert len(chained) == 4 and len({r["partition"] for r in chained}) == 1
    assert not any(r["keep_out"] for r in chained)          # none fits 4 KiB next to the stripes
    assert sum(c["dma_saved_bytes"] for c in got.values()) == 0
    _, _, _, off, _ = run_npu16(prog, NPU16(sram_act_kib=4, sram_weight_kib=8, cascade=False), tmp_path)
    assert got == off


# --- end to end: a MobileNetV2-like block through waps-tvm compile / run / report --------

def _inverted_block():
    import torch
    from torch import nn

    class Block(nn.Module):
        """Stem conv → 1×1 expansion → depthwise 3×3 → 1×1 projection + residual → max pool."""

        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU6())
            self.expand = nn.Sequential(nn.Conv2d(16, 48, 1), nn.BatchNorm2d(48), nn.ReLU6())
            self.dw = nn.Sequential(nn.Conv2d(48, 48, 3, padding=1, groups=48), nn.BatchNorm2d(48), nn.ReLU6())
            self.project = nn.Sequential(nn.Conv2d(48, 16, 1), nn.BatchNorm2d(16))
            self.pool = nn.MaxPool2d(2)

        def forward(self, x):
            y = self.stem(x)
            return self.pool(y + self.project(self.dw(self.expand(y))))

    torch.manual_seed(0)
    return Block()


@pytest.fixture(scope="module")
def block_artifact():
    from tests.compile_helpers import calibrated
    from tests.conftest import randomize_bn
    return calibrated(randomize_bn(_inverted_block()), (3, 12, 12))


@pytest.mark.slow                  # ~30 s: calibration and two compiles
def test_inverted_block_compiles_to_partitions_bit_exact_with_report(block_artifact, tmp_path, capsys):
    import json

    from calib import artifact
    from tests.compile_helpers import run_in_fresh_process
    from waps_tvm import cli
    from waps_tvm.compiler import lower_artifact
    path = artifact.save(block_artifact, tmp_path / "b.waps")
    x = np.random.default_rng(2).normal(size=(2, 3, 12, 12)).astype("float32")
    ref = reference.run(lower_artifact(block_artifact, 2).program, x)
    reps = {}
    for on in (True, False):
        cfg = tmp_path / f"npu_{on}.json"
        cfg.write_text(json.dumps({"cascade": on}))
        out = tmp_path / f"out_{on}"
        assert cli.main(["compile", str(path), "--target", "npu16", "--npu-config", str(cfg), "-o", str(out),
                         "--batch", "2"]) == 0
        np.testing.assert_array_equal(run_in_fresh_process(out, x, tmp_path), ref[1], err_msg=f"cascade {on}")
        reps[on] = json.loads((out / "report.json").read_text())
    capsys.readouterr()
    on, off = reps[True]["totals"], reps[False]["totals"]
    parts = on["partitions"]
    merged = {op for p in parts for op in p["ops"]}
    kinds = {r["op"]: r["kind"] for r in reps[True]["ops"]}
    assert {kinds[o] for o in merged} >= {"conv2d", "add", "max_pool2d"}       # 1×1 → dw → 1×1 → add → pool
    assert on["dma_saved_bytes"] > 0 and off["partitions"] == [] and off["dma_saved_bytes"] == 0
    assert on["offchip_read"] + on["offchip_write"] == off["offchip_read"] + off["offchip_write"] - on["dma_saved_bytes"]
    assert on["cycles"] == off["cycles"] - on["cycles_saved"]
    assert cli.main(["report", str(tmp_path / "out_True")]) == 0
    text = capsys.readouterr().out
    assert "Multi-op partitions (cascading)" in text and " → " in text
    csv = (tmp_path / "out_True" / "report.csv").read_text().splitlines()
    assert "partition" in csv[0] and any(p["partition"] in line for p in parts for line in csv[1:])
    # re-costed for the same machine without cascading: what the cascade-off build counted
    assert cli.main(["report", str(tmp_path / "out_True"), "--npu-config", str(tmp_path / "npu_False.json"),
                     "--out", str(tmp_path / "recost")]) == 0
    again = json.loads((tmp_path / "recost" / "report.json").read_text())["totals"]
    assert again["partitions"] == [] and again["cycles"] == off["cycles"]
    assert (again["offchip_read"], again["offchip_write"]) == (off["offchip_read"], off["offchip_write"])


@pytest.mark.slow                  # ~1-2 min: calibrates MobileNetV2 (W2A4, 32×32) and builds it twice
def test_mobilenet_v2_partitions_bit_exact_and_fewer_dma_bytes(tmp_path):
    """The real network through the normal lowering and npu16 build, cascading on and off:
    the same codes as the reference, the counters equal to the cost model, chains of its
    inverted-residual blocks, and the bytes kept in SRAM missing from the DMA exactly."""
    import tvm

    from codegen.npu16.byoc import counter_symbols
    from targets.npu16.counters import measure
    from targets.npu16.report import query
    from tests.compile_helpers import torchvision_w2
    from waps_tvm.compiler import build, lower_artifact
    art = torchvision_w2("mobilenet_v2")
    x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype("float32")
    moved = {}
    for on in (True, False):
        npu = NPU16(cascade=on)
        lowered = lower_artifact(art, 2)
        ex = build(lowered, "npu16", npu)
        out = tvm.runtime.vm.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x))
        np.testing.assert_array_equal(out[1].numpy(), reference.run(lowered.program, x)[1], err_msg=f"cascade {on}")
        ex.export_library(str(tmp_path / f"mnv2_{on}.so"))
        where = lowered.placement
        got = measure(tmp_path / f"mnv2_{on}.so", x.shape, counter_symbols(where))
        prog = lowered.program
        for r in where:
            if r.get("symbol"):
                keep = {"inputs": r.get("keep_in", []), "output": r.get("keep_out", False)}
                assert got[r["symbol"]] == query(prog, prog[r["op"]], npu, keep).cost(npu).counters(), r["op"]
        parts = {r["partition"] for r in where if r.get("partition")}
        kinds = {prog[r["op"]].kind for r in where if r.get("partition")}
        moved[on] = (sum(c["dma_in_bytes"] + c["dma_out_bytes"] for c in got.values()),
                     sum(c["dma_saved_bytes"] for c in got.values()), len(parts), kinds)
    (b_on, saved, n_parts, kinds), (b_off, saved_off, n_off, _) = moved[True], moved[False]
    assert n_parts >= 10 and kinds >= {"conv2d", "add"} and n_off == 0 and saved_off == 0
    assert saved > 0 and b_on == b_off - saved
