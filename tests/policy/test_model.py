"""Policy parsing: every field's bounds and types, unknown fields, the merge-patch edit, selection globs."""

from __future__ import annotations

from typing import Any

import pytest

from sendense_nbd.backup.records import Mode
from sendense_nbd.errors import BadRequest
from sendense_nbd.policy.model import Policy, Retention, Schedule, Selection, merge_patch


def _policy(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"name": "gold", "vms": {"include": ["/DC0/vm/prod"]}, "schedule": {"every": 3600}}
    body.update(changes)
    return body


def test_a_full_policy_round_trips() -> None:
    body = {
        "name": "gold-1",
        "node": "site-b",
        "vms": {"include": ["/DC0/vm/prod", "/DC0/vm/**/db-*"], "exclude": ["/DC0/vm/prod/test?"]},
        "schedule": {"cron": "0 22 * * 1-5", "timezone": "Europe/Berlin", "window": 14400},
        "verify": {"cron": "@weekly"},
        "per_policy": 2,
        "per_node": 8,
        "mode": "full",
        "full_every": 6,
        "retention": {"keep_last": 3, "keep_daily": 7, "keep_weekly": 4, "keep_monthly": 6, "keep_yearly": 2},
        "enabled": False,
    }
    policy = Policy.from_json(body)
    assert policy.schedule == Schedule(cron="0 22 * * 1-5", timezone="Europe/Berlin", window=14400.0)
    assert policy.verify == Schedule(cron="@weekly")
    assert (policy.mode, policy.full_every, policy.per_policy, policy.per_node) == (Mode.FULL, 6, 2, 8)
    assert policy.retention == Retention(3, 7, 4, 6, 2)
    assert Policy.from_json(policy.to_json()) == policy
    assert policy.to_json()["schedule"] == {"cron": "0 22 * * 1-5", "timezone": "Europe/Berlin", "window": 14400.0}


def test_defaults_and_nulls() -> None:
    policy = Policy.from_json(_policy(node=None, verify=None, retention=None, mode=None))
    assert policy == Policy("gold", Selection(("/DC0/vm/prod",)), Schedule(every=3600.0))
    assert (policy.per_policy, policy.per_node, policy.mode, policy.enabled) == (1, 4, Mode.AUTO, True)
    assert policy.retention.keeps_all and policy.node is None and policy.full_every is None
    assert policy.to_json()["node"] is None and policy.to_json()["retention"]["keep_daily"] == 0


BAD = [
    (_policy(colour="red"), "policy: unknown field 'colour'"),
    ([1], "policy must be a JSON object"),
    (_policy(name="-x"), "name must be"),
    (_policy(name="a" * 129), "name must be"),
    (_policy(name=7), "name must be"),
    ({"name": "x", "vms": {"include": ["/a"]}}, "needs vms and schedule"),
    (_policy(node="a b"), "node must be"),
    (_policy(per_policy=0), "per_policy must be an integer from 1 to 64"),
    (_policy(per_policy=65), "per_policy must be an integer from 1 to 64"),
    (_policy(per_policy=True), "per_policy must be an integer"),
    (_policy(per_node=257), "per_node must be an integer from 1 to 256"),
    (_policy(full_every=0), "full_every must be an integer from 1 to 1000"),
    (_policy(full_every=1001), "full_every must be an integer from 1 to 1000"),
    (_policy(mode="sometimes"), "mode must be one of full, incremental, auto"),
    (_policy(enabled="yes"), "enabled must be true or false"),
    (_policy(retention={"keep_daily": -1}), "retention.keep_daily must be an integer from 0 to 10000"),
    (_policy(retention={"keep_last": 10001}), "retention.keep_last must be an integer from 0 to 10000"),
    (_policy(retention={"keep_hourly": 1}), "retention: unknown field 'keep_hourly'"),
    (_policy(schedule={}), "schedule has exactly one of cron or every"),
    (_policy(schedule={"cron": "@daily", "every": 60}), "schedule has exactly one of cron or every"),
    (_policy(schedule={"every": 4.9}), "schedule.every must be a number of seconds from 5 to 3.16224e"),
    (_policy(schedule={"every": 366 * 86400 + 1}), "schedule.every must be a number of seconds"),
    (_policy(schedule={"every": "60"}), "schedule.every must be a number"),
    (_policy(schedule={"every": True}), "schedule.every must be a number"),
    (_policy(schedule={"every": float("nan")}), "schedule.every must be a number"),
    (_policy(schedule={"every": 60, "window": 59}), "schedule.window must be a number of seconds from 60 to 2.6784e"),
    (_policy(schedule={"every": 60, "window": 31 * 86400 + 1}), "schedule.window must be"),
    (_policy(schedule={"every": 60, "timezone": "Mars/Olympus"}), "schedule.timezone: 'Mars/Olympus' is not a known"),
    (_policy(schedule={"every": 60, "timezone": "../../etc/passwd"}), "schedule.timezone: .* is not a known"),
    (_policy(schedule={"every": 60, "timezone": ""}), "schedule.timezone must be a string"),
    (_policy(schedule={"cron": "0 0 30 2 *"}), r"schedule.cron: cron '0 0 30 2 \*' never fires"),
    (_policy(schedule={"cron": "61 * * * *"}), "schedule.cron: cron minute: 61 is outside 0-59"),
    (_policy(schedule={"cron": 5}), "schedule.cron must be a string"),
    (_policy(schedule={"every": 60, "at": 1}), "schedule: unknown field 'at'"),
    (_policy(verify={"every": 1}), "verify.every must be a number of seconds from 5"),
    (_policy(vms={"include": []}), "vms.include names at least one"),
    (_policy(vms={"exclude": ["/a"]}), "vms.include must be a list"),
    (_policy(vms={"include": "/DC0"}), "vms.include must be a list of at most 256 items"),
    (_policy(vms={"include": [f"/v{i}" for i in range(257)]}), "vms.include must be a list of at most 256"),
    (_policy(vms={"include": ["/a"], "exclude": [f"/v{i}" for i in range(257)]}), "vms.exclude must be a list"),
    (_policy(vms={"include": ["DC0/vm"]}), r"vms.include\[0\] is an inventory path"),
    (_policy(vms={"include": ["/DC0//vm"]}), r"vms.include\[0\] is an inventory path"),
    (_policy(vms={"include": ["/" + "a" * 1024]}), r"vms.include\[0\] must be a string of 1 to 1024"),
    (_policy(vms={"include": ["/a\nb"]}), r"vms.include\[0\] must be a string"),
    (_policy(vms={"include": ["/a", 3]}), r"vms.include\[1\] must be a string"),
    (_policy(vms={"include": ["/DC0/vm/[ab"]}), r"vms.include\[0\]: the '\[' at 0 in '\[ab' is not closed"),
    (_policy(vms={"include": ["/a"], "tags": []}), "vms: unknown field 'tags'"),
]


@pytest.mark.parametrize(("body", "message"), BAD)
def test_refusals_name_the_field(body: Any, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        Policy.from_json(body)


def test_bounds_are_inclusive() -> None:
    edges = _policy(
        per_policy=64, per_node=256, full_every=1000, retention={"keep_yearly": 10000},
        schedule={"every": 5, "window": 60, "timezone": "Australia/Lord_Howe"},
        vms={"include": ["/" + "a" * 1023] + [f"/v{i}" for i in range(255)], "exclude": [f"/x{i}" for i in range(256)]},
    )  # fmt: skip
    policy = Policy.from_json(edges)
    assert (policy.per_policy, policy.per_node, policy.full_every, policy.retention.keep_yearly) == (
        64,
        256,
        1000,
        10000,
    )
    assert len(policy.vms.include) == 256 and len(policy.vms.exclude) == 256
    assert Schedule.from_json({"every": 366 * 86400, "window": 31 * 86400}).every == 366 * 86400.0


def test_edit_is_a_merge_patch_that_is_checked() -> None:
    policy = Policy.from_json(
        _policy(
            schedule={"cron": "0 22 * * *", "timezone": "Europe/Berlin"}, retention={"keep_last": 3, "keep_daily": 7}
        )
    )
    edited = policy.edited({"retention": {"keep_daily": None, "keep_weekly": 4}, "per_policy": 3, "name": "gold"})
    assert edited.retention == Retention(keep_last=3, keep_weekly=4)
    assert edited.per_policy == 3 and edited.schedule == policy.schedule
    swapped = policy.edited({"schedule": {"cron": None, "every": 600}})
    assert swapped.schedule == Schedule(every=600.0, timezone="Europe/Berlin")
    assert policy.edited({"retention": None}).retention == Retention()  # null: back to the default
    assert policy.edited({"vms": {"include": ["/DC1"]}}).vms == Selection(("/DC1",))  # lists are replaced
    with pytest.raises(BadRequest, match="schedule has exactly one of cron or every"):
        policy.edited({"schedule": {"every": 600}})
    with pytest.raises(BadRequest, match="a policy's name cannot change"):
        policy.edited({"name": "silver"})
    with pytest.raises(BadRequest, match="per_node must be"):
        policy.edited({"per_node": 0})
    with pytest.raises(BadRequest, match="needs vms and schedule"):
        policy.edited({"schedule": None})
    with pytest.raises(BadRequest, match="a JSON object"):
        policy.edited([])  # type: ignore[arg-type]
    assert policy.edited({}) == policy


def test_merge_patch_follows_rfc_7386() -> None:
    # the RFC's appendix examples, a few of them
    assert merge_patch({"a": "b"}, {"a": "c"}) == {"a": "c"}
    assert merge_patch({"a": "b"}, {"b": "c"}) == {"a": "b", "b": "c"}
    assert merge_patch({"a": "b"}, {"a": None}) == {}
    assert merge_patch({"a": [{"b": "c"}]}, {"a": [1]}) == {"a": [1]}
    assert merge_patch({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}) == {"a": {"b": "d"}}
    assert merge_patch(["a"], {"a": "b"}) == {"a": "b"}
    assert merge_patch({}, {"a": {"bb": {"ccc": None}}}) == {"a": {"bb": {}}}
    target = {"a": {"b": 1}}
    merge_patch(target, {"a": {"b": 2}})
    assert target == {"a": {"b": 1}}


VMS = [
    "/DC0/vm/prod/web01",
    "/DC0/vm/prod/web02",
    "/DC0/vm/prod/db/db-main",
    "/DC0/vm/prod-old/web01",
    "/DC0/vm/test/web01",
    "/DC0/vm/db-lone",
    "/DC1/vm/prod/web01",
    "/DC1/vm/a/b/c/db-deep",
    "/DC0/vm/[lab]x",
]


@pytest.mark.parametrize(
    ("include", "exclude", "expected"),
    [
        (["/DC0/vm/prod"], [], ["/DC0/vm/prod/db/db-main", "/DC0/vm/prod/web01", "/DC0/vm/prod/web02"]),
        (["/DC0/vm/prod/web01"], [], ["/DC0/vm/prod/web01"]),
        (["/DC0/vm/prod/web0"], [], []),  # a folder is a whole component, never a prefix of a name
        (["/DC*/vm/prod/web01"], [], ["/DC0/vm/prod/web01", "/DC1/vm/prod/web01"]),
        (["/DC0/vm/*/web01"], [], ["/DC0/vm/prod-old/web01", "/DC0/vm/prod/web01", "/DC0/vm/test/web01"]),
        (["/DC0/vm/*"], ["/DC0/vm/*/*"], ["/DC0/vm/[lab]x", "/DC0/vm/db-lone"]),  # "*" never crosses "/"
        (["/**/db-*"], [], ["/DC0/vm/db-lone", "/DC0/vm/prod/db/db-main", "/DC1/vm/a/b/c/db-deep"]),
        (["/DC1/**"], ["/DC1/vm/a"], ["/DC1/vm/prod/web01"]),
        (["/DC0/vm/prod/web0?"], ["/DC0/vm/prod/web02"], ["/DC0/vm/prod/web01"]),
        (["/DC0/vm/prod/web0[!1]"], [], ["/DC0/vm/prod/web02"]),
        (["/DC0/vm/prod/web0[1-2]"], ["/DC0/vm/prod"], []),  # exclusions win, folders too
        (["/DC0/vm/[[]lab]x"], [], ["/DC0/vm/[lab]x"]),  # a literal "[" as a one-character set
        (["/DC0/vm/prod", "/DC0/vm/prod/web01"], [], ["/DC0/vm/prod/db/db-main", "/DC0/vm/prod/web01",
                                                      "/DC0/vm/prod/web02"]),  # each once, sorted
        (["/DC0/vm/prod.old"], [], []),  # "." is no wildcard
        (["/**/**/web01"], ["/**/test"], ["/DC0/vm/prod-old/web01", "/DC0/vm/prod/web01", "/DC1/vm/prod/web01"]),
    ],
)  # fmt: skip
def test_selection_globs(include: list[str], exclude: list[str], expected: list[str]) -> None:
    selection = Selection.from_json({"include": include, "exclude": exclude})
    assert selection.select(VMS) == expected
    assert selection.select(VMS + VMS) == expected


def test_many_double_stars_stay_fast() -> None:
    selection = Selection.from_json({"include": ["/" + "/".join(["**"] * 40) + "/x"]})
    deep = "/" + "/".join(["a"] * 200)
    assert selection.select([deep, deep + "/x"]) == [deep + "/x"]


def test_the_policy_layer_is_pure() -> None:
    """No I/O libraries and no clock reads in sendense_nbd/policy/: callers pass the time."""
    import ast
    from pathlib import Path

    import sendense_nbd.policy

    forbidden = {"asyncio", "socket", "sqlite3", "aiohttp", "time", "selectors", "threading", "subprocess"}
    for path in Path(sendense_nbd.policy.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}  # fmt: skip
        imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert not imported & forbidden, f"{path.name} imports {sorted(imported & forbidden)}"
        calls = {ast.unparse(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
        assert not calls & {"datetime.now", "dt.datetime.now", "date.today", "dt.date.today"}, path.name


def test_globs_that_backtrack_in_a_regex_engine_match_in_linear_steps() -> None:
    import time

    hostile = Selection.from_json({"include": ["/" + "*a" * 12 + "*b", "/**/" + "*a" * 12 + "*b"]})
    vms = ["/" + "a" * 40, "/DC/vm/" + "a" * 1000, "/" + "a" * 40 + "b"]
    started = time.monotonic()
    assert hostile.select(vms) == ["/" + "a" * 40 + "b"]
    assert time.monotonic() - started < 5  # a backtracking matcher takes minutes here


@pytest.mark.parametrize("pattern", ["/DC/[z-a]", "/DC/vm/[b-a]x"])
def test_an_invalid_class_is_refused_with_the_field_named(pattern: str) -> None:
    with pytest.raises(BadRequest, match=r"include\[0\].*invalid"):
        Selection.from_json({"include": [pattern]})
