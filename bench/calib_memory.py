"""Calibration memory: peak RSS of a ResNet-18 / ResNet-50 calibration at 224×224.

Each measurement is a fresh process (so ``ru_maxrss`` is that calibration's peak):
torchvision architecture with random weights (BN statistics randomised so activations
look trained), N random images 3×224×224, ``waps`` W2A4, a few iterations per block
(memory does not depend on the iteration count: the cached activations and one batch's
autograd graph do), batch 32, on the CPU with 2 threads. Peak = a + b·N is fitted per
model through the measured N and extrapolated to the reference 1024 samples; the
results say which numbers are measured and which are extrapolated.

The parent polls the child's /proc status (peak RSS, peak anonymous memory; spill files'
pages are file-backed and reclaimable, calib/spill.py) and the machine's MemAvailable,
and kills the child when MemAvailable falls below ``--floor-gb`` (the row then says
where it stopped): other jobs share this machine. The child logs per block the
frontier's bytes and its peak RSS while the block ran. New rows are merged into the
result files; earlier rows stay, each with the code version it measured.

    python -m bench.calib_memory [--samples 64 256] [--models resnet18 resnet50] [--iters 2]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE_SAMPLES = 1024
LIMIT_GB = 24.0
FLOOR_GB = 2.5  # the watchdog stops a child when the machine's MemAvailable falls below this


def _shorten_range_searches(steps: int) -> None:
    """Fewer candidates in the L2.4 range searches. Memory-neutral: the candidates are
    tried one after another, each with temporaries of the same size (the activation
    search works on a subsample of at most 2M values), so only the time changes; on
    this shared 2-core machine one 100-candidate activation search took 94 s."""
    from calib import quantizers
    quantizers.init_act_range.__defaults__ = (steps,)
    quantizers.init_weight_scale.__defaults__ = (steps,)


def _proc_status(pid: str = "self") -> dict[str, float]:
    """Memory lines of /proc/PID/status in GB (VmRSS, VmHWM, RssAnon, RssFile, RssShmem)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(rest.split()[0]) / 2**20
    return out


def _trace_blocks() -> list[float]:
    """Log to stderr, per block, the frontier's bytes and the process's peak RSS while
    that block ran (VmHWM is reset after each block through /proc/self/clear_refs).
    Returns the list the per-block peaks (GB) are appended to: the reset also resets
    ``ru_maxrss``, so the run's peak is the largest of these and the final ``ru_maxrss``."""
    from calib import calibrate, frontier

    real_reconstruct, real_evaluate, state, peaks = calibrate.reconstruct, frontier.evaluate, {"block": 0}, []

    def gb(values) -> float:
        return round(frontier.nbytes(values) / 2**30, 3)

    def reconstruct(model, block, q_in, fp_in, fp_out, *args, **kwargs):
        state.update(name=block.name, q_in=gb(q_in), fp_in=gb(fp_in), fp_out=gb(fp_out),
                     rss_at_reconstruct=round(_proc_status()["VmRSS"], 3))
        return real_reconstruct(model, block, q_in, fp_in, fp_out, *args, **kwargs)

    def evaluate(model, block, inputs, compact=False, **kwargs):
        out = real_evaluate(model, block, inputs, compact, **kwargs)
        if compact:  # the quantized outputs: the block's last step
            st = _proc_status()
            state["block"] += 1
            peaks.append(st["VmHWM"])
            print(json.dumps({**state, "q_out": gb(out), "peak_rss_in_block": round(st["VmHWM"], 3),
                              "rss_end": round(st["VmRSS"], 3)}), file=sys.stderr, flush=True)
            Path("/proc/self/clear_refs").write_text("5")
        return out

    calibrate.reconstruct, frontier.evaluate = reconstruct, evaluate
    return peaks


def child(arch: str, samples: int, iters: int, search_steps: int = 0) -> dict:
    """One calibration in this process; returns its peak RSS and timings."""
    import torch

    from calib.config import CalibConfig
    from waps_tvm import api
    from waps_tvm.architectures import get_architecture

    torch.set_num_threads(2)
    block_peaks = _trace_blocks()
    if search_steps:
        _shorten_range_searches(search_steps)
    torch.manual_seed(0)
    net = get_architecture(arch).eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 1.5)
            m.running_mean.normal_(0, 0.1)
    x = torch.randn(samples, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    cfg = CalibConfig(wbits=2, abits=4, method="waps", iters=iters, batch=32, samples=samples,
                      device="cpu", progress=False)
    t0 = time.perf_counter()
    result, _ = api.quantize(net, x, cfg, input_shape=(3, 224, 224))
    seconds = time.perf_counter() - t0
    peak = max([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, *block_peaks])
    return {"model": arch, "samples": samples, "iters": iters, "search_steps": search_steps or "default",
            "blocks": len(result.blocks),
            "rss_before_gb": round(before, 3), "peak_rss_gb": round(peak, 3), "seconds": round(seconds, 1),
            "spilled_gb": round(result.spilled / 2**30, 2)}


def mem_available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no MemAvailable in /proc/meminfo")


@dataclass
class Watch:
    """What the parent saw of a child while it ran (polled every ``interval`` s)."""
    peak_rss_gb: float = 0.0     # VmRSS: includes resident pages of spill files (reclaimable)
    peak_anon_gb: float = 0.0    # RssAnon: memory the kernel cannot reclaim without swap
    min_available_gb: float = float("inf")
    stopped_at_gb: float | None = None  # the child's RSS when the watchdog killed it
    timed_out: bool = False              # killed at the time limit


def watch(proc: subprocess.Popen, floor_gb: float, interval: float = 0.5,
          available=mem_available_gb, time_limit_s: float | None = None) -> Watch:
    """Poll until ``proc`` ends; kill it when the machine's MemAvailable falls below
    ``floor_gb``, so a measurement cannot take the machine (and others' jobs) down,
    or when it has run ``time_limit_s``."""
    w, start = Watch(), time.monotonic()
    while proc.poll() is None:
        if time_limit_s is not None and time.monotonic() - start > time_limit_s:
            w.timed_out = True
            proc.kill()
            proc.wait()
            break
        try:
            st = _proc_status(str(proc.pid))
        except (FileNotFoundError, ProcessLookupError):
            break
        w.peak_rss_gb = max(w.peak_rss_gb, st.get("VmRSS", 0.0))
        w.peak_anon_gb = max(w.peak_anon_gb, st.get("RssAnon", 0.0))
        avail = available()
        w.min_available_gb = min(w.min_available_gb, avail)
        if avail < floor_gb:
            w.stopped_at_gb = st.get("VmRSS", 0.0)
            proc.kill()
            proc.wait()
            break
        time.sleep(interval)
    return w


def stopped_row(arch: str, samples: int, iters: int, search_steps: int, why: str, trace: list[dict],
                polled: dict) -> dict:
    """The row of a measurement stopped before it ended: how far it got and its peak so far
    (per-block peaks from the trace, the parent's polled peak for the unfinished block)."""
    where = f"{len(trace)} blocks done, last {trace[-1]['name']}" if trace else "no block done"
    peak = max([t["peak_rss_in_block"] for t in trace] + [polled.get("peak_rss_polled_gb", 0.0)])
    return {"model": arch, "samples": samples, "iters": iters, "search_steps": search_steps or "default",
            "status": f"{why}; {where}", "peak_rss_so_far_gb": round(peak, 3), **polled, "trace": trace}


def measure(arch: str, samples: int, iters: int, search_steps: int = 0, floor_gb: float = FLOOR_GB,
            log: Path | None = None, time_limit_s: float | None = None) -> dict | None:
    """One child calibration under the watchdog; its row (``status`` "stopped" when killed)."""
    cmd = [sys.executable, "-m", "bench.calib_memory", "--child", arch, str(samples), str(iters), str(search_steps)]
    err_path = log or Path(tempfile.mkstemp(prefix="calib_memory-", suffix=".log")[1])
    with open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                                cwd=Path(__file__).resolve().parent.parent)
        w = watch(proc, floor_gb, time_limit_s=time_limit_s)
        out = proc.stdout.read()
    stderr = err_path.read_text()
    if log is None:
        err_path.unlink()
    trace = [json.loads(line) for line in stderr.splitlines() if line.startswith('{"block"')]
    polled = {"peak_rss_polled_gb": round(w.peak_rss_gb, 3), "peak_anon_gb": round(w.peak_anon_gb, 3),
              "min_mem_available_gb": round(w.min_available_gb, 2)}
    if w.stopped_at_gb is not None or w.timed_out:
        why = (f"stopped at {w.stopped_at_gb:.1f} GB: would exceed (MemAvailable < {floor_gb} GB)"
               if w.stopped_at_gb is not None else f"stopped at the time limit ({time_limit_s:.0f} s)")
        row = stopped_row(arch, samples, iters, search_steps, why, trace, polled)
        print(f"{arch} N={samples}: {row['status']}", flush=True)
        return row
    if proc.returncode != 0:
        print(f"{arch} N={samples} failed (exit {proc.returncode}):\n{stderr[-2000:]}", flush=True)
        return None
    row = {**json.loads(out.strip().splitlines()[-1]), "status": "done", **polled, "trace": trace}
    print(f"{arch:9s} N={samples:5d}: peak {row['peak_rss_gb']:.2f} GB, anonymous {row['peak_anon_gb']:.2f} GB "
          f"(before calibrating {row['rss_before_gb']:.2f} GB), {row['seconds']:.0f} s", flush=True)
    return row


def code_version() -> str:
    """The commit measured (``-dirty`` with uncommitted changes)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "calib", "bench", "waps_tvm"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def fit(rows: list[dict]) -> tuple[float, float]:
    """Least-squares (a GB, b GB per sample) of peak = a + b·N."""
    n = [r["samples"] for r in rows]
    y = [r["peak_rss_gb"] for r in rows]
    mn, my = sum(n) / len(n), sum(y) / len(y)
    var = sum((v - mn) ** 2 for v in n)
    b = sum((v - mn) * (w - my) for v, w in zip(n, y)) / var if var else 0.0
    return my - b * mn, b


def merge(old: list[dict], new: list[dict]) -> list[dict]:
    """Every earlier row kept (with the code it measured); a new row replaces only an
    earlier one of the same model, N and code version."""
    same = {(r["model"], r["samples"], r.get("code")) for r in new}
    return [r for r in old if (r["model"], r["samples"], r.get("code")) not in same] + new


def write(rows: list[dict], args, results: Path = RESULTS) -> Path:
    """Merge ``rows`` into the result files (older rows stay), with per model and code
    version with two or more N a linear fit."""
    results.mkdir(exist_ok=True)
    stem = f"calib_memory{args.tag}"
    path = results / f"{stem}.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    rows = merge(doc.get("rows", []), rows)
    fits = {}
    for arch, code in dict.fromkeys((r["model"], r.get("code")) for r in rows):
        mine = sorted((r for r in rows if r["model"] == arch and r.get("code") == code
                       and r.get("status", "done") == "done"), key=lambda r: r["samples"])
        if len({r["samples"] for r in mine}) < 2:
            continue
        a, b = fit(mine)
        fits[f"{arch} @ {code}"] = {"base_gb": round(a, 3), "mb_per_sample": round(b * 1024, 2),
                                    "extrapolated_peak_gb_at_1024": round(a + b * REFERENCE_SAMPLES, 2),
                                    "measured_at": [r["samples"] for r in mine]}
    doc.update(rows=rows, fit=fits, limit_gb=LIMIT_GB)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    md = ["# Calibration peak memory (ResNet at 224×224, CPU)", "",
          "`python -m bench.calib_memory --runs ARCH:N ... --iters 2 --search-steps 4`: one fresh process per "
          "row, random weights and images, waps W2A4, batch 32, 2 threads; range searches shortened "
          "(memory-neutral, see `_shorten_range_searches`), so seconds are not calibration times. "
          "2-core machine shared with other engineers' jobs: seconds are noisy, memory is not.", "",
          "Peak RSS is the child's `getrusage` high-water mark; it counts resident pages of the spill files "
          "(calib/spill.py), which the kernel can write back and drop. Peak anonymous is the highest `RssAnon` "
          "the parent saw polling every 0.5 s (memory that cannot be reclaimed without swap). A watchdog stops a "
          f"child when the machine's MemAvailable falls below {FLOOR_GB} GB.", "",
          "| model | N | peak RSS (GB) | peak anonymous (GB) | RSS before calibrating (GB) | seconds | code | status |",
          "|---|---:|---:|---:|---:|---:|---|---|"]

    def cell(r, k, fmt="{:.2f}"):
        return fmt.format(r[k]) if isinstance(r.get(k), (int, float)) else "–"

    def peak(r):
        if "peak_rss_so_far_gb" in r and "peak_rss_gb" not in r:
            return f"≥ {r['peak_rss_so_far_gb']:.2f} (so far)"
        return cell(r, "peak_rss_gb")

    md += [f"| {r['model']} | {r['samples']} | {peak(r)} | {cell(r, 'peak_anon_gb')} | "
           f"{cell(r, 'rss_before_gb')} | {cell(r, 'seconds', '{:.0f}')} | {r.get('code', '?')} | "
           f"{r.get('status', 'done')} |" for r in rows]
    if fits:
        md += ["", f"Linear fit peak = a + b·N per model and code through its measured rows, **extrapolated** "
               f"(not measured) to {REFERENCE_SAMPLES} samples:", "",
               "| model @ code | a (GB) | b (MB/sample) | peak at 1024 (GB, extrapolated) | under 24 GB |",
               "|---|---:|---:|---:|---|"]
        md += [f"| {k} | {f['base_gb']:.2f} | {f['mb_per_sample']:.2f} | {f['extrapolated_peak_gb_at_1024']:.1f} | "
               f"{'yes' if f['extrapolated_peak_gb_at_1024'] < LIMIT_GB else 'no'} |" for k, f in fits.items()]
    traced = [r for r in rows if r.get("trace")]
    for r in traced:
        md += ["", f"Per block, {r['model']} N={r['samples']} ({r.get('code')}): frontier GB (quantized in as codes, "
               "float in, float out, quantized out) and the process's peak RSS while the block ran:", "",
               "| block | q in | fp in | fp out | q out | peak RSS in block (GB) |", "|---|---:|---:|---:|---:|---:|"]
        md += [f"| {t['block']} {t['name']} | {t['q_in']:.2f} | {t['fp_in']:.2f} | {t['fp_out']:.2f} | "
               f"{t['q_out']:.2f} | {t['peak_rss_in_block']:.2f} |" for t in r["trace"]]
    if doc.get("note"):
        md += ["", doc["note"]]
    (results / f"{stem}.md").write_text("\n".join(md) + "\n")
    return results / f"{stem}.md"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=4, metavar=("ARCH", "N", "ITERS", "STEPS"), help=argparse.SUPPRESS)
    ap.add_argument("--samples", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--runs", nargs="+", metavar="ARCH:N", help="measure these pairs instead of models × samples")
    ap.add_argument("--search-steps", type=int, default=0,
                    help="candidates per L2.4 range search (default: calibration's own; fewer is faster "
                         "and does not change peak memory)")
    ap.add_argument("--jobs", type=int, default=1, help="measurements run side by side (each its own process)")
    ap.add_argument("--floor-gb", type=float, default=FLOOR_GB,
                    help="stop a measurement when the machine's MemAvailable falls below this")
    ap.add_argument("--time-limit", type=float, default=None, metavar="S",
                    help="stop a measurement after S seconds, recording how far it got and its peak so far")
    ap.add_argument("--tag", default="", help="suffix of the result files (e.g. to keep a baseline)")
    args = ap.parse_args()
    if args.child:
        arch, n, iters, steps = args.child
        print(json.dumps(child(arch, int(n), int(iters), int(steps))))
        return
    from concurrent.futures import ThreadPoolExecutor, as_completed
    rows = []
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = ([(r.split(":")[0], int(r.split(":")[1])) for r in args.runs] if args.runs
                else [(arch, n) for arch in args.models for n in args.samples])
        jobs = [pool.submit(measure, arch, n, args.iters, args.search_steps, args.floor_gb, None,
                            args.time_limit) for arch, n in runs]
        path, code = None, code_version()
        for job in as_completed(jobs):
            if job.result() is not None:
                rows.append({**job.result(), "code": code})
                path = write(rows, args)  # after every row: a long run keeps what it measured
    print(f"wrote {path} and .json")


if __name__ == "__main__":
    main()
