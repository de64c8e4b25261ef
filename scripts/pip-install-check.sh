#!/usr/bin/env bash
# `pip install .` alone, into a fresh venv, gives a working waps-tvm: runs the README's first
# command's main job (compile digit-recognizer for npu16, then report) from a directory outside
# the source tree, so only the installed package (and its package data) is on sys.path.
# CI runs it with fewer calibration iterations and test images (as tests/waps_tvm/test_cli.py's
# slow test does), which takes the same code path; `--full` runs the README's command as written.
# The venv ($PKG_VENV, default .venv-pkg here; about 6 GB: torch's CUDA wheels) and the run's
# folder are removed on exit. pip's cache and the local wheel index keep the install short.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=$PWD
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=${PKG_VENV:-$SRC/.venv-pkg}
JOB=(compile digit-recognizer --data mnist --target npu16 -o out/mnist)
[ "${1:-}" = --full ] || JOB+=(--samples 128 --iters 40 --eval-samples 300 -q)
RUN=$(mktemp -d)
trap 'rm -rf "$VENV" "$RUN"' EXIT
rm -rf "$VENV"
"$PY" -m venv "$VENV"
# --no-compile: skips byte-compiling torch's thousands of modules; nothing else differs from `pip install .`
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-compile "$SRC"
cd "$RUN"
"$VENV/bin/python" - "$SRC" <<'PY'
import sys
from pathlib import Path

import codegen, targets, waps_tvm

src = Path(sys.argv[1]).resolve()
for mod in (waps_tvm, codegen, targets):
    where = Path(mod.__file__).resolve()
    assert src / mod.__name__ != where.parent, f"{mod.__name__} imported from the source tree: {where}"
print(f"pip-install-check: waps_tvm from {Path(waps_tvm.__file__).parent}")
PY
"$VENV/bin/waps-tvm" "${JOB[@]}"
"$VENV/bin/waps-tvm" report out/mnist
test -s out/mnist/report.md
echo "pip-install-check: ok"
