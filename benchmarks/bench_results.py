"""benchmarks/RESULTS.md: a new section goes after its 3-line preamble, newest first.

No side effects at import (no signal handlers, no atexit), so every benchmark can use it:
bench_pipeline.py, bench_rbd.py and bench_tls.py.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def add_section(results: Path, section: list[str]) -> None:
    """Insert `section` after the first 3 lines of `results`, blank lines around it."""
    lines = results.read_text().split("\n")
    rest = lines[3:]
    while rest and not rest[0].strip():
        rest.pop(0)
    results.write_text("\n".join([*lines[:3], "", "", *section, "", *rest]))
    print(f"added a section to {results}")


def machine(load0: float, elapsed: float) -> str:
    """The section's machine line: CPUs, architecture, kernel, load average at start and now, the run's seconds."""
    return (
        f"- machine: {os.cpu_count()} CPUs, {platform.machine()}, Linux {platform.release()}; load average (1 min)"
        f" {load0:.2f} at start, {os.getloadavg()[0]:.2f} at end; {elapsed:.0f} s"
    )


def section(title: str, about: list[str], text: str, issue: int, goals: list[str], note: str) -> list[str]:
    """A section's lines: its title, what was run and how, the results, the issue's targets, a closing note."""
    return [
        title,
        "",
        *about,
        "",
        text,
        "",
        f"Targets (issue {issue}, medians):",
        "",
        *goals,
        *(["", note] if note else []),
    ]
