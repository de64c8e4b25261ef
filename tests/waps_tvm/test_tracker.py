"""Tuning across a farm: ``waps-tvm rpc-tracker``, two emulated aarch64 boards registered under
one key (``rpc-server --emulate --tracker … --key …``), ``tune --tracker`` measuring candidates
on both at once, and ``run --tracker`` of the tuned build, bit-exact (waps_tvm/boards.py).

Needs scripts/aarch64-emulation.sh; without it the farm test fails in CI and is skipped
elsewhere. The one-line errors of the tracker flags are in test_bad_inputs.py."""
import json
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime

import numpy as np
import pytest

from calib import artifact
from relay_passes import reference
from targets import cpu
from tests.emulation_helpers import require
from tests.waps_tvm.conftest import free_port, require_tornado
from tests.waps_tvm.test_cli import run
from waps_tvm import boards, emulation
from waps_tvm.compiler import lower_artifact

EXE = [sys.executable, "-m", "waps_tvm.cli"]
KEY = "a64-farm"


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to a `waps-tvm rpc-*` process: it stops its server's process group itself."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    """A tracker (waps-tvm rpc-tracker) and two emulated aarch64 servers registered with it
    under KEY (waps-tvm rpc-server --emulate --tracker); yields (tracker address, server logs)
    once the tracker lists both as free."""
    require(lambda: cpu.export_cc("aarch64"))
    require(emulation.python)
    require_tornado()
    d = tmp_path_factory.mktemp("farm")
    port = free_port()
    address = f"127.0.0.1:{port}"
    procs, logs = [], [d / "server0.log", d / "server1.log"]
    try:
        procs.append(subprocess.Popen(EXE + ["rpc-tracker", "--port", str(port)], stdout=subprocess.DEVNULL,
                                      stderr=open(d / "tracker.log", "w")))
        tracker = boards.Boards("127.0.0.1", port, KEY)
        deadline = time.monotonic() + 240               # qemu start + `import tvm` of two servers on 2 cores
        for log in logs:
            while True:                                 # the servers check the tracker before they start
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    assert procs[0].poll() is None and time.monotonic() < deadline, (d / "tracker.log").read_text()
                    time.sleep(0.3)
            procs.append(subprocess.Popen(EXE + ["rpc-server", "--emulate", "--port", str(free_port()),
                                                 "--tracker", address, "--key", KEY],
                                          stdout=subprocess.DEVNULL, stderr=open(log, "w")))
        while True:
            try:
                free = tracker.workers()
            except boards.RunError:
                free = 0
            if free == 2:
                break
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, \
                f"the servers did not register: {[log.read_text()[-500:] for log in logs]}"
            time.sleep(1)
        yield address, logs
    finally:
        for p in reversed(procs):
            _stop(p)


def _sessions(log) -> list[tuple[float, float]]:
    """(start, end) seconds of each RPC session a server's log shows (TVM's server logs
    'start serving' and 'finish serving' with millisecond timestamps)."""
    stamps = {"start": [], "finish": []}
    for line in log.read_text().splitlines():
        m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) INFO (start|finish) serving", line)
        if m:
            stamps[m[2]].append(datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S.%f").timestamp())
    return list(zip(stamps["start"], stamps["finish"]))


def _concurrent(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> bool:
    """Whether a session of one board ran mostly inside a session of the other: their overlap
    exceeds half the shorter one. Sessions handed out one after another overlap only by the
    moments a server takes to log the end of one after its client has left (tenths of the
    session under qemu), so this holds only when two workers measured at once."""
    return any(min(e0, e1) - max(s0, s1) > 0.5 * min(e0 - s0, e1 - s1) for s0, e0 in a for s1, e1 in b)


def test_concurrent_tells_parallel_sessions_from_consecutive_ones():
    consecutive = [(0.0, 0.30), (0.61, 0.90)], [(0.28, 0.62), (0.88, 1.2)]    # each starts as the other ends
    assert not _concurrent(*consecutive)
    assert _concurrent([(0.0, 0.33), (0.51, 1.05)], [(0.0, 0.43), (0.60, 0.94)])


@pytest.mark.slow
def test_tune_through_a_tracker_measures_on_both_boards_at_once(farm, tiny_artifact, tmp_path, capsys):
    """tune --tracker --key: the runner gets one worker per free board and both emulated boards
    serve candidate sessions at the same time; the records build an aarch64 library that runs
    (run --tracker, on one board of the pool) bit-exact against the reference interpreter."""
    address, logs = farm
    waps = artifact.save(tiny_artifact, tmp_path / "tiny.waps")
    for attempt in range(2):
        # Whether two qemu boards on a 2-core machine hold a round's sessions at once depends on
        # the scheduler (a loaded CI machine once serialised one tune); a second tune must show it.
        rec = tmp_path / f"rec{attempt}"
        code, out, err = run(["tune", waps, "--target", "aarch64", "--tracker", address, "--key", KEY,
                              "--work-dir", rec, "--trials", "4", "-q"], capsys)
        assert code == 0, err
        assert "4 trials" in out and f"measured on 2 boards (key '{KEY}' at the RPC tracker {address})" in out, out
        info = json.loads((rec / "waps-tuning.json").read_text())
        assert info["target"]["mtriple"] == "aarch64-linux-gnu"
        records = [json.loads(line)
                   for line in (rec / "search" / "database_tuning_record.json").read_text().splitlines()]
        workloads = (rec / "database_workload.json").read_text().splitlines()
        assert len([r for r in records if all(float(s) < 1e9 for s in r[1][1])]) > len(workloads)
        a, b = (_sessions(log) for log in logs)
        assert a and b, [log.read_text()[-2000:] for log in logs]       # both boards served sessions
        if _concurrent(a, b):                                           # and at the same time
            break
    else:
        raise AssertionError(f"no two sessions of the boards overlapped in two tunes: {a} / {b}")

    x = np.random.default_rng(5).normal(size=(1, 1, 16, 16)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    assert run(["compile", waps, "--target", "aarch64", "--tuning-records", rec, "-o", tmp_path / "tuned", "-q"],
               capsys)[0] == 0
    code, out, err = run(["run", tmp_path / "tuned", "--input", tmp_path / "x.npy", "--tracker", address,
                          "--key", KEY, "--codes", "--output", tmp_path / "codes.npy"], capsys)
    assert code == 0, err
    ref = reference.run(lower_artifact(tiny_artifact, 1).program, x)[1]
    assert np.load(tmp_path / "codes.npy").tobytes() == np.ascontiguousarray(ref).tobytes()


def test_free_boards_set_the_runner_workers(empty_tracker):
    """workers(): a direct server is one worker; a tracker's key with no server is an error."""
    assert boards.Boards("127.0.0.1", 9).workers() == 1
    with pytest.raises(boards.RunError, match="no server under key 'k'"):
        boards.Boards(*boards.parse_address(empty_tracker, "--tracker"), "k").workers()
    cfg = boards.Boards("h", 1, "k").rpc_config(30)
    assert (cfg.tracker_host, cfg.tracker_port, cfg.tracker_key, cfg.session_timeout_sec) == ("h", 1, "k", 30)
