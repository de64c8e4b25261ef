"""One-pass CPU kernels for the reconstruction loop (fastquant.c), built on first use.

``kernels()`` compiles fastquant.c with the system C compiler into a shared library
cached under ``$XDG_CACHE_HOME/waps-tvm`` (keyed by the source's hash, written
atomically) and returns it loaded through ctypes, or None when no compiler is found or
the build fails: callers then use their PyTorch form, which gives the same values.
``usable(*tensors)`` says whether tensors can go through the kernels: float32 (masks
bool) CPU tensors that share one dense memory layout.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("fastquant.c")
# -march=native: the library is built on, and cached for, the machine that runs it
FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]

_f32, _u8, _i64, _int, _dbl = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double)
_SIGNATURES = {
    "fq_forward": (None, [_f32, _f32, _u8, _i64, ctypes.c_float, ctypes.c_float, ctypes.c_float, _int]),
    "fq_backward": (_dbl, [_f32, _f32, _f32, _u8, _f32, _i64, _int]),
    "sse_forward": (_dbl, [_f32, _f32, _f32, _i64, ctypes.c_float, ctypes.c_float, _int, _int]),
    "sse_backward": (None, [_f32, _f32, _f32, _i64, ctypes.c_float, ctypes.c_float, _int, ctypes.c_float, _int]),
    "lsq_sse": (_dbl, [_f32, _f32, _i64, ctypes.c_float, ctypes.c_float, ctypes.c_float,
                       ctypes.POINTER(ctypes.c_double), _int]),
}


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "waps-tvm"


def _cpu_id() -> bytes:
    """What -march=native depends on: the CPU model and its flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor().encode()
    return "".join(l for l in lines if l.startswith(("model name", "flags")))[:4096].encode()


@lru_cache(maxsize=1)
def kernels() -> ctypes.CDLL | None:
    """The loaded kernel library, or None when it cannot be built here."""
    if os.environ.get("WAPS_TVM_NO_NATIVE"):
        return None
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return None
    src = SOURCE.read_bytes()
    tag = hashlib.sha256(src + " ".join(FLAGS).encode() + _cpu_id()).hexdigest()[:16]
    lib = _cache_dir() / f"fastquant-{tag}.so"
    try:
        if not lib.exists():
            lib.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
            os.close(fd)
            try:
                subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], check=True, capture_output=True)
                os.replace(tmp, lib)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        dll = ctypes.CDLL(str(lib))
    except (OSError, subprocess.CalledProcessError):
        return None
    for name, (res, args) in _SIGNATURES.items():
        fn = getattr(dll, name)
        fn.restype, fn.argtypes = res, args
    return dll


def usable(*tensors: torch.Tensor) -> bool:
    """True when every tensor is a dense CPU float32/bool tensor with the strides of the
    first (so one flat loop visits matching elements) and the kernels are built."""
    first = tensors[0]
    if not (first.device.type == "cpu" and (first.is_contiguous() or first.is_contiguous(memory_format=torch.channels_last))):
        return False
    for t in tensors:
        if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.bool) or t.shape != first.shape \
                or t.stride() != first.stride():
            return False
    return kernels() is not None


def threads() -> int:
    return torch.get_num_threads()
