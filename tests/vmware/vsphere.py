"""The vSphere test peer for tests: our vcsim build (simulator/) and its disk helper ``vmdisk``.

A failed build or a missing tool fails the test; it never skips.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import selectors
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SIMULATOR = ROOT / "simulator"
STANDIN_PLUGIN = SIMULATOR / "vddk_standin.py"

_spec = importlib.util.spec_from_file_location("vmdisk", SIMULATOR / "vmdisk.py")
assert _spec is not None and _spec.loader is not None
vmdisk: Any = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vmdisk)

_built: list[str] = []


def vcsim_binary() -> str:
    """Build (once per session; the script skips an up-to-date build) and return vcsim's path."""
    if not _built:
        build = subprocess.run(
            ["sh", str(SIMULATOR / "build-vcsim.sh")], capture_output=True, text=True, timeout=900, check=False
        )
        if build.returncode != 0:
            pytest.fail(f"build-vcsim.sh failed:\n{build.stdout}\n{build.stderr}", pytrace=False)
        _built.append(build.stdout.strip().splitlines()[-1])
    return _built[0]


@contextlib.contextmanager
def running_vcsim(state: Path, *args: str) -> Iterator[dict[str, Any]]:
    """Start vcsim with its state in ``state``; yields its JSON line (plus ``"state"``)."""
    command = [vcsim_binary(), "-listen", "127.0.0.1:0", "-state", str(state), "-username", "user"]
    command += ["-password", "pass", *args]
    log_path = state.parent / f"{state.name}-vcsim.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log)
        assert proc.stdout is not None
        selector = selectors.DefaultSelector()
        selector.register(proc.stdout, selectors.EVENT_READ)
        line = proc.stdout.readline() if selector.select(timeout=30) else b""
        selector.close()
        try:
            if not line:
                pytest.fail(f"vcsim did not start: {log_path.read_text()}", pytrace=False)
            info = json.loads(line)
            info["state"] = state
            yield info
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()
