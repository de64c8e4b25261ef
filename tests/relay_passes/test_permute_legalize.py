"""PermuteChannels and LegalizeWAPS: structure after each pass, numerics unchanged."""
import numpy as np
import pytest
import tvm

from relay_passes import fast_kernels, reference
from relay_passes.kernels import group_ranges
from relay_passes.legalize import legalize_waps
from relay_passes.permute import permute_channels
from relay_passes.program import INPUT, emit, input_layout, parse
from tests.relay_passes.helpers import assert_same, body_ops
from waps_tvm.frontend import to_program


@pytest.fixture(scope="module")
def quantized(tiny_artifact):
    return to_program(tiny_artifact, 2)


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(5).normal(size=(2, 1, 16, 16)).astype("float32")


def _waps_layers(prog):
    return [o for o in prog.ops if o.kind in ("conv2d", "linear") and "groups" in o.params
            and not (o.kind == "conv2d" and o.attrs.conv_groups > 1)]


def test_scrambled_groups_are_not_contiguous_before(quantized):
    assert any(group_ranges(o.params["groups"], 3) is None for o in _waps_layers(quantized))


def test_permute_makes_every_group_contiguous(quantized, x):
    prog, report = permute_channels(quantized)
    for o in _waps_layers(prog):
        assert group_ranges(o.params["groups"], 3) is not None, o.name
    gathers = [o for o in prog.ops if o.kind == "gather"]
    assert report.gathers == len(gathers) >= 1          # the residual stream feeds two WAPS convs
    assert report.permuted >= 1
    # numerics: same outputs as before the pass, and llvm equals the reference
    np.testing.assert_array_equal(reference.run(prog, x)[1], reference.run(quantized, x)[1])
    assert_same(prog, x)


def test_permute_without_disagreement_needs_no_gather(quantized):
    prog = quantized.copy()
    # give every consumer of each tensor the same labels: one order serves them all
    for o in _waps_layers(prog):
        c = o.params["groups"].size
        o.params["groups"] = (np.arange(c)[::-1] % 3).astype(np.int8)
    out, report = permute_channels(prog)
    readers = {}
    for o in _waps_layers(out):
        readers.setdefault(o.inputs[0], []).append(o)
    assert report.gathers <= sum(len(v) - 1 for v in readers.values() if len(v) > 1) + 1


@pytest.mark.parametrize("form", ["split", "fused"])
def test_legalize_forms(quantized, x, form):
    permuted, _ = permute_channels(quantized)
    prog, report = legalize_waps(permuted, form)
    assert report.legalized == len(_waps_layers(prog))
    assert report.masked == [o.attrs.layer for o in prog.ops if o.kind == "conv2d" and "groups" in o.params
                             and o.attrs.conv_groups > 1]
    mod = emit(prog)
    conv = next(o for o in _waps_layers(prog) if o.kind == "conv2d")
    ops = body_ops(mod, conv.name)
    if form == "split":
        nonempty = sum(1 for a, b in group_ranges(conv.params["groups"], 3) if b > a)
        assert ops.count("relax.nn.conv2d") == nonempty
        assert ops.count("relax.right_shift") >= 1
    else:
        assert ops.count("relax.nn.conv2d") == 0 and ops.count("relax.call_tir") == 1
    np.testing.assert_array_equal(reference.run(prog, x)[1], reference.run(quantized, x)[1])
    assert_same(prog, x)


@pytest.mark.parametrize("dot", ["vnni", "none"])
def test_fast_form_is_one_scheduled_kernel_per_op(quantized, x, dot):
    if dot == "vnni" and fast_kernels.host_dot() != "vnni":
        pytest.skip("this CPU has no AVX-512 VNNI")
    permuted, _ = permute_channels(quantized)
    prog, report = legalize_waps(permuted, "fast", dot)
    depthwise = [o for o in prog.ops if o.kind == "conv2d" and o.attrs.conv_groups == o.params["w"].shape[0]
                 and o.params["w"].shape[1] == 1]
    assert depthwise and all(o.schedule.form == "fast" for o in depthwise)
    assert report.masked == [o.attrs.layer for o in prog.ops if o.kind == "conv2d" and "groups" in o.params
                             and 1 < o.attrs.conv_groups and o not in depthwise]
    mod = emit(prog)
    for op in prog.ops:
        if op.schedule.form == "fast" and op.kind != "conv2d" or op in depthwise:
            ops = body_ops(mod, op.name)
            assert ops.count("relax.call_tir") == 1 and "relax.nn.conv2d" not in ops, (op.name, ops)
    kernels = [f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert kernels and all(f.attrs["tirx.is_scheduled"] for f in kernels)
    np.testing.assert_array_equal(reference.run(prog, x)[1], reference.run(quantized, x)[1])
    assert_same(prog, x)


def test_fast_form_keeps_nhwc_between_kernels(quantized, x):
    prog, _ = legalize_waps(permute_channels(quantized)[0], "fast", "none")
    layouts = {INPUT: "NCHW", **{o.name: o.schedule.layout for o in prog.ops}}
    assert layouts[prog.ops[0].name] == "NHWC"                     # the quantize transposes
    # gathers between kernels stay NHWC, or are folded into the fast conv they feed
    assert all(layouts[o.name] == "NHWC" for o in prog.ops if o.kind == "gather" and len(o.shape) == 4)
    assert any(o.kind == "conv2d" and "in_index" in o.params and layouts[o.name] == "NHWC" for o in prog.ops)
    # a conversion exactly where a 4-D value crosses layouts, each made once, plus 4-D outputs
    crossings = {(i, input_layout(o)) for o in prog.ops for i in o.inputs
                 if len(prog.shape_of(i)) == 4 and layouts[i] != input_layout(o)}
    crossings |= {(n, "NCHW") for n in prog.outputs if len(prog[n].shape) == 4 and layouts[n] != "NCHW"}
    mod = emit(prog)
    assert body_ops(mod, "main").count("relax.permute_dims") == len(crossings)
    again = parse(mod)                                            # shapes stay logical (NCHW)
    assert [(o.name, o.shape, o.schedule) for o in again.ops] == [(o.name, o.shape, o.schedule) for o in prog.ops]
    np.testing.assert_array_equal(reference.run(again, x)[1], reference.run(quantized, x)[1])
    assert_same(prog, x)


def test_split_form_needs_contiguous_groups(quantized):
    prog, _ = legalize_waps(quantized, "split")          # no permutation: layers stay masked
    assert prog is not quantized
    assert any(o.schedule.form == "reference" for o in _waps_layers(prog))


def _token_program(consumer_reads_constant: bool):
    """q → conv (8 channels) → crop → reshape → a WAPS conv whose groups alternate (0, 1, 0, …),
    and optionally a constant read from the first conv's map, added to the crop's."""
    from calib.numerics import GroupScale, quantize_multiplier
    from relay_passes.attrs import (AddAttrs, ConstantAttrs, ConvAttrs, CropAttrs, DequantizeAttrs, QuantizeAttrs,
                                    ReshapeAttrs)
    from relay_passes.program import Op, Program
    rng = np.random.default_rng(0)

    def conv(name, src, c, m, groups):
        mult, shift = quantize_multiplier(np.full(m, 0.002))
        params = {"w": rng.integers(-8, 8, (m, c, 1, 1)).astype(np.int8), "bias": np.zeros(m, np.int32),
                  "mult": mult.astype(np.int32), "shift": shift.astype(np.int32)}
        scales = ()
        if groups:
            params["groups"] = (np.arange(c) % 2).astype(np.int8)
            scales = (GroupScale(0, 0), GroupScale(1, 2))
        attrs = ConvAttrs(z_in=128, z_out=100, lo=0, hi=255, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                          conv_groups=1, group_scales=scales)
        return Op("conv2d", name, [src], attrs, params)
    ops = [Op("quantize", "q", [INPUT], QuantizeAttrs(scale=0.02, zero_point=128, qmax=255)),
           conv("c1", "q", 3, 8, False),
           Op("crop", "box", ["c1"], CropAttrs(top=1, left=0, height=4, width=3))]
    if consumer_reads_constant:
        codes = rng.integers(0, 256, (8, 4, 3)).astype(np.uint8)
        ops += [Op("constant", "pos", ["c1"], ConstantAttrs(), {"codes": codes}),
                Op("add", "box_pos", ["box", "pos"], AddAttrs(za=100, zb=128, ka=1 << 21, kb=1 << 20, t=22,
                                                              z_out=100, lo=0, hi=255))]
    ops += [Op("reshape", "tokens", [ops[-1].name], ReshapeAttrs(shape=(8, 12, 1))),
            conv("c2", "tokens", 8, 4, True),
            Op("dequantize", "deq", ["c2"], DequantizeAttrs(scale=0.05, zero_point=100), dtype="float32")]
    return Program((2, 3, 5, 3), ops, ["deq", "c2"])


@pytest.mark.parametrize("reads_constant", [False, True])
def test_permute_goes_through_crop_and_reshape(reads_constant):
    """A crop and a reshape are channel-wise: the first conv emits its channels in the WAPS conv's
    group order through them, with no gather. A constant is pinned: added to the crop, it fixes
    that class at the identity order and the WAPS conv gets a gather instead. Same codes."""
    prog = _token_program(reads_constant)
    emit(prog)
    x = np.random.default_rng(1).normal(size=prog.input_shape).astype("float32")
    out, report = permute_channels(prog)
    got = reference.run(out, x)
    want = reference.run(prog, x)
    np.testing.assert_array_equal(got[1], want[1])
    if not reads_constant:
        assert report.permuted == 1 and report.gathers == 0
    else:                       # the add joins the crop's class to the constant's, which is pinned
        assert report.gathers == 1
