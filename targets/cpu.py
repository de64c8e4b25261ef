"""CPU targets: the named ones, any TVM llvm target dict given as JSON, and cross export.

``--target`` is a name from TARGETS or a JSON llvm target dict such as
``{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a53"}``. A target whose
triple names another architecture than this machine's is a cross target: TVM's llvm
backend generates the code here and a cross gcc links the exported library.
"""
from __future__ import annotations

import json
import platform
import re
import shutil
from dataclasses import dataclass, field

from calib.errors import ConfigError

TARGETS = ("llvm", "aarch64", "c", "npu16")

# ARMv8.2-A with the dot-product extension: Cortex-A55/A75/A76/A78 and later (Raspberry Pi 5,
# RK3588, most phones since 2018), Neoverse-N1/V1 (Graviton2/3, Ampere Altra). Generic
# scheduling, no -mcpu, so one library serves all of them; qemu-user's default "max" CPU
# runs it. Pass a JSON dict with "mcpu" to tune for one core, or drop "+dotprod"/"+v8.2a"
# for ARMv8.0 boards (Raspberry Pi 3/4, Cortex-A53/A72).
AARCH64 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+v8.2a", "+dotprod"]}

SETUP_HINT = "run scripts/aarch64-emulation.sh or apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross"


@dataclass(frozen=True)
class CpuTarget:
    """A resolved ``--target``.

    name:   what meta.json, the report and the ONNX graph call it ('llvm', 'aarch64', 'c',
            'npu16', or 'llvm:<triple>[:<mcpu>]' for a JSON dict)
    config: the TVM llvm target dict the module (for 'c'/'npu16': its host glue) is built for;
            for 'llvm' it is filled in with this machine's CPU by :func:`llvm_target`
    arch:   the machine the library runs on, spelled like ``platform.machine()`` on Linux
    """

    name: str
    config: dict = field(hash=False)
    arch: str

    @property
    def triple(self) -> str | None:
        return self.config.get("mtriple")

    @property
    def cross(self) -> bool:
        return self.arch != host_arch()


def host_arch() -> str:
    return _canonical_arch(platform.machine())


def _canonical_arch(arch: str) -> str:
    arch = arch.lower()
    return {"arm64": "aarch64", "amd64": "x86_64", "x64": "x86_64"}.get(arch, arch)


def _llvm_backend(arch: str) -> str:
    """LLVM's target name for a triple's architecture (armv7a → arm, i686 → i386)."""
    if re.fullmatch(r"(arm|thumb)(eb)?(v\w+)?", arch):
        return re.sub(r"v\w+$", "", arch)
    if re.fullmatch(r"i[3-6]86", arch):
        return "i386"
    return arch


def resolve(spec: str | CpuTarget) -> CpuTarget:
    """``--target`` → CpuTarget; a ConfigError (one line) names the choices otherwise."""
    if isinstance(spec, CpuTarget):
        return spec
    if spec in ("llvm", "c", "npu16"):
        return CpuTarget(spec, {"kind": "llvm"}, host_arch())
    if spec == "aarch64":
        return CpuTarget("aarch64", dict(AARCH64), "aarch64")
    if not spec.lstrip().startswith(("{", "[")):
        raise ConfigError(f"unknown target {spec!r} (choose from {', '.join(TARGETS)}, or give a JSON llvm "
                          f"target dict such as '{json.dumps(AARCH64)}')")
    try:
        config = json.loads(spec)
    except ValueError as e:
        raise ConfigError(f"--target {spec!r}: not valid JSON ({e}); give a name ({', '.join(TARGETS)}) "
                          "or a JSON llvm target dict") from None
    return _from_dict(config)


def _from_dict(config) -> CpuTarget:
    if not isinstance(config, dict) or config.get("kind", "llvm") != "llvm":
        raise ConfigError(f"--target {json.dumps(config)}: only llvm target dicts are supported "
                          '(e.g. {"kind": "llvm", "mtriple": "aarch64-linux-gnu"})')
    config = {"kind": "llvm", **config}
    for key in ("mtriple", "mcpu"):
        if key in config and not (isinstance(config[key], str) and config[key]):
            raise ConfigError(f"--target: {key!r} must be a non-empty string")
    if "mattr" in config and not (isinstance(config["mattr"], list)
                                  and all(isinstance(a, str) and a[:1] in "+-" and a[1:] for a in config["mattr"])):
        raise ConfigError('--target: "mattr" must be a list of "+feature"/"-feature" strings')
    import tvm
    from tvm.target import codegen
    triple = config.get("mtriple")
    arch = _canonical_arch(triple.split("-")[0]) if triple else host_arch()
    # an unknown architecture crashes TVM's LLVM code, so it is checked before TVM sees it
    if _llvm_backend(arch) not in set(codegen.llvm_get_targets()):
        raise ConfigError(f"--target: mtriple {triple!r}: LLVM has no backend for {arch!r} "
                          f"(e.g. aarch64-linux-gnu, x86_64-linux-gnu)")
    if "mcpu" in config and not codegen.llvm_is_valid_cpu(config["mcpu"], triple or codegen.llvm_get_system_triple()):
        raise ConfigError(f"--target: mcpu {config['mcpu']!r} is not a CPU LLVM knows for {triple or 'this machine'}")
    try:
        tvm.target.Target(config)
    except Exception as e:  # noqa: BLE001 (TVM raises ValueError, TypeError, TVMError; one line for the user)
        raise ConfigError(f"--target: {str(e).splitlines()[0].split('. Target creation')[0]}") from None
    name = "llvm" if config == {"kind": "llvm"} else ":".join(
        ["llvm", triple or "host"] + ([config["mcpu"]] if "mcpu" in config else []))
    return CpuTarget(name, config, arch)


def llvm_target(spec: str | CpuTarget):
    """The tvm.target.Target that builds ``spec`` ('llvm', 'c' and 'npu16': this machine's CPU,
    the host glue of the last two)."""
    import tvm
    tgt = resolve(spec)
    if tgt.config == {"kind": "llvm"}:
        cpu = tvm.target.codegen.llvm_get_system_cpu()
        return tvm.target.Target({"kind": "llvm", "mcpu": cpu}) if cpu and cpu != "generic" else tvm.target.Target("llvm")
    return tvm.target.Target(tgt.config)


def target_config(spec: str | CpuTarget) -> dict:
    """The llvm target dict actually built (this machine's CPU filled in), for meta.json."""
    tgt = llvm_target(spec)
    return {k: (list(v) if k == "mattr" else v) for k, v in tgt.export().items()
            if k in ("kind", "mtriple", "mcpu", "mattr")}


def export_cc(spec: str | CpuTarget) -> str | None:
    """The C compiler that links the exported library: None (TVM's default, this machine's
    gcc) for native targets, the cross gcc for others; a ConfigError when it is missing."""
    tgt = resolve(spec)
    if not tgt.cross:
        return None
    if tgt.arch == "aarch64" and "linux" in (tgt.triple or "linux"):
        cc, hint = "aarch64-linux-gnu-gcc", SETUP_HINT
    else:
        cc, hint = f"{tgt.triple}-gcc", f"install a cross gcc for {tgt.triple}"
    if shutil.which(cc) is None:
        raise ConfigError(f"{tgt.name} libraries are linked by {cc}, which is not installed: {hint}")
    return cc
