"""The pipeline: a tvm.transform.Sequential of module passes, extensible, stages recorded by
a PassInstrument, compile errors keeping their type across TVM's FFI."""
import numpy as np
import pytest
import tvm

from relay_passes import reference
from relay_passes.overflow import CompileError
from relay_passes.pipeline import lower
from relay_passes.program import parse, waps_pass
from waps_tvm.frontend import to_program


def test_stages_are_recorded_and_user_passes_run_after_legalize(tiny_artifact):
    seen = []

    @tvm.ir.transform.module_pass(opt_level=0, name="user.CountOps")
    def count_ops(mod, ctx):
        seen.append([op.kind for op in parse(mod).ops])
        return mod

    program = to_program(tiny_artifact, 2)
    lowered = lower(program, "split", extra_passes=(count_ops,))
    assert list(lowered.stages) == ["quantized", "permuted", "legalized", "user.CountOps"]
    assert seen and seen[0] == [op.kind for op in lowered.program.ops]
    assert lowered.permute is not None and lowered.legalize.form == "split" and lowered.bounds
    x = np.random.default_rng(0).normal(size=(2, 1, 16, 16)).astype("float32")
    np.testing.assert_array_equal(reference.run(lowered.program, x)[1], reference.run(program, x)[1])


def test_a_rejected_layer_keeps_its_error_type_through_the_passes(tiny_artifact):
    @waps_pass("user.Reject")
    def reject(mod, ctx):
        raise CompileError("layer conv9 is not allowed here")

    with pytest.raises(CompileError, match="layer conv9 is not allowed here"):
        lower(to_program(tiny_artifact, 1), "split", extra_passes=(reject,))


def test_ops_with_equal_bodies_keep_their_own_names(tiny_artifact):
    """Two gathers by the same index have structurally equal Relax functions; each keeps its
    name through emit → parse (BlockBuilder would otherwise hand both the first's GlobalVar)."""
    from relay_passes.attrs import GatherAttrs
    from relay_passes.program import Op, emit
    prog = to_program(tiny_artifact, 1)
    q = prog.ops[0]
    index = np.arange(q.shape[1], dtype=np.int32)
    for name in ("gather_a", "gather_b"):
        prog.ops.insert(1, Op("gather", name, [q.name], GatherAttrs(), {"index": index}, q.shape, q.dtype))
    prog.ops[3].inputs = ["gather_a"]
    names = [op.name for op in prog.ops]
    assert [op.name for op in parse(emit(prog)).ops] == names
    prog.ops[1].name = "gather_a"
    with pytest.raises(ValueError, match="not unique"):
        emit(prog)


def test_group_scales_are_typed_and_survive_emit_parse(tiny_artifact):
    """Every layer's WAPS scales read back as GroupScale values through the Relax module, as
    calibrated (the artifact's, in order); an ungrouped layer is one unscaled group."""
    from calib.numerics import GroupScale
    from relay_passes.program import Op, emit
    prog = to_program(tiny_artifact, 1)
    layers = {op.attrs.layer: op for op in prog.ops if op.kind in ("conv2d", "linear")}
    recs = {n.label(): tiny_artifact.layers[n.name] for n in tiny_artifact.graph if n.name in tiny_artifact.layers}
    grouped = [name for name, op in layers.items() if "groups" in op.params]
    assert grouped and all(layers[name].group_scales == tuple(recs[name].group_scales) for name in grouped)
    back = {op.name: op for op in parse(emit(prog)).ops}
    assert all(back[op.name].group_scales == op.group_scales and back[op.name].n_groups == op.n_groups
               for op in layers.values())
    assert any(s.sigma for name in grouped for s in layers[name].group_scales)
    from relay_passes.attrs import LinearAttrs
    plain = Op("linear", "fc", ["input"], LinearAttrs(z_in=0, z_out=0, lo=0, hi=255))
    assert plain.group_scales == (GroupScale(0, 0),) and plain.n_groups == 1
    plain.group_scales = [GroupScale(-1, 3), GroupScale(0, 0)]
    assert plain.copy().group_scales == (GroupScale(-1, 3), GroupScale(0, 0)) and plain.copy().n_groups == 2


def test_schedule_is_apart_from_attrs_and_survives_emit_parse(tiny_artifact):
    """LegalizeWAPS's choices live in Op.schedule, never in attrs; they read back through the
    Relax module (their JSON: only the chosen fields, beside n_inputs), and copies keep them."""
    import json

    from relay_passes.program import SCHEDULE, Op, Schedule, decode_attrs, emit, encode_attrs
    lowered = lower(to_program(tiny_artifact, 1), "fast", dot="sdot")
    ops = lowered.program.ops
    assert {o.schedule.form for o in ops} >= {"fast", "reference"} and {o.schedule.layout for o in ops} == {"NCHW", "NHWC"}
    assert {o.schedule.dot for o in ops if o.kind in ("conv2d", "linear")} == {"sdot"}
    assert not any({"form", "layout", "dot", "n_inputs"} & set(o.attrs.to_json()) for o in ops)
    again = parse(emit(lowered.program.copy()))
    assert [(o.name, o.schedule, o.attrs) for o in again.ops] == [(o.name, o.schedule, o.attrs) for o in ops]
    assert [o.schedule for o in lowered.program.copy().ops] == [o.schedule for o in ops]
    assert [o.schedule for o in lower(to_program(tiny_artifact, 1), "split").program.ops if o.kind == "quantize"] \
        == [SCHEDULE]
    from relay_passes.attrs import AddAttrs
    add = AddAttrs(za=1, zb=2, ka=3, kb=4, t=5, z_out=3, lo=0, hi=255)
    json_add = {"za": 1, "zb": 2, "ka": 3, "kb": 4, "t": 5, "z_out": 3, "lo": 0, "hi": 255}
    op = Op("add", "a", ["x", "y"], add, schedule=Schedule("fast", "NHWC"))
    assert json.loads(encode_attrs(op)) == {**json_add, "form": "fast", "layout": "NHWC", "n_inputs": 2}
    assert decode_attrs("add", encode_attrs(op)) == (add, Schedule("fast", "NHWC"), 2)
    assert json.loads(encode_attrs(Op("add", "a", ["x"], add))) == {**json_add, "n_inputs": 1}
    with pytest.raises(TypeError, match="form"):
        AddAttrs(za=1, zb=2, ka=3, kb=4, t=5, z_out=3, lo=0, hi=255, form="fast")     # a schedule key in attrs
    with pytest.raises(ValueError, match="layout"):
        Schedule(layout="NWHC")
