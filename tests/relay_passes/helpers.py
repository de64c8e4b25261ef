import numpy as np
import tvm

from relay_passes import reference
from relay_passes.program import Program, emit


def run_llvm(program: Program, x: np.ndarray) -> list[np.ndarray]:
    from tvm import relax

    from targets.cpu import llvm_target
    ex = relax.build(emit(program), target=llvm_target("llvm"))     # this CPU (the fast form may use VNNI)
    vm = tvm.runtime.vm.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x))
    return [out[0].numpy(), out[1].numpy()]


def assert_same(program: Program, x: np.ndarray, other: Program | None = None) -> None:
    """Reference outputs of ``program`` equal llvm's (and ``other``'s reference when given)."""
    ref = reference.run(program, x)
    got = run_llvm(program, x)
    np.testing.assert_array_equal(ref[1], got[1])
    np.testing.assert_array_equal(ref[0], got[0])
    if other is not None:
        np.testing.assert_array_equal(reference.run(other, x)[1], ref[1])


def body_ops(mod, fn_name: str) -> list[str]:
    """Names of the Relax ops called in a function's body, in order."""
    fn = mod[fn_name]
    out = []
    for block in fn.body.blocks:
        for b in block.bindings:
            v = b.value
            if hasattr(v, "op"):
                out.append(getattr(v.op, "name", None) or v.op.name_hint)
    return out
