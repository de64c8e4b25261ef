"""Nothing outside the op tables branches on an op-kind string (issue "One definition per rule").

A kind is declared once (relay_passes/opset.py) and each backend reaches its handler through
one table keyed by kind; a comparison such as ``op.kind == "conv2d"`` or
``node.op in ("add", "mul")`` elsewhere in the compiler is a second dispatch site that a new
kind would silently miss. This test reads the compiler's source and fails on any such
comparison, naming file and line.
"""
from __future__ import annotations

import ast
from pathlib import Path

from relay_passes.opset import KINDS

ROOT = Path(__file__).resolve().parents[2]
COMPILER = ("relay_passes", "codegen", "targets", "waps_tvm")
DECLARATION = ROOT / "relay_passes" / "opset.py"
# op-kind names, and the graph ops the frontend maps to them (calib/graph.py)
NAMES = set(KINDS) | {"input", "cat", "relu", "relu6", "elementwise", "global_avg_pool", "adaptive_avg_pool2d",
                      "upsample_nearest2d", "upsample_bilinear2d"}


def _names_in(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return set().union(*(_names_in(e) for e in node.elts)) if node.elts else set()
    return set()


def _is_kind_read(node: ast.AST) -> bool:
    """``x.kind``, ``x.op`` or ``x["kind"]``."""
    if isinstance(node, ast.Attribute):
        return node.attr in ("kind", "op")
    if isinstance(node, ast.Subscript):
        return _names_in(node.slice) == {"kind"}
    return False


def kind_branches(source: str) -> list[tuple[int, str]]:
    """(line, text) of every comparison of an op kind with kind-name string constants."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        if any(_is_kind_read(s) for s in sides) and any(_names_in(s) & NAMES for s in sides):
            out.append((node.lineno, ast.unparse(node)))
    return out


def test_the_check_finds_kind_branches():
    src = ('if op.kind == "conv2d": pass\n'
           'y = n.op in ("add", "mul")\n'
           'z = r["kind"] != "gather"\n'
           'ok = x.dtype.kind != "f" or op.schedule.form == "fast"\n')
    assert [line for line, _ in kind_branches(src)] == [1, 2, 3]


def test_no_kind_string_branches_in_the_compiler():
    found = []
    for package in COMPILER:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == DECLARATION:
                continue
            found += [f"{path.relative_to(ROOT)}:{line}: {text}" for line, text in kind_branches(path.read_text())]
    assert not found, "kind-string branches outside the op tables:\n" + "\n".join(found)
