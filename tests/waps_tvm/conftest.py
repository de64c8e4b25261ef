import socket

import pytest


def free_port() -> int:
    """A TCP port nothing listens on now (closed again: connecting to it is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def empty_tracker() -> str:
    """host:port of TVM's RPC tracker (x86, in a popen worker) with no server registered."""
    from tvm.rpc.tracker import Tracker
    port = free_port()
    tracker = Tracker("127.0.0.1", port=port, port_end=port + 1, silent=True)
    try:
        yield f"127.0.0.1:{tracker.port}"
    finally:
        tracker.terminate()
