"""C sources handed to TVM as one string: quoted includes of our headers inlined.

``runtime.CSourceModuleCreate`` compiles a single string with no include path of ours, so
a header such as ``codegen/c/waps_kernels.h`` that includes ``"waps_numeric.h"`` (the one
C definition of the numeric contract, in this folder) is expanded here, each header once.
"""
from __future__ import annotations

import re
from pathlib import Path

INCLUDE_DIR = Path(__file__).resolve().parent
NUMERIC_H = INCLUDE_DIR / "waps_numeric.h"
_QUOTED = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')


def inline_source(header: Path, search: tuple[Path, ...] = (INCLUDE_DIR,)) -> str:
    """``header``'s text with every quoted include found beside it or in ``search`` inlined
    (recursively, each file once); system includes are kept."""
    seen: set[Path] = set()

    def expand(path: Path) -> list[str]:
        path = path.resolve()
        if path in seen:
            return []
        seen.add(path)
        out = []
        for line in path.read_text().splitlines():
            m = _QUOTED.match(line)
            found = m and next((d / m.group(1) for d in (path.parent, *search) if (d / m.group(1)).is_file()), None)
            out += expand(found) if found else [line]
        return out
    return "\n".join(expand(header)) + "\n"
