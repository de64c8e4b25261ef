"""Multi-op partitions in Relax: each chain's calls in ``main`` become one call (issue 15).

``merge_chains(mod, chains, rows, npu)`` adds per chain (codegen/npu16/cascade.py) a function
``<partition symbol>`` whose parameters are every op's parameters but the intermediates and
whose body calls the ops' functions in order, and rewrites ``main``: the calls of the chain's
ops but the last are dropped, the last's variable is bound to one call of the new function.
The function is marked for the npu16 codegen (codegen/npu16/byoc.py), which never reads its
body: ``Partition`` says what its C entry runs (per op: symbol, function, lowered stream, the C
pointer of each parameter and of the output) and which buffers it declares: the model of the
activation SRAM (``npu16_act_sram``, ``sram_kib.activations`` bytes, one per module since
partitions run one at a time; consecutive kept intermediates at its two ends, which
memory.keeps guarantees do not overlap) and a host buffer per spilled one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import tvm
from tvm import relax

from codegen.npu16.cascade import Chain
from codegen.npu16.lower import NpuOp
from targets.npu16.params import NPU16


@dataclass
class Partition:
    """A chain's C entry: per op (in order) its symbol, function, lowered stream, the C pointer
    of each function parameter and of its output; the buffers it declares."""
    ops: list[tuple[str, relax.Function, NpuOp, list[str], str]] = field(default_factory=list)
    buffers: list[str] = field(default_factory=list)

    @property
    def op_symbols(self) -> list[str]:
        return [op[0] for op in self.ops]


def merge_chains(mod: tvm.IRModule, chs: list[Chain], rows: dict[str, dict], npu: NPU16
                 ) -> tuple[tvm.IRModule, dict[str, Partition]]:
    """Each chain's calls in ``main`` → one call of a new function named by its ops' rows'
    ``partition`` symbol, taking every op's arguments but the intermediates → (module,
    {partition symbol: Partition}). ``rows``: placement rows by op (``symbol``, ``lowered``)."""
    parts: dict[str, Partition] = {}
    if not chs:
        return mod, parts
    gv_of = {gv.name_hint: gv for gv in mod.get_global_vars()}
    bb = relax.BlockBuilder(mod)
    merged = {}
    for ch in chs:
        sym = rows[ch.ops[0]]["partition"]
        part, params, n_args = Partition(), [], 0
        into = {lk.consumer: lk for lk in ch.links}
        buf_of, sram_top = {}, False
        for j, lk in enumerate(ch.links):
            if lk.kept:                # the SRAM model: consecutive kept intermediates at its two ends
                off = npu.sram_act_kib * 1024 - lk.nbytes if sram_top else 0
                buf_of[lk.producer] = f"(void*)(npu16_act_sram + {off})"
                sram_top = not sram_top
            else:                      # spilled: host memory, by DMA
                part.buffers.append(f"static uint8_t {sym}_spill{j}[{lk.nbytes}];")
                buf_of[lk.producer] = f"(void*){sym}_spill{j}"
                sram_top = False
        if any(lk.kept for lk in ch.links):     # one activation SRAM per module: partitions run one by one
            part.buffers.insert(0, f"#ifndef NPU16_ACT_SRAM\n#define NPU16_ACT_SRAM\n"
                                   f"static uint8_t npu16_act_sram[{npu.sram_act_kib * 1024}];\n#endif")
        for op in ch.ops:
            fn = mod[gv_of[op]]
            args = []
            for i, p in enumerate(fn.params):
                if op in into and i == into[op].input_index:
                    args.append(buf_of[into[op].producer])
                else:
                    params.append(relax.Var(p.name, p.ty))
                    args.append(f"waps_ptr(&args[{n_args}])")
                    n_args += 1
            out = buf_of.get(op, "waps_ptr(&args[num_args - 1])")
            part.ops.append((rows[op]["symbol"], fn, rows[op]["lowered"], args, out))
        with bb.function(sym, params, attrs={"waps.chain": ",".join(ch.ops)}, private=True):
            it = iter(params)
            value = None
            for op in ch.ops:
                fn = mod[gv_of[op]]
                call_args = [value if (op in into and i == into[op].input_index) else next(it)
                             for i in range(len(fn.params))]
                value = bb.emit(relax.Call(gv_of[op], call_args))
            bb.emit_func_output(value)
        parts[sym] = part
        merged[ch.ops[-1]] = (ch, bb.get().get_global_var(sym), into)
    mod = bb.get()
    return _MergeChains(mod, merged).run(), parts


@relax.expr_functor.mutator
class _MergeChains(relax.PyExprMutator):
    """Drops the calls of a chain's ops but the last, and binds the last's variable to one call
    of the chain's function with every op's arguments but the intermediates."""

    def __init__(self, mod: tvm.IRModule, merged: dict):
        super().__init__(mod)
        self.mod, self.merged = mod, merged
        self.member = {op: last for last, (ch, _, _) in merged.items() for op in ch.ops}
        self.pending: dict[str, list] = {}

    def run(self) -> tvm.IRModule:
        self.builder_.update_func(self.mod.get_global_var("main"), self.visit_expr(self.mod["main"]))
        return self.builder_.get()

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        v = binding.value
        name = v.op.name_hint if isinstance(v, relax.Call) and isinstance(v.op, relax.GlobalVar) else None
        if name not in self.member:
            return super().visit_var_binding_(binding)
        last = self.member[name]
        _, gv, into = self.merged[last]
        args = [self.visit_expr(a) for i, a in enumerate(v.args) if not (name in into and i == into[name].input_index)]
        self.pending.setdefault(last, []).extend(args)
        if name == last:
            new = self.builder_.normalize(relax.Call(gv, self.pending.pop(last)))
            self.set_var_remap(binding.var, self.builder_.emit(new, binding.var.name))
