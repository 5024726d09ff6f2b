"""A policy's copy target is parsed and checked like every policy field (no S3 needed)."""

from __future__ import annotations

import pytest

from sendense_nbd.errors import BadRequest
from sendense_nbd.offsite.chains import Chain, expired, lock_until, starts_chain
from sendense_nbd.policy.model import Policy
from sendense_nbd.policy.offsite import CopyTarget, LockMode

COPY = {"endpoint": "https://s3.example.com/", "bucket": "sendense-offsite", "access_key": "AKIA1",
        "secret_file": "/etc/sendense/s3.secret", "retain": 86400}  # fmt: skip
POLICY = {"name": "p", "vms": {"include": ["/DC/vm"]}, "schedule": {"every": 3600}}


def test_a_copy_target_round_trips_with_its_defaults() -> None:
    policy = Policy.from_json({**POLICY, "copy": COPY, "full_every": 4})
    target = policy.copy
    assert target is not None and target.endpoint == "https://s3.example.com"
    assert (target.region, target.prefix, target.lock_mode, target.margin) == (
        "us-east-1",
        "sendense/",
        LockMode.GOVERNANCE,
        86400.0,
    )
    assert target.chain_length(policy.full_every) == 5 and target.chain_length(None) == 7
    assert Policy.from_json(policy.to_json()) == policy
    assert policy.edited({"copy": None}).copy is None
    assert policy.edited({"copy": {"lock_mode": "COMPLIANCE", "seal_every": 3}}).copy == CopyTarget(
        **{**COPY, "endpoint": "https://s3.example.com"}, lock_mode=LockMode.COMPLIANCE, seal_every=3
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"bucket": "Bad_Bucket"}, "copy.bucket must be an S3 bucket name"),
        ({"endpoint": "ftp://x"}, "copy.endpoint must be an http"),
        ({"secret_file": "relative/path"}, "copy.secret_file must be an absolute path"),
        ({"retain": 0}, "copy.retain must be a number of seconds from 1"),
        ({"retain": True}, "copy.retain must be a number"),
        ({"lock_mode": "governance"}, "copy.lock_mode must be one of GOVERNANCE, COMPLIANCE"),
        ({"seal_every": 0}, "copy.seal_every must be an integer from 1 to 1000"),
        ({"prefix": "/abs/"}, "copy.prefix must be like backups/"),
        ({"secret": "inline"}, "copy: unknown field 'secret'"),
        ({"access_key": "a key"}, "copy.access_key must be 1-128 visible ASCII"),
    ],
)
def test_bad_copy_targets_are_refused_naming_the_field(change: dict[str, object], message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        Policy.from_json({**POLICY, "copy": {**COPY, **change}})


def test_a_copy_target_needs_its_fields() -> None:
    with pytest.raises(BadRequest, match="copy needs access_key, retain"):
        Policy.from_json({**POLICY, "copy": {k: v for k, v in COPY.items() if k not in ("access_key", "retain")}})


def test_chains_start_join_seal_and_expire() -> None:
    target = CopyTarget(**COPY, margin=60, seal_every=3)
    open_chain = Chain("p1", ("p1", "p2"), 1000.0, sealed=False)
    assert starts_chain(None, None, 3)
    assert not starts_chain(open_chain, "p2", 3)  # p3 on p2: joins
    assert starts_chain(open_chain, "p1", 3)  # does not build on the chain's newest copy
    assert starts_chain(Chain("p1", ("p1", "p2", "p3"), 1000.0, sealed=False), "p3", 3)  # full chain
    assert lock_until(1000.0, target) == 1000.0 + 86400 + 60
    assert not expired(open_chain, target, 10**9)  # an open chain never expires
    sealed = Chain("p1", ("p1", "p2"), 1000.0, sealed=True)
    assert not expired(sealed, target, 1000.0 + 86400 + 59) and expired(sealed, target, 1000.0 + 86400 + 60)
