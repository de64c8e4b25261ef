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

from codegen.byoc_source import entry_function, register, symbol
from codegen.byoc_source import offload as byoc_offload
from codegen.c.emit import KERNELS, SHARED_KINDS, float_literal, kernel_call
from targets.c_source import inline_source

CODEGEN = "waps_c"


def offload(mod: tvm.IRModule) -> tvm.IRModule:
    """Mark every integer-op function for the C codegen, then run RunCodegen."""
    register(CODEGEN, lambda: inline_source(KERNELS), _entry)
    names = {gv.name_hint: symbol("waps_c_", gv.name_hint) for gv, fn in mod.functions.items()
             if isinstance(fn, relax.Function) and fn.attrs is not None and "waps.kind" in fn.attrs}
    return byoc_offload(mod, CODEGEN, names)


def _shape(v) -> tuple[int, ...]:
    return tuple(int(d) for d in v.ty.shape)


def _out_shape(fn: relax.Function) -> tuple[int, ...]:
    """The op's output shape: its result (DPS: the last argument after RunCodegen)."""
    return tuple(int(d) for d in fn.ret_ty.shape)


def _entry(fn: relax.Function, sym: str) -> str:
    kind = str(fn.attrs["waps.kind"])
    a = json.loads(str(fn.attrs["waps.attrs"]))
    pnames = [str(p) for p in fn.attrs["waps.params"]]
    n_in = int(a["n_inputs"])
    params = list(fn.params)
    ins = params[:n_in]
    arg = {k: f"args[{n_in + i}]" for i, k in enumerate(pnames)}
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
        lines.append(f"waps_quantize({x}, {int(np.prod(in_shape))}, {float_literal(a['scale'])}, {float_literal(a['zero_point'])}, "
                     f"{float_literal(a['qmax'])}, {ptr(out, 'uint8_t')});")
    elif kind == "dequantize":
        lines.append(f"waps_dequantize_{sfx}({x}, {int(np.prod(in_shape))}, {float_literal(a['scale'])}, "
                     f"{float_literal(a['zero_point'])}, {ptr(out, 'float')});")
    elif kind == "add":
        lines.append(f"waps_add({x}, {ptr('args[1]', 'const uint8_t')}, {int(np.prod(in_shape))}, {a['za']}, {a['zb']}, "
                     f"{a['ka']}LL, {a['kb']}LL, {a['t']}, {a['z_out']}, {a['lo']}, {a['hi']}, {ptr(out, 'uint8_t')});")
    elif kind == "sum_pool2d":
        n, c, h, w = in_shape
        (kh, kw), (sh, sw), (ph, pw) = a["kernel"], a["stride"], a["padding"]
        lines.append(f"waps_sum_pool2d({x}, {n}, {c}, {h}, {w}, {kh}, {kw}, {sh}, {sw}, {ph}, {pw}, {a['z_in']}, "
                     f"{ptr(out, 'int32_t')});")
    elif kind in SHARED_KINDS:
        ptypes = {"table": "const uint8_t"}
        lines += kernel_call(kind, a, [_shape(v) for v in ins], _out_shape(fn),
                             [ptr(f"args[{i}]", "const uint8_t") for i in range(n_in)],
                             {k: ptr(e, ptypes.get(k, "const int32_t")) for k, e in arg.items()}, ptr(out, "uint8_t"))
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
    return entry_function(sym, lines)
