#!/usr/bin/env bash
# Create .venv with the pinned packages and install waps-tvm into it (editable).
# Also installs Debian's Fashion-MNIST package (used by bench/ and tests) when run as root.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "install.sh: note: 'sudo apt-get install dataset-fashion-mnist' enables the Fashion-MNIST benchmarks" >&2
  fi
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
echo "install.sh: ready: .venv/bin/waps-tvm"
