"""``sendense-nbd policy ...`` and ``status`` against a running hub, and the policy API's refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from tests.hub.conftest import Api, HubProcess

DEAD_NODE = "http://127.0.0.1:9"


def cli(hub: HubProcess, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "sendense_nbd", *args, "--hub", hub.url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def test_policy_commands_make_show_edit_run_and_delete_a_policy(hub_factory: Callable[..., HubProcess]) -> None:
    hub = hub_factory(DEAD_NODE)
    added = json.loads(
        cli(hub, "policy", "add", "nightly", "--include", "/DC0/vm/prod", "--exclude", "/DC0/vm/prod/tmp-*",
            "--cron", "0 22 * * 1-5", "--timezone", "Europe/Berlin", "--window", "4h", "--per-policy", "2",
            "--full-every", "6", "--keep-last", "3", "--keep-daily", "7", "--keep-monthly", "12").stdout
    )  # fmt: skip
    assert added["vms"] == {"include": ["/DC0/vm/prod"], "exclude": ["/DC0/vm/prod/tmp-*"]}
    assert added["schedule"] == {"cron": "0 22 * * 1-5", "timezone": "Europe/Berlin", "window": 14400}
    assert added["retention"]["keep_daily"] == 7 and added["full_every"] == 6 and added["per_policy"] == 2
    assert isinstance(added["next_run"], float)
    listed = cli(hub, "policy", "list").stdout
    assert listed.startswith("nightly\t0 22 * * 1-5\tenabled\tnext run ")
    edited = json.loads(cli(hub, "policy", "edit", "nightly", "--every", "2h", "--disable").stdout)
    assert edited["schedule"] == {"every": 7200, "timezone": "Europe/Berlin", "window": 14400}
    assert edited["enabled"] is False and edited["next_run"] is None
    assert edited["retention"]["keep_monthly"] == 12  # fields not given stay
    shown = json.loads(cli(hub, "policy", "show", "nightly").stdout)
    assert shown["runs"] == [] and shown["schedules"]["backup"]["next_run"] is None
    run = json.loads(cli(hub, "policy", "run-now", "nightly").stdout)
    assert run["state"] == "failed" or "did not list the VMs" in (run["note"] or ""), run
    status = cli(hub, "status").stdout
    assert "policies:\n  nightly" in status and "nodes:\n  default" in status and "DOWN" in status
    assert json.loads(cli(hub, "status", "--json").stdout)["policies"][0]["name"] == "nightly"
    assert cli(hub, "policy", "delete", "nightly").stdout.strip() == "deleted policy nightly"
    gone = cli(hub, "policy", "show", "nightly", check=False)
    assert gone.returncode == 1 and gone.stderr.strip() == "Error: HTTP 404 not_found: no policy 'nightly'"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"name": "p", "vms": {"include": ["/x"]}}, "schedule"),
        ({"name": "p", "vms": {"include": ["/x"]}, "schedule": {"cron": "61 * * * *"}}, "cron"),
        ({"name": "p", "vms": {"include": ["/x"]}, "schedule": {"every": 1}}, "every"),
        ({"name": "p", "vms": {"include": ["/x"]}, "schedule": {"every": 60, "timezone": "Mars/Olympus"}}, "timezone"),
        ({"name": "p", "vms": {"include": ["/x"]}, "schedule": {"every": 60}, "retention": {"keep_last": -1}},
         "keep_last"),
        ({"name": "p", "vms": {"include": ["/x"]}, "schedule": {"every": 60}, "surprise": 1}, "surprise"),
        ({"name": "../p", "vms": {"include": ["/x"]}, "schedule": {"every": 60}}, "name"),
        ({"name": "p", "vms": {"include": ["/x"]}, "schedule": {"every": 60}, "node": "nowhere"}, "nowhere"),
    ],
)  # fmt: skip
def test_the_policy_api_refuses_bad_policies_with_the_field_named(
    hub_factory: Callable[..., HubProcess], body: dict[str, Any], message: str
) -> None:
    hub = hub_factory(DEAD_NODE)
    api = Api(hub.url)
    status, answer = api.post("/policies", body)
    assert status in (400, 404), answer
    assert message in answer["error"]["message"], answer
    assert api.get("/policies") == (200, {"policies": []})


def test_policy_names_are_unique_and_unknown_ones_are_404(hub_factory: Callable[..., HubProcess]) -> None:
    hub = hub_factory(DEAD_NODE)
    api = Api(hub.url)
    body = {"name": "p", "vms": {"include": ["/DC0/vm"]}, "schedule": {"every": 3600}}
    assert api.post("/policies", body)[0] == 201
    status, answer = api.post("/policies", body)
    assert (status, answer["error"]["code"]) == (409, "exists")
    for method in ("GET", "DELETE", "PATCH"):
        status, answer = api.call(method, "/policies/nope", {} if method == "PATCH" else None)
        assert (status, answer["error"]["code"]) == (404, "not_found"), (method, answer)
    status, answer = api.call("PATCH", "/policies/p", {"name": "q"})
    assert status == 400 and "name" in answer["error"]["message"]
    assert api.call("PATCH", "/policies/p", {"per_policy": 3})[1]["per_policy"] == 3


def test_policy_names_are_quoted_in_the_url(hub_factory: Callable[..., HubProcess]) -> None:
    hub = hub_factory(DEAD_NODE)
    for name in ("a b", "../nodes/default", "x?y"):
        done = cli(hub, "policy", "show", name, check=False)
        assert done.returncode == 1 and "HTTP 404 not_found: no policy" in done.stderr, done.stderr
