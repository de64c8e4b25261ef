"""Kernel fusion for the CPU targets (llvm, aarch64, JSON llvm dicts), each opt-in
(``waps-tvm compile --fuse residual-adds,expand-depthwise``):

residual-adds
    A fast conv (relay_passes/fast_kernels.conv2d) whose only consumer is a fast residual add
    computes that add in its epilogue: the conv's output codes stay in registers and only the
    add's codes are stored, so one full-size write, two full-size reads and one kernel launch
    go away. The fused kernel applies the same rules in the same order
    (numeric_tvm.output_code, then numeric_tvm.residual_add).
expand-depthwise
    A pointwise stride-1 fast conv (an inverted residual's expansion) whose only consumer is a
    fast depthwise conv runs with it as one kernel (fast_kernels.expand_depthwise): each task
    expands the rows and channels its part of the depthwise output reads and convolves them
    while they are in cache; the expanded map is never written whole.

Fused codes are the unfused kernels', bit for bit (tests/codegen/test_cpu_fusion.py; the whole
model against the reference in the backend tests). bench/cpu_fusion.py measures each fused
pair against its two kernels and whole models fused against unfused.

This runs on the final legalized module, after every pass and just before ``relax.build``:
a fused call is no longer one op per function, so ``program.parse`` does not read it back,
and the Program (what ``report``, ``inspect`` and the ONNX graph show) keeps both ops.
Builds from tuning records are not fused: the records hold the unfused kernels' schedules.
"""
from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import relax

from relay_passes.kernels import build_conv_add, build_expand_depthwise, fast_plan
from relay_passes.program import INPUT, Program


@dataclass(frozen=True)
class ResidualFusion:
    """The add ``add`` computed in the epilogue of the conv ``conv``, whose output is the add's
    operand ``conv_operand`` (0: a, 1: b)."""
    conv: str
    add: str
    conv_operand: int


def _in_types(program: Program, op) -> list[tuple[tuple[int, ...], str]]:
    return [(program.shape_of(i), program.dtype_of(i)) for i in op.inputs]


def _fast_ops(program: Program, plan: str) -> list:
    """The NHWC ops of ``program`` that get the fast body ``plan`` (kernels.fast_plan)."""
    return [op for op in program.ops
            if op.schedule.layout == "NHWC" and fast_plan(op, _in_types(program, op)) == plan]


def _sole_conv(program: Program, src: str, users, outputs: set):
    """The op computing ``src`` when it is a fast ungrouped conv (the 'conv' body, NHWC, output
    channels a multiple of 16) whose output nothing else reads and is not a model output."""
    if src == INPUT or src in outputs or len(users[src]) != 1:
        return None
    conv = program[src]
    if conv.schedule.layout != "NHWC" or fast_plan(conv, _in_types(program, conv)) != "conv" \
            or conv.params["w"].shape[0] % 16:
        return None
    return conv


def residual_fusions(program: Program) -> list[ResidualFusion]:
    """The conv → add pairs of a legalized ``fast`` program that fuse: the add has the fast
    'add' body (kernels.fast_plan; operands of equal shape) and one operand is the output of a
    fast ungrouped conv (the 'conv' body, NHWC, output channels a multiple of 16) that nothing
    else reads and that is not a model output; when both operands qualify, the first."""
    users, outputs, fusions = program.consumers(), set(program.outputs), []
    for add in _fast_ops(program, "add"):
        if add.inputs[0] == add.inputs[1]:
            continue
        for side, src in enumerate(add.inputs):
            conv = _sole_conv(program, src, users, outputs)
            if conv is not None:
                fusions.append(ResidualFusion(conv.name, add.name, side))
                break
    return fusions


@dataclass(frozen=True)
class DepthwiseFusion:
    """The pointwise conv ``conv`` and the depthwise conv ``depthwise`` that alone reads it,
    computed as one kernel."""
    conv: str
    depthwise: str


def depthwise_fusions(program: Program) -> list[DepthwiseFusion]:
    """The conv → depthwise pairs of a legalized ``fast`` program that fuse: the depthwise has
    the fast 'depthwise' body and reads, with no layout change between, the output of a fast
    ungrouped conv (the 'conv' body) that is pointwise (1×1, stride 1, no padding), has output
    channels in multiples of 16, has no other reader and is not a model output."""
    users, outputs, fusions = program.consumers(), set(program.outputs), []
    for dw in _fast_ops(program, "depthwise"):
        conv = _sole_conv(program, dw.inputs[0], users, outputs)
        if conv is None or conv.params["w"].shape[2:] != (1, 1) or tuple(conv.attrs.stride) != (1, 1) \
                or any(conv.attrs.padding):
            continue
        fusions.append(DepthwiseFusion(conv.name, dw.name))
    return fusions


def fuse(program: Program, mod: tvm.IRModule, kinds) -> tuple[tvm.IRModule, list]:
    """``mod`` (``emit(program)``, the legalized module) with the pairs of each fusion in
    ``kinds`` (a subset of KINDS) fused, in KINDS order; with the pairs (ResidualFusion,
    DepthwiseFusion)."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown fusion {sorted(unknown)}; known: {', '.join(KINDS)}")
    done = []
    for kind in KINDS:
        if kind in kinds:
            mod, pairs = FUSERS[kind](program, mod)
            done += pairs
    return mod, done


def _op_calls(mod: tvm.IRModule) -> dict[str, tuple[relax.Var, relax.Call]]:
    """Op name → (the var ``main`` binds its call to, the call of the op's function)."""
    op_of_gv = {gv: str(f.attrs["waps.name"]) for gv, f in mod.functions.items()
                if isinstance(f, relax.Function) and f.attrs is not None and "waps.name" in f.attrs}
    calls = {}
    for block in mod["main"].body.blocks:
        for b in block.bindings:
            if isinstance(b.value, relax.Call) and b.value.op in op_of_gv:
                calls[op_of_gv[b.value.op]] = (b.var, b.value)
    return calls


def _rewrite_main(bb: relax.BlockBuilder, main: relax.Function, dropped: set,
                  replaced: dict) -> tvm.IRModule:
    """The module of ``bb`` with ``main``'s bindings of ``dropped`` removed and those of
    ``replaced`` (var → new call) rebound, and the functions no longer called removed."""
    blocks = []
    for block in main.body.blocks:
        bindings = [relax.VarBinding(b.var, replaced[b.var]) if b.var in replaced else b
                    for b in block.bindings if b.var not in dropped]
        blocks.append(relax.DataflowBlock(bindings) if isinstance(block, relax.DataflowBlock)
                      else relax.BindingBlock(bindings))
    new_main = relax.Function(main.params, relax.SeqExpr(blocks, main.body.body), main.ret_ty,
                              main.is_pure, main.attrs)
    out = bb.get()
    out["main"] = new_main
    return _reachable(out)


def fuse_expand_depthwise(program: Program, mod: tvm.IRModule) -> tuple[tvm.IRModule, list[DepthwiseFusion]]:
    """``mod`` with every pair of ``depthwise_fusions`` replaced by one call of its fused
    function (kernels.build_expand_depthwise) at the depthwise's place; with the pairs fused."""
    calls = _op_calls(mod)
    fusions = [f for f in depthwise_fusions(program) if f.conv in calls and f.depthwise in calls
               and calls[f.depthwise][1].args[0].same_as(calls[f.conv][0])]
    if not fusions:
        return mod, []
    bb = relax.BlockBuilder(mod)
    replaced = {}
    for f in fusions:
        conv, dw = program[f.conv], program[f.depthwise]
        fn = build_expand_depthwise(conv, dw, _in_types(program, conv), _in_types(program, dw), bb.add_func)
        gv = bb.add_func(fn, f"{conv.name}__{dw.name}")
        replaced[calls[f.depthwise][0]] = relax.Call(gv, [*calls[f.conv][1].args, *calls[f.depthwise][1].args[1:]])
    return _rewrite_main(bb, mod["main"], {calls[f.conv][0] for f in fusions}, replaced), fusions


def fuse_residual_adds(program: Program, mod: tvm.IRModule) -> tuple[tvm.IRModule, list[ResidualFusion]]:
    """``mod`` (``emit(program)``, the legalized module) with every pair of ``residual_fusions``
    replaced by one call of its fused function (kernels.build_conv_add) at the add's place, and
    the functions no longer called removed; with the pairs fused."""
    calls = _op_calls(mod)
    # a pair fuses when the add reads the conv's binding itself (no layout conversion between)
    fusions = [f for f in residual_fusions(program) if f.conv in calls and f.add in calls
               and calls[f.add][1].args[f.conv_operand].same_as(calls[f.conv][0])]
    if not fusions:
        return mod, []
    bb = relax.BlockBuilder(mod)
    replaced = {}
    for f in fusions:
        conv, add = program[f.conv], program[f.add]
        other = add.inputs[1 - f.conv_operand]
        fn = build_conv_add(conv, add, f.conv_operand, _in_types(program, conv),
                            (program.shape_of(other), program.dtype_of(other)), bb.add_func)
        gv = bb.add_func(fn, f"{conv.name}__{add.name}")
        replaced[calls[f.add][0]] = relax.Call(gv, [*calls[f.conv][1].args, calls[f.add][1].args[1 - f.conv_operand]])
    return _rewrite_main(bb, mod["main"], {calls[f.conv][0] for f in fusions}, replaced), fusions


FUSERS = {"residual-adds": fuse_residual_adds, "expand-depthwise": fuse_expand_depthwise}
KINDS = tuple(FUSERS)


def _reachable(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` without the functions ``main`` no longer reaches (directly or through the
    private functions it calls); unused PrimFuncs would still be compiled."""
    seen, todo = set(), [mod.get_global_var("main")]
    while todo:
        gv = todo.pop()
        if gv in seen:
            continue
        seen.add(gv)
        fn = mod[gv]
        if isinstance(fn, relax.Function):
            todo += [g for g in relax.analysis.all_global_vars(fn) if g not in seen]
    return tvm.IRModule({gv: mod[gv] for gv in seen}, attrs=mod.attrs)
