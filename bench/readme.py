"""Rewrite the README's benchmark numbers from bench/results/, or check that they match.

Each generated part of README.md sits between ``<!-- bench:NAME -->`` and
``<!-- /bench:NAME -->`` (a name may appear more than once; the same text goes in each). A
block's markers stand on their own lines; an inline one's sit inside a sentence. The text
between them is bench.readme_blocks' NAME rendered from the results folder: edit the
generator, not the README.

    python -m bench.readme            # rewrite README.md
    python -m bench.readme --check    # exit 1 (and show a diff) when README.md differs
"""
from __future__ import annotations

import argparse
import difflib
import re
import sys
import textwrap
from pathlib import Path

from bench.readme_blocks import BLOCKS, Block

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "bench" / "results"
WIDTH = 92  # the README's prose line length
MARKER = re.compile(r"<!-- bench:(?P<name>[a-z0-9_]+) -->(?P<body>.*?)<!-- /bench:(?P=name) -->", re.S)


class ReadmeError(ValueError):
    """The README's markers do not match the generators (unknown, missing or malformed)."""


def _wrap(text: str) -> str:
    """Prose paragraphs filled to WIDTH; tables (lines starting with '|') kept as they are."""
    paras = text.split("\n\n")
    return "\n\n".join(p if p.lstrip().startswith("|") else
                       textwrap.fill(re.sub(r"[ \n]+", " ", p), WIDTH, break_on_hyphens=False, break_long_words=False)
                       for p in paras)


def render(block: Block, results: Path) -> str:
    """The text between the block's markers: an inline phrase as is, a block on its own lines."""
    text = block.render(results).strip("\n")
    return text if block.inline else f"\n{_wrap(text)}\n"


def rewrite(readme: str, results: Path, blocks: tuple[Block, ...] = BLOCKS) -> str:
    """``readme`` with every marked part re-rendered; ReadmeError for an unknown or missing name."""
    by_name = {b.name: b for b in blocks}
    seen: set[str] = set()
    cache: dict[str, str] = {}

    def sub(m: re.Match) -> str:
        name = m["name"]
        if name not in by_name:
            raise ReadmeError(f"README marker bench:{name} has no generator in bench/readme_blocks.py")
        block = by_name[name]
        if block.inline == ("\n" in m["body"]):
            raise ReadmeError(f"bench:{name} is {'inline' if block.inline else 'a block'}; "
                              f"its markers must {'share a line' if block.inline else 'stand on their own lines'}")
        seen.add(name)
        if name not in cache:
            cache[name] = render(block, results)
        return f"<!-- bench:{name} -->{cache[name]}<!-- /bench:{name} -->"

    out = MARKER.sub(sub, readme)
    missing = sorted(set(by_name) - seen)
    if missing:
        raise ReadmeError(f"README has no markers for {', '.join('bench:' + n for n in missing)}")
    stray = re.findall(r"<!-- /?bench:([a-z0-9_]+) -->", MARKER.sub("", readme))
    if stray:
        raise ReadmeError(f"unpaired README marker(s): {', '.join(sorted(set(stray)))}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 when README.md differs from the results")
    p.add_argument("--readme", type=Path, default=README)
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    old = args.readme.read_text()
    try:
        new = rewrite(old, args.results)
    except ReadmeError as e:
        print(f"bench.readme: error: {e}", file=sys.stderr)
        return 2
    if new == old:
        print(f"bench.readme: {args.readme} matches {args.results}")
        return 0
    if args.check:
        sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True),
                                                   str(args.readme), "generated"))
        print(f"bench.readme: {args.readme} differs from {args.results}: run python -m bench.readme",
              file=sys.stderr)
        return 1
    args.readme.write_text(new)
    print(f"bench.readme: rewrote {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
