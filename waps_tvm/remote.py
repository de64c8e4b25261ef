"""Run a compiled folder on a TVM RPC server (``waps-tvm run --rpc host:port``).

The library is uploaded to the server, loaded there and run by the Relax VM on the
server's CPU; the input and outputs cross the connection. Start a server on the board with
``python -m tvm.exec.rpc_server --host 0.0.0.0 --port 9090`` (the TVM runtime is enough).
"""
from __future__ import annotations

import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from waps_tvm.runner import RunError, check_input, first_batch, first_line, read_folder, run_batches

CONNECT_TIMEOUT_S = 5.0
HANDSHAKE_TIMEOUT_S = 60.0


def parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RunError(f"--rpc {address!r}: expected host:port (e.g. 192.168.1.20:9090)")
    return host.strip("[]"), int(port)


def connect(address: str, timeout: float = CONNECT_TIMEOUT_S):
    """A tvm.rpc session; a RunError naming host:port when nothing answers within ``timeout``
    (TVM's own connect would wait for the system's TCP timeout, minutes for a dropped packet)."""
    from tvm import rpc
    host, port = parse_address(address)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        reason = "timed out" if isinstance(e, socket.timeout) else (e.strerror or str(e))
        raise RunError(f"cannot reach the RPC server at {host}:{port} ({reason})") from None
    # TVM's handshake has no timeout: a server busy with another session would block forever
    result: dict = {}

    def handshake():
        try:
            result["session"] = rpc.connect(host, port)
        except Exception as e:  # noqa: BLE001 (TVM raises many types; one line for the user)
            result["error"] = first_line(e)
    worker = threading.Thread(target=handshake, daemon=True)
    worker.start()
    worker.join(HANDSHAKE_TIMEOUT_S)
    if "session" in result:
        return result["session"]
    if "error" in result:
        raise RunError(f"RPC server at {host}:{port}: {result['error']}")
    raise RunError(f"RPC server at {host}:{port} accepted the connection but did not answer within "
                   f"{HANDSHAKE_TIMEOUT_S:.0f} s (busy with another session?)")


@dataclass
class RemoteCompiled:
    folder: Path
    meta: dict
    address: str
    session: object
    vm: object

    def _invoke(self, x: np.ndarray):
        import tvm
        dev = self.session.cpu()
        self.vm.set_input("main", tvm.runtime.tensor(check_input(self.meta, x), dev))
        # over RPC a returned tuple is an opaque remote object: the stateful API fetches its fields
        self.vm.invoke_stateful("main")

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Outputs for any number of samples, one compiled batch per remote call."""
        return run_batches(self._call_batch, self.meta, x)

    def _call_batch(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self._invoke(x)
        deq, codes = self.vm.get_outputs("main")
        return deq.numpy(), codes.numpy()

    def close(self) -> None:
        """Drop the remote VM, module and session now: a TVM RPC server serves one session at a
        time, so a session left for the garbage collector blocks the next client."""
        import gc
        self.vm = self.session = None
        gc.collect()

    def time(self, x: np.ndarray, repeat: int) -> list[float]:
        """Seconds per call of one compiled batch (the first of ``x``), timed on the server
        (after one warm-up)."""
        self._invoke(first_batch(self.meta, x))
        timer = self.vm.time_evaluator("invoke_stateful", self.session.cpu(), number=1, repeat=repeat)
        return list(timer("main").results)


def load(folder: str | Path, address: str, timeout: float = CONNECT_TIMEOUT_S) -> RemoteCompiled:
    from tvm.runtime.vm import VirtualMachine
    folder = Path(folder)
    meta, lib_path = read_folder(folder)
    session = connect(address, timeout)
    # the server keeps uploads in one temporary folder: name by content, not by folder
    name = f"waps_{meta.get('library', {}).get('sha256', 'model')[:16]}.so"
    failed = None
    try:
        session.upload(str(lib_path), target=name)
        lib = session.load_module(name)
        vm = VirtualMachine(lib, session.cpu())
    except Exception as e:  # noqa: BLE001
        # the first line of an RPCError only says that the remote call failed
        failed = ([ln for ln in str(e).splitlines() if ln.strip()][-1:] or [type(e).__name__])[0]
    if failed is not None:
        import gc
        session = lib = None            # release the server (it serves one session at a time)
        gc.collect()
        raise RunError(f"{lib_path}: cannot load on the RPC server at {address} "
                       f"(compiled for {meta.get('arch', 'x86_64')}): {failed}")
    return RemoteCompiled(folder, meta, address, session, vm)
