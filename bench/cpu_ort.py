"""CPU latency against ONNX Runtime int8 and PyTorch fp32, one run, ratios (batch 1, llvm).

For each model, side by side in one process:
  * PyTorch fp32 eager; ONNX Runtime fp32 and int8 (static QDQ of the same float model with
    onnxruntime.quantization: uint8 activations, int8 per-channel weights, MinMax on the
    calibration images; 2 intra-op threads);
  * waps-tvm's integer model in the ``fast`` form (the untuned default schedules: VNNI where
    the CPU has it, all cores), with WAPS groups and with the groups removed (same artifact),
    so ``groups/no-groups`` is the cost of WAPS on this CPU;
  * the WAPS build tuned by ``waps-tvm tune`` (meta-schedule, XGBoost; --tune-trials, records
    cached in bench/.cache/tune-<model>);
  * for the small benchmark models also the ``split`` form (TVM's unscheduled default).
Models: the benchmark models (calibrated artifacts from bench/.cache, like bench/cpu.py) and
torchvision ResNet-18 and MobileNetV2 at 224×224 (random weights: latency only; the integer
model gets WAPS groups of whole 16-channel tiles at random, which is what calibration
produces structurally). Writes bench/results/cpu_ort.json, cpu_ort.md and cpu_ort.png.

    python -m bench.cpu_ort [--models ...] [--repeat 100] [--rounds 10] [--tune-trials 64]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(__file__).resolve().parent / ".cache"
BENCH = ("fashion_resnet", "fashion_mobilenetv2")
TORCHVISION = ("resnet18", "mobilenet_v2")
PAUSE_S = 1.0       # between timing blocks: the previous engine's spinning threads (TVM's, ORT's, OpenMP's) go idle


def model_and_artifact(name: str):
    """(float nn.Module, calibration images [N, C, H, W], .waps artifact)."""
    from calib import artifact
    from tests.compile_helpers import calibrated, scramble_groups
    if name in TORCHVISION:
        import torchvision
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None).eval()
        x = torch.randn(8, 3, 224, 224)
        cached = CACHE / f"{name}_224_rtn_s4.waps"       # calibrating at 224×224 takes minutes
        if cached.exists():
            art = artifact.load(cached)
        else:
            art = calibrated(model, (3, 224, 224), iters=0, samples=4)
            CACHE.mkdir(exist_ok=True)
            artifact.save(art, cached)
        return model, x, scramble_groups(with_groups(art), seed=0, tile=16)
    from bench.accuracy import MODELS, load_model
    from bench.cpu import artifact_for
    from waps_tvm.datasets import load_dataset
    art = artifact_for(name, "W4A4", 300, 512)
    x = load_dataset(MODELS[name], "calib", n=64, seed=1, input_shape=(1, 28, 28)).x
    return load_model(name).eval(), x, art


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
    """(a call of the compiled model on ``x``, its facts: gathers, WAPS layers, bit-exact);
    ``records`` (waps_tvm.tuning.load_records) builds each fast kernel from its best record."""
    import contextlib

    import tvm

    from relay_passes import fast_kernels, reference
    from waps_tvm.compiler import build, lower_artifact
    with fast_kernels.tuned(*records) if records else contextlib.nullcontext():
        low = lower_artifact(art, 1, form)
    vm = tvm.runtime.vm.VirtualMachine(build(low), tvm.cpu())
    xt = tvm.runtime.tensor(x)
    codes = vm["main"](xt)[1].numpy()
    exact = bool(np.array_equal(codes, reference.run(low.program, x)[1]))
    info = {"gathers": low.permute.gathers, "waps_layers": low.legalize.legalized, "bit_exact": exact}
    return (lambda: vm["main"](xt)), info


def tuning_records(name: str, art, trials: int):
    """(database, target) of ``trials`` meta-schedule trials for this model's WAPS build, kept
    in bench/.cache/tune-<name> and reused by later runs (tuned again when they hold fewer
    trials, from scratch when the kernels have changed since)."""
    import shutil

    from calib.errors import ConfigError
    from waps_tvm.tuning import INFO, load_records, tune
    import hashlib

    from relay_passes import fast_kernels
    from waps_tvm import tuning
    work = CACHE / f"tune-{name}"
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
        print(f"{name}: tuned {s['kernels']} kernels, {s['trials']} trials in {s['seconds']:.0f} s "
              f"({s['improved']} improved)", flush=True)
    return load_records(work, art, 1, "llvm")


def reference_calls(name: str) -> tuple[dict, dict]:
    """PyTorch fp32 and ONNX Runtime fp32/int8 calls of one model (in the reference engine
    process)."""
    torch.set_num_threads(os.cpu_count())
    model, x_calib, _ = model_and_artifact(name)
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


def tvm_calls(name: str, trials: int) -> tuple[dict, dict]:
    """The TVM builds of one model (in the TVM engine process): the fast form with WAPS groups,
    without them, tuned with ``trials`` (0: not), and for the small models the split form."""
    from bench.cpu import without_groups
    from relay_passes.fast_kernels import host_dot
    from waps_tvm.runner import use_all_cores
    use_all_cores()                              # before TVM's thread pool exists
    _, x_calib, art = model_and_artifact(name)
    x = x_calib[:1].numpy()
    calls = {}
    calls["tvm_fast_ms"], info = tvm_call(art, "fast", x)
    info["dot"] = host_dot()
    calls["tvm_fast_nogroups_ms"], _ = tvm_call(without_groups(art), "fast", x)
    if trials:
        calls["tvm_tuned_ms"], tuned_info = tvm_call(art, "fast", x, tuning_records(name, art, trials))
        info["bit_exact"] = info["bit_exact"] and tuned_info["bit_exact"]
        info["tune_trials"] = trials
    if name not in TORCHVISION:                      # TVM's unscheduled default: seconds at 224×224
        calls["tvm_split_ms"], _ = tvm_call(art, "split", x)
    return calls, info


WARMUP_S = 0.05     # before each timing block: caches refilled, threads awake, clocks up


def _engine(kind: str, name: str, trials: int, conn) -> None:
    """An engine process: builds its calls, reports ready with its facts, then times
    (key, n) requests, answering the median ms of n calls after WARMUP_S of warm-up calls
    (at least two). Two calls were not enough after an engine's idle turn: FashionResNet
    then measured 0.142 ms against 0.068 ms alone."""
    from bench.cpu import _time as median_ms
    calls, info = reference_calls(name) if kind == "reference" else tvm_calls(name, trials)
    conn.send((sorted(calls), info))
    while (msg := conn.recv()) is not None:
        key, n = msg
        t0, k = time.perf_counter(), 0
        while k < 2 or time.perf_counter() - t0 < WARMUP_S:
            calls[key]()
            k += 1
        conn.send(median_ms(calls[key], n, warmup=0))


def measure(name: str, repeat: int, rounds: int, trials: int) -> dict:
    """One model's row, timed in two engine processes — PyTorch and ONNX Runtime in one, TVM in
    the other, so that no engine's thread pool or CPU pinning reaches another's — that take
    turns: ``rounds`` blocks of ``repeat // rounds`` calls for every engine, each after a
    PAUSE_S pause in which the previous engine's spinning threads go idle (with 20 ms, ORT int8
    measured 1.8 ms on MobileNetV2 against 0.94 ms alone). A machine that speeds up or slows
    down meanwhile moves all engines alike; each figure is the median of its blocks."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    engines, keys, row = [], [], {"model": name}
    try:
        for kind in ("reference", "tvm"):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_engine, args=(kind, name, trials, child), daemon=True)
            proc.start()
            engines.append((proc, parent))
            names, info = parent.recv()
            row.update(info)
            keys += [(parent, k) for k in names]
        samples: dict = {k: [] for _, k in keys}
        per = max(1, repeat // rounds)
        for r in range(rounds):
            for conn, key in keys:
                if key == "tvm_split_ms" and r:      # seconds per call: one block
                    continue
                time.sleep(PAUSE_S)
                conn.send((key, per if key != "tvm_split_ms" else max(5, per // 2)))
                samples[key].append(conn.recv())
    finally:
        for proc, conn in engines:
            if proc.is_alive():
                conn.send(None)
                proc.join(30)
    row.update({k: float(np.median(v)) for k, v in samples.items()})
    row["fast_vs_ort_int8"] = row["tvm_fast_ms"] / row["ort_int8_ms"]
    if trials:
        row["tuned_vs_ort_int8"] = row["tvm_tuned_ms"] / row["ort_int8_ms"]
    row["groups_cost_pct"] = 100 * (row["tvm_fast_ms"] / row["tvm_fast_nogroups_ms"] - 1)
    return row


def report(rows: list[dict], meta: dict) -> str:
    lines = [f"# CPU latency against ONNX Runtime int8 ({meta['machine']}, batch 1)", "",
             f"Median ms over {meta['repeat']} runs, PyTorch/ORT and TVM in two processes that take turns "
             f"in {meta['rounds']} blocks; TVM `fast` form = untuned default schedules "
             f"(inner product: {rows[0]['dot'] if rows else '?'}), {meta['tvm_threads']} threads; ORT "
             f"{meta['onnxruntime']} with {meta['ort_threads']} intra-op threads. `fast/ORT` < 1 means waps-tvm "
             "is faster; `groups` is the WAPS-group cost against the same integer model without groups.", "",
             "| model | input | PyTorch fp32 | ORT fp32 | ORT int8 | TVM split (unscheduled) | TVM fast, no groups | "
             "TVM fast, WAPS | fast/ORT int8 | groups | TVM tuned, WAPS | tuned/ORT int8 | bit-exact |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        split = f"{r['tvm_split_ms']:.3f}" if "tvm_split_ms" in r else "–"
        tuned = (f"{r['tvm_tuned_ms']:.3f} ({r['tune_trials']} trials) | {r['tuned_vs_ort_int8']:.2f}×"
                 if "tvm_tuned_ms" in r else "– | –")
        lines.append(f"| {r['model']} | {'×'.join(map(str, r['input'][1:]))} | {r['pytorch_fp32_ms']:.3f} | "
                     f"{r['ort_fp32_ms']:.3f} | {r['ort_int8_ms']:.3f} | {split} | {r['tvm_fast_nogroups_ms']:.3f} | "
                     f"{r['tvm_fast_ms']:.3f} | {r['fast_vs_ort_int8']:.2f}× | {r['groups_cost_pct']:+.1f} % | "
                     f"{tuned} | {'yes' if r['bit_exact'] else 'NO'} |")
    return "\n".join(lines) + "\n\n![latency](cpu_ort.png)\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [("pytorch_fp32_ms", "PyTorch fp32"), ("ort_fp32_ms", "ORT fp32"), ("ort_int8_ms", "ORT int8"),
            ("tvm_fast_nogroups_ms", "TVM fast, no groups"), ("tvm_fast_ms", "TVM fast, WAPS"),
            ("tvm_tuned_ms", "TVM tuned, WAPS")]
    keys = [(k, label) for k, label in keys if all(k in r for r in rows)]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    width = 0.8 / len(keys)
    for k, (key, label) in enumerate(keys):
        ax.bar([i + k * width for i in range(len(rows))], [r[key] for r in rows], width, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], [r["model"] for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("ms per image (log)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=[*TORCHVISION, *BENCH])
    p.add_argument("--repeat", type=int, default=100)
    p.add_argument("--rounds", type=int, default=10, help="alternating timing blocks per model")
    p.add_argument("--tune-trials", type=int, default=64,
                   help="meta-schedule trials per model for the tuned column (0: none; records are cached)")
    args = p.parse_args(argv)
    import onnxruntime
    import tvm
    rows = []
    for name in args.models:
        rows.append(measure(name, args.repeat, args.rounds, args.tune_trials))
        print(json.dumps(rows[-1]), flush=True)
    meta = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                       f"{tvm.target.codegen.llvm_get_system_cpu()}",
            "repeat": args.repeat, "onnxruntime": onnxruntime.__version__, "ort_threads": os.cpu_count(),
            "tvm_threads": len(os.sched_getaffinity(0)), "rounds": args.rounds}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cpu_ort.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (RESULTS / "cpu_ort.md").write_text(report(rows, meta))
    plot(rows, RESULTS / "cpu_ort.png")
    print(report(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
