"""Run a compiled folder with the TVM runtime and the Relax VM.

Imports only NumPy and TVM (runtime), so it runs in a fresh process beside nothing
else of waps-tvm (and under TVM_USE_RUNTIME_LIB=1). The module's main takes float32
[N, C, H, W] and returns (dequantized float32, output codes).
"""
from __future__ import annotations

import hashlib
import json
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
    import tvm
    try:
        lib = tvm.runtime.load_module(str(lib_path))
        vm = tvm.runtime.vm.VirtualMachine(lib, tvm.cpu())
    except Exception as e:  # noqa: BLE001 (TVM raises many types; one line for the user)
        raise RunError(f"{lib_path}: cannot load ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return Compiled(folder, meta, vm)


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
