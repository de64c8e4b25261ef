"""The pass pipeline from the imported float module to the final integer module.

    imported   float Relax from torch.export (waps_tvm.frontend)
    quantized  QuantizeGraph: integer ops, WAPS layers in masked reference form
               (CheckOverflow proves every int32 intermediate fits, or rejects)
    permuted   PermuteChannels: groups made contiguous, gathers where consumers disagree
    legalized  LegalizeWAPS: split (per-group convs) or fused (one TIR kernel) form
Each stage is a Relax IRModule kept for inspection (``compile --dump-ir``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import tvm

from relay_passes.legalize import LegalizeReport, legalize_waps
from relay_passes.overflow import check_overflow
from relay_passes.permute import PermuteReport, permute_channels
from relay_passes.program import Program, emit
from relay_passes.quantize import QuantSpec, quantize_graph

STAGES = ("imported", "quantized", "permuted", "legalized")


@dataclass
class Lowered:
    program: Program                       # the final integer program (legalized)
    module: tvm.IRModule                   # its Relax module
    stages: dict[str, tvm.IRModule] = field(default_factory=dict)
    permute: PermuteReport | None = None
    legalize: LegalizeReport | None = None
    bounds: dict[str, int] = field(default_factory=dict)
    placement: list[dict] = field(default_factory=list)   # npu16: where each op runs and why
    final: tvm.IRModule | None = None                     # what relax.build received (after BYOC)
    streams: dict = field(default_factory=dict)           # npu16: encoded stream per op


def lower(float_mod: tvm.IRModule, spec: QuantSpec, form: str = "split", permute: bool = True,
          dot: str = "none") -> Lowered:
    stages = {"imported": float_mod}
    prog = quantize_graph(float_mod, spec)
    stages["quantized"] = emit(prog)
    bounds = check_overflow(prog)
    perm_report = None
    if permute:
        prog, perm_report = permute_channels(prog)
        stages["permuted"] = emit(prog)
    prog, leg_report = legalize_waps(prog, form, dot)
    module = emit(prog)
    stages["legalized"] = module
    return Lowered(prog, module, stages, perm_report, leg_report, bounds)
