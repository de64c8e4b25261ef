"""BYOC for the C fallback: every integer op of the program runs as portable C99.

``offload(mod)`` marks each integer-op function of a lowered module for the external
codegen ``waps_c`` and runs ``relax.transform.RunCodegen``: the calls in ``main`` become
``call_dps_packed`` of C entry points, and the registered codegen ``relax.ext.waps_c``
returns one C source module holding ``waps_kernels.h`` plus, per op, an ``extern "C"``
tvm-ffi entry ``__tvm_ffi_<symbol>`` that unpacks its tensors and calls the kernel with the
op's attributes as literals. ``export_library`` compiles it into the exported module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import tvm
from tvm import relax

from codegen.byoc_source import entry_function, register, symbol
from codegen.byoc_source import offload as byoc_offload
from codegen.c.emit import (C_TYPES, KERNELS, SHARED_KINDS, add_call, constant_call, crop_call, kernel_call,
                            layer_norm_call, quantize_call)
from relay_passes.program import decode_attrs
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


@dataclass(frozen=True)
class _Entry:
    """One op's entry: its function, decoded attributes, and the tvm-ffi argument of each param."""
    fn: relax.Function
    a: dict
    pnames: list[str]
    n_in: int

    @property
    def ins(self) -> list:
        return list(self.fn.params)[:self.n_in]

    @property
    def arg(self) -> dict[str, str]:
        return {k: f"args[{self.n_in + i}]" for i, k in enumerate(self.pnames)}

    @property
    def in_shape(self) -> tuple[int, ...]:
        return _shape(self.ins[0])

    @property
    def in_dtype(self) -> str:
        return str(self.ins[0].ty.dtype)

    @property
    def sfx(self) -> str:
        return "u8" if self.in_dtype == "uint8" else "i32"

    @property
    def x(self) -> str:
        return _ptr("args[0]", "const uint8_t" if self.in_dtype == "uint8" else
                    ("const int32_t" if self.in_dtype == "int32" else "const float"))

    def param_shape(self, name: str) -> tuple[int, ...]:
        return _shape(self.fn.params[self.n_in + self.pnames.index(name)])


_OUT = "args[num_args - 1]"


def _ptr(e: str, t: str) -> str:
    return f"({t}*)waps_ptr(&{e})"


def _entry(fn: relax.Function, sym: str) -> str:
    kind = str(fn.attrs["waps.kind"])
    if kind not in ENTRIES:
        raise ValueError(f"no C kernel for {kind}")
    a, _, n_in = decode_attrs(kind, str(fn.attrs["waps.attrs"]))
    e = _Entry(fn, a, [str(p) for p in fn.attrs["waps.params"]], n_in)
    return entry_function(sym, ENTRIES[kind](e))


def _layer(e: _Entry, call: str) -> list[str]:
    """σ and n as static arrays, then ``call`` + the arguments conv2d and linear share."""
    a, arg = e.a, e.arg
    scales = a.scales
    ng = len(scales)
    groups = _ptr(arg["groups"], "const int8_t") if "groups" in e.pnames else "0"
    tail = (f"{groups}, {ng}, sig, nsh, {a.frac}, {_ptr(arg['bias'], 'const int32_t')}, "
            f"{_ptr(arg['mult'], 'const int32_t')}, {_ptr(arg['shift'], 'const int32_t')}, {a.z_in}, "
            f"{a.z_out}, {a.lo}, {a.hi}, {_ptr(_OUT, 'uint8_t')});")
    return [f"static const int8_t sig[{ng}] = {{{','.join(str(s.sigma) for s in scales)}}};",
            f"static const int8_t nsh[{ng}] = {{{','.join(str(s.n) for s in scales)}}};",
            call + tail]


def _linear(e: _Entry) -> list[str]:
    w_shape = e.param_shape("w")
    return _layer(e, f"waps_linear_{e.sfx}({e.x}, {e.in_shape[0]}, {e.in_shape[1]}, "
                     f"{_ptr(e.arg['w'], 'const int8_t')}, {w_shape[0]}, ")


def _conv2d(e: _Entry) -> list[str]:
    a, w_shape = e.a, e.param_shape("w")
    n, c, h, w = e.in_shape
    (sh, sw), (ph, pw), (dh, dw) = a.stride, a.padding, a.dilation
    return _layer(e, f"waps_conv2d_{e.sfx}({e.x}, {n}, {c}, {h}, {w}, {_ptr(e.arg['w'], 'const int8_t')}, "
                     f"{w_shape[0]}, {w_shape[2]}, {w_shape[3]}, {a.conv_groups}, {sh}, {sw}, {ph}, {pw}, "
                     f"{dh}, {dw}, ")


def _quantize(e: _Entry) -> list[str]:
    return [quantize_call("waps_quantize", e.a, e.in_shape, e.x, _ptr(_OUT, "uint8_t"))]


def _dequantize(e: _Entry) -> list[str]:
    return [quantize_call(f"waps_dequantize_{e.sfx}", e.a, e.in_shape, e.x, _ptr(_OUT, "float"))]


def _add(e: _Entry) -> list[str]:
    b_dtype = str(e.ins[1].ty.dtype)
    b = _ptr("args[1]", "const uint8_t" if b_dtype == "uint8" else "const int32_t")
    return [add_call(e.a, e.in_shape, _shape(e.ins[1]), b_dtype, e.x, b, _ptr(_OUT, "uint8_t"))]


def _layer_norm(e: _Entry) -> list[str]:
    return [layer_norm_call(e.a, e.in_shape, e.in_dtype, e.x, _ptr(e.arg["g"], "const int32_t"),
                            _ptr(e.arg["b"], "const int32_t"), _ptr(_OUT, "uint8_t"))]


def _shared(e: _Entry) -> list[str]:
    ptypes = {"table": "const uint8_t"}
    return kernel_call(str(e.fn.attrs["waps.kind"]), e.a, [_shape(v) for v in e.ins], _out_shape(e.fn),
                       [_ptr(f"args[{i}]", "const uint8_t") for i in range(e.n_in)],
                       {k: _ptr(p, ptypes.get(k, "const int32_t")) for k, p in e.arg.items()},
                       _ptr(_OUT, C_TYPES[str(e.fn.ret_ty.dtype)]))


def _flatten(e: _Entry) -> list[str]:
    size = int(np.prod(e.in_shape)) * (1 if e.in_dtype == "uint8" else 4)
    return [f"memcpy(waps_ptr(&{_OUT}), waps_ptr(&args[0]), {size});"]


def _gather(e: _Entry) -> list[str]:
    n, c = e.in_shape[:2]
    inner = int(np.prod(e.in_shape[2:]))
    elem = 1 if e.in_dtype == "uint8" else 4
    return [f"waps_gather(waps_ptr(&args[0]), {n}, {c}, {inner}, {elem}, {_ptr(e.arg['index'], 'const int32_t')}, "
            f"{e.param_shape('index')[0]}, waps_ptr(&{_OUT}));"]


def _constant(e: _Entry) -> list[str]:
    size = int(np.prod(e.param_shape("codes")))
    return [constant_call(size, e.in_shape[0], _ptr(e.arg["codes"], "const uint8_t"), _ptr(_OUT, "uint8_t"))]


def _crop(e: _Entry) -> list[str]:
    return [crop_call(e.a, e.in_shape, e.in_dtype, "waps_ptr(&args[0])", f"waps_ptr(&{_OUT})")]


# kind → the C body of its tvm-ffi entry (every kind of relay_passes/opset.py)
ENTRIES: dict[str, Callable[[_Entry], list[str]]] = {
    "quantize": _quantize, "dequantize": _dequantize, "conv2d": _conv2d, "linear": _linear, "add": _add,
    "flatten": _flatten, "gather": _gather, "layer_norm": _layer_norm, **{k: _shared for k in SHARED_KINDS},
    "constant": _constant,
    "reshape": _flatten,
    "crop": _crop}
