"""The skip/fail rule of the tests that need aarch64 cross-compilation or qemu emulation
(scripts/aarch64-emulation.sh): without it they fail in CI, which runs the script before the
tests, and are skipped elsewhere."""
from __future__ import annotations

import os

import pytest

from calib.errors import ConfigError
from waps_tvm import runner


def require(check) -> None:
    """Run ``check`` (e.g. ``emulation.python``, ``lambda: cpu.export_cc("aarch64")``); its
    ConfigError or RunError fails the test under CI and skips it elsewhere."""
    try:
        check()
    except (ConfigError, runner.RunError) as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI runs scripts/aarch64-emulation.sh before the tests: {e}")
        pytest.skip(str(e))
