"""Read the tables of a bench/results/*.md file (the benchmarks' own output) back as rows."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Table:
    """One pipe table: the nearest heading above it, its header and its rows (cells as text)."""
    heading: str
    header: tuple[str, ...]
    rows: tuple[dict[str, str], ...]

    def column(self, name: str) -> list[str]:
        return [r[name] for r in self.rows]


def _cells(line: str) -> tuple[str, ...]:
    return tuple(c.strip() for c in line.strip().strip("|").split("|"))


def tables(path: Path) -> list[Table]:
    """Every table in ``path`` in order; a table is a header line, a |---| line and its rows."""
    lines = path.read_text().splitlines()
    out, heading, i = [], "", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if (line.startswith("|") and i + 1 < len(lines)
                and set(lines[i + 1].replace("|", "").replace(":", "").strip()) == {"-"}):
            header = _cells(line)
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(dict(zip(header, _cells(lines[i]))))
                i += 1
            out.append(Table(heading, header, tuple(rows)))
            continue
        i += 1
    return out


def table(path: Path, heading_prefix: str) -> Table:
    """The first table under a heading starting with ``heading_prefix``; KeyError if none."""
    for t in tables(path):
        if t.heading.startswith(heading_prefix):
            return t
    raise KeyError(f"{path.name}: no table under a heading starting with {heading_prefix!r}")
