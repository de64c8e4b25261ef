"""LegalizeWAPS: choose how each WAPS layer is computed (relay_passes/kernels.py).

``form="split"``: one integer conv/matmul per group over its contiguous channel slice,
then the shift-add merge and requantization; ``form="fused"``: convs become one TIR
kernel accumulating all groups per output element in one pass (linear layers, which
are tiny, stay split); ``form="fast"``: scheduled kernels (relay_passes/fast_kernels.py),
with activations kept NHWC between them. Layers whose groups are not contiguous — grouped convs, whose
conv-group structure pins their channels, or programs that skipped PermuteChannels —
keep the masked ``reference`` form: every group reads the whole input with the other
groups' weights zeroed (exact, g× the MACs); the report lists them.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from relay_passes.attrs import GatherAttrs
from relay_passes.kernels import choose_layout, fast_plan, group_ranges, has_fast_body
from relay_passes.opset import is_layer
from relay_passes.program import waps_pass, INPUT, Program, Schedule, emit, parse

FORMS = ("split", "fused", "fast")


@dataclass
class LegalizeReport:
    form: str
    legalized: int = 0
    masked: list[str] = field(default_factory=list)


def legalize_waps(program: Program, form: str = "split", dot: str = "none") -> tuple[Program, LegalizeReport]:
    """``dot``: the fast form's inner product ('vnni': AVX-512 VNNI vpdpbusd; 'sdot': ARM
    dot product, see fast_kernels.conv_dot; 'none')."""
    if form not in FORMS:
        raise ValueError(f"unknown WAPS form {form!r} (choose from {', '.join(FORMS)})")
    prog = program.copy()
    report = LegalizeReport(form)
    for op in prog.ops:
        if is_layer(op):
            op.schedule = Schedule(_layer_form(op, form, report), dot=dot if form == "fast" else "none")
        else:
            op.schedule = Schedule("fast" if form == "fast" and has_fast_body(op) else "reference")
    if form == "fast":
        _fold_gathers(prog)
        _choose_layouts(prog)
    return prog, report


def _layer_form(op, form: str, report: LegalizeReport) -> str:
    """The form a conv2d/linear gets under ``form`` (counted in ``report``)."""
    if "groups" not in op.params:
        return "fast" if form == "fast" else "plain"
    grouped = op.attrs.grouped
    depthwise = grouped and op.params["w"].shape[1] == 1 and op.attrs.conv_groups == op.params["w"].shape[0]
    fast_depthwise = form == "fast" and depthwise          # one group per channel: per-channel σ, n tables
    if not fast_depthwise and (grouped or group_ranges(op.params["groups"], op.n_groups) is None):
        report.masked.append(op.label)
        return "reference"
    report.legalized += 1
    return form


def _fold_gathers(prog: Program) -> None:
    """A permuting gather whose only consumer is a fast conv becomes that conv's ``in_index``: the gathered
    map is never written. The kernel permutes its weights instead when its groups fold
    (fast_kernels.fold_groups), else its input packing reads the channels through the index."""
    users = prog.consumers()
    folded = set()
    for g in prog.ops:
        if not isinstance(g.attrs, GatherAttrs) or len(users[g.name]) != 1 or g.name in prog.outputs:
            continue
        conv = users[g.name][0]
        in_types = [(prog.shape_of(i), prog.dtype_of(i)) for i in conv.inputs]
        if "in_index" in conv.params or fast_plan(conv, in_types) != "conv":
            continue
        if g.params["index"].size != prog.shape_of(g.inputs[0])[1]:
            continue                        # a selection (split, chunk): the conv reads fewer channels than exist
        conv.params["in_index"] = g.params["index"]
        conv.inputs = list(g.inputs)
        folded.add(g.name)
    prog.ops = [o for o in prog.ops if o.name not in folded]


def _choose_layouts(prog: Program) -> None:
    """NHWC through runs of fast kernels (kernels.choose_layout); ``emit`` converts at the edges."""
    layouts = {INPUT: "NCHW"}
    for op in prog.ops:
        in_types = [(prog.shape_of(i), prog.dtype_of(i)) for i in op.inputs]
        layouts[op.name] = choose_layout(op, in_types, [layouts[i] for i in op.inputs])
        op.schedule = replace(op.schedule, layout=layouts[op.name])


def LegalizeWAPS(form: str = "split", dot: str = "none", sink=None):  # noqa: N802 (TVM pass naming)
    """The pass; ``sink(LegalizeReport)`` receives its report when given."""
    @waps_pass("waps.LegalizeWAPS")
    def _pass(mod, ctx):
        prog, report = legalize_waps(parse(mod), form, dot)
        if sink is not None:
            sink(report)
        return emit(prog)
    return _pass
