#!/usr/bin/env bash
# Create .venv with the pinned packages and install waps-tvm into it (editable).
# Also installs Debian's Fashion-MNIST package (used by bench/ and tests) when run as root.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
# Debian packages: Fashion-MNIST (bench/ and tests), chromium + chromedriver (the netron browser test)
need=()
[ -d /usr/share/datasets/fashion-mnist ] || need+=(dataset-fashion-mnist)
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get -o DPkg::Lock::Timeout=300 update -qq && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq "${need[@]}" >/dev/null
  else
    echo "install.sh: note: 'sudo apt-get install ${need[*]}' enables the Fashion-MNIST benchmarks and the browser test" >&2
  fi
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
echo "install.sh: ready: .venv/bin/waps-tvm"
