"""benchmarks/RESULTS.md: a new section goes after its 3-line preamble, newest first.

No side effects at import (no signal handlers, no atexit), so every benchmark can use it:
bench_pipeline.py, bench_rbd.py and bench_tls.py.
"""

from __future__ import annotations

from pathlib import Path


def add_section(results: Path, section: list[str]) -> None:
    """Insert `section` after the first 3 lines of `results`, blank lines around it."""
    lines = results.read_text().split("\n")
    rest = lines[3:]
    while rest and not rest[0].strip():
        rest.pop(0)
    results.write_text("\n".join([*lines[:3], "", "", *section, "", *rest]))
    print(f"added a section to {results}")
