"""One-pass CPU kernels for the reconstruction loop (fastquant.c), built on first use.

``kernels()`` compiles fastquant.c with the system C compiler into a shared library
cached under ``$XDG_CACHE_HOME/waps-tvm`` (keyed by the source's hash, written
atomically) and returns it loaded through ctypes, or None when no compiler is found or
the build fails: callers then use their PyTorch form, which gives the same values.
``usable(*tensors)`` says whether tensors can go through the kernels: float32 (or, for
the fake quantizer, bfloat16) CPU tensors that share one dense memory layout. The functions below are the only
callers of the library: tensors in, results out, scratch for the block sums owned here
(the C code allocates nothing).
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

_ptr, _i64, _int, _flt, _dbl = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_double
_SIGNATURES = {
    "scratch_len": (_i64, [_i64]),
    "fq_forward": (None, [_ptr, _int, _ptr, _int, _i64, _flt, _flt, _flt, _int]),
    "fq_backward": (_dbl, [_ptr, _int, _ptr, _int, _ptr, _i64, _flt, _flt, _flt, _ptr, _int]),
    "gather": (None, [_ptr, _int, _ptr, _i64, _i64, _i64, _flt, _flt, _int, _ptr, _int]),
    "sse_forward": (_dbl, [_ptr, _ptr, _ptr, _i64, _flt, _flt, _int, _ptr, _int]),
    "sse_backward": (None, [_ptr, _ptr, _ptr, _i64, _flt, _flt, _int, _flt, _int]),
    "lsq_sse": (_dbl, [_ptr, _ptr, _i64, _flt, _flt, _flt, ctypes.POINTER(_dbl), _ptr, _int]),
    "soft_round_forward": (_dbl, [_ptr, _ptr, _ptr, _i64, _i64, _flt, _flt, _flt, _flt, _int, _flt, _ptr, _ptr, _int]),
    "soft_round_backward": (None, [_ptr, _ptr, _ptr, _ptr, _i64, _i64, _flt, _flt, _flt, _flt, _flt, _flt, _ptr, _int]),
    "soft_groups_forward": (_dbl, [_ptr, _i64, _i64, _ptr, _int, _flt, _flt, _int, _flt, _ptr, _ptr]),
    "soft_groups_backward": (None, [_ptr, _i64, _i64, _ptr, _int, _flt, _flt, _ptr, _ptr, _ptr, _flt, _flt, _ptr]),
    "soft_groups_track": (None, [_ptr, _i64, _i64, _int, _flt, _flt, _i64, _ptr, _ptr]),
}
MAX_GROUPS = 64   # fastquant.c's bound on the groups of one unit


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


def usable(*tensors: torch.Tensor, bf16: bool = False) -> bool:
    """True when every tensor is a dense CPU float32 tensor (or bfloat16 where ``bf16``)
    with the strides of the first (so one flat loop visits matching elements) and the
    kernels are built."""
    first = tensors[0]
    if not (first.device.type == "cpu" and (first.is_contiguous() or first.is_contiguous(memory_format=torch.channels_last))):
        return False
    dtypes = (torch.float32, torch.bfloat16) if bf16 else (torch.float32,)
    for t in tensors:
        if t.device.type != "cpu" or t.dtype not in dtypes or t.shape != first.shape or t.stride() != first.stride():
            return False
    return kernels() is not None


def _bf16(t: torch.Tensor) -> int:
    return int(t.dtype == torch.bfloat16)


def threads() -> int:
    return torch.get_num_threads()


def _scratch(n: int, runs: int = 1) -> torch.Tensor:
    """float64 scratch for ``runs`` block-sum reductions over ``n`` elements (the caller keeps
    a reference for the duration of the C call: a bare ``_scratch(n).data_ptr()`` is freed first)."""
    return torch.empty(runs * int(kernels().scratch_len(n)), dtype=torch.float64, device="cpu")   # never the default device


def fake_quant_forward(x: torch.Tensor, scale: float, zero_point: float, levels: float,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x̂ = (clamp(round_half_even(x/s) + z, 0, L) − z)·s like ``x`` (float32 or bfloat16),
    computed in float32 and stored as ``dtype`` (float32, or bfloat16 rounded to nearest even)."""
    out = torch.empty_like(x, dtype=dtype)
    kernels().fq_forward(x.data_ptr(), _bf16(x), out.data_ptr(), _bf16(out), x.numel(), scale, zero_point, levels,
                         threads())
    return out


def fake_quant_backward(g, x, scale: float, zero_point: float, levels: float, want_x: bool
                        ) -> tuple[torch.Tensor | None, float]:
    """(g·inside like ``x`` if ``want_x`` else None, Σ g·(x̂ − x·inside)) with x̂ and
    inside = 0 < code < L recomputed from ``x``: the STE input gradient and the LSQ step
    gradient times s. ``g`` and ``x`` float32 or bfloat16, in one memory layout."""
    gx, sums = torch.empty_like(x) if want_x else None, _scratch(x.numel())
    acc = kernels().fq_backward(g.data_ptr(), _bf16(g), x.data_ptr(), _bf16(x), gx.data_ptr() if want_x else None,
                                x.numel(), scale, zero_point, levels, sums.data_ptr(), threads())
    return gx, acc


def gather(src: torch.Tensor, idx: torch.Tensor, channels_last: bool, scale: float | None = None,
           zero_point: float = 0.0) -> torch.Tensor | None:
    """``src[idx]`` as float32 in one pass, or None where the kernel cannot walk ``src``.

    ``src`` [N, C, *spatial] contiguous: uint8 codes, decoded as (code − z)·s with ``scale``
    given (the decode of calib/frontier), or float32 values taken as they are. 4-D results
    come in channels-last memory order when ``channels_last``; ``idx`` int64 [B] in [0, N)."""
    if kernels() is None or src.device.type != "cpu" or not src.is_contiguous() or src.dim() < 2 \
            or src.dtype != (torch.uint8 if scale is not None else torch.float32):
        return None
    idx = idx.to(torch.int64).contiguous()
    b, c = len(idx), src.shape[1]
    nhwc = channels_last and src.dim() == 4
    out = torch.empty((b, *src.shape[1:]), dtype=torch.float32, device="cpu",
                      memory_format=torch.channels_last if nhwc else torch.contiguous_format)
    kernels().gather(src.data_ptr(), int(scale is not None), idx.data_ptr(), b, c, src[0, 0].numel(),
                     0.0 if scale is None else scale, zero_point, int(nhwc), out.data_ptr(), threads())
    return out


def clipped_sse_forward(x, t, bounds: tuple[float, float] | None) -> tuple[torch.Tensor, float]:
    """(d = clamp(x, lo, hi) − t, Σ d²); no clamp when ``bounds`` is None."""
    d, sums = torch.empty_like(x), _scratch(x.numel())
    lo, hi = bounds if bounds is not None else (0.0, 0.0)
    acc = kernels().sse_forward(x.data_ptr(), t.data_ptr(), d.data_ptr(), x.numel(), lo, hi, int(bounds is not None),
                                sums.data_ptr(), threads())
    return d, acc


def clipped_sse_backward(x, d, bounds: tuple[float, float] | None, c: float) -> torch.Tensor:
    """c·d·[lo ≤ x ≤ hi] (the bounds pass, as torch's clamp); c·d when ``bounds`` is None."""
    gx = torch.empty_like(x)
    lo, hi = bounds if bounds is not None else (0.0, 0.0)
    kernels().sse_backward(x.data_ptr(), d.data_ptr(), gx.data_ptr(), x.numel(), lo, hi, int(bounds is not None), c,
                           threads())
    return gx


def quantized_sse(x, t, scale: float, zero_point: float, levels: float) -> tuple[float, float]:
    """(Σ (x̂ − t)², Σ 2(x̂ − t)·∂x̂/∂s) with x̂ fake-quantized x, in one read pass."""
    ds, sums = ctypes.c_double(), _scratch(x.numel(), 2)
    acc = kernels().lsq_sse(x.data_ptr(), t.data_ptr(), x.numel(), scale, zero_point, levels, ctypes.byref(ds),
                            sums.data_ptr(), threads())
    return acc, ds.value


def soft_round_usable(v: torch.Tensor, floor: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether AdaRound's tensors can go through soft_round_*: V and floor dense float32 CPU
    tensors of one shape [rows, ...] in row-major order, scale float32 with one value per row."""
    return (v.dim() >= 1 and v.is_contiguous() and floor.is_contiguous() and scale.is_contiguous()
            and scale.dtype == torch.float32 and scale.device.type == "cpu" and scale.numel() == v.shape[0]
            and usable(v, floor))


def soft_round_forward(v: torch.Tensor, floor: torch.Tensor, scale: torch.Tensor, qmin: float, qmax: float,
                       stretch: tuple[float, float], beta: float | None) -> tuple[torch.Tensor, float]:
    """(w, reg): w = clamp(floor + h(V), qmin, qmax)·scale[row] like ``v`` with h the rectified
    sigmoid clamp(σ(V)·span + low, 0, 1), ``stretch`` = (span, low) = (ζ − τ, τ), and
    reg = Σ (1 − |2h − 1|^β) (0.0, not computed, when ``beta`` is None)."""
    rows = v.shape[0]
    w, sums = torch.empty_like(v), torch.empty(rows, dtype=torch.float64, device="cpu")
    reg = kernels().soft_round_forward(v.data_ptr(), floor.data_ptr(), scale.data_ptr(), rows, v.numel() // rows,
                                       qmin, qmax, *stretch, int(beta is not None), 0.0 if beta is None else beta,
                                       w.data_ptr(), sums.data_ptr(), threads())
    return w, reg


def soft_round_backward(v: torch.Tensor, floor: torch.Tensor, scale: torch.Tensor, gw: torch.Tensor, qmin: float,
                        qmax: float, stretch: tuple[float, float], beta: float | None, c_reg: float) -> torch.Tensor:
    """∂/∂V of Σ gw·w + c_reg·reg with (w, reg) as soft_round_forward; ``gw`` like ``v``."""
    rows = v.shape[0]
    gv, gw = torch.empty_like(v), gw.to(torch.float32).contiguous()   # gw kept alive through the call
    kernels().soft_round_backward(v.data_ptr(), floor.data_ptr(), scale.data_ptr(), gw.data_ptr(), rows,
                                  v.numel() // rows, qmin, qmax, *stretch, 0.0 if beta is None else beta,
                                  c_reg if beta is not None else 0.0, gv.data_ptr(), threads())
    return gv


def soft_groups_usable(r: torch.Tensor, gammas: torch.Tensor) -> bool:
    """Whether WAPS logits R [units, g] and scales γ [g] can go through soft_groups_*."""
    return (r.dim() == 2 and 0 < r.shape[1] <= MAX_GROUPS and gammas.is_contiguous() and usable(r)
            and gammas.dtype == torch.float32 and gammas.device.type == "cpu" and gammas.numel() == r.shape[1])


def soft_groups_forward(r: torch.Tensor, gammas: torch.Tensor, sigmoid_form: bool, stretch: tuple[float, float],
                        beta: float | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(s [units, g], γ^y [units], reg): the rectified group probabilities clamp(π·span + low, 0, 1)
    with π the softmax or the sigmoid ratio of eq. 15 and ``stretch`` = (span, low),
    γ^y = Σ γ·s / Σ s, and Σ (1 − |2s − 1|^β) (0.0 when ``beta`` is None)."""
    units, g = r.shape
    s, gy = torch.empty_like(r), torch.empty(units, dtype=torch.float32, device="cpu")
    reg = kernels().soft_groups_forward(r.data_ptr(), units, g, gammas.data_ptr(), int(sigmoid_form), *stretch,
                                        int(beta is not None), 0.0 if beta is None else beta, s.data_ptr(), gy.data_ptr())
    return s, gy, reg


def soft_groups_backward(r: torch.Tensor, gammas: torch.Tensor, sigmoid_form: bool, stretch: tuple[float, float],
                         s: torch.Tensor, gy: torch.Tensor, ggy: torch.Tensor, beta: float | None, c_reg: float
                         ) -> torch.Tensor:
    """∂/∂R of Σ ggy·γ^y + c_reg·reg with (s, γ^y, reg) as soft_groups_forward."""
    units, g = r.shape
    gr, ggy = torch.empty_like(r), ggy.to(torch.float32).contiguous()   # ggy kept alive through the call
    kernels().soft_groups_backward(r.data_ptr(), units, g, gammas.data_ptr(), int(sigmoid_form), *stretch, s.data_ptr(),
                                   gy.data_ptr(), ggy.data_ptr(), 0.0 if beta is None else beta,
                                   c_reg if beta is not None else 0.0, gr.data_ptr())
    return gr


def soft_groups_track(r: torch.Tensor, sigmoid_form: bool, stretch: tuple[float, float], step: int,
                      settled_at: torch.Tensor) -> torch.Tensor | None:
    """s [units, g] from R (as soft_groups_forward), updating ``settled_at`` (int64 [units]) in
    place as ProductGroups.track does; None (nothing done) where the tensors don't suit the kernel."""
    if not (settled_at.dtype == torch.int64 and settled_at.device.type == "cpu" and settled_at.is_contiguous()
            and r.dim() == 2 and 0 < r.shape[1] <= MAX_GROUPS and settled_at.numel() == r.shape[0] and usable(r)):
        return None
    units, g = r.shape
    s = torch.empty_like(r)
    kernels().soft_groups_track(r.data_ptr(), units, g, int(sigmoid_form), *stretch, step, s.data_ptr(),
                                settled_at.data_ptr())
    return s
