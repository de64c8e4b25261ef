"""``waps-tvm compile``: .waps → integer Relax (relay_passes) → TVM llvm build → out/.

The output folder holds
    model.so     the exported library (Relax VM executable + kernels), linked by a cross gcc
                 for cross targets (targets/cpu.py)
    meta.json    what a runner needs: input/output shapes, dtypes, layout, the input and
                 output quantization, target (name, llvm target dict, machine), WAPS form,
                 gathers, versions
    ir/<stage>.py   the Relax text of each pipeline stage (with dump_ir)
Files are written to a temporary folder next to ``out`` and renamed into place, so an
interrupted compile leaves nothing half-written.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from calib.artifact import WapsArtifact
from calib.errors import ConfigError
from relay_passes.pipeline import Lowered, lower
from relay_passes.program import INPUT
from targets.cpu import CpuTarget, export_cc, llvm_target, resolve, target_config
from waps_tvm.frontend import to_program

META_VERSION = 1


def lower_artifact(art: WapsArtifact, batch: int = 1, form: str = "split", permute: bool = True,
                   target: str | CpuTarget = "llvm") -> Lowered:
    """``form``: split | fused | fast (relay_passes/legalize.py); the fast form's inner product
    is chosen for ``target`` by :func:`dot_product`."""
    if batch < 1:
        raise ConfigError(f"--batch must be at least 1 (got {batch})")
    return lower(to_program(art, batch), form, permute, dot_product(target) if form == "fast" else "none")


def dot_product(target: str | CpuTarget) -> str:
    """The fast form's inner product for ``target``: 'vnni' for this machine when its CPU has
    AVX-512 VNNI, 'sdot' for an aarch64 target whose mattr has "+dotprod" (--target aarch64
    does), else 'none' (vectorized int32 multiply-adds)."""
    from relay_passes.fast_kernels import host_dot
    tgt = resolve(target)
    if tgt.config == {"kind": "llvm"}:
        return host_dot()
    mattr = tgt.config.get("mattr", [])
    mattr = mattr.split(",") if isinstance(mattr, str) else list(mattr)
    return "sdot" if tgt.arch == "aarch64" and "+dotprod" in mattr else "none"


def build(lowered: Lowered, target: str | CpuTarget = "llvm", npu=None, fuse=()):
    """Relax VM executable of the lowered module for ``target``: 'llvm' (TVM kernels for
    this CPU), 'aarch64' or a JSON llvm target dict (TVM kernels for that CPU), 'c' (every
    integer op as portable C99 through BYOC, host glue on llvm) or 'npu16' (on the machine
    ``npu``, a targets.npu16.params.NPU16; default today's npu16). On the TVM CPU targets,
    ``fuse`` names the kernel fusions to apply (codegen/cpu_fusion.KINDS: 'residual-adds',
    'expand-depthwise'; the pairs fused in ``lowered.fusions``)."""
    import tvm
    from tvm import relax

    tgt = resolve(target)
    module = lowered.module
    if tgt.name == "c":
        from codegen.c.byoc import offload
        module = offload(module)
        lowered.stages["partitioned"] = module
    elif tgt.name == "npu16":
        from codegen.npu16.byoc import offload as npu_offload
        module, lowered.placement = npu_offload(module, *([npu] if npu is not None else []))
        lowered.streams = {r["op"]: r["lowered"].words for r in lowered.placement if r["lowered"] is not None}
        lowered.stages["partitioned"] = module
    else:                                  # one VM frame for the whole model, not one per op
        if fuse:
            from codegen.cpu_fusion import fuse as fuse_pairs
            module, lowered.fusions = fuse_pairs(lowered.program, module, fuse)
        module = relax.transform.InlinePrivateFunctions()(module)
    lowered.final = module
    with tvm.transform.PassContext(opt_level=3):
        return relax.build(module, target=llvm_target(tgt))


def metadata(art: WapsArtifact | None, lowered: Lowered, target: CpuTarget, batch: int, seconds: float) -> dict:
    """meta.json of a compiled folder; ``art`` None (a Program compiled without an artifact,
    as the tests do): no "model" entry."""
    import tvm
    from codegen.cpu_fusion import DepthwiseFusion, ResidualFusion
    prog = lowered.program
    quant = next(o for o in prog.ops if INPUT in o.inputs)      # the input's quantize
    names = art.graph.output_names() if art is not None else [c for _, c in prog.results]
    results = [_result(name, prog[d], prog[c]) for name, (d, c) in zip(names, prog.results)]
    return {
        "format": "waps-tvm-compiled", "version": META_VERSION, "target": target.name,
        # the runner refuses a library built for another machine (runner.check_arch)
        "llvm_target": target_config(target), "arch": target.arch,
        "input": {"shape": list(prog.input_shape), "dtype": "float32", "layout": "NCHW",
                  "scale": quant.attrs.scale, "zero_point": quant.attrs.zero_point,
                  "qmax": quant.attrs.qmax},
        "output": results[0],                     # the first (a classifier's only) output
        "results": results,                       # every model output, in its order
        # the VM's tuple: (dequantized, codes) of each result in turn
        "outputs": ["dequantized", "codes"] * len(results),
        "waps": {"form": lowered.legalize.form, "legalized_layers": lowered.legalize.legalized,
                 "masked_layers": lowered.legalize.masked,
                 "gathers": lowered.permute.gathers if lowered.permute else 0,
                 "gathered_layers": lowered.permute.gathered_layers if lowered.permute else [],
                 # op pairs computed as one kernel (codegen/cpu_fusion.py)
                 "fused_residual_adds": [[f.conv, f.add] for f in lowered.fusions if isinstance(f, ResidualFusion)],
                 "fused_expand_depthwise": [[f.conv, f.depthwise] for f in lowered.fusions
                                            if isinstance(f, DepthwiseFusion)]},
        "placement": [{k: v for k, v in row.items() if k != "lowered"} for row in lowered.placement],
        **({"model": {"producer": art.producer, "config": art.config}} if art is not None else {}),
        "versions": {"waps_tvm": __import__("waps_tvm").__version__, "tvm": tvm.__version__},
        "compile_seconds": round(seconds, 2),
    }


def _result(name: str, deq, codes) -> dict:
    """meta.json's description of one model output: its name (the model's key for it, else its
    value's), shape, code dtype and the scale and zero point that dequantize it."""
    return {"name": name, "shape": list(codes.shape), "dtype": "float32", "codes_dtype": codes.dtype,
            "scale": deq.attrs.scale, "zero_point": deq.attrs.zero_point}


def write_library(ex, folder: Path, meta: dict, cc: str | None) -> None:
    """What the runner needs of a compiled folder: ``ex`` exported as folder/model.so (linked by
    ``cc``, targets.cpu.export_cc; None: this machine's gcc) and meta.json, ``meta`` with the
    library's size and SHA-256 added (runner.check_library)."""
    ex.export_library(str(folder / "model.so"), **({"cc": cc} if cc else {}))
    lib = (folder / "model.so").read_bytes()
    meta["library"] = {"file": "model.so", "bytes": len(lib), "sha256": hashlib.sha256(lib).hexdigest()}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))


def compile_artifact(art: WapsArtifact, out: str | os.PathLike, target: str | CpuTarget = "llvm", batch: int = 1,
                     form: str = "fast", dump_ir: bool = False, records=None, npu=None,
                     fuse=()) -> dict:
    """Compile ``art`` into the folder ``out`` (replaced atomically) for ``target`` (a name or
    a JSON llvm target dict, targets/cpu.py); returns the metadata. ``records``: (meta-schedule
    database, its target) from waps_tvm.tuning.load_records — the fast kernels' schedules.
    ``npu``: the npu16 machine (targets.npu16.params.NPU16) of an npu16 build, recorded in
    meta.json and npu_config.json; the report's npu16 counts are the simulator's counters
    from one run of the compiled library. ``fuse``: the kernel fusions (``build``)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"-o {out}: exists and is not a folder")
    tgt = resolve(target)
    cc = export_cc(tgt)                              # a missing cross gcc fails before any work
    if npu is not None and tgt.name != "npu16":
        raise ConfigError(f"--npu-config describes the npu16 machine; it does not apply to --target {tgt.name}")
    if fuse:
        from codegen.cpu_fusion import KINDS
        unknown = sorted(set(fuse) - set(KINDS))
        if unknown:
            raise ConfigError(f"--fuse {','.join(unknown)}: unknown fusion (known: {','.join(KINDS)})")
        if records is not None or form != "fast" or tgt.name in ("c", "npu16"):
            raise ConfigError("--fuse applies to the fast form on the TVM CPU targets, without "
                              "--tuning-records (the records hold the unfused kernels' schedules)")
    if tgt.name == "npu16":
        from targets.npu16.params import DEFAULT
        npu = npu or DEFAULT
    t0 = time.perf_counter()
    if tgt.name in ("c", "npu16"):
        form = "split"            # their BYOC codegens replace the integer ops' bodies anyway
    if records is not None:
        from relay_passes.fast_kernels import tuned
        with tuned(*records):
            lowered = lower_artifact(art, batch, form, target=tgt)
    else:
        lowered = lower_artifact(art, batch, form, target=tgt)
    ex = build(lowered, tgt, npu, fuse=tuple(fuse))
    from waps_tvm.inspect import to_onnx
    onnx_model = to_onnx(lowered.program, tgt.name, lowered.placement)
    meta = metadata(art, lowered, tgt, batch, time.perf_counter() - t0)
    meta["waps"]["tuning_records"] = records is not None
    if npu is not None:
        meta["npu16"] = npu.to_config()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as e:
        raise ConfigError(f"cannot write {out}: {e.strerror or e}") from None
    try:
        write_library(ex, tmp, meta, cc)
        (tmp / "graph.onnx").write_bytes(onnx_model.SerializeToString())
        if lowered.streams:
            import numpy as np
            np.savez(tmp / "npu16_streams.npz", **lowered.streams)
        counters = None
        if npu is not None:
            from codegen.npu16.byoc import counter_symbols
            from targets.npu16.counters import measure
            (tmp / "npu_config.json").write_text(json.dumps(npu.to_config(), indent=1))
            op_of = {r["symbol"]: r["op"] for r in meta["placement"] if r.get("symbol")}
            counted = measure(tmp / "model.so", tuple(meta["input"]["shape"]), counter_symbols(meta["placement"]))
            counters = {op_of[s]: c for s, c in counted.items()}
        from waps_tvm import report
        report.write(tmp, report.build(lowered.program, meta["placement"], tgt.name, npu, counters))
        if dump_ir:
            (tmp / "ir").mkdir()
            for name, mod in lowered.stages.items():
                (tmp / "ir" / f"{name}.py").write_text(mod.script(show_meta=False))
            if lowered.final is not None:
                (tmp / "ir" / "final.py").write_text(lowered.final.script(show_meta=False))
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta
