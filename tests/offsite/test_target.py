"""A policy's copy target is parsed and checked like every policy field (no S3 needed)."""

from __future__ import annotations

import pytest

from sendense_nbd.errors import BadRequest
from sendense_nbd.offsite.chains import Chain, expired, lock_until, starts_chain
from sendense_nbd.policy.model import Policy
from sendense_nbd.policy.offsite import MAX_SEAL_EVERY, CopyTarget, LockMode
from sendense_nbd.storage.qcow2.device import MAX_CHAIN

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
    # the qcow2 engine opens chains of at most 16 files: a long full_every cannot make a longer copy chain
    assert target.chain_length(30) == MAX_SEAL_EVERY == MAX_CHAIN == 16
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
        ({"seal_every": 0}, "copy.seal_every must be an integer from 1 to 16 .*backing files"),
        ({"seal_every": 17}, "copy.seal_every must be an integer from 1 to 16"),
        ({"prefix": "/abs/"}, "copy.prefix must be like backups/"),
        ({"prefix": "a/../b/"}, "copy.prefix must not have . or .. folders"),
        ({"prefix": "./"}, "copy.prefix must not have . or .. folders"),
        ({"endpoint": "http://["}, "copy.endpoint must be an http:// or https:// URL with a host"),
        ({"endpoint": "http://-"}, "copy.endpoint must be an http"),
        ({"endpoint": "http://::::"}, "copy.endpoint must be an http"),
        ({"endpoint": "http://s3.example.com:99999"}, "a port from 1 to 65535"),
        ({"endpoint": "http://s3.example.com:0"}, "a port from 1 to 65535"),
        ({"endpoint": "https://s3.example.com/bucket"}, "copy.endpoint must be an http"),
        ({"endpoint": "https://key:secret@s3.example.com"}, "copy.endpoint must be an http"),
        ({"endpoint": "http://169.254.169.254"}, "169.254.169.254 is a link-local"),
        ({"endpoint": "http://[fe80::1%25eth0]"}, "is a link-local"),
        ({"endpoint": "http://[::ffff:169.254.169.254]"}, "169.254.169.254 is a link-local"),
        ({"endpoint": "http://0.0.0.0:80"}, "unspecified"),
        ({"secret": "inline"}, "copy: unknown field 'secret'"),
        ({"access_key": "a key"}, "copy.access_key must be 1-128 visible ASCII"),
    ],
)
def test_bad_copy_targets_are_refused_naming_the_field(change: dict[str, object], message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        Policy.from_json({**POLICY, "copy": {**COPY, **change}})


@pytest.mark.parametrize(
    "endpoint",
    ["http://127.0.0.1:7480", "https://s3.example.com.", "http://[::1]:9000", "https://S3-eu.Example.com:443/"],
)
def test_good_endpoints_are_taken(endpoint: str) -> None:
    policy = Policy.from_json({**POLICY, "copy": {**COPY, "endpoint": endpoint}})
    assert policy.copy is not None and policy.copy.endpoint == endpoint.rstrip("/")


def test_a_copy_target_needs_its_fields() -> None:
    with pytest.raises(BadRequest, match="copy needs access_key, retain"):
        Policy.from_json({**POLICY, "copy": {k: v for k, v in COPY.items() if k not in ("access_key", "retain")}})


def test_chains_start_join_seal_and_expire() -> None:
    target = CopyTarget(**COPY, margin=60, seal_every=3)
    open_chain = Chain("p1", ("p1", "p2"), 1000.0, sealed=False)
    at = {"now": 2000.0, "target": target}
    assert starts_chain(None, None, 3, **at)
    assert not starts_chain(open_chain, "p2", 3, **at)  # p3 on p2: joins
    assert starts_chain(open_chain, "p1", 3, **at)  # does not build on the chain's newest copy
    assert starts_chain(Chain("p1", ("p1", "p2", "p3"), 1000.0, sealed=False), "p3", 3, **at)  # full chain
    # a chain whose lock lapses (or is within half the margin of lapsing) takes no copy: its objects may go
    lapse = lock_until(1000.0, target)
    assert not starts_chain(open_chain, "p2", 3, now=lapse - 31, target=target)
    assert starts_chain(open_chain, "p2", 3, now=lapse - 30, target=target)
    assert starts_chain(open_chain, "p2", 3, now=lapse + 1, target=target)
    assert lock_until(1000.0, target) == 1000.0 + 86400 + 60
    assert not expired(open_chain, target, 10**9)  # an open chain never expires
    sealed = Chain("p1", ("p1", "p2"), 1000.0, sealed=True)
    assert not expired(sealed, target, 1000.0 + 86400 + 59) and expired(sealed, target, 1000.0 + 86400 + 60)
