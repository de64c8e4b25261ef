"""CPU latency against ONNX Runtime int8, like for like, and against the CPU's peak (batch 1, llvm).

For each model, side by side in one run:
  * PyTorch fp32 eager; ONNX Runtime fp32 and int8 (static QDQ of the same float model with
    onnxruntime.quantization: uint8 activations, int8 per-channel weights, MinMax on the
    calibration images, i.e. W8A8; all cores);
  * waps-tvm's integer model in the ``fast`` form (the untuned default schedules: VNNI where
    the CPU has it, all cores) at each of --precisions (default W8A8 W4A4 W2A4), with WAPS
    groups. The first precision is the headline: W8A8 against ORT's W8A8. At that precision
    also the same artifact without groups (``groups`` = the cost of WAPS on this CPU) and, for
    the small models, the ``split`` form (TVM's unscheduled default);
  * with --tune-trials N, each precision's build tuned by ``waps-tvm tune`` (meta-schedule,
    XGBoost; records cached in bench/.cache/tune-<model>-<precision>); default 0: not tuned.
Throughput: the compiled program's integer MACs ÷ latency, against the peak of the CPU's
dot-product instruction measured first by bench/cpu_peak.py (also written to cpu_peak.*).
Models: the benchmark models (bench.cpu.artifact_for at each precision, --iters/--samples;
RTN by default) and torchvision ResNet-18 and MobileNetV2 at 224×224 (random weights,
RTN-calibrated per precision and cached in bench/.cache: latency only). Where calibration
assigned no WAPS groups, every layer gets the default group scales on random groups of whole
16-channel tiles, which is what calibration produces structurally. Writes
bench/results/cpu_ort.json, cpu_ort.md and cpu_ort.png.

    python -m bench.cpu_ort [--models ...] [--precisions W8A8 W4A4 W2A4] [--repeat 100] [--rounds 10]
                            [--tune-trials 0] [--iters 0] [--samples 512]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from calib.errors import ConfigError

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(__file__).resolve().parent / ".cache"
BENCH = ("fashion_resnet", "fashion_mobilenetv2")
TORCHVISION = ("resnet18", "mobilenet_v2")
PAUSE_S = 1.0       # between timing blocks: the previous engine's spinning threads (TVM's, ORT's, OpenMP's) go idle


@dataclass(frozen=True)
class Calibration:
    """How the 28×28 benchmark models' artifacts are calibrated (bench.cpu.artifact_for:
    BRECQ+WAPS, seed 0): latency depends on the bit widths only, not on how well the
    rounding was learned, so fewer iterations than the accuracy table's 300 suffice here."""
    iters: int = 0
    samples: int = 512

    def label(self) -> str:
        return (f"RTN ({self.samples} samples)" if self.iters == 0 else
                f"BRECQ+WAPS, {self.iters} iterations × {self.samples} samples")


def bits(precision: str) -> tuple[int, int]:
    """(weight bits, activation bits) of 'W8A8' and the like (bench.cpu.CONFIGS)."""
    from bench.cpu import CONFIGS
    if precision not in CONFIGS:
        raise ConfigError(f"precision {precision!r}: one of {', '.join(CONFIGS)}")
    return CONFIGS[precision]


def float_model(name: str):
    """(float nn.Module, calibration images [N, C, H, W])."""
    if name in TORCHVISION:
        import torchvision
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None).eval()
        return model, torch.randn(8, 3, 224, 224)
    from bench.accuracy import MODELS, load_model
    from waps_tvm.datasets import load_dataset
    x = load_dataset(MODELS[name], "calib", n=64, seed=1, input_shape=(1, 28, 28)).x
    return load_model(name).eval(), x


def artifact(name: str, precision: str, calib: Calibration):
    """The .waps artifact of ``name`` at ``precision``, with WAPS groups. Torchvision models:
    RTN-calibrated at 224×224 on 4 random images (cached per precision in bench/.cache), then
    default group scales on random tile-granular groups; benchmark models: bench.cpu.artifact_for,
    given the same random groups where calibration left a layer without any."""
    from calib import artifact as waps_artifact
    from tests.compile_helpers import calibrated, scramble_groups
    wbits, abits = bits(precision)
    if name in TORCHVISION:
        cached = CACHE / f"{name}_224_rtn_s4_{precision}.waps"       # calibrating at 224×224 takes minutes
        if cached.exists():
            art = waps_artifact.load(cached)
        else:
            model, _ = float_model(name)
            art = calibrated(model, (3, 224, 224), wbits=wbits, abits=abits, iters=0, samples=4)
            CACHE.mkdir(exist_ok=True)
            waps_artifact.save(art, cached)
        return scramble_groups(with_groups(art), seed=0, tile=16)
    from bench.cpu import artifact_for
    CACHE.mkdir(exist_ok=True)
    art = artifact_for(name, precision, calib.iters, calib.samples)
    if all(rec.groups is None for rec in art.layers.values()):     # RTN (iters 0) assigns no groups
        art = scramble_groups(with_groups(art), seed=0, tile=16)
    return art


def with_groups(art):
    """Give every ungrouped, non-depthwise conv/linear the default WAPS group scales
    (γ = 1, 1 − 2^−4, 1 + 2^−4) over its input channels (scramble_groups then assigns the
    channels, tile by tile): the structure calibration produces, for a latency-only model."""
    from calib.numerics import GroupScale
    art = copy.deepcopy(art)
    for rec in art.layers.values():
        fan_in = rec.w_codes.shape[1]
        if rec.groups is None and fan_in >= 32:
            rec.unit_size = 1
            rec.groups = np.zeros(fan_in, np.int8)
            rec.group_scales = [GroupScale(0, 0), GroupScale(-1, 4), GroupScale(1, 4)]
    return art


def ort_sessions(model, x_calib: torch.Tensor, folder: Path):
    import onnxruntime as ort
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process
    fp32, pre, int8 = folder / "m.onnx", folder / "m.pre.onnx", folder / "m.int8.onnx"
    torch.onnx.export(model, (x_calib[:1],), str(fp32), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"])
    quant_pre_process(str(fp32), str(pre))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": x_calib[i:i + 1].numpy()} for i in range(len(x_calib))])

        def get_next(self):
            return next(self.it, None)
    quantize_static(str(pre), str(int8), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, per_channel=True, calibrate_method=CalibrationMethod.MinMax)
    so = ort.SessionOptions()
    so.intra_op_num_threads = os.cpu_count()
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return (ort.InferenceSession(str(fp32), so, providers=["CPUExecutionProvider"]),
            ort.InferenceSession(str(int8), so, providers=["CPUExecutionProvider"]))


def tvm_call(art, form: str, x: np.ndarray, records=None) -> tuple[object, dict]:
    """(a call of the compiled model on ``x``, its facts: gathers, WAPS layers, MACs, bit-exact);
    ``records`` (waps_tvm.tuning.load_records) builds each fast kernel from its best record."""
    import contextlib

    import tvm

    from relay_passes import fast_kernels, reference
    from waps_tvm.compiler import build, lower_artifact
    from waps_tvm.report import program_macs
    with fast_kernels.tuned(*records) if records else contextlib.nullcontext():
        low = lower_artifact(art, 1, form)
    vm = tvm.runtime.vm.VirtualMachine(build(low), tvm.cpu())
    xt = tvm.runtime.tensor(x)
    codes = vm["main"](xt)[1].numpy()
    exact = bool(np.array_equal(codes, reference.run(low.program, x)[1]))
    info = {"gathers": low.permute.gathers, "waps_layers": low.legalize.legalized, "macs": program_macs(low.program),
            "bit_exact": exact}
    return (lambda: vm["main"](xt)), info


def tuning_records(name: str, precision: str, art, trials: int):
    """(database, target) of ``trials`` meta-schedule trials for this model's WAPS build at
    ``precision``, kept in bench/.cache/tune-<name>-<precision> and reused by later runs (tuned again when they hold fewer
    trials, from scratch when the kernels have changed since)."""
    import shutil

    from calib.errors import ConfigError
    from waps_tvm.tuning import INFO, load_records, tune
    import hashlib

    from relay_passes import fast_kernels
    from waps_tvm import tuning
    work = CACHE / f"tune-{name}-{precision}"
    # the default schedules are records too: records from an older fast_kernels.py would bring
    # its defaults back, so the cache is keyed by that file (and by the tuner's)
    version = hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in (fast_kernels, tuning))).hexdigest()[:16]
    done = json.loads((work / INFO).read_text()).get("trials", 0) if (work / INFO).exists() else -1
    if done >= 0:
        try:
            load_records(work, art, 1, "llvm")
            if (work / "schedules.version").read_text() != version:
                raise ConfigError("older default schedules")
        except (ConfigError, OSError):           # records of older kernels: tune afresh
            shutil.rmtree(work)
            done = -1
    if done < trials:
        s = tune(art, "llvm", trials - max(done, 0), work, progress=False)
        (work / "schedules.version").write_text(version)
        print(f"{name} {precision}: tuned {s['kernels']} kernels, {s['trials']} trials in {s['seconds']:.0f} s "
              f"({s['improved']} improved)", flush=True)
    return load_records(work, art, 1, "llvm")


@dataclass(frozen=True)
class Plan:
    """What the TVM engine builds: the fast form at each of ``precisions`` (the first is the
    headline, compared without groups and, for the small models, in split form too), tuned with
    ``trials`` meta-schedule trials per precision (0: not)."""
    precisions: tuple[str, ...]
    trials: int
    calib: Calibration

    @property
    def headline(self) -> str:
        return self.precisions[0]


def reference_calls(name: str) -> tuple[dict, dict]:
    """PyTorch fp32 and ONNX Runtime fp32/int8 calls of one model (in the reference engine
    process)."""
    torch.set_num_threads(os.cpu_count())
    model, x_calib = float_model(name)
    x = x_calib[:1].numpy()
    xt = torch.from_numpy(x)
    with tempfile.TemporaryDirectory() as d:
        s32, s8 = ort_sessions(model, x_calib, Path(d))

    def pytorch():
        with torch.no_grad():
            model(xt)
    calls = {"pytorch_fp32_ms": pytorch,
             "ort_fp32_ms": lambda: s32.run(None, {"input": x}),
             "ort_int8_ms": lambda: s8.run(None, {"input": x})}
    return calls, {"input": list(x.shape)}


def tvm_calls(name: str, plan: Plan) -> tuple[dict, dict]:
    """The TVM builds of one model (in the TVM engine process), keyed ``tvm_<build>_<precision>_ms``:
    ``fast`` at every precision, ``tuned`` too when plan.trials, and at the headline precision
    ``nogroups`` (the same artifact without groups) and, for the small models, ``split``."""
    from bench.cpu import without_groups
    from relay_passes.fast_kernels import host_dot
    from waps_tvm.runner import use_all_cores
    use_all_cores()                              # before TVM's thread pool exists
    _, x_calib = float_model(name)
    x = x_calib[:1].numpy()
    calls, builds = {}, {}
    for p in plan.precisions:
        art = artifact(name, p, plan.calib)
        calls[f"tvm_fast_{p}_ms"], info = tvm_call(art, "fast", x)
        facts = {"bit_exact": {"fast": info.pop("bit_exact")}, **info}
        if p == plan.headline:
            calls[f"tvm_nogroups_{p}_ms"], ng = tvm_call(without_groups(art), "fast", x)
            facts["bit_exact"]["nogroups"] = ng["bit_exact"]
            if name not in TORCHVISION:              # TVM's unscheduled default: seconds at 224×224
                calls[f"tvm_split_{p}_ms"], sp = tvm_call(art, "split", x)
                facts["bit_exact"]["split"] = sp["bit_exact"]
        if plan.trials:
            calls[f"tvm_tuned_{p}_ms"], tu = tvm_call(art, "fast", x, tuning_records(name, p, art, plan.trials))
            facts["bit_exact"]["tuned"] = tu["bit_exact"]
        builds[p] = facts
    return calls, {"dot": host_dot(), "builds": builds}


WARMUP_S = 0.05     # before each timing block: caches refilled, threads awake, clocks up


def _engine(kind: str, name: str, plan: Plan, conn) -> None:
    """An engine process: builds its calls, reports ready with its facts, then times
    (key, n) requests, answering the median ms of n calls after WARMUP_S of warm-up calls
    (at least two). Two calls were not enough after an engine's idle turn: FashionResNet
    then measured 0.142 ms against 0.068 ms alone."""
    from bench.cpu import _time as median_ms
    calls, info = reference_calls(name) if kind == "reference" else tvm_calls(name, plan)
    conn.send((list(calls), info))
    while (msg := conn.recv()) is not None:
        key, n = msg
        t0, k = time.perf_counter(), 0
        while k < 2 or time.perf_counter() - t0 < WARMUP_S:
            calls[key]()
            k += 1
        conn.send(median_ms(calls[key], n, warmup=0))


def measure(name: str, repeat: int, rounds: int, plan: Plan, peak_gmacs: float) -> dict:
    """One model's row, timed in two engine processes — PyTorch and ONNX Runtime in one, TVM in
    the other, so that no engine's thread pool or CPU pinning reaches another's — that take
    turns: ``rounds`` blocks of ``repeat // rounds`` calls for every engine, each after a
    PAUSE_S pause in which the previous engine's spinning threads go idle (with 20 ms, ORT int8
    measured 1.8 ms on MobileNetV2 against 0.94 ms alone). A machine that speeds up or slows
    down meanwhile moves all engines alike; each figure is the median of its blocks.

    Per precision p, ``builds[p]`` holds the ms of each build, ``vs_ort_int8`` (fast ms ÷ ORT
    int8 ms), ``gmacs`` (the program's integer MACs ÷ fast ms) and ``pct_of_peak`` (of
    ``peak_gmacs``)."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    engines, keys, row = [], [], {"model": name}
    try:
        for kind in ("reference", "tvm"):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_engine, args=(kind, name, plan, child), daemon=True)
            proc.start()
            engines.append((proc, parent))
            names, info = parent.recv()
            row.update(info)
            keys += [(parent, k) for k in names]
        samples: dict = {k: [] for _, k in keys}
        per = max(1, repeat // rounds)
        for r in range(rounds):
            for conn, key in keys:
                split = key.startswith("tvm_split_")
                if split and r:                      # seconds per call: one block
                    continue
                time.sleep(PAUSE_S)
                conn.send((key, max(5, per // 2) if split else per))
                samples[key].append(conn.recv())
    finally:
        for proc, conn in engines:
            if proc.is_alive():
                conn.send(None)
                proc.join(30)
    ms = {k: float(np.median(v)) for k, v in samples.items()}
    row.update({k: ms[k] for k in ("pytorch_fp32_ms", "ort_fp32_ms", "ort_int8_ms")})
    for p, b in row["builds"].items():
        for build in ("fast", "nogroups", "split", "tuned"):
            if f"tvm_{build}_{p}_ms" in ms:
                b[f"{build}_ms"] = ms[f"tvm_{build}_{p}_ms"]
        b["vs_ort_int8"] = b["fast_ms"] / row["ort_int8_ms"]
        b["gmacs"] = b["macs"] / (b["fast_ms"] * 1e-3) / 1e9
        b["pct_of_peak"] = 100 * b["gmacs"] / peak_gmacs
        if "tuned_ms" in b:
            b["tuned_vs_ort_int8"] = b["tuned_ms"] / row["ort_int8_ms"]
        if "nogroups_ms" in b:
            b["groups_cost_pct"] = 100 * (b["fast_ms"] / b["nogroups_ms"] - 1)
    head = row["builds"][plan.headline]
    row["headline"] = plan.headline
    row["ort_int8_gmacs"] = head["macs"] / (row["ort_int8_ms"] * 1e-3) / 1e9
    row["ort_int8_pct_of_peak"] = 100 * row["ort_int8_gmacs"] / peak_gmacs
    return row


def _exact(r: dict) -> str:
    """'yes (7 builds)' or the builds that differ from the NumPy reference."""
    flags = {f"{p} {b}": ok for p, facts in r["builds"].items() for b, ok in facts["bit_exact"].items()}
    bad = [k for k, ok in flags.items() if not ok]
    return f"yes ({len(flags)} builds)" if not bad else "NO: " + ", ".join(bad)


def report(rows: list[dict], meta: dict) -> str:
    ps, head = meta["precisions"], meta["headline"]
    low = [p for p in ps if p != head]
    tuned = meta["tune_trials"] > 0
    peak = meta["peak"]
    lines = [f"# CPU latency against ONNX Runtime int8 ({meta['machine']}, batch 1)", "",
             f"Median ms over {meta['repeat']} runs, PyTorch/ORT and TVM in two processes that take turns in "
             f"{meta['rounds']} blocks; TVM `fast` form = untuned default schedules (inner product: "
             f"{rows[0]['dot'] if rows else '?'}), {meta['tvm_threads']} threads; ORT {meta['onnxruntime']} with "
             f"{meta['ort_threads']} intra-op threads, static QDQ int8 = W8A8 (uint8 activations, per-channel int8 "
             f"weights). Like for like: **{head}/ORT int8** is waps-tvm's {head} build against ORT's {head}; "
             f"{', '.join(low)} are waps-tvm's lower-precision builds against the same ORT int8 (< 1: waps-tvm "
             f"faster). `groups` is the WAPS-group cost of the {head} build against the same integer model without "
             f"groups. Calibration (latency depends on the bit widths only): torchvision models "
             f"{meta['calibration']['torchvision']}; 28×28 models {meta['calibration']['bench']}. "
             + (f"Tuned: `waps-tvm tune`, {meta['tune_trials']} trials per model and precision." if tuned else
                "Tuned builds: not measured (`--tune-trials 0`, the default: tuning every precision of every model "
                "takes too long on this machine)."), "",
             "| model | input | PyTorch fp32 | ORT fp32 | ORT int8 (W8A8) | "
             f"TVM split {head} (unscheduled) | TVM fast {head}, no groups | TVM fast {head}, WAPS | "
             f"**{head}/ORT int8** | groups ({head}) | "
             + "".join(f"TVM fast {p}, WAPS | {p}/ORT int8 | " for p in low)
             + "".join(f"TVM tuned {p} | tuned {p}/ORT int8 | " for p in ps if tuned) + "bit-exact |"]
    ncol = lines[-1].count("|") - 1
    lines.append("|---" * ncol + "|")
    for r in rows:
        b = r["builds"]
        h = b[head]
        cells = [r["model"], "×".join(map(str, r["input"][1:])), f"{r['pytorch_fp32_ms']:.3f}",
                 f"{r['ort_fp32_ms']:.3f}", f"{r['ort_int8_ms']:.3f}",
                 f"{h['split_ms']:.3f}" if "split_ms" in h else "–", f"{h['nogroups_ms']:.3f}",
                 f"{h['fast_ms']:.3f}", f"**{h['vs_ort_int8']:.2f}×**", f"{h['groups_cost_pct']:+.1f} %"]
        for p in low:
            cells += [f"{b[p]['fast_ms']:.3f}", f"{b[p]['vs_ort_int8']:.2f}×"]
        for p in ps if tuned else ():
            cells += [f"{b[p]['tuned_ms']:.3f}", f"{b[p]['tuned_vs_ort_int8']:.2f}×"]
        lines.append("| " + " | ".join(cells + [_exact(r)]) + " |")
    lines += ["", f"## Throughput against the CPU's peak", "",
              f"Integer MACs of the compiled program (conv/linear layers, as `waps-tvm report` counts them) ÷ "
              f"latency. Peak ({peak['instruction']}, measured by `bench/cpu_peak.py`): "
              f"{_peak_sentence(peak)}. Every build runs on that instruction: the 2- and 4-bit codes are held in "
              "int8 lanes, so fewer bits do not raise the peak. ORT int8's rate uses the same MAC count.", "",
              "| model | MACs | ORT int8 (W8A8) GMAC/s | % of peak | "
              + " | ".join(f"TVM fast {p} GMAC/s | % of peak" for p in ps) + " |",
              "|---" * (4 + 2 * len(ps)) + "|"]
    for r in rows:
        b = r["builds"]
        cells = [r["model"], f"{b[head]['macs'] / 1e6:.1f} M", f"{r['ort_int8_gmacs']:.1f}",
                 f"{r['ort_int8_pct_of_peak']:.1f} %"]
        for p in ps:
            cells += [f"{b[p]['gmacs']:.1f}", f"{b[p]['pct_of_peak']:.1f} %"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n![latency](cpu_ort.png)\n"


def _peak_sentence(peak: dict) -> str:
    from bench.cpu_peak import Peak
    return Peak(**peak).derivation()


def plot(rows: list[dict], meta: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    bars = [("PyTorch fp32", lambda r: r["pytorch_fp32_ms"]), ("ORT fp32", lambda r: r["ort_fp32_ms"]),
            ("ORT int8 (W8A8)", lambda r: r["ort_int8_ms"])]
    bars += [(f"TVM fast {p}, WAPS", lambda r, p=p: r["builds"][p]["fast_ms"]) for p in meta["precisions"]]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    width = 0.8 / len(bars)
    for k, (label, get) in enumerate(bars):
        ax.bar([i + k * width for i in range(len(rows))], [get(r) for r in rows], width, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], [r["model"] for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("ms per image (log)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(results: Path) -> int:
    """Rewrite the tables and plot from cpu_ort.json: the peak follows bench/cpu_peak.Peak from
    its stored instruction rates, and every % of peak from the stored GMAC/s."""
    from bench import cpu_peak
    data = json.loads((results / "cpu_ort.json").read_text())
    meta, rows = data["meta"], data["rows"]
    stored = dict(meta["peak"])
    best = max(stored["single_core_instr_per_s"], stored["all_core_instr_per_s_per_core"])
    stored["peak_gmacs"] = best * stored["macs_per_instruction"] * stored["cores"] / 1e9
    peak = cpu_peak.Peak(**stored)
    meta["peak"] = asdict(peak)
    for r in rows:
        r["ort_int8_pct_of_peak"] = 100 * r["ort_int8_gmacs"] / peak.peak_gmacs
        for b in r["builds"].values():
            b["pct_of_peak"] = 100 * b["gmacs"] / peak.peak_gmacs
    (results / "cpu_ort.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (results / "cpu_ort.md").write_text(report(rows, meta))
    plot(rows, meta, results / "cpu_ort.png")
    cpu_peak.write(peak, results)
    return 0


def main(argv=None) -> int:
    from bench import cpu_peak
    from bench.cpu import CONFIGS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=[*TORCHVISION, *BENCH], choices=[*TORCHVISION, *BENCH])
    p.add_argument("--precisions", nargs="+", default=["W8A8", "W4A4", "W2A4"], choices=list(CONFIGS),
                   help="builds per model; the first is the headline, compared with ORT int8 like for like")
    p.add_argument("--repeat", type=int, default=100)
    p.add_argument("--rounds", type=int, default=10, help="alternating timing blocks per model")
    p.add_argument("--tune-trials", type=int, default=0,
                   help="meta-schedule trials per model and precision for the tuned columns (0: none; records "
                        "are cached)")
    p.add_argument("--iters", type=int, default=Calibration.iters,
                   help="calibration iterations of the 28×28 models (0: RTN; latency does not depend on it)")
    p.add_argument("--samples", type=int, default=Calibration.samples)
    p.add_argument("--render", action="store_true",
                   help="measure nothing: rewrite cpu_ort.md/png and cpu_peak.* from cpu_ort.json (the peak and "
                        "each %% of peak recomputed from the stored rates by the current rule)")
    args = p.parse_args(argv)
    if args.render:
        return render(RESULTS)
    import onnxruntime
    import tvm
    plan = Plan(tuple(args.precisions), args.tune_trials, Calibration(args.iters, args.samples))
    peak = cpu_peak.measure()                # before the engines: an idle machine, all cores
    cpu_peak.write(peak, RESULTS)
    print(cpu_peak.report(peak), flush=True)
    rows = []
    for name in args.models:
        rows.append(measure(name, args.repeat, args.rounds, plan, peak.peak_gmacs))
        print(json.dumps(rows[-1]), flush=True)
    meta = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                       f"{tvm.target.codegen.llvm_get_system_cpu()}",
            "repeat": args.repeat, "onnxruntime": onnxruntime.__version__, "ort_threads": os.cpu_count(),
            "tvm_threads": len(os.sched_getaffinity(0)), "rounds": args.rounds,
            "precisions": list(plan.precisions), "headline": plan.headline, "tune_trials": plan.trials,
            "calibration": {"torchvision": "RTN on 4 random images, random tile-granular WAPS groups",
                            "bench": plan.calib.label()},
            "peak": asdict(peak)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cpu_ort.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (RESULTS / "cpu_ort.md").write_text(report(rows, meta))
    plot(rows, meta, RESULTS / "cpu_ort.png")
    print(report(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
