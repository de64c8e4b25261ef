"""The package declares what it imports, with requirements.txt's pins, and ships its C headers.

The wheel is built for real (setuptools from pyproject.toml, no dependencies fetched), so the
checks read what `pip install .` would install, not a re-parse of pyproject.toml.
"""
from __future__ import annotations

import ast
import email.parser
import importlib.metadata
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("calib", "waps_tvm", "relay_passes", "codegen", "targets")
LOCAL = {*PACKAGES, "bench", "tests"}
EXTRAS = ("test", "browser", "bench")
# bench/vela*.py run in Vela's own venv (bench/vela_requirements.txt), never the project's
VELA_MODULES = {"tensorflow": "tensorflow-cpu", "keras": "keras", "ethosu": "ethos-u-vela"}


def canonical(name: str) -> str:
    """PEP 503 normalized distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_lines(path: Path) -> list[str]:
    """A requirements file's requirement lines, `-r` includes followed (relative to the file)."""
    out = []
    for raw in path.read_text().splitlines():
        line = raw.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-r "):
            out += requirement_lines(path.parent / line[3:].strip())
        else:
            out.append(line)
    return out


def pins(lines: list[str]) -> dict[str, str]:
    """{canonical name: '==version'} of exact pins; anything else fails the test."""
    got = {}
    for line in lines:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s;]+)", line)
        assert m, f"not an exact pin: {line!r}"
        got[canonical(m[1])] = m[2]
    return got


def imported_modules(py: Path) -> set[str]:
    """Top-level names a file imports: import statements (also inside functions) and the
    string literals given to importlib.util.find_spec / importlib.resources.files / import_module."""
    tree = ast.parse(py.read_text(), str(py))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("find_spec", "files", "import_module") and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.add(node.args[0].value.split(".")[0])
    return names - set(sys.stdlib_module_names) - LOCAL - {"__future__"}


def third_party(dirs: tuple[str, ...]) -> dict[str, set[str]]:
    """{top-level module: files importing it} over the .py files under ``dirs``."""
    found: dict[str, set[str]] = {}
    for d in dirs:
        for py in sorted((ROOT / d).rglob("*.py")):
            for mod in imported_modules(py):
                found.setdefault(mod, set()).add(str(py.relative_to(ROOT)))
    return found


def undeclared(found: dict[str, set[str]], declared: set[str]) -> list[str]:
    """Modules whose distribution (per the installed environment) is not in ``declared``."""
    dists = importlib.metadata.packages_distributions()
    bad = []
    for mod, files in sorted(found.items()):
        owners = {canonical(d) for d in dists.get(mod, [])}
        if not owners & declared:
            bad.append(f"{mod} (from {sorted(owners) or 'no installed distribution'}; "
                       f"imported by {', '.join(sorted(files)[:3])})")
    return bad


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(ROOT)], check=True, cwd=out)
    (whl,) = out.glob("waps_tvm-*.whl")
    return zipfile.ZipFile(whl)


@pytest.fixture(scope="module")
def declared(wheel) -> dict[str | None, dict[str, str]]:
    """The built wheel's Requires-Dist as {extra or None: {name: version}}."""
    (meta,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    msg = email.parser.Parser().parsestr(wheel.read(meta).decode())
    out: dict[str | None, list[str]] = {None: [], **{e: [] for e in msg.get_all("Provides-Extra") or []}}
    for req in msg.get_all("Requires-Dist") or []:
        spec, _, marker = req.partition(";")
        m = re.search(r'extra == "([^"]+)"', marker)
        out[m[1] if m else None].append(spec.strip())
    return {k: pins(v) for k, v in out.items()}


def test_wheel_pins_equal_requirements_txt(declared):
    assert set(declared) == {None, *EXTRAS}
    union: dict[str, str] = {}
    for group in declared.values():
        assert not set(group) & set(union), "a distribution is declared twice"
        union |= group
    assert union == pins(requirement_lines(ROOT / "requirements.txt"))


def test_package_imports_are_runtime_dependencies(declared):
    bad = undeclared(third_party(PACKAGES), set(declared[None]))
    assert not bad, "imported by the package but not in its runtime dependencies: " + "; ".join(bad)


def test_test_and_bench_imports_are_declared(declared):
    tests = set(declared[None]) | set(declared["test"]) | set(declared["browser"])
    assert not undeclared(third_party(("tests",)), tests)
    bench = third_party(("bench",))
    vela = pins(requirement_lines(ROOT / "bench/vela_requirements.txt"))
    for mod, dist in VELA_MODULES.items():
        files = bench.pop(mod, set())
        assert all(Path(f).name.startswith("vela") for f in files), (mod, files)
        assert not files or canonical(dist) in vela, mod
    assert not undeclared(bench, set(declared[None]) | set(declared["bench"]))


def test_wheel_ships_the_package_data(wheel):
    """Every tracked non-Python file under the packages (the C headers the generated kernels
    include) is in the wheel, so a non-editable install finds it next to the module reading it."""
    tracked = subprocess.run(["git", "ls-files", *PACKAGES], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    data = [f for f in tracked if not f.endswith(".py")]
    assert any(f.endswith("npu16_sim.h") for f in data)
    missing = sorted(set(data) - set(wheel.namelist()))
    assert not missing, f"not in the wheel: {missing}"


def test_undeclared_import_is_caught(tmp_path, monkeypatch):
    """The import scan sees function-local imports and find_spec/resources.files strings."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(
        "import os\nimport numpy as np\ndef f():\n    import onnx.helper\n"
        "import importlib.util\nimportlib.util.find_spec('digit_recognizer')\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    found = third_party(("pkg",))
    assert set(found) == {"numpy", "onnx", "digit_recognizer"}
    assert [b.split()[0] for b in undeclared(found, {"numpy"})] == ["digit_recognizer", "onnx"]
