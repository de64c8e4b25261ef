"""What the C and npu16 BYOC codegens share: marking integer-op functions for an external
codegen, registering ``relax.ext.<name>`` to return one C source module, and the tvm-ffi
entry-point boilerplate (``waps_ptr`` unpacks a tensor argument, DLTensor* or Tensor)."""
from __future__ import annotations

from typing import Callable

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


def entry_function(sym: str, body: list[str], rc: str = "0") -> str:
    """An extern "C" tvm-ffi packed entry ``__tvm_ffi_<sym>`` running ``body``; returns ``rc``."""
    lines = "\n  ".join(body)
    return (f'extern "C" TVM_FFI_DLL_EXPORT int __tvm_ffi_{sym}(void* self, const TVMFFIAny* args, '
            f"int32_t num_args, TVMFFIAny* result) {{\n  {lines}\n  result->type_index = kTVMFFINone;\n"
            f"  result->v_int64 = 0;\n  return {rc};\n}}\n")
