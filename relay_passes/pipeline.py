"""The pass pipeline: the integer Program from the artifact to the final integer module.

The frontend (waps_tvm/frontend.py) builds the Program straight from the artifact's layer
graph; the pipeline emits it as Relax once and runs a ``tvm.transform.Sequential`` of
module passes over it, each one parse → rewrite → emit (relay_passes/program.py):

    quantized  the Program as built (integer ops, WAPS layers in masked reference form)
    waps.CheckOverflow    proves every int32 intermediate fits, or rejects the layer
    waps.PermuteChannels  → permuted: groups made contiguous, gathers where consumers disagree
    waps.LegalizeWAPS     → legalized: split, fused or fast form per op
    your passes           (``extra_passes``: any tvm.transform passes over the same module)

A PassInstrument keeps the module after every pass, which ``compile --dump-ir`` and
``inspect`` show by stage name.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import tvm

from relay_passes.legalize import LegalizeReport, LegalizeWAPS
from relay_passes.overflow import CheckOverflow, OverflowReport
from relay_passes.permute import PermuteChannels, PermuteReport
from relay_passes.program import Program, emit, parse, run_passes

STAGES = ("quantized", "permuted", "legalized")
_STAGE_OF_PASS = {"waps.PermuteChannels": "permuted", "waps.LegalizeWAPS": "legalized"}


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
    fusions: list = field(default_factory=list)           # CPU: conv → add pairs fused (codegen/cpu_fusion.py)

    def record(self, report) -> None:
        """A pass's report (the ``sink`` of each waps pass)."""
        if isinstance(report, OverflowReport):
            self.bounds = report.bounds
        elif isinstance(report, PermuteReport):
            self.permute = report
        elif isinstance(report, LegalizeReport):
            self.legalize = report


@tvm.instrument.pass_instrument
class StageRecorder:
    """Keeps the module after each pass: waps passes by stage name, others by pass name."""

    def __init__(self, stages: dict[str, tvm.IRModule]):
        self.stages = stages

    def run_after_pass(self, mod, info):
        name = str(info.name)
        if name not in ("waps.CheckOverflow", "waps.pipeline"):
            self.stages[_STAGE_OF_PASS.get(name, name)] = mod


def passes(form: str = "split", permute: bool = True, dot: str = "none", sink=None) -> list:
    """The waps passes in order (each reports to ``sink``)."""
    seq = [CheckOverflow(sink)]
    if permute:
        seq.append(PermuteChannels(sink))
    seq.append(LegalizeWAPS(form, dot, sink))
    return seq


def lower(program: Program, form: str = "split", permute: bool = True, dot: str = "none",
          extra_passes: tuple = ()) -> Lowered:
    """Run the pipeline on the frontend's Program; ``extra_passes`` run after LegalizeWAPS."""
    quantized = emit(program)
    lowered = Lowered(program, quantized, {"quantized": quantized})
    seq = tvm.transform.Sequential([*passes(form, permute, dot, lowered.record), *extra_passes],
                                   name="waps.pipeline")
    lowered.module = run_passes(seq, quantized, [StageRecorder(lowered.stages)])
    lowered.program = parse(lowered.module)
    return lowered
