"""A backup policy as plain values: which VMs, on which node, when, how, and what to keep.

Every value is parsed strictly from its JSON (:meth:`Policy.from_json`):
unknown fields, wrong types and out-of-range numbers are a
:class:`~sendense_nbd.errors.BadRequest` naming the field, and ``null`` stands
for a field's default. :meth:`Policy.edited` applies a JSON merge patch
(RFC 7386) and checks the result the same way.
"""

from __future__ import annotations

import re
import zoneinfo
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from sendense_nbd import fields
from sendense_nbd.backup.records import Mode
from sendense_nbd.errors import BadRequest
from sendense_nbd.policy import cron
from sendense_nbd.policy.offsite import CopyTarget

#: Include or exclude patterns per policy (each at most fields.MAX_VM_PATH characters).
MAX_PATTERNS = 256
MIN_EVERY, MAX_EVERY = 5.0, 366 * 86400.0
MIN_WINDOW, MAX_WINDOW = 60.0, 31 * 86400.0
MAX_PER_POLICY = 64
MAX_PER_NODE = 256
MAX_FULL_EVERY = 1000
MAX_KEEP = 10_000
MAX_TIMEZONE = 64

SCHEDULE_FIELDS = frozenset({"cron", "every", "timezone", "window"})
RETENTION_FIELDS = frozenset({"keep_last", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly"})
SELECTION_FIELDS = frozenset({"include", "exclude"})
POLICY_FIELDS = frozenset(
    "name node vms schedule verify per_policy per_node mode full_every retention enabled copy".split()
)


def _seconds(value: object, name: str, low: float, high: float) -> float:
    """A JSON number of seconds from ``low`` to ``high``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise BadRequest(f"{name} must be a number of seconds from {low:g} to {high:g}")
    return float(value)


def timezone(value: object, name: str = "timezone") -> str:
    """An IANA time zone name that zoneinfo can load, such as ``Europe/Berlin``."""
    zone = fields.text(value, name, limit=MAX_TIMEZONE)
    try:
        zoneinfo.ZoneInfo(zone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise BadRequest(f"{name}: {zone!r} is not a known time zone (an IANA name such as Europe/Berlin)") from exc
    return zone


@attrs.frozen
class Schedule:
    """When a policy runs: a cron expression in a time zone, or every N seconds; exactly one of them.

    ``window``: seconds after a slot during which new jobs may still start (None: no limit).
    """

    cron: str | None = None
    every: float | None = None
    timezone: str = "UTC"
    window: float | None = None

    @classmethod
    def from_json(cls, body: object, name: str = "schedule") -> Schedule:
        """From ``{"cron": "0 22 * * 1-5", "timezone": "Europe/Berlin", "window": 14400}`` or ``{"every": 3600}``."""
        data = fields.json_object(body, name, SCHEDULE_FIELDS)
        expression, every = data.get("cron"), data.get("every")
        if (expression is None) == (every is None):
            raise BadRequest(f"{name} has exactly one of cron or every")
        if expression is not None:
            expression = fields.text(expression, f"{name}.cron", limit=cron.MAX_EXPRESSION)
            try:
                cron.parse(expression)
            except ValueError as exc:
                raise BadRequest(f"{name}.cron: {exc}") from exc
        window = data.get("window")
        zone = data.get("timezone")
        return cls(
            cron=expression,
            every=None if every is None else _seconds(every, f"{name}.every", MIN_EVERY, MAX_EVERY),
            timezone="UTC" if zone is None else timezone(zone, f"{name}.timezone"),
            window=None if window is None else _seconds(window, f"{name}.window", MIN_WINDOW, MAX_WINDOW),
        )

    def to_json(self) -> dict[str, object]:
        """The JSON :meth:`from_json` reads (fields that are None left out)."""
        return {k: v for k, v in attrs.asdict(self).items() if v is not None}


@attrs.frozen
class Retention:
    """GFS rules over a disk's completed points (:func:`sendense_nbd.policy.retention.select`); all 0 keeps all."""

    keep_last: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    keep_yearly: int = 0

    @classmethod
    def from_json(cls, body: object, name: str = "retention") -> Retention:
        """From ``{"keep_last": 3, "keep_daily": 7, ...}``; absent or null rules are 0."""
        data = fields.json_object(body, name, RETENTION_FIELDS)
        return cls(
            **{
                key: 0 if data.get(key) is None else fields.integer(data[key], f"{name}.{key}", 0, MAX_KEEP)
                for key in sorted(RETENTION_FIELDS)
            }
        )

    def to_json(self) -> dict[str, object]:
        """All five rules."""
        return attrs.asdict(self)

    @property
    def keeps_all(self) -> bool:
        """No rule set: every point is kept."""
        return not any(attrs.astuple(self))


@attrs.frozen
class Selection:
    """Which VMs: inventory path patterns; a folder includes everything under it; exclusions win.

    In a pattern ``*`` matches within one path component, ``**`` any number
    of components, ``?`` one character, ``[...]`` (``[!...]``) one of (none of)
    a set of characters.
    """

    include: tuple[str, ...]
    exclude: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, body: object, name: str = "vms") -> Selection:
        """From ``{"include": ["/DC0/vm/prod"], "exclude": ["/DC0/vm/prod/*-test"]}``."""
        data = fields.json_object(body, name, SELECTION_FIELDS)
        include = _patterns(data.get("include"), f"{name}.include")
        if not include:
            raise BadRequest(f"{name}.include names at least one inventory path or pattern")
        exclude = () if data.get("exclude") is None else _patterns(data["exclude"], f"{name}.exclude")
        return cls(include, exclude)

    def to_json(self) -> dict[str, object]:
        """The JSON :meth:`from_json` reads."""
        return {"include": list(self.include), "exclude": list(self.exclude)}

    def select(self, vm_paths: Iterable[str]) -> list[str]:
        """The VM paths this selection covers: sorted, each once."""
        include = [_compile(p) for p in self.include]
        exclude = [_compile(p) for p in self.exclude]
        return sorted(
            {
                path
                for path in vm_paths
                if any(_covers(p, path) for p in include) and not any(_covers(p, path) for p in exclude)
            }
        )


@attrs.frozen
class Policy:
    """A named backup policy (see docs/OPERATIONS.md).

    ``node`` None is the hub's default node; ``per_policy`` VMs of this policy
    run at once, ``per_node`` jobs at once on its node (all policies);
    ``mode`` incremental behaves as auto; ``full_every`` forces a full after
    that many incrementals (the chain cap); ``copy``: an offsite copy target
    (S3 with Object Lock) each completed point is copied to.
    """

    name: str
    vms: Selection
    schedule: Schedule
    node: str | None = None
    verify: Schedule | None = None
    per_policy: int = 1
    per_node: int = 4
    mode: Mode = Mode.AUTO
    full_every: int | None = None
    retention: Retention = Retention()
    enabled: bool = True
    copy: CopyTarget | None = None

    @classmethod
    def from_json(cls, body: object) -> Policy:
        """A policy from its JSON; :class:`BadRequest` naming the field on anything wrong or unknown."""
        data = fields.json_object(body, "policy", POLICY_FIELDS)
        name = data.get("name")
        if not isinstance(name, str) or not fields.IDENTIFIER.fullmatch(name):
            raise BadRequest("name must be 1 to 128 letters, digits, '.', '_', ':' or '-' (a letter or digit first)")
        if "vms" not in data or "schedule" not in data:
            raise BadRequest("a policy needs vms and schedule")

        def given(key: str, default: Any, parse: Callable[[Any], Any]) -> Any:
            return default if data.get(key) is None else parse(data[key])

        return cls(
            name=name,
            vms=Selection.from_json(data["vms"]),
            schedule=Schedule.from_json(data["schedule"]),
            node=given("node", None, _node),
            verify=given("verify", None, lambda v: Schedule.from_json(v, "verify")),
            per_policy=given("per_policy", 1, lambda v: fields.integer(v, "per_policy", 1, MAX_PER_POLICY)),
            per_node=given("per_node", 4, lambda v: fields.integer(v, "per_node", 1, MAX_PER_NODE)),
            mode=given("mode", Mode.AUTO, lambda v: fields.choice(v, "mode", Mode)),
            full_every=given("full_every", None, lambda v: fields.integer(v, "full_every", 1, MAX_FULL_EVERY)),
            retention=given("retention", Retention(), Retention.from_json),
            enabled=given("enabled", True, _boolean),
            copy=given("copy", None, CopyTarget.from_json),
        )

    def to_json(self) -> dict[str, Any]:
        """Every field, as :meth:`from_json` reads it (unset optional ones as null)."""
        return {
            "name": self.name,
            "node": self.node,
            "vms": self.vms.to_json(),
            "schedule": self.schedule.to_json(),
            "verify": None if self.verify is None else self.verify.to_json(),
            "per_policy": self.per_policy,
            "per_node": self.per_node,
            "mode": self.mode.value,
            "full_every": self.full_every,
            "retention": self.retention.to_json(),
            "enabled": self.enabled,
            "copy": None if self.copy is None else self.copy.to_json(),
        }

    def edited(self, patch: Mapping[str, Any]) -> Policy:
        """This policy with a JSON merge patch (RFC 7386) applied and checked; ``null`` restores a default."""
        if not isinstance(patch, dict):
            raise BadRequest("a policy edit is a JSON object (a merge patch)")
        if "name" in patch and patch["name"] != self.name:
            raise BadRequest(f"a policy's name cannot change (it is {self.name!r}); add a new policy instead")
        return Policy.from_json(merge_patch(self.to_json(), patch))


def merge_patch(target: object, patch: object) -> object:
    """RFC 7386: ``patch`` applied to ``target`` (neither is changed)."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _node(value: object) -> str:
    if not isinstance(value, str) or not fields.IDENTIFIER.fullmatch(value):
        raise BadRequest("node must be a registered node's name (letters, digits, '.', '_', ':' or '-')")
    return value


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise BadRequest("enabled must be true or false")
    return value


def _patterns(value: object, name: str) -> tuple[str, ...]:
    items = fields.json_list(value, name, MAX_PATTERNS)
    patterns = []
    for index, item in enumerate(items):
        pattern = fields.vm_path(item, f"{name}[{index}]")
        try:
            _compile(pattern)
        except ValueError as exc:
            raise BadRequest(f"{name}[{index}]: {exc}") from exc
        patterns.append(pattern)
    return tuple(dict.fromkeys(patterns))


#: One token of a component's glob: ``*``, ``?``, a literal character, or a character class (``[...]``).
_Token = str | re.Pattern[str]
#: One compiled component: ``**`` stays the string, others become their tokens.
_Component = tuple[_Token, ...] | str


def _compile(pattern: str) -> tuple[_Component, ...]:
    return tuple("**" if part == "**" else _component(part) for part in pattern[1:].split("/"))


def _component(part: str) -> tuple[_Token, ...]:
    """One path component's glob as tokens; ValueError on an open or invalid ``[...]``."""
    out: list[_Token] = []
    i = 0
    while i < len(part):
        char = part[i]
        if char == "[":
            start = i + 2 if part[i + 1 : i + 2] in ("!", "^") else i + 1
            end = part.find("]", start + 1 if part[start : start + 1] == "]" else start)  # "[]a]": ] is literal
            if end < 0:
                raise ValueError(f"the '[' at {i} in {part!r} is not closed")
            body = "".join(c if c.isalnum() or c == "-" else "\\" + c for c in part[start:end])
            try:
                out.append(re.compile(f"[{'^' if start > i + 1 else ''}{body}]", re.DOTALL))
            except re.error as exc:
                raise ValueError(f"the class {part[i : end + 1]!r} in {part!r} is invalid: {exc}") from None
            i = end
        else:
            out.append(char)
        i += 1
    return tuple(out)


def _one(token: _Token, char: str) -> bool:
    if isinstance(token, str):
        return token == "?" or token == char
    return token.fullmatch(char) is not None


def _glob(tokens: tuple[_Token, ...], text: str) -> bool:
    """Whether one component's glob matches ``text``, in at most len(tokens) x len(text) steps: on a
    mismatch only the last ``*`` is retried one character further (no exponential backtracking)."""
    t = s = 0
    star, mark = -1, 0
    while s < len(text):
        if t < len(tokens) and tokens[t] == "*":
            star, mark = t, s
            t += 1
        elif t < len(tokens) and _one(tokens[t], text[s]):
            t += 1
            s += 1
        elif star >= 0:
            t, mark = star + 1, mark + 1
            s = mark
        else:
            return False
    return all(token == "*" for token in tokens[t:])


def _covers(pattern: tuple[_Component, ...], vm_path: str) -> bool:
    """Whether ``pattern`` matches ``vm_path`` or one of the folders above it."""
    parts = vm_path[1:].split("/")
    seen: set[tuple[int, int]] = set()
    stack = [(0, 0)]
    while stack:
        i, j = stack.pop()
        if (i, j) in seen:
            continue
        seen.add((i, j))
        if i == len(pattern):
            return j > 0  # the pattern used up a prefix: the VM or a folder above it
        part = pattern[i]
        if isinstance(part, str):  # "**": no component, or one more
            stack.append((i + 1, j))
            if j < len(parts):
                stack.append((i, j + 1))
        elif j < len(parts) and _glob(part, parts[j]):
            stack.append((i + 1, j + 1))
    return False
