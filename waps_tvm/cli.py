"""The ``waps-tvm`` command line. Errors become one line and exit code 2 here, and
only here; Ctrl-C exits 130 with nothing half-written (artifacts are renamed into
place only when complete); an interrupted calibration says how to resume it."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from calib.errors import ConfigError, WapsError
from waps_tvm.runner import RunError as RunnerError


def _shape(text: str) -> tuple[int, int, int]:
    try:
        dims = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not C,H,W") from None
    if len(dims) != 3 or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not C,H,W")
    return dims


def _percent(text: str) -> float:
    """'1%' or '1' → 0.01 (a fraction)."""
    try:
        v = float(text.strip().removesuffix("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a percentage such as 1%") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"'{text}': a budget must be ≥ 0 %")
    return v / 100


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of numbers") from None


def build_parser() -> argparse.ArgumentParser:
    from calib.config import ACT_BITS, CAT_QUANTS, GROUP_PROBS, METHODS, WEIGHT_BITS, CalibConfig
    from calib.device import CONV_DTYPES
    d = CalibConfig()
    p = argparse.ArgumentParser(prog="waps-tvm", description="WAPS-Quant PTQ and TVM compilation for a 16x16 NPU")
    p.add_argument("--version", action="version", version=f"waps-tvm {__import__('waps_tvm').__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("calibrate", help="quantize a model with WAPS-Quant (or a baseline) into a .waps artifact")
    c.add_argument("model", help="'digit-recognizer' (bundled), a .pt2 torch.export program, a state dict "
                                 "(.pt/.pth, with --arch) or a pickled nn.Module (with --trust-pickle)")
    c.add_argument("--data", required=True, help="calibration data: mnist | fashion-mnist | digits, "
                                                 "a .npy/.npz tensor file, or a folder of images")
    c.add_argument("-o", "--output", required=True, help="the .waps file to write")
    c.add_argument("--arch", help="torchvision architecture name for a state dict")
    c.add_argument("--trust-pickle", action="store_true",
                   help="allow unpickling a .pt nn.Module (runs code from the file)")
    c.add_argument("--input-shape", type=_shape, help="model input C,H,W (when it cannot be inferred)")
    c.add_argument("--wbits", type=int, default=d.wbits, choices=WEIGHT_BITS)
    c.add_argument("--abits", type=int, default=d.abits, choices=ACT_BITS, help="32 = weight-only")
    c.add_argument("--method", default=d.method, choices=METHODS,
                   help="waps = BRECQ+WAPS (default); qdrop+waps = QDrop+WAPS")
    c.add_argument("--cwac", action="store_true", help="add QwT-v2 channel-wise affine compensation")
    c.add_argument("--iters", type=int, default=d.iters, help=f"iterations per block (default {d.iters})")
    c.add_argument("--batch", type=int, default=d.batch)
    c.add_argument("--samples", type=int, default=d.samples, help="calibration samples")
    c.add_argument("--seed", type=int, default=d.seed)
    c.add_argument("--gammas", type=_floats, default=None,
                   help="group scales γ^G, each 1 or 1±2^-n (default 1,0.9375,1.0625)")
    c.add_argument("--groups", type=int, default=None, help="g: use the first g default group scales")
    c.add_argument("--tile", type=int, default=d.tile, help="group-size granularity in channels (MAC tile)")
    c.add_argument("--group-prob", default=d.group_prob, choices=GROUP_PROBS,
                   help=f"eq. 15 group probability: sigmoid ratio as printed, or softmax (default {d.group_prob})")
    c.add_argument("--cat-quant", default=d.cat_quant, choices=CAT_QUANTS,
                   help="channel concatenation: share one quantizer with the values it joins, or "
                        f"rescale each to its own (default {d.cat_quant}; bench/results/cat_quant.md)")
    c.add_argument("--lam", type=float, default=None, help="regulariser weight λ_r = λ_g (default 0.01)")
    c.add_argument("--first-last-bits", type=int, default=d.first_last_bits, choices=WEIGHT_BITS)
    c.add_argument("--attn-bits", type=int, default=None, choices=ACT_BITS[:-1],
                   help="codes of attention's Q, K, V, scores, probabilities and context (default: --abits)")
    c.add_argument("--eval-data", help="labelled data for top-1 (default: the built-in test split)")
    c.add_argument("--no-eval", action="store_true", help="skip the accuracy evaluation")
    c.add_argument("--device", default=d.device, help="where to calibrate: auto (CUDA when available, "
                                                    "the default), cpu, cuda or cuda:N")
    c.add_argument("--conv-dtype", default=d.conv_dtype, choices=CONV_DTYPES,
                   help="precision of the reconstruction loop's conv/linear products: auto (the default: "
                        "bfloat16 where the CPU or GPU runs it natively, else float32), float32 or bfloat16; "
                        "quantizers and losses stay float32 (bench/results/bf16.md, calib_speed.md)")
    c.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its checkpoint OUTPUT.ckpt (same arguments)")
    c.add_argument("--npu-budget", type=_percent, metavar="PCT",
                   help="hardware-aware groups: choose each layer's g ∈ 1..4 and group shifts so the WAPS "
                        "overhead on npu16 stays within PCT of its conv/linear compute cycles (e.g. 1%%; waps methods)")
    c.add_argument("--npu-config", metavar="FILE", help="the npu16 machine (JSON) --npu-budget costs groups on "
                                                        "(default: the built-in 16x16 npu16)")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    k = sub.add_parser("compile", help="compile a .waps (or calibrate+compile a model with --data) for a target")
    k.add_argument("model", help="a .waps artifact, or a model as for 'calibrate' (then --data is required)")
    k.add_argument("--target", default="llvm",
                   help="llvm (TVM kernels for this CPU), aarch64 (ARMv8.2-A+dotprod, cross-compiled), "
                        "c (portable C99 kernels via BYOC), npu16 (instruction streams run by the npu16 "
                        "simulator via BYOC), or a JSON llvm target dict, e.g. "
                        "'{\"kind\": \"llvm\", \"mtriple\": \"aarch64-linux-gnu\", \"mcpu\": \"cortex-a53\"}'")
    k.add_argument("-o", "--output", required=True, help="output folder (model.so, meta.json)")
    k.add_argument("--batch", type=int, default=1, help="batch size compiled in (default 1)")
    k.add_argument("--form", default="fast", choices=("fast", "split", "fused"),
                   help="how TVM computes the integer ops: fast (default: scheduled multi-threaded kernels, "
                        "VNNI where the CPU has it), split (per-group Relax convs) or fused (one naive TIR "
                        "kernel per WAPS conv)")
    k.add_argument("--dump-ir", action="store_true", help="write each pipeline stage's Relax to out/ir/")
    k.add_argument("--fuse", default="", metavar="KINDS",
                   help="kernel fusions, comma-separated (TVM CPU targets, fast form; bit-exact; "
                        "bench/results/cpu_fusion.md measures them): residual-adds (each residual add in the "
                        "epilogue of the conv feeding it), expand-depthwise (each pointwise expansion with "
                        "the depthwise conv reading it)")
    k.add_argument("--fuse-residual-adds", action="store_true", help="the same as --fuse residual-adds")
    k.add_argument("--data", help="calibration data, to calibrate a .pt/.pt2/built-in model first")
    for flag in ("--arch", "--input-shape", "--wbits", "--abits", "--method", "--iters", "--samples", "--seed",
                 "--npu-budget"):
        src = next(a for a in c._actions if flag in a.option_strings)
        k.add_argument(flag, type=src.type, default=src.default, choices=src.choices, help=src.help,
                       metavar=src.metavar)
    k.add_argument("--trust-pickle", action="store_true", help="allow unpickling a .pt nn.Module")
    k.add_argument("--eval-data", help="labelled test data (mnist | fashion-mnist | digits, a .npz with y, an "
                                       "image folder): the report gets the compiled and fake-quant top-1 and "
                                       "their agreement (default: the built-in data of a one-step compile)")
    k.add_argument("--eval-samples", type=int, default=None,
                   help="test images for the compiled-model top-1 "
                        "(default: all; 2000 for npu16, whose simulator is slow)")
    k.add_argument("-q", "--quiet", action="store_true")
    k.add_argument("--npu-config", metavar="FILE",
                   help="npu16 machine as JSON (--target npu16): tile, arrays, clock_mhz, dma_bytes_per_cycle, "
                        "epilogue_lanes, sram_kib {weights, activations, accumulators}, waps_switch_cycles, "
                        "waps_merge_cycles, waps_pipelined; omitted keys keep the default 16x16 npu16")

    k.add_argument("--tuning-records", help="a folder written by 'waps-tvm tune': each kernel is built from its "
                                            "best record (fast form; llvm, or the cross target it was tuned for)")

    t = sub.add_parser("tune", help="meta-schedule search (XGBoost cost model) over a model's kernels")
    t.add_argument("model", help="a .waps artifact")
    t.add_argument("--target", default="llvm", help="llvm (candidates are measured on this machine), or aarch64 / a "
                                                    "JSON llvm dict measured on a board through --rpc or --tracker")
    boards = t.add_mutually_exclusive_group()
    boards.add_argument("--rpc", metavar="HOST:PORT", help="the TVM RPC server on the board that a cross target's "
                                                           "candidates run on (waps-tvm rpc-server [--emulate])")
    boards.add_argument("--tracker", metavar="HOST:PORT",
                        help="a TVM RPC tracker (waps-tvm rpc-tracker): candidates run on every server free under "
                             "--key, in parallel")
    t.add_argument("--key", help="with --tracker: the key its boards registered under (one kind of board)")
    t.add_argument("--trials", type=int, default=200, help="search trials over all kernels (default 200)")
    t.add_argument("--work-dir", required=True, help="records folder (meta-schedule JSON database), reused")
    t.add_argument("--batch", type=int, default=1)
    t.add_argument("-q", "--quiet", action="store_true")

    r = sub.add_parser("run", help="run a compiled folder with the TVM runtime")
    r.add_argument("folder")
    r.add_argument("--input", required=True, help=".npy float32 input [N, C, H, W] (or [C, H, W] for batch 1)")
    r.add_argument("--output", help="write the outputs to this .npy file")
    r.add_argument("--codes", action="store_true", help="output the integer codes instead of dequantized values")
    r.add_argument("--repeat", type=int, default=0, help="also time N runs")
    where = r.add_mutually_exclusive_group()
    where.add_argument("--emulate", action="store_true",
                       help="run an aarch64 build under qemu (set up by scripts/aarch64-emulation.sh)")
    where.add_argument("--rpc", metavar="HOST:PORT", help="run on a TVM RPC server (python -m tvm.exec.rpc_server)")
    where.add_argument("--tracker", metavar="HOST:PORT", help="run on one free board of --key at a TVM RPC tracker")
    r.add_argument("--key", help="with --tracker: the key of the boards to run on")

    rs = sub.add_parser("rpc-server", help="serve TVM RPC on this machine, or as aarch64 under qemu (--emulate)")
    rs.add_argument("--emulate", action="store_true", help="an aarch64 server under qemu")
    rs.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    rs.add_argument("--port", type=int, default=9090)
    rs.add_argument("--tracker", metavar="HOST:PORT", help="register with this TVM RPC tracker (waps-tvm rpc-tracker)")
    rs.add_argument("--key", help="with --tracker: the key clients ask the tracker for (one kind of board, "
                                  "e.g. aarch64)")

    rt = sub.add_parser("rpc-tracker", help="a TVM RPC tracker: boards' RPC servers register with it under a key, "
                                            "tune and run --tracker share them out")
    rt.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for "
                                                         "boards on the network)")
    rt.add_argument("--port", type=int, default=9190)

    rp = sub.add_parser("report", help="the compile report of a compiled folder: per-op targets, groups, gathers, "
                                       "npu16 costs, accuracy (prints it, rewrites report.md and its PNGs)")
    rp.add_argument("folder")
    rp.add_argument("--npu-config", help="re-cost an npu16 build for another npu16 JSON config without recompiling "
                                         "(estimates; written to FOLDER/recost-<config name>/ unless --out)")
    rp.add_argument("--out", help="with --npu-config: the folder for the re-costed report")

    ins = sub.add_parser("inspect", help="lowered graphs of a compiled folder: Relax stages, ONNX, netron")
    ins.add_argument("folder")
    ins.add_argument("--stage", help="print the Relax text of a stage (quantized, permuted, legalized, "
                                     "partitioned, final, or an extra pass's name; needs compile --dump-ir)")
    ins.add_argument("--netron", action="store_true", help="serve out/graph.onnx with netron on localhost")
    ins.add_argument("--port", type=int, default=0, help="netron port (default: any free port)")
    ins.add_argument("--serve-seconds", type=float, default=None, help="stop serving after this many seconds")

    e = sub.add_parser("eval", help="top-1 of a .waps artifact's fake-quant model on labelled data")
    e.add_argument("artifact")
    e.add_argument("--data", required=True)
    e.add_argument("--samples", type=int, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
        args = build_parser().parse_args(argv)
        args._argv = argv
        if args.command == "calibrate":
            return _calibrate(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "compile":
            return _compile(args)
        if args.command == "tune":
            return _tune(args)
        if args.command == "run":
            return _run(args)
        if args.command == "report":
            return _report(args)
        if args.command == "inspect":
            return _inspect(args)
        if args.command == "rpc-server":
            return _rpc_server(args)
        if args.command == "rpc-tracker":
            return _rpc_tracker(args)
    except WapsError as e:
        print(f"waps-tvm: error: {e}", file=sys.stderr)
        return e.exit_code
    except RunnerError as e:
        print(f"waps-tvm: error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:                       # e.g. `waps-tvm report out | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("waps-tvm: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


def _calibrate(args) -> int:
    from rich.console import Console

    from calib.checkpoint import checkpoint_path, progress
    from calib.config import CalibConfig
    from calib.device import resolve_device
    from calib.errors import CheckpointError
    from waps_tvm import api
    from waps_tvm.datasets import BUILTIN, load_dataset
    from waps_tvm.model_io import load_model

    out = Path(args.output)
    if out.exists() and out.is_dir():
        raise ConfigError(f"-o {out}: is a folder, expected a file path")
    console = Console(stderr=False)
    from calib.config import default_gammas
    if args.gammas and args.groups and len(args.gammas) != args.groups:
        raise ConfigError(f"--groups {args.groups} contradicts the {len(args.gammas)} --gammas given")
    gammas = args.gammas or (default_gammas(args.groups) if args.groups else CalibConfig().gammas)
    cfg = CalibConfig(wbits=args.wbits, abits=args.abits, method=args.method, cwac=args.cwac,
                      iters=args.iters, batch=args.batch, samples=args.samples, seed=args.seed,
                      gammas=tuple(gammas), tile=args.tile, lam=args.lam, group_prob=args.group_prob,
                      cat_quant=args.cat_quant,
                      first_last_bits=args.first_last_bits, attn_bits=args.attn_bits, progress=not args.quiet,
                      device=args.device, conv_dtype=args.conv_dtype).validate()
    resolve_device(cfg.device)                        # no CUDA: one line before any work
    ckpt = checkpoint_path(out)
    if args.resume and not ckpt.exists():
        raise CheckpointError(f"--resume: no checkpoint {ckpt} to continue (a run writes it after its first block)")
    if args.npu_config and args.npu_budget is None:
        raise ConfigError("--npu-config goes with --npu-budget (the machine the groups are costed on)")
    budget = _group_budget(args.npu_budget, args.npu_config, cfg)
    model = load_model(args.model, args.arch, args.trust_pickle, args.input_shape)
    data = load_dataset(args.data, "calib", n=cfg.samples, seed=cfg.seed, input_shape=model.input_shape)
    t0 = time.perf_counter()
    try:
        result, art = api.quantize(model, data.x, cfg, checkpoint=ckpt, resume=args.resume, group_budget=budget)
    except KeyboardInterrupt:
        done = progress(ckpt)
        if done is None:
            raise
        again = args._argv + ([] if args.resume else ["--resume"])
        print(f"waps-tvm: interrupted after {done[0]} of {done[1]} blocks (checkpoint {ckpt}); "
              f"continue with: waps-tvm {shlex.join(again)}", file=sys.stderr)
        return 130
    api.save_artifact(art, out)
    ckpt.unlink(missing_ok=True)
    if result.group_plan is not None:
        console.print(_group_table(result.group_plan))
    console.print(_loss_table(result))
    console.print(f"calibrated {len(result.blocks)} blocks in {time.perf_counter() - t0:.1f} s "
                  f"({cfg.method}, W{cfg.wbits}A{cfg.abits}, {cfg.iters} iters/block) → {out}")
    eval_spec = args.eval_data or (args.data if args.data in BUILTIN else None)
    if eval_spec and not args.no_eval:
        test = load_dataset(eval_spec, "test", input_shape=model.input_shape)
        if test.y is None:
            console.print(f"{eval_spec} has no labels: accuracy not evaluated")
            return 0
        fp = api.top1(_float_logits(model, test.x), test.y)
        q = api.evaluate(api.load_artifact(out), test.x, test.y)
        console.print(f"top-1 on {eval_spec} test ({len(test.x)} images): float {fp * 100:.2f} %, "
                      f"quantized (reloaded {out.name}) {q * 100:.2f} %")
    return 0


def _compile(args) -> int:
    from waps_tvm import api
    from waps_tvm.compiler import compile_artifact
    from targets.cpu import export_cc, resolve
    target = resolve(args.target)                     # unknown targets and missing cross gcc fail
    export_cc(target)                                 # before any work
    npu = None
    if args.npu_config:
        if target.name != "npu16":
            raise ConfigError(f"--npu-config describes the npu16 machine; it does not apply to --target {target.name}")
        from targets.npu16.params import load_config
        npu = load_config(args.npu_config)
    out = Path(args.output)
    if str(args.model).endswith(".waps"):
        art = api.load_artifact(args.model)
    else:
        if not args.data:
            raise ConfigError(f"{args.model} is not a .waps artifact: give --data to calibrate it first")
        art = _calibrate_for_compile(args)
    test = None
    spec = args.eval_data or getattr(args, "_eval_spec", None)
    if spec and target.cross:
        if args.eval_data:
            raise ConfigError(f"--eval-data: a {target.name} build does not run on this machine; evaluate a "
                              "--target llvm build, or run this one with `waps-tvm run --emulate` or --rpc")
        print(f"note: no test-set evaluation for {target.name} (does not run here); "
              "`waps-tvm run --emulate` runs it under qemu")
        spec = None
    if spec:                                                            # checked before any compile work
        # the npu16 simulator runs about 100 images/s on the bundled model: 2000 by default
        limit = args.eval_samples or (2000 if args.target == "npu16" else None)
        test = _eval_set(spec, art, limit, args.batch)
    t0 = time.perf_counter()
    if args.tuning_records:
        if args.form != "fast":
            raise ConfigError("--tuning-records applies to the fast form (drop --form)")
        from waps_tvm.tuning import load_records
        records = load_records(args.tuning_records, art, args.batch, args.target)
    else:
        records = None
    meta = compile_artifact(art, out, args.target, args.batch, args.form, args.dump_ir, records=records, npu=npu,
                            fuse=_fusions(args))
    w = meta["waps"]
    print(f"compiled for {target.name} in {time.perf_counter() - t0:.1f} s → {out}/model.so "
          f"(input {tuple(meta['input']['shape'])}, WAPS {w['form']}: {w['legalized_layers']} layers, "
          f"{w['gathers']} gathers, {len(w['masked_layers'])} masked)")
    host = [p for p in meta.get("placement", []) if p["target"] != "npu16"]
    if meta.get("placement"):
        print(f"npu16 runs {len(meta['placement']) - len(host)} of {len(meta['placement'])} ops; on the host (llvm):")
        for p in host:
            print(f"  {p['op']} ({p['kind']}): {p['reason']}")
    if "npu16" in meta:
        m = meta["npu16"]
        print(f"npu16 machine: {m['tile']}x{m['tile']} MAC array x{m['arrays']}, {m['clock_mhz']:g} MHz, DMA "
              f"{m['dma_bytes_per_cycle']} B/cycle, epilogue {m['epilogue_lanes']} lanes (in {out}/npu_config.json)")
        _print_time_split(Path(out) / "report.json")
    if test is not None:
        _eval_compiled(out, art, spec, test, quiet=args.quiet)
    return 0


def _print_time_split(report: Path) -> None:
    """The npu16 report's estimated NPU time, host time and the host's share, in one line."""
    import json
    if not report.exists():
        return
    t = json.loads(report.read_text()).get("totals", {})
    if "total_time_us" in t:
        print(f"estimated per batch: NPU {t['npu_time_us']:,.1f} µs + host {t['host_time_us']:,.1f} µs "
              f"({100 * t['host_share']:.1f} % on the host; {report.parent}/report.md)")


def _calibrate_for_compile(args):
    from calib.config import CalibConfig
    from waps_tvm import api
    from waps_tvm.datasets import load_dataset
    from waps_tvm.model_io import load_model
    cfg = CalibConfig(wbits=args.wbits, abits=args.abits, method=args.method, iters=args.iters,
                      samples=args.samples, seed=args.seed, progress=not args.quiet).validate()
    budget = _group_budget(args.npu_budget, args.npu_config, cfg)
    model = load_model(args.model, args.arch, args.trust_pickle, args.input_shape)
    data = load_dataset(args.data, "calib", n=cfg.samples, seed=cfg.seed, input_shape=model.input_shape)
    result, art = api.quantize(model, data.x, cfg, group_budget=budget)
    if result.group_plan is not None and not args.quiet:
        from rich.console import Console
        Console().print(_group_table(result.group_plan))
    waps = Path(args.output).with_name(Path(args.output).name + ".waps")
    api.save_artifact(art, waps)
    print(f"calibrated {args.model} ({cfg.method}, W{cfg.wbits}A{cfg.abits}) → {waps}")
    from waps_tvm.datasets import BUILTIN
    if args.data in BUILTIN:
        args._eval_spec = args.data
    return art


def _fusions(args) -> tuple[str, ...]:
    """The kernel fusions named by --fuse (comma-separated) and --fuse-residual-adds."""
    kinds = [k.strip() for k in args.fuse.split(",") if k.strip()]
    if args.fuse_residual_adds and "residual-adds" not in kinds:
        kinds.append("residual-adds")
    return tuple(kinds)


def _eval_set(spec: str, art, limit: int | None, batch: int):
    from waps_tvm.datasets import load_dataset
    test = load_dataset(spec, "test", n=limit, input_shape=tuple(art.graph.input.attrs["shape"]))
    if test.y is None:
        raise ConfigError(f"--eval-data {spec}: has no labels")
    if len(test.x) < batch:
        raise ConfigError(f"--eval-data {spec}: fewer images ({len(test.x)}) than the compiled batch ({batch})")
    return test


def _eval_compiled(folder: Path, art, spec: str, test, quiet: bool = False) -> None:
    """Top-1 of the compiled integer model (TVM runtime) and of the fake-quant model, and how
    often they agree; printed and added to the folder's report."""
    import json

    import numpy as np
    import torch
    from tqdm import tqdm

    from waps_tvm import api, report, runner
    model = runner.load(folder)
    b = model.meta["input"]["shape"][0]
    n = len(test.x) // b * b
    preds = [model(test.x[i:i + b].numpy())[0].argmax(1) for i in tqdm(range(0, n, b), desc="compiled model",
                                                                        leave=False, disable=quiet)]
    with torch.no_grad():
        fq_pred = api.predict(api.build_fake_quant(art), test.x[:n]).argmax(1).numpy()
    acc = report.accuracy(spec, test.y[:n].numpy(), np.concatenate(preds), fq_pred)
    rep = json.loads((folder / "report.json").read_text())
    rep["accuracy"] = acc
    report.write(folder, rep)
    print(f"top-1 on {spec} test ({n} images): compiled integer model ({model.meta['target']}) "
          f"{acc['compiled_top1'] * 100:.2f} %, fake-quant {acc['fake_quant_top1'] * 100:.2f} %, "
          f"agreement {acc['agreement'] * 100:.2f} %")


def _tune(args) -> int:
    from waps_tvm import api
    from waps_tvm.boards import Boards
    from waps_tvm.tuning import tune
    boards = Boards.from_flags(args.rpc, args.tracker, args.key)
    if not str(args.model).endswith(".waps"):
        raise ConfigError(f"{args.model}: tune takes a .waps artifact (calibrate first)")
    art = api.load_artifact(args.model)
    s = tune(art, args.target, args.trials, args.work_dir, args.batch, progress=not args.quiet, boards=boards)
    print(f"tuned {s['kernels']} kernels with {s['trials']} trials in {s['seconds']:.0f} s → {args.work_dir}: "
          f"sum of kernel times {s['default_ms']:.3f} ms (default schedules) → {s['best_ms']:.3f} ms (best records); "
          f"{s['searched']} kernels searched"
          + (f" (meta-schedule's rules fail on the other {s['kernels'] - s['searched']})"
             if s["trials"] and s["searched"] < s["kernels"] else "") + f", {s['improved']} improved"
          + (f"; measured on {s['boards']} board{'s' if s['boards'] > 1 else ''} ({boards})" if boards else ""))
    return 0


def _run(args) -> int:
    import numpy as np
    from waps_tvm import runner
    from waps_tvm.boards import Boards
    boards = Boards.from_flags(args.rpc, args.tracker, args.key)
    try:
        x = np.load(args.input, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise runner.RunError(f"--input {args.input}: cannot read a .npy array ({e})") from None
    times = None
    if args.emulate:
        from waps_tvm import emulation
        meta = runner.read_folder(args.folder)[0]
        _check_output_file(args, meta)
        results, times = emulation.run_results(args.folder, x, args.repeat)
    elif boards:
        from waps_tvm import remote
        model = remote.load(args.folder, boards)
        try:
            meta = model.meta
            _check_output_file(args, meta)
            results = model.results(x)
            if args.repeat:
                times = model.time(x, args.repeat)
        finally:
            model.close()
    else:
        model = runner.load(args.folder)
        meta = model.meta
        _check_output_file(args, meta)
        results = model.results(x)
    if len(results) > 1:
        _write_results(args, meta, results)
    else:
        _show(args, results[0][1] if args.codes else results[0][0])
    if args.repeat:
        t = np.array(times if times is not None else model.time(x, args.repeat)) * 1000
        where = " (emulated aarch64 under qemu)" if args.emulate else f" (on {args.rpc})" if args.rpc else \
            f" (on a board of {boards})" if boards else ""
        print(f"latency over {args.repeat} runs{where}: median {np.median(t):.3f} ms, min {t.min():.3f} ms")
    return 0


def _check_output_file(args, meta: dict) -> None:
    """A model with several outputs writes them to an .npz (before any work is done)."""
    names = [r["name"] for r in meta.get("results", [])]
    if len(names) > 1 and not (args.output or "").endswith(".npz"):
        raise ConfigError(f"the model has {len(names)} outputs ({', '.join(names)}); give --output F.npz "
                          "to write one array per output")


def _write_results(args, meta: dict, results) -> None:
    """A model with several outputs: one array per output in an .npz, keyed by the output's
    name (meta.json "results"), dequantized or (--codes) its codes."""
    import numpy as np
    names = [r["name"] for r in meta["results"]]           # --output F.npz: checked before the run
    arrays = {n: (codes if args.codes else deq) for n, (deq, codes) in zip(names, results)}
    tmp = Path(args.output).with_name(f".{Path(args.output).name}.tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(args.output)
    print(f"wrote {args.output}: " + ", ".join(f"{n} {a.shape} {a.dtype}" for n, a in arrays.items()))


def _show(args, y) -> None:
    """One output: written to --output (.npy) or printed (with the top-1 class of a [N, K] output)."""
    import numpy as np
    if args.output:
        tmp = Path(args.output).with_name(f".{Path(args.output).name}.tmp.npy")
        np.save(tmp, y)
        tmp.replace(args.output)
        print(f"wrote {args.output} {y.shape} {y.dtype}")
    else:
        np.set_printoptions(precision=4, suppress=True, linewidth=120)
        print(y)
        if y.ndim == 2:
            print("top-1:", y.argmax(1).tolist())


def _rpc_server(args) -> int:
    """TVM's RPC server in the foreground until Ctrl-C (which stops its worker processes too)."""
    import subprocess

    from waps_tvm.boards import Boards, server_args
    if args.tracker is not None or args.key is not None:
        tracker = Boards.from_flags(tracker=args.tracker, key=args.key)
        tracker.summary()                     # a wrong address: one line now, not a minute of retries later
    if args.emulate:
        from waps_tvm import emulation
        proc = emulation.rpc_server(args.host, args.port, args.tracker, args.key)
    else:
        proc = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server",
                                 *server_args(args.host, args.port, args.tracker, args.key)], start_new_session=True)
    registered = f", registered as key {args.key!r} with the tracker at {args.tracker}" if args.tracker else ""
    return _foreground(proc, f"TVM RPC server{' (aarch64 under qemu)' if args.emulate else ''} on "
                             f"{args.host}:{args.port}{registered}")


def _rpc_tracker(args) -> int:
    """TVM's RPC tracker in the foreground until Ctrl-C."""
    import importlib.util
    import socket
    import subprocess
    if importlib.util.find_spec("tornado") is None:         # TVM's tracker runs on tornado's event loop
        raise ConfigError("rpc-tracker needs the tornado package (pip install tornado)")
    try:                                      # TVM's tracker would die on a busy port with a traceback
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((args.host, args.port))
    except OSError as e:
        raise ConfigError(f"rpc-tracker: cannot listen on {args.host}:{args.port} ({e.strerror or e})") from None
    proc = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", args.host,
                             "--port", str(args.port), "--port-end", str(args.port + 1)], start_new_session=True)
    return _foreground(proc, f"TVM RPC tracker on {args.host}:{args.port} (boards: waps-tvm rpc-server --tracker "
                             f"{args.host}:{args.port} --key KEY)")


def _foreground(proc, banner: str) -> int:
    """Wait for ``proc`` (started in its own process group) after printing ``banner``; Ctrl-C or
    SIGTERM stops its whole group."""
    import signal
    import subprocess
    print(f"{banner}; Ctrl-C stops it", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))     # `kill` also stops the server's group
    try:
        return proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _inspect(args) -> int:
    from collections import Counter

    from waps_tvm.inspect import stage_text
    folder = Path(args.folder)
    graph = folder / "graph.onnx"
    if not graph.is_file():
        raise ConfigError(f"{folder}: no graph.onnx (not a folder written by 'waps-tvm compile')")
    if args.stage:
        print(stage_text(folder, args.stage))
        return 0
    import onnx
    try:
        model = onnx.load(str(graph))
    except Exception as e:  # noqa: BLE001 (protobuf's DecodeError and friends)
        raise ConfigError(f"{graph}: not a readable ONNX graph ({type(e).__name__}); recompile the folder") from None
    kinds = Counter((n.op_type, next((a.s.decode() for a in n.attribute if a.name == "target"), "?"))
                    for n in model.graph.node)
    print(f"{graph}: {len(model.graph.node)} nodes in domain ai.waps")
    for (op, tgt), k in sorted(kinds.items()):
        print(f"  {op:<11} ×{k:<4} on {tgt}")
    stages = sorted(p.stem for p in (folder / "ir").glob("*.py")) if (folder / "ir").is_dir() else []
    print(f"Relax stages: {', '.join(stages) if stages else 'none (compile with --dump-ir)'}")
    if args.netron:
        import netron
        address = netron.start(str(graph), address=("127.0.0.1", args.port), browse=False)
        host, port = address if isinstance(address, tuple) else ("127.0.0.1", args.port)
        print(f"netron serving {graph} at http://{host}:{port}", flush=True)
        try:
            if args.serve_seconds is not None:
                time.sleep(args.serve_seconds)
            else:
                netron.wait()
        finally:
            netron.stop(address)
    return 0


def _report(args) -> int:
    import json

    from waps_tvm import report
    folder = Path(args.folder)
    path = folder / "report.json"
    if not path.is_file():
        raise ConfigError(f"{folder}: no report.json (not a folder written by 'waps-tvm compile')")
    try:
        rep = json.loads(path.read_text())
        text = report.markdown(rep)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: not a waps-tvm report ({type(e).__name__}: {e})") from None
    if args.npu_config:
        from targets.npu16.params import load_config
        npu = load_config(args.npu_config)
        try:
            rep = report.recost(rep, npu)
        except ValueError as e:
            raise ConfigError(f"{path}: {e}") from None
        text = report.markdown(rep)
        folder = Path(args.out) if args.out else folder / f"recost-{Path(args.npu_config).stem}"
    elif args.out:
        raise ConfigError("--out goes with --npu-config (a compile's own report is rewritten in its folder)")
    print(text)
    written = report.write(folder, rep)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _float_logits(model, x):
    import torch
    with torch.no_grad():
        return torch.cat([model.float_forward(x[i:i + 1000]) for i in range(0, len(x), 1000)])


def _group_budget(fraction, npu_config, cfg):
    """The hardware-aware group search's request, or None without --npu-budget."""
    if fraction is None:
        return None
    if not cfg.uses_waps:
        raise ConfigError(f"--npu-budget chooses WAPS groups: --method {cfg.method} has none (waps or qdrop+waps)")
    from calib.group_search import GroupBudget
    from targets.npu16.group_cost import NpuGroupCost
    from targets.npu16.params import NPU16, load_config
    return GroupBudget(fraction, NpuGroupCost(load_config(npu_config) if npu_config else NPU16()))


def _group_table(plan):
    from rich.table import Table
    t = Table(title=f"WAPS groups under the npu16 budget: {plan.overhead_cycles:,} of {plan.base_cycles:,} "
                    f"conv/linear compute cycles = {plan.overhead_fraction * 100:.2f} % (budget {plan.fraction * 100:g} %, "
                    "worst case over group assignments)")
    for col in ("layer", "g", "γ^G", "benefit (NSR drop)", "+cycles"):
        t.add_column(col, justify="left" if col in ("layer", "γ^G") else "right")
    for c in plan.layers:
        if c.benefit or c.overhead or len(c.gammas) > 1:
            t.add_row(c.name, str(len(c.gammas)), ", ".join(f"{g:g}" for g in c.gammas), f"{c.benefit:.3g}",
                      "host" if c.base is None else f"{c.overhead:,}")
    return t


def _loss_table(result):
    from rich.table import Table
    t = Table(title="block reconstruction loss (mean over samples of summed squared error)")
    for col in ("#", "block", "kind", "layers", "before (RTN)", "after", "s/iter"):
        t.add_column(col, justify="right" if col not in ("block", "kind") else "left")
    for i, r in enumerate(result.report, 1):
        t.add_row(str(i), r.source, r.kind, str(r.layers), f"{r.loss_before:.4g}", f"{r.loss_after:.4g}",
                  f"{r.sec_per_iter * 1000:.2f} ms" if r.iters else "-")
    return t


def _eval(args) -> int:
    from waps_tvm import api
    from waps_tvm.datasets import load_dataset
    art = api.load_artifact(args.artifact)
    shape = tuple(art.graph.input.attrs["shape"])
    test = load_dataset(args.data, "test", n=args.samples, input_shape=shape)
    if test.y is None:
        raise ConfigError(f"{args.data} has no labels")
    print(f"top-1 {api.evaluate(art, test.x, test.y) * 100:.2f} % on {len(test.x)} images of {args.data}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
