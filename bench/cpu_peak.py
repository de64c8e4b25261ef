"""This CPU's peak int8 multiply-accumulate rate, measured with its dot-product instruction.

A tiny C program (built with gcc here) issues the host's widest int8 dot-product
instruction into ACCUMULATORS independent accumulators, so the loop is bound by the
instruction's throughput, not by its latency (vpdpbusd: 5 cycles on Ice Lake):
  * x86 with AVX-512 VNNI: ``_mm512_dpbusd_epi32`` on zmm registers, 64 u8×s8 MACs per
    instruction (16 int32 lanes × 4), the instruction TVM's VNNI intrinsic
    (relay_passes/fast_kernels.py, ``VNNI``) emits;
  * aarch64 with the dot-product extension: ``vdotq_s32`` (sdot) on a 128-bit vector,
    16 s8×s8 MACs per instruction (4 int32 lanes × 4).
It runs on one core, then on all cores at once (os.cpu_count() processes), each the best of
``repeats`` runs. Then, per core, instructions per cycle = instructions/s ÷ clock (the mean
``cpu MHz`` of /proc/cpuinfo), and

    peak GMAC/s = instructions/cycle × MACs/instruction × clock × cores   (all-core run).

Writes bench/results/cpu_peak.json and cpu_peak.md.

    python -m bench.cpu_peak [--seconds 0.5] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from calib.errors import WapsError

RESULTS = Path(__file__).resolve().parent / "results"
ACCUMULATORS = 16          # ≥ latency × issue width (5 × 2 would do on two VNNI ports); 16 + 2 operands fit in 32 zmm


class PeakError(WapsError):
    """The host has no supported dot-product instruction, or the microbenchmark failed."""


@dataclass(frozen=True)
class Dot:
    """One dot-product instruction: its C spelling and what it computes."""
    name: str              # as the report writes it
    instruction: str
    macs: int              # multiply-accumulates per instruction
    cflags: tuple[str, ...]
    header: str
    vector: str            # accumulator type
    setup: str             # C declaring operands a, b from the int seed s
    zero: str              # C expression: accumulator k's initial value
    step: str              # C expression: acc[k] after one instruction
    lanes_sum: str         # C statement adding acc[k]'s lanes into the long ``sum``


VNNI = Dot("AVX-512 VNNI", "vpdpbusd zmm", 64, ("-mavx512f", "-mavx512bw", "-mavx512vnni"), "immintrin.h",
           "__m512i", "__m512i a = _mm512_set1_epi8((char)s), b = _mm512_set1_epi8((char)(s + 1));",
           "_mm512_set1_epi32(k)", "_mm512_dpbusd_epi32(acc[k], a, b)", "sum += _mm512_reduce_add_epi32(acc[k]);")
SDOT = Dot("Arm dot product", "sdot v.4s, v.16b", 16, ("-march=armv8.2-a+dotprod",), "arm_neon.h",
           "int32x4_t", "int8x16_t a = vdupq_n_s8((int8_t)s), b = vdupq_n_s8((int8_t)(s + 1));",
           "vdupq_n_s32(k)", "vdotq_s32(acc[k], a, b)", "sum += vaddvq_s32(acc[k]);")


def host_dot() -> Dot:
    """The host's dot-product instruction, chosen like relay_passes.fast_kernels.host_dot
    (x86: AVX-512 VNNI; aarch64: sdot), from the CPU flags in /proc/cpuinfo."""
    flags = set()
    for line in _cpuinfo().splitlines():
        if line.split(":")[0].strip() in ("flags", "Features"):
            flags |= set(line.split(":", 1)[1].split())
    machine = platform.machine()
    if machine in ("x86_64", "AMD64") and "avx512_vnni" in flags:
        return VNNI
    if machine in ("aarch64", "arm64") and "asimddp" in flags:
        return SDOT
    raise PeakError(f"no int8 dot-product instruction known on this {machine} CPU (need avx512_vnni or asimddp)")


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def clock_hz() -> float | None:
    """The mean 'cpu MHz' of /proc/cpuinfo (aarch64 has none: cpufreq's maximum, if any)."""
    mhz = [float(line.split(":")[1]) for line in _cpuinfo().splitlines() if line.startswith("cpu MHz")]
    if mhz:
        return sum(mhz) / len(mhz) * 1e6
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) * 1e3
    except (OSError, ValueError):
        return None


def source(dot: Dot) -> str:
    """The microbenchmark: ``./a.out N SEED`` runs N rounds of ACCUMULATORS instructions and
    prints 'instructions seconds checksum'. The operands come from argv, and the checksum of the
    accumulators is printed, so the compiler can neither fold nor drop the loop. Accumulators
    are named variables, not an array: gcc spilled an array's elements to the stack."""
    ks = range(ACCUMULATORS)
    decl = "\n    ".join(f"{dot.vector} acc{k} = {dot.zero.replace('k', str(k))};" for k in ks)
    step = "\n        ".join(f"acc{k} = {dot.step.replace('acc[k]', f'acc{k}')};" for k in ks)
    total = "\n    ".join(dot.lanes_sum.replace("acc[k]", f"acc{k}") for k in ks)
    return f"""#include <{dot.header}>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
int main(int argc, char **argv) {{
    long n = atol(argv[1]);
    int s = atoi(argv[2]);
    {dot.setup}
    {decl}
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < n; i++) {{
        {step}
    }}
    clock_gettime(CLOCK_MONOTONIC, &t1);
    long sum = 0;
    {total}
    double sec = (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
    printf("%ld %.9f %ld\\n", n * {ACCUMULATORS}, sec, sum);
    return 0;
}}
"""


def compile_bench(dot: Dot, folder: Path) -> Path:
    """gcc -O2 the microbenchmark into ``folder``; returns the executable."""
    src, exe = folder / "dot_peak.c", folder / "dot_peak"
    src.write_text(source(dot))
    done = subprocess.run(["gcc", "-O2", *dot.cflags, str(src), "-o", str(exe)], capture_output=True, text=True)
    if done.returncode:
        raise PeakError(f"gcc failed on the {dot.name} microbenchmark: {done.stderr.strip()[:400]}")
    return exe


def _run(exe: Path, rounds: list[int]) -> list[float]:
    """Instructions/s of len(rounds) copies of ``exe`` started together, one per entry."""
    procs = [subprocess.Popen([str(exe), str(n), "1"], stdout=subprocess.PIPE, text=True) for n in rounds]
    rates = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode:
            raise PeakError(f"the microbenchmark exited with {p.returncode}")
        instr, sec, _ = out.split()
        rates.append(int(instr) / float(sec))
    return rates


@dataclass(frozen=True)
class Peak:
    """The measured peak. Rates are instructions/s per core; ``peak_gmacs`` is the best per-core
    rate (one core alone or all at once: on a shared machine the all-core run is held down by
    other jobs, so the faster one is nearer the chip's limit) × MACs × cores."""
    instruction: str
    extension: str
    macs_per_instruction: int
    accumulators: int
    cores: int
    clock_ghz: float | None
    single_core_instr_per_s: float
    all_core_instr_per_s_per_core: float
    single_core_instr_per_cycle: float | None
    all_core_instr_per_cycle: float | None
    single_core_gmacs: float
    peak_gmacs: float

    @property
    def per_core_instr_per_s(self) -> float:
        return max(self.single_core_instr_per_s, self.all_core_instr_per_s_per_core)

    @property
    def best_run(self) -> str:
        return "one core alone" if self.single_core_instr_per_s >= self.all_core_instr_per_s_per_core \
            else f"all {self.cores} cores at once"

    def derivation(self) -> str:
        """One sentence: how peak_gmacs follows from the measurement."""
        per_core = self.per_core_instr_per_s
        other = (f"; all {self.cores} cores at once measured {self.all_core_instr_per_s_per_core / 1e9:.2f} G/s per core"
                 if self.best_run == "one core alone" else
                 f"; one core alone measured {self.single_core_instr_per_s / 1e9:.2f} G/s")
        if not self.clock_ghz:
            return (f"{per_core / 1e9:.2f} G `{self.instruction}`/s per core ({self.best_run}; clock unknown) × "
                    f"{self.macs_per_instruction} MACs × {self.cores} cores = {self.peak_gmacs:.0f} GMAC/s{other}")
        return (f"{per_core / 1e9 / self.clock_ghz:.2f} `{self.instruction}`/cycle (measured {per_core / 1e9:.2f} G/s "
                f"per core, {self.best_run}, ÷ {self.clock_ghz:.2f} GHz from /proc/cpuinfo) × "
                f"{self.macs_per_instruction} MACs/instruction × {self.clock_ghz:.2f} GHz × {self.cores} cores = "
                f"{self.peak_gmacs:.0f} GMAC/s{other}")


def measure(seconds: float = 0.5, repeats: int = 3, cores: int | None = None) -> Peak:
    """Build and run the microbenchmark: each run lasts about ``seconds``; the best of
    ``repeats`` runs on one core and on ``cores`` (default os.cpu_count()) at once."""
    dot = host_dot()
    cores = cores or os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as d:
        exe = compile_bench(dot, Path(d))
        probe = 1 << 16
        t0 = time.perf_counter()
        rate = _run(exe, [probe])[0]
        if time.perf_counter() - t0 > 5:
            raise PeakError("the microbenchmark probe took over 5 s")
        n = max(probe, int(rate * seconds / ACCUMULATORS))
        single = max(_run(exe, [n])[0] for _ in range(repeats))
        every = max(sum(_run(exe, [n] * cores)) / cores for _ in range(repeats))
    clock = clock_hz()
    ipc = (lambda r: r / clock if clock else None)
    return Peak(dot.instruction, dot.name, dot.macs, ACCUMULATORS, cores, clock / 1e9 if clock else None,
                single, every, ipc(single), ipc(every), single * dot.macs / 1e9, max(single, every) * dot.macs * cores / 1e9)


def report(peak: Peak) -> str:
    ipc = (lambda x: f"{x:.2f}" if x is not None else "–")
    return "\n".join([
        f"# Peak int8 MAC rate of this CPU ({platform.processor() or platform.machine()}, {peak.cores} cores)", "",
        f"Microbenchmark: `{peak.instruction}` ({peak.extension}) into {peak.accumulators} independent "
        "accumulators (throughput-bound), gcc -O2, best of the runs; the all-core row runs one copy per core "
        "at once. Clock: mean `cpu MHz` of /proc/cpuinfo.", "",
        "| run | instructions/s per core | clock | instructions/cycle | MACs/instruction | cores | GMAC/s |",
        "|---|---|---|---|---|---|---|",
        f"| one core | {peak.single_core_instr_per_s / 1e9:.2f} G | {_ghz(peak)} | "
        f"{ipc(peak.single_core_instr_per_cycle)} | {peak.macs_per_instruction} | 1 | {peak.single_core_gmacs:.1f} |",
        f"| all cores | {peak.all_core_instr_per_s_per_core / 1e9:.2f} G | {_ghz(peak)} | "
        f"{ipc(peak.all_core_instr_per_cycle)} | {peak.macs_per_instruction} | {peak.cores} | "
        f"{peak.all_core_instr_per_s_per_core * peak.macs_per_instruction * peak.cores / 1e9:.1f} |",
        "", f"Peak: {peak.derivation()}.", ""])


def _ghz(peak: Peak) -> str:
    return f"{peak.clock_ghz:.2f} GHz" if peak.clock_ghz else "unknown"


def write(peak: Peak, results: Path = RESULTS) -> None:
    results.mkdir(exist_ok=True)
    (results / "cpu_peak.json").write_text(json.dumps(asdict(peak), indent=1))
    (results / "cpu_peak.md").write_text(report(peak))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=0.5, help="duration of one run")
    p.add_argument("--repeats", type=int, default=3, help="runs per setting (the best counts)")
    args = p.parse_args(argv)
    peak = measure(args.seconds, args.repeats)
    if not (math.isfinite(peak.peak_gmacs) and peak.peak_gmacs > 0):
        raise PeakError(f"implausible peak {peak.peak_gmacs}")
    write(peak)
    print(report(peak))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
