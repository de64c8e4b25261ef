"""Faster R-CNN ResNet-50 FPN backbone as one integer program: per-level SQNR (issue 16 item 4).

torchvision's ``fasterrcnn_resnet50_fpn`` backbone (ResNet-50 body, FPN laterals, top-down
path, 3×3 output convs and the max-pooled extra level) is calibrated on Fashion-MNIST images
(grey replicated to 3 channels, resized, ImageNet-normalised as the detector's transform
does), compiled as one integer program with its five outputs and run on held-out images by
the NumPy reference interpreter (the compiled program's exact semantics; llvm, c and npu16
are bit-exact with it, tests/waps_tvm/test_multi_output.py). Each level's dequantized
integer output is compared with the float backbone's: SQNR = 10·log10(Σf² / Σ(f − q)²) over
every evaluation image. The fake-quant model rebuilt from the same artifact is measured
beside it. No weights can be downloaded: the backbone has random (torchvision-initialised)
weights and random BatchNorm statistics (tests/conftest.randomize_bn), so its activations
are not a trained detector's, and detection mAP (what the WAPS paper reports) cannot be
measured here.

    python -m bench.fpn_sqnr [--precisions W4A4 W8A8] [--methods brecq waps] [--seeds 0]
                             [--px 64] [--iters 40] [--samples 128] [--batch 16] [--eval 128]
    python -m bench.fpn_sqnr --render      # rewrite fpn_sqnr.md and .png from the JSON

Writes bench/results/fpn_sqnr.{json,md,png}; finished runs of the same setup are kept and
skipped when re-run (so another seed can be added later).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
PRECISIONS = {"W4A4": (4, 4), "W8A8": (8, 8)}
METHODS = {"brecq": "BRECQ", "waps": "BRECQ+WAPS"}
# the detector's GeneralizedRCNNTransform normalisation (ImageNet statistics)
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
MODEL_SEED = 0          # the backbone's weights and BN statistics; the run's seed picks the calibration


def sqnr_db(signal: float, noise: float) -> float:
    """10·log10(signal / noise) of summed squares: +inf when the noise is 0 (identical outputs),
    −inf when only the signal is; a ValueError for negative sums or 0/0."""
    if signal < 0 or noise < 0:
        raise ValueError(f"sums of squares must be ≥ 0, got signal {signal}, noise {noise}")
    if noise == 0:
        if signal == 0:
            raise ValueError("SQNR of an all-zero signal with no noise is undefined")
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


@dataclass
class LevelPower:
    """Running sums over the evaluation images of one output level (float64)."""
    signal: float = 0.0           # Σ f² of the float backbone's output
    noise: float = 0.0            # Σ (f − q)² of the compiled integer program's dequantized output
    noise_fakequant: float = 0.0  # Σ (f − q)² of the fake-quant model's output
    max_code_diff: int = 0        # largest |compiled code − fake-quant code| (units of the output step)

    def add(self, f: np.ndarray, q: np.ndarray, fq: np.ndarray, step: float) -> None:
        f, q, fq = (np.asarray(a, np.float64) for a in (f, q, fq))
        if not f.shape == q.shape == fq.shape:
            raise ValueError(f"shapes differ: float {f.shape}, compiled {q.shape}, fake-quant {fq.shape}")
        self.signal += float(np.sum(f * f))
        self.noise += float(np.sum((f - q) ** 2))
        self.noise_fakequant += float(np.sum((f - fq) ** 2))
        self.max_code_diff = max(self.max_code_diff, int(np.rint(np.abs(q - fq).max(initial=0) / step)))


def randomized_backbone():
    """The Faster R-CNN ResNet-50 FPN backbone: torchvision's random initialisation (seed
    MODEL_SEED) and random BN statistics, eval mode. Returns a dict of five levels."""
    import torch
    import torchvision

    from tests.conftest import randomize_bn
    torch.manual_seed(MODEL_SEED)
    model = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                                                 num_classes=2).backbone
    return randomize_bn(model.eval(), seed=MODEL_SEED)


def images(split: str, n: int, seed: int, px: int):
    """``n`` Fashion-MNIST images of ``split`` as float32 [n, 3, px, px]: grey in [0, 1]
    replicated to 3 channels, bilinearly resized, normalised with IMAGE_MEAN/IMAGE_STD."""
    import torch
    import torch.nn.functional as F

    from waps_tvm.datasets import NORMALISATION, load_dataset
    mean, std = NORMALISATION["fashion-mnist"]
    grey = load_dataset("fashion-mnist", split, n=n, seed=seed).x * std + mean     # back to [0, 1]
    x = F.interpolate(grey.repeat(1, 3, 1, 1), size=(px, px), mode="bilinear", align_corners=False)
    return ((x - torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGE_STD).view(1, 3, 1, 1)).contiguous()


def run_one(precision: str, method: str, seed: int, px: int, iters: int, samples: int, batch: int,
            n_eval: int, eval_batch: int = 16) -> dict:
    """Calibrate the backbone at ``precision`` with ``method`` (seed picks calibration images
    and batches), compile it to the integer program and measure every level on ``n_eval``
    test images."""
    import torch
    torch.set_num_threads(1)
    from calib.config import CalibConfig
    from calib.fakequant import build_fake_quant
    from relay_passes import reference
    from waps_tvm import api
    from waps_tvm.frontend import to_program

    model = randomized_backbone()
    calib = images("calib", samples, seed, px)
    test = images("test", n_eval, 0, px)                      # the same evaluation images in every run
    wb, ab = PRECISIONS[precision]
    cfg = CalibConfig(wbits=wb, abits=ab, method=method, iters=iters, batch=batch, samples=samples, seed=seed,
                      progress=False)
    t0 = time.perf_counter()
    result, art = api.quantize(model, calib, cfg)
    calib_s = time.perf_counter() - t0
    labels = art.graph.labels
    fake = build_fake_quant(art)
    t0 = time.perf_counter()
    power = {name: LevelPower() for name in labels}
    program = None
    for i in range(0, n_eval, eval_batch):
        x = test[i:i + eval_batch]
        if program is None or program.input_shape[0] != len(x):
            program = to_program(art, len(x))
            steps = [float(program[deq].attrs.scale) for deq, _ in program.results]
        with torch.no_grad():
            want = model(x)
            fq = fake(x)
        if list(want) != list(labels):
            raise ValueError(f"the program's outputs {labels} are not the backbone's levels {list(want)}")
        got = reference.run(program, x.numpy())[0::2]         # the dequantized value of each output
        for name, q, f, step in zip(labels, got, fq, steps):
            power[name].add(want[name].numpy(), q, f.numpy(), step)
    eval_s = time.perf_counter() - t0
    return {"precision": precision, "method": method, "seed": seed, "px": px, "iters": iters, "samples": samples,
            "batch": batch, "eval": n_eval, "calib_s": calib_s, "eval_s": eval_s,
            "block_loss": sum(r.loss_after for r in result.report),
            "shapes": {name: list(art.graph[o].shape) for name, o in zip(labels, art.graph.outputs)},
            "levels": {name: asdict(p) for name, p in power.items()}}


# --- rendering ----------------------------------------------------------------------------

def _key(r: dict) -> tuple:
    return r["precision"], r["method"], r["seed"], r["px"], r["iters"], r["samples"], r["batch"], r["eval"]


def _columns(runs: list[dict]) -> list[tuple[str, str]]:
    """(precision, method) pairs present, in PRECISIONS × METHODS order."""
    have = {(r["precision"], r["method"]) for r in runs}
    return [(p, m) for p in PRECISIONS for m in METHODS if (p, m) in have]


def _levels(runs: list[dict]) -> list[str]:
    return list(runs[0]["levels"]) if runs else []


def level_db(r: dict, level: str, noise: str = "noise") -> float:
    """A run's SQNR (dB) at ``level``, or over all levels together for level "all"."""
    ls = r["levels"].values() if level == "all" else [r["levels"][level]]
    return sqnr_db(sum(v["signal"] for v in ls), sum(v[noise] for v in ls))


def _cell(values: list[float]) -> str:
    if any(math.isinf(v) for v in values):
        return "∞" if all(v == math.inf for v in values) else "–"
    s = f"{statistics.fmean(values):.2f}"
    return s + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")


def sqnr_table(runs: list[dict], noise: str = "noise", shapes: bool = True) -> list[str]:
    """Markdown rows: one per level (and all levels pooled), one column per (precision, method),
    mean ± s.d. over seeds; a WAPS − BRECQ column per precision where both are present."""
    cols = _columns(runs)
    head = ["level", *(["shape"] if shapes else [])]
    for p in PRECISIONS:
        mine = [c for c in cols if c[0] == p]
        head += [f"{p} {METHODS[m]}" for _, m in mine]
        if len(mine) == len(METHODS):
            head.append(f"{p} WAPS − BRECQ")
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for level in [*_levels(runs), "all"]:
        cells = [f"`{level}`" if level != "all" else "all levels"]
        if shapes:
            cells.append("×".join(map(str, runs[0]["shapes"][level])) if level != "all" else "")
        for p in PRECISIONS:
            by = {m: [level_db(r, level, noise) for r in runs if (r["precision"], r["method"]) == (p, m)]
                  for _, m in (c for c in cols if c[0] == p)}
            cells += [_cell(v) for v in by.values()]
            if len(by) == len(METHODS):
                seeds = sorted({r["seed"] for r in runs if r["precision"] == p})
                diffs = [level_db(_run(runs, p, "waps", s), level, noise) - level_db(_run(runs, p, "brecq", s), level, noise)
                         for s in seeds if _has(runs, p, s)]
                cells.append("–" if not diffs or any(math.isnan(d) or math.isinf(d) for d in diffs)
                             else f"{statistics.fmean(diffs):+.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _run(runs: list[dict], precision: str, method: str, seed: int) -> dict:
    return next(r for r in runs if (r["precision"], r["method"], r["seed"]) == (precision, method, seed))


def _has(runs: list[dict], precision: str, seed: int) -> bool:
    return all(any((r["precision"], r["method"], r["seed"]) == (precision, m, seed) for r in runs) for m in METHODS)


def render(res: dict) -> str:
    """The results page: setup line, compiled and fake-quant SQNR tables, notes."""
    m, runs = res["meta"], res["runs"]
    seeds = sorted({r["seed"] for r in runs})
    code_diff = max((v["max_code_diff"] for r in runs for v in r["levels"].values()), default=0)
    lines = ["# Faster R-CNN ResNet-50 FPN backbone: per-level SQNR of the integer program", "",
             f"Model: torchvision `fasterrcnn_resnet50_fpn(weights=None).backbone`, random weights and BN "
             f"statistics (seed {MODEL_SEED}). Input {m['px']}×{m['px']}×3; calibration: {m['samples']} Fashion-MNIST "
             f"training images, {m['iters']} iterations per block, batch {m['batch']}; evaluation: {m['eval']} "
             f"Fashion-MNIST test images; seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}; "
             f"{m['machine']}, {m['workers']} worker processes × 1 thread, {m['seconds']:.0f} s in all.", "",
             "## Compiled integer program (NumPy reference) against the float backbone, SQNR dB", "",
             *sqnr_table(runs), "",
             "## Fake-quant model (same artifact) against the float backbone, SQNR dB", "",
             *sqnr_table(runs, "noise_fakequant", shapes=False), "",
             f"Largest difference between the compiled program's output codes and the fake-quant model's, over "
             f"every level and run: {code_diff} code{'s' if code_diff != 1 else ''} (the program rounds half up in "
             "integers, fake-quant half to even in float).", "",
             "Notes:", "",
             "- SQNR = 10·log10(Σf² / Σ(f − q)²) over all evaluation images and elements of a level (f: the "
             "float backbone, q: the dequantized output); *all levels* pools the sums. Mean (± s.d. over seeds "
             "when there are several).",
             "- The integer program is `waps_tvm.frontend.to_program` run by `relay_passes.reference`, the "
             "semantics every backend (llvm, c, npu16) matches bit for bit "
             "(`tests/waps_tvm/test_multi_output.py`).",
             "- No pretrained weights can be downloaded offline: the backbone's weights are torchvision's "
             "random initialisation and its BatchNorm statistics are drawn at random (`tests/conftest.randomize_bn`: "
             "mean N(0, 0.1²), variance and γ U(0.5, 1.5), β N(0, 0.1²)) so activations vary per channel as in a "
             "trained network; the numbers compare methods and precisions, not a trained detector.",
             "- Images: Fashion-MNIST grey replicated to 3 channels, resized bilinearly, normalised with the "
             "detector's ImageNet mean/std; calibration and evaluation images are disjoint (training and test splits).",
             "- The WAPS paper reports its Faster R-CNN result as detection mAP on COCO; that needs the trained "
             "detector and COCO, neither available offline, so this benchmark reports feature agreement instead.",
             f"- Per run (calibration / evaluation seconds): " + "; ".join(
                 f"{r['precision']} {METHODS[r['method']]} seed {r['seed']}: {r['calib_s']:.0f} / {r['eval_s']:.0f}"
                 for r in runs) + "."]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    """Grouped bars: compiled SQNR per level and (precision, method); fake-quant as markers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = res["runs"]
    cols = _columns(runs)
    levels = [*_levels(runs), "all"]
    width = 0.8 / max(len(cols), 1)
    colors = {"brecq": ("tab:gray", "silver"), "waps": ("tab:red", "lightcoral")}
    fig, ax = plt.subplots(figsize=(8, 4))
    for j, (p, m) in enumerate(cols):
        mine = [r for r in runs if (r["precision"], r["method"]) == (p, m)]
        xs = [i + (j - (len(cols) - 1) / 2) * width for i in range(len(levels))]
        ys = [statistics.fmean(level_db(r, lv) for r in mine) for lv in levels]
        fq = [statistics.fmean(level_db(r, lv, "noise_fakequant") for r in mine) for lv in levels]
        ax.bar(xs, ys, width, color=colors[m][p == "W4A4"], edgecolor="black", linewidth=0.5,
               label=f"{p} {METHODS[m]}")
        ax.scatter(xs, fq, marker="_", color="black", s=60, zorder=3, label="fake-quant" if j == 0 else None)
    ax.set_xticks(range(len(levels)), [f"'{lv}'" if lv != "all" else "all" for lv in levels])
    ax.set_xlabel("FPN output level")
    ax.set_ylabel("SQNR vs float backbone (dB)")
    ax.set_title(f"Faster R-CNN R50-FPN backbone, integer program, {res['meta']['px']}² inputs")
    ax.legend(fontsize=8, ncol=3)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(res: dict, results: Path = RESULTS) -> None:
    (results / "fpn_sqnr.md").write_text(render(res))
    plot(res, results / "fpn_sqnr.png")


def _machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--px", type=int, default=64, help="input height and width")
    p.add_argument("--iters", type=int, default=40, help="reconstruction iterations per block")
    p.add_argument("--samples", type=int, default=128, help="calibration images")
    p.add_argument("--batch", type=int, default=16, help="calibration batch")
    p.add_argument("--eval", type=int, default=128, help="evaluation images")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--render", action="store_true", help="rewrite fpn_sqnr.md and .png from the JSON")
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of fpn_sqnr.{json,md,png}")
    args = p.parse_args(argv)
    from tqdm import tqdm

    from bench.accuracy import _atomic_json
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / "fpn_sqnr.json"
    if args.render:
        res = json.loads(out.read_text())
        write(res, args.results)
        print(render(res))
        return 0
    setup = (args.px, args.iters, args.samples, args.batch, args.eval)
    old = json.loads(out.read_text()) if out.exists() else {"runs": []}
    runs = [r for r in old["runs"] if _key(r)[3:] == setup]         # another setup's runs do not mix in
    done = {_key(r)[:3] for r in runs}
    jobs = [(pr, m, s) for s in args.seeds for pr in args.precisions for m in args.methods if (pr, m, s) not in done]
    before = old["meta"]["seconds"] if runs else 0.0                  # time spent on the kept runs
    t0 = time.perf_counter()
    res = {"meta": {"px": args.px, "iters": args.iters, "samples": args.samples, "batch": args.batch,
                    "eval": args.eval, "machine": _machine(), "workers": args.workers, "seconds": before},
           "runs": runs}
    with ProcessPoolExecutor(args.workers) as pool, tqdm(total=len(jobs), desc="fpn_sqnr runs") as bar:
        futs = [pool.submit(run_one, *j, *setup) for j in jobs]
        for f in as_completed(futs):
            row = f.result()
            res["runs"] = sorted([r for r in res["runs"] if _key(r) != _key(row)] + [row],
                                 key=lambda r: (r["seed"], list(PRECISIONS).index(r["precision"]),
                                                list(METHODS).index(r["method"])))
            res["meta"]["seconds"] = before + time.perf_counter() - t0
            _atomic_json(out, res)
            bar.update(1)
            bar.write(f"{row['precision']} {METHODS[row['method']]} seed {row['seed']}: all levels "
                      f"{level_db(row, 'all'):.2f} dB (fake-quant {level_db(row, 'all', 'noise_fakequant'):.2f}), "
                      f"calib {row['calib_s']:.0f} s, eval {row['eval_s']:.0f} s")
    write(res, args.results)
    print(render(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
