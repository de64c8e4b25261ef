"""Run a compiled folder with the TVM runtime and the Relax VM.

Imports only NumPy and TVM (runtime), so it runs in a fresh process beside nothing
else of waps-tvm, and under TVM_USE_RUNTIME_LIB=1 on an aarch64 Python that has the TVM
runtime only (``waps-tvm run --emulate`` runs ``python -m waps_tvm.runner`` under qemu). The
module's main takes float32 [N, C, H, W] and returns (dequantized float32, output codes).
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
        import tvm
        x = check_input(self.meta, x)
        out = self.vm["main"](tvm.runtime.tensor(x))
        return out[0].numpy(), out[1].numpy()

    def time(self, x: np.ndarray, repeat: int) -> list[float]:
        """Seconds per call for ``repeat`` calls (after one warm-up)."""
        import tvm
        x = tvm.runtime.tensor(check_input(self.meta, x))
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
    want = tuple(meta["input"]["shape"])
    if not isinstance(x, np.ndarray) or x.dtype.kind != "f":
        raise RunError(f"input must be a float array of shape {want}, got dtype {getattr(x, 'dtype', type(x))}")
    if x.ndim == len(want) - 1 and (1, *x.shape) == want:
        x = x[None]
    if tuple(x.shape) != want:
        raise RunError(f"input shape {tuple(x.shape)} does not match the compiled shape {want} "
                       f"(recompile with --batch {x.shape[0] if x.ndim == len(want) else 'N'})")
    if not np.all(np.isfinite(x)):
        raise RunError("input holds NaN or Inf values")
    return np.ascontiguousarray(x, dtype=np.float32)


def main(argv: list[str] | None = None) -> int:
    """``python -m waps_tvm.runner FOLDER X.npy OUTDIR [--repeat N]``: what ``waps-tvm run --emulate``
    runs under qemu. Writes OUTDIR/dequantized.npy, codes.npy and times.npy (seconds per
    call); a RunError is one line on stderr and exit code 2."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m waps_tvm.runner")
    p.add_argument("folder")
    p.add_argument("input")
    p.add_argument("outdir")
    p.add_argument("--repeat", type=int, default=0)
    args = p.parse_args(argv)
    try:
        model = load(args.folder)
        x = np.load(args.input, allow_pickle=False)
        deq, codes = model(x)
        times = model.time(x, args.repeat) if args.repeat else []
    except RunError as e:
        print(f"{e}", file=sys.stderr)
        return e.exit_code
    out = Path(args.outdir)
    np.save(out / "dequantized.npy", deq)
    np.save(out / "codes.npy", codes)
    np.save(out / "times.npy", np.asarray(times, dtype=np.float64))
    return 0


if __name__ == "__main__":
    sys.exit(main())
