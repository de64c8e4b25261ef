"""npu16 BYOC: an op's lowered arrays (tiled weights, tables, LUT) reach its entry as tensor
arguments, so the generated C source does not grow with the weights, and a layer with 16M
weights compiles in seconds and runs bit-exact."""
import numpy as np
import tvm

from calib.numerics import GroupScale, quantize_multiplier
from codegen.npu16.byoc import offload
from relay_passes import reference
from relay_passes.pipeline import lower
from relay_passes.attrs import DequantizeAttrs, LinearAttrs, QuantizeAttrs
from relay_passes.program import INPUT, Op, Program
from waps_tvm.compiler import build


def _linear(f: int, m: int, seed: int = 0) -> Program:
    """quantize → flatten → linear f→m (int8 weights, 3 WAPS groups) → dequantize."""
    rng = np.random.default_rng(seed)
    mult, shift = quantize_multiplier(0.5 / (f * 8) * rng.uniform(0.5, 1.5, m))
    params = {"w": rng.integers(-8, 8, (m, f)).astype(np.int8), "bias": rng.integers(-500, 500, m).astype(np.int32),
              "mult": mult.astype(np.int32), "shift": shift.astype(np.int32),
              "groups": rng.integers(0, 3, f).astype(np.int8)}
    attrs = LinearAttrs(z_in=128, z_out=7, lo=0, hi=255, in_qmax=255, frac=4, layer="fc",
                        group_scales=[GroupScale(0, 0), GroupScale(-1, 4), GroupScale(1, 4)])
    ops = [Op("quantize", "q", [INPUT], QuantizeAttrs(scale=0.02, zero_point=128, qmax=255)),
           Op("flatten", "flat", ["q"]),
           Op("linear", "fc", ["flat"], attrs, params),
           Op("dequantize", "deq", ["fc"], DequantizeAttrs(scale=0.05, zero_point=7), dtype="float32")]
    return Program((2, f, 1, 1), ops, ["deq", "fc"])


def _source(prog: Program) -> str:
    mod, _ = offload(lower(prog, "split").module)
    (ext,) = mod.attrs["external_mods"]
    return ext.inspect_source()


def test_source_size_does_not_grow_with_the_weight_count():
    small, large = _source(_linear(32, 32)), _source(_linear(1024, 1024))      # 1k and 1M weights
    # only the stream's register values differ (a few digits); literals made the large one 2.6 MB
    assert len(large) - len(small) < 200, (len(small), len(large))
    assert "b.tiles = (const int8_t*)waps_ptr(&args[" in large and "waps_npu16_fc_tiles[" not in large


def test_linear_4096_by_4096_compiles_and_runs_bit_exact():
    # 16M weights: as C literals this took ~150 s of build and 42 MB of source here
    prog = _linear(4096, 4096, seed=1)
    lowered = lower(prog, "split")
    vm = tvm.runtime.vm.VirtualMachine(build(lowered, "npu16"), tvm.cpu())
    assert {r["op"]: r["target"] for r in lowered.placement}["fc"] == "npu16"
    x = np.random.default_rng(2).normal(0, 1.5, prog.input_shape).astype(np.float32)
    out = vm["main"](tvm.runtime.tensor(x))
    ref = reference.run(prog, x)
    np.testing.assert_array_equal(out[1].numpy(), ref[1])
    np.testing.assert_array_equal(out[0].numpy(), ref[0])
    assert len(np.unique(ref[1])) > 10                       # the codes are not all clamped
