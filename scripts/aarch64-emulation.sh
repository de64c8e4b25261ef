#!/usr/bin/env bash
# Cross-compile for aarch64 and run the result under qemu-user on an x86_64 Debian 12 host.
# Idempotent; a second run takes seconds. Needs root only for the host packages.
#
#   host (amd64):   gcc-aarch64-linux-gnu + libc6-dev-arm64-cross (the exporting linker;
#                   without the libc it fails with "cannot find crti.o"), qemu-user-static
#   $ROOT/sysroot:  arm64 Debian python3.11 and its libraries, unpacked with dpkg-deb -x
#                   (the host never installs an arm64 package; no binfmt_misc either)
#   $ROOT/site:     aarch64 wheels (TVM runtime, NumPy, ...) installed by the x86 pip
#   $ROOT/sysroot/usr/bin/python3-qemu: the aarch64 python, launched through qemu
#
# Env: ROOT (default: .aarch64 at the repository root; waps-tvm looks there, or in
#      $WAPS_AARCH64_ROOT), PY (x86 python with pip; default .venv/bin/python, else python3),
#      SLIM=0 keeps the aarch64 libtvm_compiler.so (240 MB; running needs only the runtime).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
ROOT=${ROOT:-$REPO/.aarch64}
PY=${PY:-$REPO/.venv/bin/python}
[ -x "$PY" ] || PY=python3
SLIM=${SLIM:-1}
APT=(apt-get -o DPkg::Lock::Timeout=300 -q)
export DEBIAN_FRONTEND=noninteractive
SYSROOT=$ROOT/sysroot
SITE=$ROOT/site
t0=$(date +%s)

# The aarch64 side runs the same numerics stack as the x86 venv: versions from the pins in
# requirements/*.txt (requirements.txt includes them).
pin() { cat "$REPO"/requirements/*.txt | sed -n "s/^$1==\([^ #]*\).*/\1/p" | head -n1; }
WHEELS=("apache-tvm==$(pin apache-tvm)" "apache-tvm-ffi==$(pin apache-tvm-ffi)" "numpy==$(pin numpy)"
        "ml_dtypes==$(pin ml_dtypes)" "typing_extensions==$(pin typing_extensions)"
        "cloudpickle==$(pin cloudpickle)" "psutil==$(pin psutil)")   # the last two: tvm.exec.rpc_server
for w in "${WHEELS[@]}"; do
  [[ $w == *== ]] && { echo "aarch64-emulation.sh: no pin for ${w%==} in requirements/*.txt" >&2; exit 1; }
done

# ---- 1. host packages (amd64; nothing already installed is upgraded) ---------------------
HOST_PKGS=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static)
missing=()
for p in "${HOST_PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
"$PY" -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
arm64=0; dpkg --print-foreign-architectures | grep -qx arm64 && arm64=1
if [ ${#missing[@]} -gt 0 ] || [ "$arm64" = 0 ] || ! apt-cache show python3.11-minimal:arm64 >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ]; then
    echo "aarch64-emulation.sh: run as root (or: sudo dpkg --add-architecture arm64 && sudo apt-get update" \
         "&& sudo apt-get install ${HOST_PKGS[*]})" >&2
    exit 1
  fi
  # arm64 is added only so apt can download arm64 .debs for the sysroot below
  [ "$arm64" = 1 ] || dpkg --add-architecture arm64
  # a third-party source without arm64 makes update report errors; the Debian ones suffice
  "${APT[@]}" update || echo "aarch64-emulation.sh: apt-get update reported errors; continuing" >&2
  [ ${#missing[@]} -eq 0 ] || "${APT[@]}" install -y --no-install-recommends "${missing[@]}"
fi

# ---- 2. arm64 python3.11 sysroot ---------------------------------------------------------
if [ ! -x "$SYSROOT/usr/bin/python3.11" ]; then
  DEBS=$ROOT/debs
  rm -rf "$DEBS" "$SYSROOT.tmp"; mkdir -p "$DEBS" "$SYSROOT.tmp"
  # the arm64 dependency closure of the interpreter, its stdlib and libstdc++ (TVM needs it);
  # the recursion also walks amd64/all packages, so keep only the :arm64 entries
  pkgs=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
           --no-replaces --no-enhances --no-pre-depends \
           python3.11-minimal:arm64 libpython3.11-stdlib:arm64 libstdc++6:arm64 \
         | grep -E '^[a-z0-9][^ ]*:arm64$' | grep -vE '^(dpkg|tar|install-info):' | sort -u)
  [ -n "$pkgs" ] || { echo "aarch64-emulation.sh: apt knows no arm64 python3.11 (did apt-get update fail?)" >&2; exit 1; }
  # as root apt warns that the download is "unsandboxed": harmless
  (cd "$DEBS" && "${APT[@]}" download $pkgs)
  for d in "$DEBS"/*.deb; do dpkg-deb -x "$d" "$SYSROOT.tmp"; done
  mv "$SYSROOT.tmp" "$SYSROOT"
  rm -rf "$DEBS"
fi

# The launcher. qemu's -0 sets argv[0] to this wrapper, so sys.executable is the wrapper and
# processes that re-exec sys.executable (tvm.rpc's popen workers) start under qemu too
# instead of failing with "Exec format error".
cat > "$SYSROOT/usr/bin/python3-qemu" <<'EOF'
#!/bin/sh
d=$(dirname "$(readlink -f "$0")")
site=$(cd "$d/../../.." && pwd)/site
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
exec "${QEMU:-qemu-aarch64-static}" -L "$d/../.." -0 "$d/python3-qemu" "$d/python3.11" "$@"
EOF
chmod +x "$SYSROOT/usr/bin/python3-qemu"

# ---- 3. aarch64 wheels into $SITE, installed by the x86 pip -------------------------------
stamp="$SITE/.stamp-$(echo "${WHEELS[*]}" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  rm -rf "$SITE"
  "$PY" -m pip install -q --disable-pip-version-check --no-cache-dir --target "$SITE" \
    --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 \
    --implementation cp --python-version 3.11 --abi cp311 --only-binary=:all: "${WHEELS[@]}"
  touch "$stamp"
fi
# runtime only: exported modules need libtvm_runtime.so; waps-tvm runs them with
# TVM_USE_RUNTIME_LIB=1, so the 240 MB compiler library is never loaded
if [ "$SLIM" = 1 ]; then rm -f "$SITE/tvm/lib/libtvm_compiler.so"; fi

# ---- 4. smoke test ------------------------------------------------------------------------
env -u PYTHONPATH -u PYTHONHOME TVM_USE_RUNTIME_LIB=1 PYTHONNOUSERSITE=1 "$SYSROOT/usr/bin/python3-qemu" -c \
  "import platform, numpy, tvm; assert platform.machine() == 'aarch64'; print('aarch64: tvm', tvm.__version__, 'numpy', numpy.__version__)"
echo "aarch64-emulation.sh: ready in $(( $(date +%s) - t0 )) s: $ROOT"
