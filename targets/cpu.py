"""CPU targets (TVM llvm target dicts)."""
from __future__ import annotations

from calib.errors import ConfigError

TARGETS = ("llvm", "c", "npu16")


def llvm_target(name: str):
    """The tvm.target.Target for ``name`` ('llvm': this host's CPU)."""
    import tvm
    if name in ("c", "npu16"):
        name = "llvm"                        # host glue of the C and npu16 targets
    if name != "llvm":
        raise ConfigError(f"unknown target {name!r} (choose from {', '.join(TARGETS)})")
    cpu = tvm.target.codegen.llvm_get_system_cpu()
    return tvm.target.Target({"kind": "llvm", "mcpu": cpu}) if cpu and cpu != "generic" else tvm.target.Target("llvm")
