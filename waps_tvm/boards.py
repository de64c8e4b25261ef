"""Where TVM RPC sessions come from: one server (``--rpc HOST:PORT``) or the servers a TVM RPC
tracker holds under a key (``--tracker HOST:PORT --key KEY``, a farm of boards).

Start a tracker with ``waps-tvm rpc-tracker`` (``python -m tvm.exec.rpc_tracker``) and register
each board's server with it: ``waps-tvm rpc-server [--emulate] --tracker HOST:PORT --key KEY``.
A tracker hands a request the next free server under the key and queues it while all are busy;
a key names one kind of board (the same CPU and core count), as in TVM.

Every wait here is bounded: TVM's own connect retries for a minute and its handshake and
tracker request wait forever, so a wrong address would otherwise hang the command.
"""
from __future__ import annotations

import socket
import threading
from dataclasses import dataclass
from typing import Callable, TypeVar

from waps_tvm.runner import RunError, first_line

CONNECT_TIMEOUT_S = 5.0
SESSION_TIMEOUT_S = 60.0     # the handshake, and a tracker request's wait for a free server

T = TypeVar("T")


def parse_address(address: str, flag: str = "--rpc") -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RunError(f"{flag} {address!r}: expected host:port (e.g. 192.168.1.20:9090)")
    return host.strip("[]"), int(port)


def _reachable(host: str, port: int, what: str, timeout: float) -> None:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        reason = "timed out" if isinstance(e, socket.timeout) else (e.strerror or str(e))
        raise RunError(f"cannot reach {what} at {host}:{port} ({reason})") from None


def _within(call: Callable[[], T], seconds: float, what: str, late: str) -> T:
    """``call()`` in a daemon thread; its error as a one-line RunError naming ``what``, and
    ``late`` as the RunError when it has not returned after ``seconds``."""
    result: dict = {}

    def work():
        try:
            result["value"] = call()
        except Exception as e:  # noqa: BLE001 (TVM raises many types; one line for the user)
            result["error"] = first_line(e)
    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    worker.join(seconds)
    if "value" in result:
        return result["value"]
    if "error" in result:
        raise RunError(f"{what}: {result['error']}")
    raise RunError(late)


@dataclass(frozen=True)
class Boards:
    """One RPC server (``key`` None) or the servers registered under ``key`` with the tracker at
    host:port. Picklable: meta-schedule's runner workers open their sessions from it."""
    host: str
    port: int
    key: str | None = None

    @classmethod
    def from_flags(cls, rpc: str | None = None, tracker: str | None = None, key: str | None = None
                   ) -> "Boards | None":
        """The boards that --rpc, or --tracker with --key, name; None when neither is given."""
        if rpc is not None and tracker is not None:
            raise RunError("--rpc and --tracker are two ways to reach boards: give one")
        if key is not None and tracker is None:
            raise RunError("--key names a kind of board at an RPC tracker: give --tracker HOST:PORT too")
        if tracker is not None:
            if not key:
                raise RunError("--tracker needs --key KEY, the key its servers registered under "
                               "(waps-tvm rpc-server --tracker HOST:PORT --key KEY)")
            return cls(*parse_address(tracker, "--tracker"), key)
        return None if rpc is None else cls(*parse_address(rpc, "--rpc"))

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def __str__(self) -> str:
        if self.key is None:
            return f"the RPC server at {self.address}"
        return f"key {self.key!r} at the RPC tracker {self.address}"

    def summary(self) -> dict:
        """The tracker's summary: ``queue_info`` {key: {free, pending}} and ``server_info``
        [{key: 'server:KEY', addr: [host, port]}] (TVM's format)."""
        from tvm import rpc
        assert self.key is not None, "a direct server has no tracker summary"
        _reachable(self.host, self.port, "the RPC tracker", CONNECT_TIMEOUT_S)
        return _within(lambda: rpc.connect_tracker(self.host, self.port).summary(), SESSION_TIMEOUT_S,
                       f"RPC tracker at {self.address}",
                       f"the RPC tracker at {self.address} accepted the connection but did not answer "
                       f"within {SESSION_TIMEOUT_S:.0f} s (is it a tracker?)")

    def workers(self) -> int:
        """How many sessions can run at once: 1 for a direct server; for a tracker the free
        servers under the key now (a RunError when there are none)."""
        if self.key is None:
            return 1
        s = self.summary()
        free = int(s.get("queue_info", {}).get(self.key, {}).get("free", 0))
        if free:
            return free
        self._registered(s)
        raise RunError(f"no free server under key {self.key!r} at the RPC tracker {self.address} "
                       "(all registered ones are busy)")

    def _registered(self, summary: dict) -> int:
        """How many servers ``summary`` lists under the key; a RunError naming the keys there
        when none."""
        servers = summary.get("server_info", [])
        n = sum(info.get("key") == f"server:{self.key}" for info in servers)
        if n == 0:
            keys = sorted({info.get("key", "").partition(":")[2] for info in servers})
            raise RunError(f"no server under key {self.key!r} at the RPC tracker {self.address} (keys there: "
                           + (", ".join(repr(k) for k in keys) if keys else "none") + ")")
        return n

    def session(self, session_timeout: float = 0):
        """A tvm.rpc session on one board: the server itself, or the next free server under the
        key (waiting up to SESSION_TIMEOUT_S for one). ``session_timeout``: seconds after which
        the server ends the session (0: never)."""
        from tvm import rpc
        if self.key is None:
            _reachable(self.host, self.port, "the RPC server", CONNECT_TIMEOUT_S)
            return _within(lambda: rpc.connect(self.host, self.port, session_timeout=session_timeout),
                           SESSION_TIMEOUT_S, f"RPC server at {self.address}",
                           f"RPC server at {self.address} accepted the connection but did not answer within "
                           f"{SESSION_TIMEOUT_S:.0f} s (busy with another session?)")
        self._registered(self.summary())       # else the request would wait for a board that never comes
        return _within(lambda: rpc.connect_tracker(self.host, self.port).request(
                           self.key, session_timeout=session_timeout, max_retry=2),
                       SESSION_TIMEOUT_S, f"{self}",
                       f"no server under key {self.key!r} at the RPC tracker {self.address} became free "
                       f"within {SESSION_TIMEOUT_S:.0f} s")

    def rpc_config(self, session_timeout_sec: int):
        """meta-schedule's RPCConfig; its runner opens sessions with :func:`runner_session`."""
        from tvm.s_tir.meta_schedule.runner import RPCConfig
        # a direct server has no key: RPCConfig requires one, runner_session ignores it
        return RPCConfig(tracker_host=self.host, tracker_port=self.port, tracker_key=self.key or "direct",
                         session_timeout_sec=session_timeout_sec)


def runner_session(boards: Boards, rpc_config):
    """meta-schedule RPCRunner's f_create_session (bind ``boards`` with functools.partial)."""
    return boards.session(rpc_config.session_timeout_sec)


def server_args(host: str, port: int, tracker: str | None = None, key: str | None = None) -> list[str]:
    """Arguments of ``python -m tvm.exec.rpc_server``: listen on host:port, and register with
    the tracker under ``key`` when one is given."""
    args = ["--host", host, "--port", str(port), "--port-end", str(port + 1)]
    if tracker is not None:
        args += ["--tracker", tracker, "--key", key or ""]
    return args
