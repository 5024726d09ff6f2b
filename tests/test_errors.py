"""The one exception tree: every public exception lives in sendense_nbd/errors.py and is drawn there."""

from __future__ import annotations

import ast
import asyncio
import re
from pathlib import Path

import pytest

from sendense_nbd import errors
from sendense_nbd.errors import (
    BackupError,
    CopyError,
    NBDRequestError,
    OptionError,
    ProtocolError,
    SendenseError,
    VerifyError,
    first_error,
)
from sendense_nbd.protocol.constants import Command, Errno, Option, OptionReply

PACKAGE = Path(errors.__file__).resolve().parent


def _exception_classes() -> dict[str, type[BaseException]]:
    return {
        name: value
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, BaseException) and value.__module__ == errors.__name__
    }


def _drawn_tree() -> dict[str, str | None]:
    """Each class drawn in the module docstring, with the class drawn as its parent (by indentation)."""
    assert errors.__doc__ is not None
    parents: dict[str, str | None] = {}
    stack: list[tuple[int, str]] = []
    for line in errors.__doc__.splitlines():
        found = re.match(r"^\s*([│├└─ ]*)([A-Z]\w+)\s{2,}\S", line)
        if not found:
            continue
        depth = len(found.group(1))
        while stack and stack[-1][0] >= depth:
            stack.pop()
        parents[found.group(2)] = stack[-1][1] if stack else None
        stack.append((depth, found.group(2)))
    return parents


def test_the_docstring_draws_every_class_under_its_base() -> None:
    classes = _exception_classes()
    drawn = _drawn_tree()
    assert set(drawn) == set(classes)
    for name, parent in drawn.items():
        ours = [base.__name__ for base in classes[name].__bases__ if base.__module__ == errors.__name__]
        assert ours == ([parent] if parent else []), name


def test_no_public_exception_is_defined_outside_errors_py() -> None:
    """Private control-flow exceptions (``_Expired``) may live next to their code; public ones may not."""
    strays = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "errors.py" and path.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                bases = {ast.unparse(base) for base in node.bases}
                if any(base.endswith(("Error", "Exception")) for base in bases):
                    strays.append(f"{path.relative_to(PACKAGE)}: {node.name}")
    assert strays == []


def test_an_option_refusal_is_not_a_protocol_violation() -> None:
    refusal = OptionError(Option.GO, OptionReply.ERR_UNKNOWN, "export not found", "disk")
    assert isinstance(refusal, SendenseError) and not isinstance(refusal, ProtocolError)
    assert refusal.unknown_export
    assert str(refusal) == "NBD_OPT_GO for export 'disk' refused with NBD_REP_ERR_UNKNOWN: export not found"


def test_option_error_names_unknown_codes_and_hang_ups() -> None:
    odd = OptionError(99, 0x8000_0099, "")
    assert str(odd) == "NBD_OPT_99 for export '' refused with reply 0x80000099" and not odd.unknown_export
    hang_up = OptionError(Option.EXPORT_NAME, None, "the server closed the connection", "x")
    assert hang_up.unknown_export
    assert str(hang_up) == "NBD_OPT_EXPORT_NAME for export 'x' refused with a hang-up: the server closed the connection"
    long = OptionError(Option.GO, OptionReply.ERR_POLICY, "y" * 2000)
    assert str(long).endswith(": " + "y" * 1021 + "...")


def test_request_error_keeps_the_raw_errno_and_names_it() -> None:
    known = NBDRequestError(Errno.ENOSPC, "full", command=Command.WRITE, offset=4096)
    assert known.errno is Errno.ENOSPC and known.offset == 4096 and str(known) == "WRITE failed: ENOSPC: full"
    odd = NBDRequestError(4242)
    assert odd.errno is Errno.EINVAL and odd.raw_errno == 4242 and str(odd) == "request failed: errno 4242"


def test_first_error_flattens_skips_cancellations_and_prefers() -> None:
    first, second = ValueError("first"), VerifyError("differs", offset=1)
    nested = BaseExceptionGroup("outer", [asyncio.CancelledError(), ExceptionGroup("inner", [first]), second])
    assert first_error(nested) is first
    assert first_error(nested, prefer=CopyError) is second
    assert first_error(nested, prefer=(KeyError, VerifyError)) is second
    assert first_error(nested, prefer=BackupError) is first


def test_first_error_of_nothing_but_cancellations_is_the_group() -> None:
    inner = BaseExceptionGroup("inner", [asyncio.CancelledError()])
    group = BaseExceptionGroup("cancelled", [asyncio.CancelledError(), inner])
    assert first_error(group) is group


async def test_first_error_names_the_failure_of_a_real_task_group() -> None:
    async def fail(exc: Exception) -> None:
        await asyncio.sleep(0)
        raise exc

    async def wait() -> None:
        await asyncio.sleep(30)

    boom = BackupError("disk 2000: the target was not flushed", "transferring")
    with pytest.raises(BaseExceptionGroup) as info:
        async with asyncio.TaskGroup() as group:
            group.create_task(wait())
            group.create_task(fail(OSError("other")))
            group.create_task(fail(boom))
    assert first_error(info.value, prefer=BackupError) is boom
    assert isinstance(first_error(info.value), OSError)
