"""What the C and npu16 BYOC codegens share: marking integer-op functions for an external
codegen, registering ``relax.ext.<name>`` to return one C source module, and the tvm-ffi
entry-point boilerplate (``waps_ptr`` unpacks a tensor argument, DLTensor* or Tensor)."""
from __future__ import annotations

from typing import Callable

import numpy as np
import tvm
from tvm import relax

PRELUDE = r'''
#include <tvm/ffi/c_api.h>
#include <dlpack/dlpack.h>
#include <stdint.h>
#include <stddef.h>
static inline void* waps_ptr(const TVMFFIAny* a) {
  DLTensor* t = a->type_index == kTVMFFIDLTensorPtr ? (DLTensor*)a->v_ptr : TVMFFITensorGetDLTensorPtr(a->v_obj);
  return (char*)t->data + t->byte_offset;
}
'''


def symbol(prefix: str, name: str) -> str:
    return prefix + "".join(c if c.isalnum() else "_" for c in name)


def register(codegen: str, library: Callable[[], str], entry: Callable[[relax.Function, str], str],
             footer: Callable[[list[str]], tuple[str, str]] | None = None) -> None:
    """Register ``relax.ext.<codegen>``: PRELUDE + library() + entry(fn, symbol) per function
    [+ footer(symbols) → (one more exported symbol, its code) over all of them]."""
    if tvm.get_global_func(f"relax.ext.{codegen}", allow_missing=True) is not None:
        return

    def _codegen(functions, options, constant_names):
        parts, symbols = [PRELUDE, library()], []
        for fn in functions:
            sym = str(fn.attrs["global_symbol"])
            symbols.append(sym)
            parts.append(entry(fn, sym))
        if footer is not None:
            sym, code = footer(list(symbols))
            symbols.append(sym)
            parts.append(code)
        return [tvm.get_global_func("runtime.CSourceModuleCreate")("\n".join(parts), "cc", symbols, [])]
    tvm.register_global_func(f"relax.ext.{codegen}", _codegen)


def offload(mod: tvm.IRModule, codegen: str, symbols: dict[str, str]) -> tvm.IRModule:
    """Mark the functions named in ``symbols`` (name → global symbol) for ``codegen``, RunCodegen."""
    for gv in list(mod.get_global_vars()):
        if gv.name_hint in symbols:
            mod[gv] = mod[gv].with_attr("Codegen", codegen).with_attr("global_symbol", symbols[gv.name_hint])
    return relax.transform.RunCodegen()(mod)


def append_constants(mod: tvm.IRModule, extra: dict[str, dict[str, np.ndarray]]) -> tvm.IRModule:
    """A copy of ``mod`` in which each function named in ``extra`` (name → {parameter name:
    array}) takes one more parameter per array, after its own, and every call of it passes
    the array as a Relax constant (exact dtype). Arrays too large for a C source literal thus
    reach an external codegen's entry as tensor arguments, like the primary params, and live
    in the executable's constant pool instead of the generated code."""
    mod, widened = mod.clone(), {}
    for gv, fn in list(mod.functions_items()):
        if gv.name_hint in extra:
            arrays = extra[gv.name_hint]
            params = [relax.Var(k, relax.TensorType(a.shape, str(a.dtype))) for k, a in arrays.items()]
            consts = [relax.const(np.ascontiguousarray(a), str(a.dtype)) for a in arrays.values()]
            widened[gv] = relax.Function([*fn.params, *params], fn.body, fn.ret_ty, fn.is_pure, fn.attrs,
                                         fn.span), consts
            del mod[gv]
    return _AppendArgs(mod, widened).run()


@relax.expr_functor.mutator
class _AppendArgs(relax.PyExprMutator):
    """Adds the widened functions (old GlobalVar → (function, constants)) under new
    GlobalVars, and redirects every call of an old one to its new one with the constants
    appended to the arguments. New GlobalVars: a GlobalVar carries its function's type, which
    replacing the function alone would leave at the old parameter count."""

    def __init__(self, mod: tvm.IRModule, widened: dict):
        super().__init__(mod)
        self.mod = mod
        self.callees = {old: (self.builder_.add_func(fn, old.name_hint), consts)
                        for old, (fn, consts) in widened.items()}

    def run(self) -> tvm.IRModule:
        for gv, fn in self.mod.functions_items():
            if isinstance(fn, relax.Function):
                self.builder_.update_func(gv, self.visit_expr(fn))
        return self.builder_.get()

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if isinstance(call.op, relax.GlobalVar) and call.op in self.callees:
            gv, consts = self.callees[call.op]
            return relax.Call(gv, [*call.args, *consts], call.attrs, call.ty_args, call.span)
        return call


def entry_function(sym: str, body: list[str], rc: str = "0") -> str:
    """An extern "C" tvm-ffi packed entry ``__tvm_ffi_<sym>`` running ``body``; returns ``rc``."""
    lines = "\n  ".join(body)
    return (f'extern "C" TVM_FFI_DLL_EXPORT int __tvm_ffi_{sym}(void* self, const TVMFFIAny* args, '
            f"int32_t num_args, TVMFFIAny* result) {{\n  {lines}\n  result->type_index = kTVMFFINone;\n"
            f"  result->v_int64 = 0;\n  return {rc};\n}}\n")
