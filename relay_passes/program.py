"""The integer program: the view of a lowered Relax module that the passes rewrite.

Every quantized operation is a private Relax function called once from ``main``.
The function carries four attributes:
    waps.kind    the operation (see relay_passes/reference.py for each one's meaning)
    waps.name    the op's name (unique in the program)
    waps.attrs   JSON of its attributes (``Op.attrs``, the kind's dataclass in
                 relay_passes/attrs.py: zero points, clamps, group scales), its Schedule's
                 chosen fields and ``n_inputs`` (``encode_attrs``/``decode_attrs``)
    waps.params  names of its primary tensor arguments, in call order after the inputs
and its call in ``main`` passes the inputs, then the primary tensors as constants, then
any derived constants (sliced weights, correction terms) that the body's form needs.
``parse`` reads a module into a Program (primary tensors only); ``emit`` writes a
Program back, regenerating bodies and derived constants with relay_passes/kernels.py.
A pass is parse → rewrite → emit, so the Relax module stays the single source of truth.

``main`` takes the float32 input [N, C, H, W] and returns (dequantized output float32,
output codes).

Layout: an Op's ``shape`` is always logical (NCHW for 4-D values). An op whose
``schedule.layout`` is NHWC (set by LegalizeWAPS for the fast form) takes its 4-D inputs and gives
its 4-D output physically as NHWC; ``emit`` inserts ``permute_dims`` in ``main`` wherever a
producer's and a consumer's layouts differ (and on 4-D outputs), and ``parse`` reads those
conversions back as plain edges.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Iterable

import numpy as np
import tvm
from tvm import relax

from calib.errors import WapsError
from calib.numerics import GroupScale
from relay_passes.attrs import Attrs

INPUT = "input"
TO_NHWC, TO_NCHW = (0, 2, 3, 1), (0, 3, 1, 2)


def input_layout(op: "Op") -> str:
    """The layout an op reads its 4-D inputs in (the op reading the float model input, its
    quantize, reads it as given: NCHW)."""
    return "NCHW" if INPUT in op.inputs else op.schedule.layout


def physical(shape, layout: str) -> tuple[int, ...]:
    """Logical (NCHW) shape → the shape stored in ``layout``."""
    shape = tuple(int(d) for d in shape)
    return (shape[0], shape[2], shape[3], shape[1]) if layout == "NHWC" and len(shape) == 4 else shape


def logical(shape, layout: str) -> tuple[int, ...]:
    shape = tuple(int(d) for d in shape)
    return (shape[0], shape[3], shape[1], shape[2]) if layout == "NHWC" and len(shape) == 4 else shape


@dataclass(frozen=True)
class Schedule:
    """How an op is computed, chosen by LegalizeWAPS (relay_passes/legalize.py); never what it
    computes (that is ``Op.attrs``), so every choice gives the same codes.
        form    the body relay_passes/kernels.py builds: 'reference' (masked groups), 'plain'
                (a layer without groups), 'split', 'fused' or 'fast'
        layout  'NCHW' | 'NHWC': how the op's 4-D inputs and output are stored
        dot     a fast conv's inner product: 'vnni', 'sdot' or 'none' (fast_kernels.conv_dot)
    Not here: ``layer`` (the source model's label, the op's provenance, not a choice: attrs)
    and ``n_inputs`` (how the call splits inputs from params: len(Op.inputs), written only
    into the serialised form)."""
    form: str = "reference"
    layout: str = "NCHW"
    dot: str = "none"

    def __post_init__(self):
        for name, allowed in (("form", ("reference", "plain", "split", "fused", "fast")),
                              ("layout", ("NCHW", "NHWC")), ("dot", ("none", "vnni", "sdot"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"schedule {name} {getattr(self, name)!r} is not one of {', '.join(allowed)}")


SCHEDULE = Schedule()                  # an op LegalizeWAPS has not seen: its defaults


def encode_attrs(op: "Op") -> str:
    """The ``waps.attrs`` JSON of ``op`` (the only writer; ``decode_attrs`` reads it): its
    attrs (``Attrs.to_json``), the fields of its schedule that differ from the defaults, and
    ``n_inputs`` (no kind's attributes share those keys: tests/relay_passes/test_attrs.py)."""
    attrs = op.attrs.to_json()
    chosen = {k: v for k, v in vars(op.schedule).items() if getattr(SCHEDULE, k) != v}
    return json.dumps({**attrs, **chosen, "n_inputs": len(op.inputs)}, sort_keys=True)


def decode_attrs(kind: str, text: str) -> tuple[Attrs, Schedule, int]:
    """``waps.attrs`` JSON of an op of ``kind`` → (attrs, schedule, number of inputs), the
    inverse of ``encode_attrs``."""
    from relay_passes.opset import kind as op_kind          # opset imports this module (its examples)

    obj = json.loads(text)
    schedule = Schedule(**{k: obj.pop(k) for k in vars(SCHEDULE) if k in obj})
    n_in = int(obj.pop("n_inputs"))
    return op_kind(kind).attrs.from_json(obj), schedule, n_in


@dataclass
class Op:
    """One operation: ``attrs`` is its kind's attributes dataclass (``opset.KINDS[kind].attrs``;
    omitted: the kind's attributes with no fields, e.g. flatten). Frozen, so ``copy`` shares it
    and writers replace it (``dataclasses.replace``)."""
    kind: str
    name: str
    inputs: list[str]                      # earlier ops' names, or INPUT
    attrs: Attrs | None = None
    params: dict[str, np.ndarray] = field(default_factory=dict)
    shape: tuple[int, ...] = ()            # output shape including the batch
    dtype: str = "uint8"                   # output dtype
    schedule: Schedule = SCHEDULE          # how it is computed (LegalizeWAPS), apart from its meaning

    def __post_init__(self):
        from relay_passes.opset import kind as op_kind          # opset imports this module (its examples)

        cls = op_kind(self.kind).attrs
        if self.attrs is None:
            self.attrs = cls()
        if type(self.attrs) is not cls:
            raise TypeError(f"{self.name}: a {self.kind} takes {cls.__name__}, not {type(self.attrs).__name__}")

    @property
    def group_scales(self) -> tuple[GroupScale, ...]:
        """A layer's WAPS group scales γ_p, one per group p of its ``groups`` labels (one
        unscaled group when it has none)."""
        return self.attrs.scales

    @group_scales.setter
    def group_scales(self, scales: Iterable[GroupScale]) -> None:
        self.attrs = replace(self.attrs, group_scales=tuple(scales))

    @property
    def label(self) -> str:
        """The source model's label of the op (``attrs.layer``), else its name: for messages."""
        return self.name if self.attrs.layer is None else self.attrs.layer

    @property
    def n_groups(self) -> int:
        """How many WAPS groups the layer's input channels fall into (1 when ungrouped)."""
        return len(self.group_scales)

    def copy(self) -> "Op":
        return Op(self.kind, self.name, list(self.inputs), self.attrs, dict(self.params), tuple(self.shape),
                  self.dtype, self.schedule)


@dataclass
class Program:
    input_shape: tuple[int, ...]
    ops: list[Op]
    outputs: list[str]                     # (dequantized, codes) of each model output, in its order

    @property
    def results(self) -> list[tuple[str, str]]:
        """(dequantized, codes) value names of each model output."""
        return list(zip(self.outputs[0::2], self.outputs[1::2]))

    def __getitem__(self, name: str) -> Op:
        for op in self.ops:
            if op.name == name:
                return op
        raise KeyError(name)

    def consumers(self) -> dict[str, list[Op]]:
        users: dict[str, list[Op]] = {INPUT: []}
        for op in self.ops:
            users.setdefault(op.name, [])
            for i in op.inputs:
                users.setdefault(i, []).append(op)
        return users

    def shape_of(self, name: str) -> tuple[int, ...]:
        return tuple(self.input_shape) if name == INPUT else self[name].shape

    def dtype_of(self, name: str) -> str:
        return "float32" if name == INPUT else self[name].dtype

    def copy(self) -> "Program":
        return Program(tuple(self.input_shape), [o.copy() for o in self.ops], list(self.outputs))

    def unique_name(self, base: str) -> str:
        names = {o.name for o in self.ops}
        if base not in names:
            return base
        i = 1
        while f"{base}_{i}" in names:
            i += 1
        return f"{base}_{i}"


def emit(program: Program) -> tvm.IRModule:
    """Write ``program`` as a Relax module (bodies from relay_passes.kernels)."""
    from relay_passes import kernels

    names = [op.name for op in program.ops]
    if len(set(names)) != len(names):
        raise ValueError(f"op names are not unique: {sorted({n for n in names if names.count(n) > 1})}")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(tuple(program.input_shape), "float32"))
    values: dict[str, relax.Expr] = {}
    layouts = {INPUT: "NCHW"}
    converted: dict[tuple[str, str], relax.Expr] = {}

    def value_in(name: str, layout: str) -> relax.Expr:
        if len(program.shape_of(name)) != 4 or layouts[name] == layout:
            return values[name]
        if (name, layout) not in converted:
            axes = TO_NHWC if layout == "NHWC" else TO_NCHW
            converted[name, layout] = bb.emit(relax.op.permute_dims(values[name], axes))
        return converted[name, layout]

    with bb.function("main", [x]):
        with bb.dataflow():
            values[INPUT] = x
            for op in program.ops:
                in_types = [(program.shape_of(i), program.dtype_of(i)) for i in op.inputs]
                fn, derived = kernels.build(op, in_types, bb.add_func)
                gv = bb.add_func(fn, op.name)
                args = [value_in(i, input_layout(op)) for i in op.inputs]
                args += [relax.const(op.params[k], str(op.params[k].dtype)) for k in param_order(op)]
                args += [relax.const(v, str(v.dtype)) for v in derived]
                values[op.name] = bb.emit(relax.Call(gv, args), name_hint=_var_name(op.name))
                layouts[op.name] = op.schedule.layout
                sinfo = values[op.name].ty
                op.shape = logical(sinfo.shape, op.schedule.layout)
                op.dtype = str(sinfo.dtype)
            out = bb.emit_output(relax.Tuple([value_in(n, "NCHW") for n in program.outputs]))
        bb.emit_func_output(out)
    return bb.get()


def param_order(op: Op) -> list[str]:
    return sorted(op.params)


def _var_name(name: str) -> str:
    return "v_" + "".join(c if c.isalnum() else "_" for c in name)


def parse(mod: tvm.IRModule) -> Program:
    """Read a module written by ``emit`` (any stage) back into a Program."""
    main = mod["main"]
    x = main.params[0]
    names: dict[relax.Var, str] = {x: INPUT}
    ops: list[Op] = []
    outputs: list[str] = []
    for block in main.body.blocks:
        for b in block.bindings:
            v = b.value
            if isinstance(v, relax.Tuple):
                outputs = [names[f] for f in v.fields]
                continue
            if isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op) and v.op.name == "relax.permute_dims":
                names[b.var] = names[v.args[0]]              # a layout conversion emitted by ``emit``
                continue
            if not (isinstance(v, relax.Call) and isinstance(v.op, relax.GlobalVar)):
                raise ValueError(f"not an integer program: unexpected binding {b.var.name_hint}")
            fn = mod[v.op]
            kind = str(fn.attrs["waps.kind"])
            attrs, schedule, n_in = decode_attrs(kind, str(fn.attrs["waps.attrs"]))
            pnames = [str(p) for p in fn.attrs["waps.params"]]
            inputs = [names[a] for a in v.args[:n_in]]
            params = {k: a.value.numpy() for k, a in zip(pnames, v.args[n_in:n_in + len(pnames)])}
            sinfo = b.var.ty
            name = str(fn.attrs["waps.name"]) if "waps.name" in fn.attrs else v.op.name_hint
            ops.append(Op(kind, name, inputs, attrs, params, logical(sinfo.shape, schedule.layout),
                          str(sinfo.dtype), schedule))
            names[b.var] = name
    shape = tuple(int(d) for d in x.ty.shape)
    return Program(shape, ops, outputs)


_RAISED: list[WapsError] = []        # errors of waps passes, re-raised by run_passes with their type


def waps_pass(name: str):
    """``tvm.ir.transform.module_pass`` for a waps pass body ``fn(mod, ctx)``. A WapsError (a
    named layer the compiler rejects) raised inside crosses TVM's FFI as a RuntimeError;
    ``run_passes`` raises the original again, so the CLI still prints one line."""
    def wrap(fn):
        def body(mod, ctx):
            try:
                return fn(mod, ctx)
            except WapsError as e:
                _RAISED.append(e)
                raise
        return tvm.ir.transform.module_pass(body, opt_level=0, name=name)
    return wrap


def run_passes(seq, mod: tvm.IRModule, instruments: list) -> tvm.IRModule:
    """``seq(mod)`` under a PassContext with ``instruments``, WapsErrors kept as they are."""
    _RAISED.clear()
    try:
        with tvm.transform.PassContext(opt_level=0, instruments=instruments):
            return seq(mod)
    except Exception:
        if _RAISED:
            raise _RAISED.pop() from None
        raise
