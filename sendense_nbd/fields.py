"""Checks of the fields of JSON request bodies, shared by the hub's and the node's APIs.

Types are exact (``true`` is not an integer, ``"5"`` is not a number),
integers and strings are bounded, and identifiers carry no control
characters. Every refusal is a :class:`~sendense_nbd.errors.BadRequest` (400).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from typing import Any

from sendense_nbd.errors import BadRequest

#: Disks in one backup job (a VM has at most 256 virtual disks).
MAX_DISKS = 256
#: VMware device keys are 32-bit integers.
MAX_DISK_KEY = (1 << 31) - 1
MAX_VM_PATH = 1024
#: A job or point ID.
IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def integer(value: object, name: str, low: int, high: int) -> int:
    """``value`` if it is a JSON integer from ``low`` to ``high``, else :class:`BadRequest`."""
    if type(value) is not int or not low <= value <= high:
        raise BadRequest(f"{name} must be an integer from {low} to {high}")
    return value


def text(value: object, name: str, *, limit: int = 256) -> str:
    """A non-empty string of at most ``limit`` characters without control characters."""
    if not isinstance(value, str) or not 0 < len(value) <= limit or CONTROL.search(value):
        raise BadRequest(f"{name} must be a string of 1 to {limit} characters without control characters")
    return value


def choice(value: object, name: str, kind: type[enum.Enum]) -> Any:
    """The member of ``kind`` whose value is the string ``value``, else :class:`BadRequest`."""
    choices = [member.value for member in kind]
    if not isinstance(value, str) or value not in choices:
        raise BadRequest(f"{name} must be one of {', '.join(choices)}")
    return kind(value)


def json_object(value: object, name: str, allowed: frozenset[str] | None = None) -> Mapping[str, Any]:
    """``value`` as a JSON object, refusing keys outside ``allowed`` (if given)."""
    if not isinstance(value, dict):
        raise BadRequest(f"{name} must be a JSON object")
    if allowed is not None and not value.keys() <= allowed:
        unknown = sorted(value.keys() - allowed)
        raise BadRequest(f"{name}: unknown field {unknown[0][:40]!r} (known: {', '.join(sorted(allowed))})")
    return value


def json_list(value: object, name: str, limit: int) -> list[Any]:
    """``value`` as a JSON list of at most ``limit`` items."""
    if not isinstance(value, list) or len(value) > limit:
        raise BadRequest(f"{name} must be a list of at most {limit} items")
    return value


def vm_path(value: object, name: str = "vm_path") -> str:
    """An inventory path such as ``/DC/vm/folder/name``: no empty component, no control characters."""
    path = text(value, name, limit=MAX_VM_PATH)
    if not path.startswith("/") or "" in path[1:].split("/"):
        raise BadRequest(f"{name} is an inventory path such as /DC/vm/name")
    return path


def identifier(value: object) -> str | None:
    """A job or point ID, or None when it cannot be one (so it is unknown: 404)."""
    return value if isinstance(value, str) and IDENTIFIER.fullmatch(value) else None
