"""Run a compiled folder on a TVM RPC server (``waps-tvm run --rpc host:port``), or on one
free board of a tracker's key (``--tracker host:port --key KEY``; waps_tvm/boards.py).

The library is uploaded to the server, loaded there and run by the Relax VM on the
server's CPU; the input and outputs cross the connection. Start a server on the board with
``python -m tvm.exec.rpc_server --host 0.0.0.0 --port 9090`` (the TVM runtime is enough).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from waps_tvm.boards import Boards
from waps_tvm.runner import RunError, check_input, first_batch, read_folder, run_batches, single

@dataclass
class RemoteCompiled:
    folder: Path
    meta: dict
    boards: Boards
    session: object
    vm: object

    def _invoke(self, x: np.ndarray):
        import tvm
        dev = self.session.cpu()
        self.vm.set_input("main", tvm.runtime.tensor(check_input(self.meta, x), dev))
        # over RPC a returned tuple is an opaque remote object: the stateful API fetches its fields
        self.vm.invoke_stateful("main")

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(dequantized, codes) of a single-output model for any number of samples."""
        return single(self.meta, self.results(x))

    def results(self, x: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """(dequantized, codes) of every model output, one compiled batch per remote call."""
        return run_batches(self._call_batch, self.meta, x)

    def _call_batch(self, x: np.ndarray) -> list[np.ndarray]:
        self._invoke(x)
        return [t.numpy() for t in self.vm.get_outputs("main")]

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


def load(folder: str | Path, boards: Boards) -> RemoteCompiled:
    """The folder's library loaded on one of ``boards`` (a session held until close())."""
    from tvm.runtime.vm import VirtualMachine
    folder = Path(folder)
    meta, lib_path = read_folder(folder)
    session = boards.session()
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
        raise RunError(f"{lib_path}: cannot load on {boards} "
                       f"(compiled for {meta.get('arch', 'x86_64')}): {failed}")
    return RemoteCompiled(folder, meta, boards, session, vm)
