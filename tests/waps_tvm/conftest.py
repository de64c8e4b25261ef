import importlib.util
import os
import socket

import pytest


def free_port() -> int:
    """A TCP port nothing listens on now (closed again: connecting to it is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_tornado() -> None:
    """TVM's RPC tracker runs on tornado: fail under CI without it (the install must provide
    it), skip elsewhere, as tests/emulation_helpers.require does for the aarch64 setup."""
    if importlib.util.find_spec("tornado") is None:
        msg = "TVM's RPC tracker needs the tornado package (pip install tornado)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture(scope="module")
def empty_tracker() -> str:
    """host:port of TVM's RPC tracker (x86, in a popen worker) with no server registered."""
    require_tornado()
    from tvm.rpc.tracker import Tracker
    port = free_port()
    tracker = Tracker("127.0.0.1", port=port, port_end=port + 1, silent=True)
    try:
        yield f"127.0.0.1:{tracker.port}"
    finally:
        tracker.terminate()
