"""Epilogue fusion for the CPU targets (llvm, aarch64, JSON llvm dicts): residual adds.

A fast conv (relay_passes/fast_kernels.conv2d) whose only consumer is a fast residual add
computes that add in its epilogue: the conv's output codes stay in registers and only the
add's codes are stored, so one full-size write, two full-size reads and one kernel launch
go away. The fused kernel applies the same rules in the same order (numeric_tvm.output_code,
then numeric_tvm.residual_add), so its codes are the add's, bit for bit
(tests/codegen/test_cpu_fusion.py; the whole model against the reference in the backend
tests). bench/cpu_fusion.py measures each fused pair against its two kernels and whole
models fused against unfused.

This runs on the final legalized module, after every pass and just before ``relax.build``:
a fused call is no longer one op per function, so ``program.parse`` does not read it back,
and the Program (what ``report``, ``inspect`` and the ONNX graph show) keeps both ops.
Builds from tuning records are not fused: the records hold the unfused kernels' schedules.
"""
from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import relax

from relay_passes.kernels import build_conv_add, fast_plan
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


def residual_fusions(program: Program) -> list[ResidualFusion]:
    """The conv → add pairs of a legalized ``fast`` program that fuse: the add has the fast
    'add' body (kernels.fast_plan; operands of equal shape) and one operand is the output of a
    fast ungrouped conv (the 'conv' body, NHWC, output channels a multiple of 16) that nothing else reads and that is not a
    model output; when both operands qualify, the first."""
    users = program.consumers()
    outputs = set(program.outputs)
    fusions = []
    for add in program.ops:
        if add.schedule.layout != "NHWC" or fast_plan(add, _in_types(program, add)) != "add":
            continue
        if add.inputs[0] == add.inputs[1]:
            continue
        for side, src in enumerate(add.inputs):
            if src == INPUT or src in outputs or len(users[src]) != 1:
                continue
            conv = program[src]
            if conv.schedule.layout != "NHWC" or fast_plan(conv, _in_types(program, conv)) != "conv" \
                    or conv.params["w"].shape[0] % 16:
                continue
            fusions.append(ResidualFusion(conv.name, add.name, side))
            break
    return fusions


def fuse_residual_adds(program: Program, mod: tvm.IRModule) -> tuple[tvm.IRModule, list[ResidualFusion]]:
    """``mod`` (``emit(program)``, the legalized module) with every pair of ``residual_fusions``
    replaced by one call of its fused function (kernels.build_conv_add) at the add's place, and
    the functions no longer called removed; with the pairs fused."""
    fusions = residual_fusions(program)
    if not fusions:
        return mod, []
    op_of_gv = {gv: str(f.attrs["waps.name"]) for gv, f in mod.functions.items()
                if isinstance(f, relax.Function) and f.attrs is not None and "waps.name" in f.attrs}
    main = mod["main"]
    calls: dict[str, tuple[relax.Var, relax.Call]] = {}          # op name → (its binding's var, its call)
    for block in main.body.blocks:
        for b in block.bindings:
            if isinstance(b.value, relax.Call) and b.value.op in op_of_gv:
                calls[op_of_gv[b.value.op]] = (b.var, b.value)
    # a pair fuses when the add reads the conv's binding itself (no layout conversion between)
    fusions = [f for f in fusions if f.conv in calls and f.add in calls
               and calls[f.add][1].args[f.conv_operand].same_as(calls[f.conv][0])]
    if not fusions:
        return mod, []
    bb = relax.BlockBuilder(mod)
    fused_call: dict[str, relax.Call] = {}
    for f in fusions:
        conv, add = program[f.conv], program[f.add]
        other = add.inputs[1 - f.conv_operand]
        fn = build_conv_add(conv, add, f.conv_operand, _in_types(program, conv),
                            (program.shape_of(other), program.dtype_of(other)), bb.add_func)
        gv = bb.add_func(fn, f"{conv.name}__{add.name}")
        fused_call[f.add] = relax.Call(gv, [*calls[f.conv][1].args, calls[f.add][1].args[1 - f.conv_operand]])
    dropped = {calls[f.conv][0] for f in fusions}
    replaced = {calls[f.add][0]: fused_call[f.add] for f in fusions}
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
    return _reachable(out), fusions


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
