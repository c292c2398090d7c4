"""Write a benchmark's section of docs/benchmarks.md between its start and end markers."""

from __future__ import annotations

from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def replace_section(name: str, body: str) -> None:
    """Replace the text between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` with `body`."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = BENCHMARKS_MD.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{BENCHMARKS_MD} has no {start} ... {end} markers: add them where the section belongs")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    BENCHMARKS_MD.write_text(f"{head}{start}\n{body.rstrip()}\n{end}{tail}")
