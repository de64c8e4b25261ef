"""``waps-tvm tune``: meta-schedule search with TVM's XGBoost cost model over a model's kernels.

The tasks are the fast form's kernels (relay_passes/fast_kernels.py) in their unscheduled
form, one per distinct workload. Before searching, each kernel's default schedule is
measured and committed as a tuning record; meta-schedule's evolutionary search, guided by
the XGBoost model, then adds candidates. Every measured candidate is kept in
``--work-dir``/search (meta-schedule's JSON database, reused and extended by later runs).
Then each kernel's best candidates are timed again beside its default schedule, the same
way, and ``--work-dir``'s own database (database_workload.json,
database_tuning_record.json) gets one record per kernel: a candidate at least 2 % faster,
else the default, so a tuned build is not slower than the untuned one. ``waps-tuning.json``
names the target the records were measured on. ``compile --tuning-records DIR`` builds every
kernel from its record. A cross target (aarch64) is measured on its board: one TVM RPC server
(``--rpc``), or every server free under a key at a TVM RPC tracker (``--tracker``/``--key``),
which then measure candidates in parallel.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from calib.errors import ConfigError

if TYPE_CHECKING:
    from waps_tvm.boards import Boards

INFO = "waps-tuning.json"
SEARCH = "search"          # meta-schedule's database of every measured candidate, reused by later runs


def ms_target(target, cores: int | None = None):
    """The llvm target that meta-schedule measures on, with its core count: this machine's CPU
    for 'llvm'; for a cross target (aarch64, a JSON dict) its own dict and ``cores``, the count
    of the board behind --rpc / --tracker (or, when loading records, the one they were measured with)."""
    import tvm

    from targets.cpu import llvm_target, resolve
    tgt = resolve(target)
    if tgt.config == {"kind": "llvm"}:
        exported = llvm_target(tgt).export()
        config = {k: str(exported[k]) for k in ("kind", "mcpu", "mtriple") if k in exported}
        return tvm.target.Target({**config, "num-cores": _cores()})
    if tgt.name in ("c", "npu16"):
        raise ConfigError(f"--target {tgt.name} has no TVM kernels to tune (tune --target llvm or aarch64)")
    if not tgt.cross:
        raise ConfigError(f"--target {tgt.name}: tune this machine with --target llvm")
    if cores is None:
        raise ConfigError(f"--target {tgt.name} is tuned on the board itself: pass --rpc HOST:PORT of a TVM RPC "
                          "server there (waps-tvm rpc-server, or rpc-server --emulate for qemu), or "
                          "--tracker HOST:PORT --key KEY of a tracker that boards registered with")
    return tvm.target.Target({**tgt.config, "num-cores": int(cores)})


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _build(mod, target, _params):
    """meta-schedule's default builder minus its import of every target's tensor intrinsics
    (about a minute per build batch on 2 cores)."""
    import tvm
    mod = tvm.s_tir.transform.RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm.driver.build(mod, target=target)


def _measure(sch, target, repeat: int = 20) -> tuple[float, np.ndarray]:
    """(seconds per call, output) of a scheduled kernel on _random_args (its last argument is
    its output)."""
    import tvm
    lib = tvm.compile(sch.mod, target=target)
    dev = tvm.cpu()
    args = _random_args(sch.mod["main"], dev)
    mod = lib.mod if hasattr(lib, "mod") else lib
    timer = mod.time_evaluator("main", dev, number=5, repeat=repeat)
    return float(np.median(timer(*args).results)), args[-1].numpy()


def _export_cross(cc: str, mod) -> str:
    """A built kernel as a shared library linked by the cross gcc ``cc`` (meta-schedule's builder
    would write a .tar that the board has no compiler to link)."""
    import tempfile
    path = os.path.join(tempfile.mkdtemp(prefix="waps-tune-"), "kernel.so")
    mod.export_library(path, cc=cc)
    return path


def _random_args(arg_infos, device) -> list:
    """Random small codes (0..2) for a kernel's arguments — a PrimFunc's, or meta-schedule's
    ArgInfo JSON list — made here and placed on ``device`` (this CPU, or a board's over RPC,
    whose TVM runtime may be built without tvm.contrib.random)."""
    import tvm
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    infos = ArgInfo.from_prim_func(arg_infos) if isinstance(arg_infos, tvm.tirx.PrimFunc) else \
        [ArgInfo.from_json(info) for info in arg_infos]
    rng = np.random.default_rng(0)
    return [tvm.runtime.tensor(rng.integers(0, 3, size=[int(d) for d in a.shape]).astype(str(a.dtype)), device)
            for a in infos]


def _alloc_remote(session, device, args_info, alloc_repeat):
    """meta-schedule's RPC argument allocator: _random_args, ``alloc_repeat`` times."""
    return [_random_args(args_info, device) for _ in range(alloc_repeat)]


def _remote_cores(boards: "Boards") -> int:
    """The thread count of the TVM runtime on (one of) ``boards``."""
    return int(boards.session().get_function("runtime.NumThreads")())


def _measure_remote(sch, target, boards: "Boards", cc: str, repeat: int = 10) -> tuple[float, np.ndarray]:
    """_measure on (one of) ``boards``."""
    import tvm
    path = Path(_export_cross(cc, tvm.compile(sch.mod, target=target)))
    session = boards.session()
    name = f"waps_default_{os.getpid()}_{time.monotonic_ns()}.so"
    session.upload(str(path), target=name)
    shutil.rmtree(path.parent)
    lib = session.load_module(name)
    dev = session.cpu()
    args = _random_args(sch.mod["main"], dev)
    timer = lib.time_evaluator(lib.entry_name, dev, number=3, repeat=repeat)
    secs, out = float(np.median(timer(*args).results)), args[-1].numpy()
    del lib, session
    return secs, out


def tune(art, target: str, trials: int, work_dir: str | os.PathLike, batch: int = 1, progress: bool = True,
         boards: "Boards | None" = None) -> dict:
    """Tune ``art``'s kernels; returns a summary (kernels, trials, seconds, improved, searched,
    default_ms, best_ms, boards: how many measured candidates at once). ``target`` 'llvm'
    measures on this machine; a cross target (aarch64) on ``boards`` (waps_tvm.boards.Boards:
    one RPC server, or the servers free under a tracker's key when tuning starts, one
    candidate each at a time), each candidate linked by the cross gcc and uploaded."""
    import tvm
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    from relay_passes import fast_kernels
    from waps_tvm.compiler import lower_artifact
    if trials < 0:
        raise ConfigError(f"--trials must be at least 0 (got {trials})")
    from targets.cpu import export_cc, resolve
    cross = resolve(target).cross
    if boards is not None and not cross:
        flag = "--rpc" if boards.key is None else "--tracker"
        raise ConfigError(f"{flag} measures a cross target's kernels on its board (tune --target aarch64 {flag} ...); "
                          "--target llvm is measured on this machine")
    # the servers free before this run opens any session of its own (a key names one kind of board)
    workers = boards.workers() if cross and boards else 0
    target_ms = ms_target(target, _remote_cores(boards) if workers else None)   # usage errors first,
    cc = export_cc(target) if cross else None                                   # then the toolchain
    work = Path(work_dir)
    info_path = work / INFO
    if info_path.exists():
        _check_info(info_path, target_ms)
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--work-dir {work}: {e.strerror or e}") from None
    os.environ.setdefault("TVM_NUM_THREADS", str(_cores()))      # the runner's workers use every core too
    t0 = time.perf_counter()
    if not cross:
        fast_kernels.alias_tvm_vnni()          # meta-schedule's VNNI candidates: our intrinsic
    with fast_kernels.collect() as pairs:
        lower_artifact(art, batch, "fast", target=target)
    unique = {}
    for func, sch in pairs:
        unique.setdefault(tvm_ffi.structural_hash(func), (func, sch))
    (work / SEARCH).mkdir(exist_ok=True)
    db = ms.database.JSONDatabase(work_dir=str(work / SEARCH))

    def measure(sch) -> tuple[float, np.ndarray]:
        return _measure_remote(sch, target_ms, boards, cc) if cross else _measure(sch, target_ms)
    if progress:
        print(f"{len(unique)} distinct kernels; measuring their default schedules", flush=True)
    defaults, expected = {}, {}
    for h, (func, sch) in unique.items():
        mod = tvm.IRModule({"main": func})
        workload = db.commit_workload(mod)
        defaults[h], expected[h] = measure(sch)
        db.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, workload, [tvm.runtime.convert(defaults[h])], target_ms,
            ms.arg_info.ArgInfo.from_prim_func(func)))
    skipped = 0                                # kernels meta-schedule's rules cannot search
    if trials:
        contexts = [ms.TuneContext(mod=tvm.IRModule({"main": func}), target=target_ms,
                                   space_generator="post-order-apply", search_strategy="evolutionary",
                                   task_name=f"k{i}", num_threads=_cores())
                    for i, (func, _) in enumerate(unique.values())]
        searchable = []
        for ctx in contexts:      # some of meta-schedule's rules fail on some kernels (a TVM limit):
            try:                  # those keep their default schedule
                if len(ctx.generate_design_space()) > 0:
                    searchable.append(ctx)
            except Exception:  # noqa: BLE001 (ScheduleError and friends)
                pass
        skipped = len(contexts) - len(searchable)
        contexts = searchable
        logger = logging.getLogger("tvm.s_tir.meta_schedule")
        logger.setLevel(logging.INFO if progress else logging.WARNING)
        if progress and not logger.handlers:      # the task scheduler's table after each round
            logger.addHandler(logging.StreamHandler())
    if trials and contexts:
        evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=20)
        if cross:
            import functools

            from waps_tvm.boards import runner_session
            builder = ms.builder.LocalBuilder(max_workers=_cores(), timeout_sec=120, f_build=_build,
                                              f_export=functools.partial(_export_cross, cc))
            # one pool worker per board: each holds one session at a time, on the board it was handed
            runner = ms.runner.RPCRunner(boards.rpc_config(session_timeout_sec=300), evaluator,
                                         max_workers=workers, f_alloc_argument=_alloc_remote,
                                         f_create_session=functools.partial(runner_session, boards))
        else:
            builder = ms.builder.LocalBuilder(max_workers=_cores(), timeout_sec=120, f_build=_build)
            runner = ms.runner.LocalRunner(evaluator_config=evaluator)
        ms.tune.tune_tasks(
            tasks=contexts, task_weights=[1.0] * len(contexts), work_dir=str(work / SEARCH),
            max_trials_global=trials, num_trials_per_iter=min(16, max(trials, 1)), database=db,
            cost_model=ms.cost_model.XGBModel(num_warmup_samples=min(32, max(trials // 2, 1)),
                                              num_tuning_cores=_cores()),
            builder=builder, runner=runner)
    if progress:
        print("re-measuring each kernel's best candidates beside its default schedule", flush=True)
    best = _select(unique, db, defaults, expected, measure, target_ms, work)
    improved = sum(best[h] < defaults[h] for h in unique)
    info = {"format": "waps-tvm-tuning", "version": 1, "target": _key(target_ms),
            "kernels": len(unique), "trials": trials + (json.loads(info_path.read_text()).get("trials", 0)
                                                         if info_path.exists() else 0)}
    tmp = info_path.with_name(f".{INFO}.tmp")
    tmp.write_text(json.dumps(info, indent=1))
    tmp.replace(info_path)
    return {"kernels": len(unique), "trials": trials, "seconds": time.perf_counter() - t0, "improved": improved,
            "searched": len(unique) - skipped, "boards": workers,
            "default_ms": 1000 * sum(defaults.values()), "best_ms": 1000 * sum(best.values())}


def _select(unique: dict, db, defaults: dict, expected: dict, measure, target_ms, work: Path,
            top: int = 3) -> dict:
    """Write the records compile applies: one per kernel, in ``work``'s own database (the search
    history stays in SEARCH). A search candidate's time comes from one short run of
    meta-schedule's runner, the default's from ``measure``, so the search's best is biased to
    lucky timings; the ``top`` candidates are timed again by ``measure`` and one replaces the
    default schedule only when it is at least 2 % faster and its output on the same inputs is
    byte-identical to the default's (``expected``): a schedule must not change the numbers, and
    under qemu some aarch64 candidates did. Returns seconds per kernel chosen."""
    import tempfile

    import tvm
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms
    chosen = {}
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        out = ms.database.JSONDatabase(work_dir=tmp)
        for h, (func, default_sch) in unique.items():
            mod = tvm.IRModule({"main": func})
            best_secs, best_trace = defaults[h], default_sch.trace
            for rec in db.get_top_k(db.commit_workload(mod), top):
                if float(np.mean([float(v) for v in rec.run_secs])) >= defaults[h] * 0.98:
                    continue                       # not even its lucky run beat the default
                sch = s_tir.Schedule(mod)
                rec.trace.apply_to_schedule(sch, remove_postproc=False)
                secs, got = measure(sch)
                if secs < 0.98 * defaults[h] and secs < best_secs and np.array_equal(got, expected[h]):
                    best_secs, best_trace = secs, rec.trace
            chosen[h] = best_secs
            out.commit_tuning_record(ms.database.TuningRecord(
                best_trace, out.commit_workload(mod), [tvm.runtime.convert(best_secs)], target_ms,
                ms.arg_info.ArgInfo.from_prim_func(func)))
        del out
        for name in ("database_workload.json", "database_tuning_record.json"):
            os.replace(os.path.join(tmp, name), work / name)
    return chosen


KEYS = ("kind", "mcpu", "mtriple", "num-cores")


def _key(target) -> dict:
    """The target fields that decide whether records apply (plain JSON)."""
    exported = target.export()
    return {k: (int(exported[k]) if k == "num-cores" else str(exported[k])) for k in KEYS if k in exported}


def _check_info(path: Path, target_ms) -> None:
    try:
        info = json.loads(path.read_text())
        recorded = info["target"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: not a waps-tvm tuning record folder ({type(e).__name__})") from None
    here = _key(target_ms)
    for key in KEYS:
        if recorded.get(key) != here.get(key):
            raise ConfigError(f"{path.parent}: records were measured for {key}={recorded.get(key)!r}, this target "
                              f"has {here.get(key)!r}; tune again for this target")


def load_records(work_dir: str | os.PathLike, art, batch: int, target: str):
    """(database, meta-schedule target) after checking that the records were measured for this
    target and cover this model's kernels; a ConfigError (one line) otherwise."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from relay_passes import fast_kernels
    from waps_tvm.compiler import lower_artifact
    work = Path(work_dir)
    if not (work / INFO).is_file() or not (work / "database_workload.json").is_file():
        raise ConfigError(f"--tuning-records {work}: not a folder written by 'waps-tvm tune'")
    try:
        cores = json.loads((work / INFO).read_text())["target"].get("num-cores")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        cores = None                           # _check_info names the problem
    from targets.cpu import resolve
    target_ms = ms_target(target, cores if resolve(target).cross else None)
    _check_info(work / INFO, target_ms)
    if not resolve(target).cross:
        fast_kernels.alias_tvm_vnni()          # records may name it (tune searched with it)
    try:
        db = ms.database.JSONDatabase(work_dir=str(work), allow_missing=False)
    except Exception as e:  # noqa: BLE001 (TVM raises several types for a bad JSON file)
        raise ConfigError(f"--tuning-records {work}: unreadable ({str(e).splitlines()[0] if str(e) else e})") from None
    with fast_kernels.collect() as pairs:
        lower_artifact(art, batch, "fast", target=target)
    # tune records every kernel's default schedule before searching, so records made for this
    # model cover all of its kernels
    known = sum(db.has_workload(tvm.IRModule({"main": func})) for func, _ in pairs)
    if known < len(pairs):
        raise ConfigError(f"--tuning-records {work}: only {known} of this model's {len(pairs)} kernels are in the "
                          f"records (tuned for another model, batch size or waps-tvm version)")
    return db, target_ms
