"""Run aarch64 builds on an x86_64 machine under qemu-user.

``scripts/aarch64-emulation.sh`` puts an arm64 Debian python3.11 (the sysroot) and the
aarch64 TVM runtime and NumPy wheels into ``.aarch64/`` at the repository root (or
``$WAPS_AARCH64_ROOT``). :func:`run` starts ``python -m waps_tvm.runner`` there under
qemu-aarch64-static with only the TVM runtime library loaded (TVM_USE_RUNTIME_LIB=1); the
input and outputs travel as .npy files in a temporary folder. :func:`run_many` runs several
compiled folders in one such process.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from waps_tvm.runner import RunError, check_samples, read_folder

REPO = Path(__file__).resolve().parents[1]
SETUP = "scripts/aarch64-emulation.sh"


def root() -> Path:
    return Path(os.environ.get("WAPS_AARCH64_ROOT") or REPO / ".aarch64")


def python() -> Path:
    """The aarch64 python launcher; a RunError naming the setup command when it is missing."""
    launcher = root() / "sysroot/usr/bin/python3-qemu"
    qemu = os.environ.get("QEMU", "qemu-aarch64-static")
    if not launcher.is_file() or not (root() / "site/tvm").is_dir() or shutil.which(qemu) is None:
        raise RunError(f"aarch64 emulation is not set up (no {launcher if shutil.which(qemu) else qemu}): "
                       f"run {SETUP} (as root, once)")
    return launcher


def env() -> dict:
    """The environment of the emulated python: none of this venv's paths, waps_tvm importable,
    only libtvm_runtime.so loaded (the sysroot holds no compiler library)."""
    e = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    # the launcher puts the aarch64 site-packages in front of this
    e.update(PYTHONPATH=str(REPO), PYTHONNOUSERSITE="1", TVM_USE_RUNTIME_LIB="1")
    return e


def command(*args: str) -> list[str]:
    """argv that runs the aarch64 python with ``args``."""
    return [str(python()), *args]


def run(folder: str | Path, x: np.ndarray, repeat: int = 0) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """(dequantized, codes, seconds per call for ``repeat`` calls) of the compiled folder run
    under qemu (its first output). Timings are emulated aarch64, not of any real board."""
    return run_many([(folder, x)], repeat)[0]


def run_results(folder: str | Path, x: np.ndarray, repeat: int = 0
                ) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[float]]:
    """((dequantized, codes) of every output, seconds per call) of the folder run under qemu."""
    return _emulate([(folder, x)], repeat)[0]


def run_many(jobs: Sequence[tuple[str | Path, np.ndarray]], repeat: int = 0
             ) -> list[tuple[np.ndarray, np.ndarray, list[float]]]:
    """:func:`run` for each (compiled folder, input) of ``jobs``, in order, all in ONE emulated
    python: qemu start-up and ``import tvm`` take seconds, a small model's run milliseconds.
    Every folder is checked (aarch64, input shape) before qemu starts; a RunError names the
    first failing folder when any run fails (the others still ran, their outputs are dropped)."""
    return [(results[0][0], results[0][1], times) for results, times in _emulate(jobs, repeat)]


def _emulate(jobs, repeat: int) -> list[tuple[list[tuple[np.ndarray, np.ndarray]], list[float]]]:
    """Every output of each job (run_many's contract otherwise)."""
    folders = []
    inputs = []
    for folder, x in jobs:
        folder = Path(folder).resolve()
        meta, _ = read_folder(folder)
        if meta.get("arch", "x86_64") != "aarch64":
            raise RunError(f"{folder}: --emulate runs aarch64 builds; this one is for {meta.get('arch', 'x86_64')} "
                           "(run it without --emulate)")
        folders.append(folder)
        inputs.append(check_samples(meta, x))    # the runner under qemu takes it in batches
    if not folders:
        return []
    cmd = command("-m", "waps_tvm.runner")
    with tempfile.TemporaryDirectory(prefix="waps-emulate-") as tmp:
        tmp = Path(tmp)
        args = []
        for i, (folder, x) in enumerate(zip(folders, inputs)):
            (tmp / str(i)).mkdir()
            np.save(tmp / str(i) / "x.npy", x)
            args += [str(folder), str(tmp / str(i) / "x.npy"), str(tmp / str(i))]
        r = subprocess.run([*cmd, *args, "--repeat", str(repeat)], env=env(), cwd=tmp, capture_output=True, text=True)
        if r.returncode != 0:
            lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
            # the runner prints one line per failed folder; a crash leaves a traceback, last line last
            said = [ln for ln in lines if any(ln.startswith(str(f)) for f in folders)] or lines[-1:]
            more = f" (and {len(said) - 1} more)" if len(said) > 1 else ""
            raise RunError(f"emulated run failed (exit {r.returncode}): {said[0] if said else 'no output'}{more}")
        out = []
        for i in range(len(folders)):
            with np.load(tmp / str(i) / "results.npz") as z:
                flat = [z[f"arr_{k}"] for k in range(len(z.files))]
            out.append((list(zip(flat[0::2], flat[1::2])), np.load(tmp / str(i) / "times.npy").tolist()))
        return out


def rpc_server(host: str = "127.0.0.1", port: int = 9090, tracker: str | None = None, key: str | None = None,
               **popen) -> subprocess.Popen:
    """Start TVM's RPC server under qemu in its own process group (the server listens in a
    child process: stop it with ``os.killpg(proc.pid, signal.SIGTERM)``), registered with the
    tracker at ``tracker`` (host:port) under ``key`` when given. The launcher is
    sys.executable there, so the server's popen workers start under qemu too."""
    from waps_tvm.boards import server_args
    cmd = command("-m", "tvm.exec.rpc_server", *server_args(host, port, tracker, key))
    return subprocess.Popen(cmd, env=env(), start_new_session=True, **popen)
