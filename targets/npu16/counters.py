"""Reading the simulator's counters out of a compiled npu16 module.

The npu16 codegen exports ``waps_npu16_counters(out, reset)``: it copies each offloaded
op's counters (int64, in the order of isa.COUNTERS; one row per op, ops in sorted symbol
order) into ``out`` [ops, len(COUNTERS)] and zeroes them when ``reset`` is non-zero. The
counters add up over every run since the library was loaded.
"""
from __future__ import annotations

import numpy as np

from targets.npu16.isa import COUNTERS

COUNTERS_FN = "waps_npu16_counters"


def read(lib, symbols: list[str], reset: bool = False) -> dict[str, dict[str, int]]:
    """Counters of the ops ``symbols`` (sorted symbol order, as compiled) from a loaded
    runtime module ``lib`` → {symbol: {counter: value}}."""
    import tvm
    out = tvm.runtime.tensor(np.zeros((max(len(symbols), 1), len(COUNTERS)), np.int64))
    lib.get_function(COUNTERS_FN, query_imports=True)(out, int(reset))
    rows = out.numpy()
    return {sym: dict(zip(COUNTERS, (int(v) for v in rows[i]))) for i, sym in enumerate(symbols)}


def measure(lib_path: str, input_shape: tuple[int, ...], symbols: list[str]) -> dict[str, dict[str, int]]:
    """Load ``lib_path``, run ``main`` once on a zero input of ``input_shape`` (float32) and
    read the counters: what the simulator counted for one batch. The counts depend on
    shapes only, not on the input values."""
    import tvm
    from tvm.runtime.vm import VirtualMachine
    lib = tvm.runtime.load_module(str(lib_path))
    read(lib, symbols, reset=True)
    VirtualMachine(lib, tvm.cpu())["main"](tvm.runtime.tensor(np.zeros(input_shape, np.float32)))
    return read(lib, symbols)
