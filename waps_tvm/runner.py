"""Run a compiled folder with the TVM runtime and the Relax VM.

Imports only NumPy and TVM (runtime), so it runs in a fresh process beside nothing
else of waps-tvm, and under TVM_USE_RUNTIME_LIB=1 on an aarch64 Python that has the TVM
runtime only (``waps-tvm run --emulate`` runs ``python -m waps_tvm.runner`` under qemu). The
module's main takes float32 [B, C, H, W] (B: the compiled batch) and returns (dequantized float32,
output codes); ``run_batches`` runs any number of samples through it in chunks of B (the
last chunk padded, its extra rows dropped): one compiled shape, any input count, the same on
this machine, under emulation and over RPC.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class RunError(Exception):
    """Bad compiled folder or input; the CLI prints it as one line (exit code 2)."""

    exit_code = 2


@dataclass
class Compiled:
    folder: Path
    meta: dict
    vm: object

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(dequantized, codes) for any number of samples (run_batches) of a single-output model."""
        return single(self.meta, self.results(x))

    def results(self, x: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """(dequantized, codes) of every model output (meta["results"]), for any number of samples."""
        return run_batches(self._call_batch, self.meta, x)

    def _call_batch(self, x: np.ndarray) -> list[np.ndarray]:
        import tvm
        out = self.vm["main"](tvm.runtime.tensor(check_input(self.meta, x)))
        return [out[i].numpy() for i in range(len(out))]

    def time(self, x: np.ndarray, repeat: int) -> list[float]:
        """Seconds per call of one compiled batch (the first of ``x``), ``repeat`` calls after one
        warm-up."""
        import tvm
        x = tvm.runtime.tensor(first_batch(self.meta, x))
        self.vm["main"](x)
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            self.vm["main"](x)
            times.append(time.perf_counter() - t0)
        return times


def load(folder: str | Path) -> Compiled:
    meta, lib_path = read_folder(folder)
    check_arch(Path(folder), meta)
    import tvm
    from tvm.runtime.vm import VirtualMachine    # not imported by `import tvm` in runtime-only mode
    use_all_cores()
    try:
        lib = tvm.runtime.load_module(str(lib_path))
        vm = VirtualMachine(lib, tvm.cpu())
    except Exception as e:  # noqa: BLE001 (TVM raises many types; one line for the user)
        raise RunError(f"{lib_path}: cannot load ({first_line(e)})") from None
    return Compiled(Path(folder), meta, vm)


def use_all_cores() -> None:
    """Size TVM's thread pool to every CPU this process may run on, unless TVM_NUM_THREADS says.

    TVM's pool takes half the logical CPUs when unset (it assumes hyper-threading), and
    resizing it afterwards with ``runtime.config_threadpool`` made MobileNetV2 slower than one
    thread on the 2-core build machine (2.5 ms against 2.06 ms). Setting TVM_NUM_THREADS
    before the pool exists (it is created by the first parallel kernel, not by ``import tvm``)
    gives two working threads (1.22 ms). So call this before running anything."""
    if not os.environ.get("TVM_NUM_THREADS"):
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        os.environ["TVM_NUM_THREADS"] = str(cpus)


def read_folder(folder: str | Path) -> tuple[dict, Path]:
    """meta.json and the path of a compiled folder's library, checked (format, checksum)."""
    folder = Path(folder)
    meta_path, lib_path = folder / "meta.json", folder / "model.so"
    if not meta_path.is_file() or not lib_path.is_file():
        raise RunError(f"{folder}: not a compiled waps-tvm folder (needs meta.json and model.so)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"{meta_path}: unreadable ({e})") from None
    if meta.get("format") != "waps-tvm-compiled" or meta.get("version") != 1:
        raise RunError(f"{meta_path}: unknown format {meta.get('format')!r} version {meta.get('version')!r}")
    check_library(meta, lib_path)
    return meta, lib_path


def first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def machine() -> str:
    arch = platform.machine().lower()
    return {"arm64": "aarch64", "amd64": "x86_64"}.get(arch, arch)


def check_arch(folder: Path, meta: dict) -> None:
    """Loading another machine's library fails deep in dlopen; say what to do instead."""
    arch = meta.get("arch")                      # folders compiled before cross targets: this machine
    if arch and arch != machine():
        how = "under emulation with `waps-tvm run --emulate`, " if arch == "aarch64" else ""
        raise RunError(f"{folder}: compiled for {arch}; run it on an {arch} machine, "
                       f"{how}or with --rpc host:port")


def check_library(meta: dict, lib_path: Path) -> None:
    """A damaged shared library can crash the process when loaded (a truncated ELF is a bus
    error inside dlopen), so its size and SHA-256 are checked against meta.json first."""
    want = meta.get("library")
    if not want:
        return                                   # folders compiled before the checksum existed
    data = lib_path.read_bytes()
    if len(data) != want["bytes"] or hashlib.sha256(data).hexdigest() != want["sha256"]:
        raise RunError(f"{lib_path}: damaged ({len(data)} bytes, checksum differs from meta.json); recompile it")


def check_input(meta: dict, x: np.ndarray) -> np.ndarray:
    """``x`` as the compiled module's exact input: float32 [B, C, H, W] (B = compiled batch)."""
    x = check_samples(meta, x)
    want = tuple(meta["input"]["shape"])
    if tuple(x.shape) != want:
        raise RunError(f"input shape {tuple(x.shape)} is not one batch of the compiled shape {want} "
                       "(run_batches takes any number of samples)")
    return x


def check_samples(meta: dict, x: np.ndarray) -> np.ndarray:
    """``x`` as float32 [S, C, H, W] for any S ≥ 1 (one sample may omit the batch axis)."""
    want = tuple(meta["input"]["shape"])
    sample = want[1:]
    if not isinstance(x, np.ndarray) or x.dtype.kind != "f":
        raise RunError(f"input must be a float array of shape (N, {', '.join(map(str, sample))}), "
                       f"got dtype {getattr(x, 'dtype', type(x))}")
    if tuple(x.shape) == sample:
        x = x[None]
    if x.ndim != len(want) or tuple(x.shape[1:]) != sample or x.shape[0] == 0:
        raise RunError(f"input shape {tuple(x.shape)} does not match the compiled shape {want}: "
                       f"give N ≥ 1 samples of shape {sample}")
    if not np.all(np.isfinite(x)):
        raise RunError("input holds NaN or Inf values")
    return np.ascontiguousarray(x, dtype=np.float32)


def batches(meta: dict, x: np.ndarray) -> list[np.ndarray]:
    """[S, ...] samples as chunks of the compiled batch B; the last chunk is padded with copies
    of its last sample. Samples never interact in a compiled model, so the padding changes
    no other sample's outputs; ``run_batches`` drops its rows."""
    b = int(meta["input"]["shape"][0])
    out = []
    for i in range(0, len(x), b):
        part = x[i:i + b]
        if len(part) < b:
            part = np.concatenate([part, np.repeat(part[-1:], b - len(part), axis=0)])
        out.append(np.ascontiguousarray(part))
    return out


def first_batch(meta: dict, x: np.ndarray) -> np.ndarray:
    """The first compiled batch of any number of samples (what latency is timed on)."""
    return batches(meta, check_samples(meta, x))[0]


def run_batches(call, meta: dict, x: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(dequantized, codes) of each model output for any number of samples: ``call`` (one
    compiled batch → the VM's flat tuple, meta["outputs"]) runs on each chunk of ``batches``;
    the results are joined and trimmed to S rows."""
    x = check_samples(meta, x)
    outs = [call(part) for part in batches(meta, x)]
    flat = [np.concatenate([o[i] for o in outs])[:len(x)] for i in range(len(outs[0]))]
    return list(zip(flat[0::2], flat[1::2]))


def single(meta: dict, results: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The (dequantized, codes) of a single-output model; RunError for a model with several."""
    if len(results) != 1:
        names = ", ".join(r["name"] for r in meta.get("results", []))
        raise RunError(f"the model has {len(results)} outputs ({names}); write them to an .npz (--output F.npz)")
    return results[0]


def main(argv: list[str] | None = None) -> int:
    """``python -m waps_tvm.runner FOLDER X.npy OUTDIR [FOLDER X.npy OUTDIR ...] [--repeat N]``: what
    ``waps-tvm run --emulate`` runs under qemu. For each triple, writes OUTDIR/dequantized.npy,
    codes.npy (the first output), results.npz (arr_0, arr_1, …: dequantized and codes of every
    output in turn) and times.npy (seconds per call). Several triples share one process, so one qemu
    start-up and one ``import tvm`` serve many compiled folders. A triple's RunError is one line
    on stderr (and no outputs in its OUTDIR); the others still run; the exit code is then 2."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m waps_tvm.runner")
    p.add_argument("jobs", nargs="+", metavar="FOLDER X.npy OUTDIR")
    p.add_argument("--repeat", type=int, default=0)
    args = p.parse_args(argv)
    if len(args.jobs) % 3:
        p.error(f"give FOLDER X.npy OUTDIR triples (got {len(args.jobs)} arguments)")
    code = 0
    for folder, x_path, outdir in zip(*[iter(args.jobs)] * 3):
        try:
            model = load(folder)
            x = np.load(x_path, allow_pickle=False)
            results = model.results(x)
            times = model.time(x, args.repeat) if args.repeat else []
        except RunError as e:
            print(f"{e}", file=sys.stderr)
            code = e.exit_code
            continue
        out = Path(outdir)
        np.save(out / "dequantized.npy", results[0][0])       # the first (a classifier's only) output
        np.save(out / "codes.npy", results[0][1])
        np.savez(out / "results.npz", *(a for pair in results for a in pair))   # every output, in meta order
        np.save(out / "times.npy", np.asarray(times, dtype=np.float64))
    return code


if __name__ == "__main__":
    sys.exit(main())
