"""BYOC for the C fallback: every integer op of the program runs as portable C99.

``offload(mod)`` marks each integer-op function of a lowered module for the external
codegen ``waps_c`` and runs ``relax.transform.RunCodegen``: the calls in ``main`` become
``call_dps_packed`` of C entry points, and the registered codegen ``relax.ext.waps_c``
returns one C source module holding ``waps_kernels.h`` plus, per op, an ``extern "C"``
tvm-ffi entry ``__tvm_ffi_<symbol>`` that unpacks its tensors and calls the kernel with the
op's attributes as literals. ``export_library`` compiles it into the exported module.
"""
from __future__ import annotations

import json

import numpy as np
import tvm
from tvm import relax

from codegen.c.emit import KERNELS, _f

CODEGEN = "waps_c"
_PRELUDE = r'''
#include <tvm/ffi/c_api.h>
#include <dlpack/dlpack.h>
#include <stdint.h>
#include <stddef.h>
static inline void* waps_ptr(const TVMFFIAny* a) {
  DLTensor* t = a->type_index == kTVMFFIDLTensorPtr ? (DLTensor*)a->v_ptr : TVMFFITensorGetDLTensorPtr(a->v_obj);
  return (char*)t->data + t->byte_offset;
}
'''


def offload(mod: tvm.IRModule) -> tvm.IRModule:
    """Mark every integer-op function for the C codegen, then run RunCodegen."""
    _register()
    updates = {}
    for gv, fn in mod.functions.items():
        if isinstance(fn, relax.Function) and fn.attrs is not None and "waps.kind" in fn.attrs:
            updates[gv] = fn.with_attr("Codegen", CODEGEN).with_attr("global_symbol", _symbol(gv.name_hint))
    for gv, fn in updates.items():
        mod[gv] = fn
    return relax.transform.RunCodegen()(mod)


def _symbol(name: str) -> str:
    return "waps_c_" + "".join(c if c.isalnum() else "_" for c in name)


def _register() -> None:
    if tvm.get_global_func(f"relax.ext.{CODEGEN}", allow_missing=True) is None:
        tvm.register_global_func(f"relax.ext.{CODEGEN}", _codegen)


def _codegen(functions, options, constant_names):
    create = tvm.get_global_func("runtime.CSourceModuleCreate")
    parts = [_PRELUDE, KERNELS.read_text()]
    symbols = []
    for fn in functions:
        sym = str(fn.attrs["global_symbol"])
        symbols.append(sym)
        parts.append(_entry(fn, sym))
    return [create("\n".join(parts), "cc", symbols, [])]


def _shape(v) -> tuple[int, ...]:
    return tuple(int(d) for d in v.ty.shape)


def _entry(fn: relax.Function, sym: str) -> str:
    kind = str(fn.attrs["waps.kind"])
    a = json.loads(str(fn.attrs["waps.attrs"]))
    pnames = [str(p) for p in fn.attrs["waps.params"]]
    n_in = int(a["n_inputs"])
    params = list(fn.params)
    ins = params[:n_in]
    arg = {k: f"args[{n_in + i}]" for i, k in enumerate(pnames)}
    out_shape = tuple(int(d) for d in fn.ret_ty.shape) if hasattr(fn, "ret_ty") else None
    in_shape, in_dtype = _shape(ins[0]), str(ins[0].ty.dtype)
    sfx = "u8" if in_dtype == "uint8" else "i32"
    ptr = lambda e, t: f"({t}*)waps_ptr(&{e})"                       # noqa: E731
    x = ptr("args[0]", "const uint8_t" if in_dtype == "uint8" else ("const int32_t" if in_dtype == "int32" else "const float"))
    out = "args[num_args - 1]"
    lines = []
    if kind in ("conv2d", "linear"):
        ng = len(a.get("sigma", [0]))
        lines.append(f"static const int8_t sig[{ng}] = {{{','.join(str(s) for s in a.get('sigma', [0]))}}};")
        lines.append(f"static const int8_t nsh[{ng}] = {{{','.join(str(s) for s in a.get('n', [0]))}}};")
        groups = ptr(arg["groups"], "const int8_t") if "groups" in pnames else "0"
        w_shape = _shape(params[n_in + pnames.index("w")])
        tail = (f"{groups}, {ng}, sig, nsh, {a.get('frac', 0)}, {ptr(arg['bias'], 'const int32_t')}, "
                f"{ptr(arg['mult'], 'const int32_t')}, {ptr(arg['shift'], 'const int32_t')}, {a['z_in']}, "
                f"{a['z_out']}, {a['lo']}, {a['hi']}, {ptr(out, 'uint8_t')});")
        if kind == "linear":
            lines.append(f"waps_linear_{sfx}({x}, {in_shape[0]}, {in_shape[1]}, {ptr(arg['w'], 'const int8_t')}, "
                         f"{w_shape[0]}, " + tail)
        else:
            n, c, h, w = in_shape
            (sh, sw), (ph, pw), (dh, dw) = a["stride"], a["padding"], a["dilation"]
            lines.append(f"waps_conv2d_{sfx}({x}, {n}, {c}, {h}, {w}, {ptr(arg['w'], 'const int8_t')}, {w_shape[0]}, "
                         f"{w_shape[2]}, {w_shape[3]}, {a['conv_groups']}, {sh}, {sw}, {ph}, {pw}, {dh}, {dw}, " + tail)
    elif kind == "quantize":
        lines.append(f"waps_quantize({x}, {int(np.prod(in_shape))}, {_f(a['scale'])}, {_f(a['zero_point'])}, "
                     f"{_f(a['qmax'])}, {ptr(out, 'uint8_t')});")
    elif kind == "dequantize":
        lines.append(f"waps_dequantize_{sfx}({x}, {int(np.prod(in_shape))}, {_f(a['scale'])}, "
                     f"{_f(a['zero_point'])}, {ptr(out, 'float')});")
    elif kind == "add":
        lines.append(f"waps_add({x}, {ptr('args[1]', 'const uint8_t')}, {int(np.prod(in_shape))}, {a['za']}, {a['zb']}, "
                     f"{a['ka']}LL, {a['kb']}LL, {a['t']}, {a['z_out']}, {a['lo']}, {a['hi']}, {ptr(out, 'uint8_t')});")
    elif kind in ("max_pool2d", "sum_pool2d"):
        n, c, h, w = in_shape
        (kh, kw), (sh, sw), (ph, pw) = a["kernel"], a["stride"], a["padding"]
        extra = f", {a['z_in']}" if kind == "sum_pool2d" else ""
        odt = "uint8_t" if kind == "max_pool2d" else "int32_t"
        lines.append(f"waps_{kind}({x}, {n}, {c}, {h}, {w}, {kh}, {kw}, {sh}, {sw}, {ph}, {pw}{extra}, {ptr(out, odt)});")
    elif kind == "flatten":
        size = int(np.prod(in_shape)) * (1 if in_dtype == "uint8" else 4)
        lines.append(f"memcpy(waps_ptr(&{out}), waps_ptr(&args[0]), {size});")
    elif kind == "gather":
        n, c = in_shape[:2]
        inner = int(np.prod(in_shape[2:])) if len(in_shape) > 2 else 1
        elem = 1 if in_dtype == "uint8" else 4
        j = _shape(params[n_in + pnames.index("index")])[0]
        lines.append(f"waps_gather(waps_ptr(&args[0]), {n}, {c}, {inner}, {elem}, {ptr(arg['index'], 'const int32_t')}, "
                     f"{j}, waps_ptr(&{out}));")
    else:
        raise ValueError(f"no C kernel for {kind}")
    del out_shape
    body = "\n  ".join(lines)
    return (f'extern "C" TVM_FFI_DLL_EXPORT int __tvm_ffi_{sym}(void* self, const TVMFFIAny* args, '
            f"int32_t num_args, TVMFFIAny* result) {{\n  {body}\n  result->type_index = kTVMFFINone;\n"
            f"  result->v_int64 = 0;\n  return 0;\n}}\n")
