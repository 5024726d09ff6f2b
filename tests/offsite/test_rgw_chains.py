"""Copy chains against the real RGW: a chain of 16 copies (the most a policy makes) served from the bucket and
compared with the local point; a point file whose backing is not the chain's newest copy refused before anything
is written; a lock held in a weaker mode than the target's (a GOVERNANCE bucket default under a COMPLIANCE policy)
refused with what to change, not taken as locked."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import attrs
import pytest

from sendense_nbd.errors import OffsiteError
from sendense_nbd.offsite.copier import Written, copy_point
from sendense_nbd.offsite.remote import open_copy
from sendense_nbd.offsite.s3 import Bucket, utc
from sendense_nbd.policy.offsite import MAX_SEAL_EVERY, CopyTarget, LockMode
from sendense_nbd.server import Export, NBDServer
from tests.conftest import require, run
from tests.offsite.conftest import LocalPoint, MemoryJournal, make_chain

pytestmark = pytest.mark.peer

MIB = 1 << 20


def _copy_all(bucket: Bucket, chain: list[LocalPoint]) -> list[Written]:
    written: list[Written] = []
    for point in chain:
        older = [(w.manifest, w.version) for w in written]
        written.append(copy_point(bucket, point.files, older, copy_id=f"c{len(written)}", now=time.time(),
                                  journal=MemoryJournal()))  # fmt: skip
    return written


async def test_a_chain_of_sixteen_copies_is_served_from_the_bucket(target: CopyTarget, tmp_path: Path) -> None:
    rng = __import__("random").Random(16)
    plans = [
        ([(i * 64 * 1024, rng.randbytes(64 * 1024)), (MIB, rng.randbytes(4096))], []) for i in range(MAX_SEAL_EVERY)
    ]
    chain = await make_chain(tmp_path / "repo", 2 * MIB, plans)
    bucket = Bucket.connect(target)
    written = await asyncio.to_thread(_copy_all, bucket, chain)
    assert len(written[-1].manifest.chain) == 16
    device = await asyncio.to_thread(open_copy, bucket, [w.manifest for w in written])
    async with NBDServer([Export("copy", device, readonly=True)], port=0, persistent=True) as server:
        uri = f"nbd://127.0.0.1:{server.port}/copy"
        await asyncio.to_thread(run, require("qemu-img"), "compare", "-F", "qcow2", uri, str(chain[-1].path))
    device.close()


async def test_a_point_not_on_the_chains_newest_copy_is_refused(
    target: CopyTarget, chain: list[LocalPoint], s3: Any
) -> None:
    bucket = Bucket.connect(target)
    (full,) = await asyncio.to_thread(_copy_all, bucket, chain[:1])
    older = [(full.manifest, full.version)]
    # the files say the overlay builds on another point than the chain's newest copy
    elsewhere = attrs.evolve(chain[2].files, backing=f"{uuid.uuid4().hex}.qcow2")
    with pytest.raises(OffsiteError, match="its file builds on .* but the chain's newest copy is"):
        copy_point(bucket, elsewhere, older, copy_id="c1", now=time.time(), journal=MemoryJournal())
    # the files say it, its qcow2 header does not (chain[2] is an overlay on chain[1], not on the full)
    lying = attrs.evolve(chain[2].files, backing=chain[0].path.name)
    with pytest.raises(OffsiteError, match=f"names the backing file {chain[1].path.name}, not {chain[0].path.name}"):
        copy_point(bucket, lying, older, copy_id="c1", now=time.time(), journal=MemoryJournal())
    # an overlay is no full: a new chain needs a standalone image
    with pytest.raises(OffsiteError, match="builds on .*, but the chain's newest copy is none"):
        copy_point(bucket, chain[1].files, [], copy_id="c1", now=time.time(), journal=MemoryJournal())
    versions = s3.list_object_versions(Bucket=target.bucket).get("Versions", [])
    assert len(versions) == 3 and not s3.list_multipart_uploads(Bucket=target.bucket).get("Uploads")


async def test_a_weaker_lock_is_not_taken_for_the_targets_mode(
    target: CopyTarget, chain: list[LocalPoint], s3: Any
) -> None:
    strict = attrs.evolve(target, lock_mode=LockMode.COMPLIANCE)
    key = f"held-{uuid.uuid4().hex[:6]}"
    version = s3.put_object(Bucket=target.bucket, Key=key, Body=b"x")["VersionId"]
    until = time.time() + 30
    s3.put_object_retention(
        Bucket=target.bucket, Key=key, VersionId=version,
        Retention={"Mode": "GOVERNANCE", "RetainUntilDate": utc(until + 30)},
    )  # fmt: skip
    compliant = _compliant(s3, target.bucket)
    bucket = Bucket.connect(strict)
    with pytest.raises(OffsiteError, match="is locked GOVERNANCE .* refused to make it COMPLIANCE .*default retention"):
        await asyncio.to_thread(bucket.lock, key, version, until)  # its date is later: the mode still falls short
    # a bucket whose default retention is GOVERNANCE: RGW gives multipart uploads that lock, not the asked one
    rule = {"DefaultRetention": {"Mode": "GOVERNANCE", "Days": 1}}
    s3.put_object_lock_configuration(
        Bucket=target.bucket, ObjectLockConfiguration={"ObjectLockEnabled": "Enabled", "Rule": rule}
    )
    with pytest.raises(OffsiteError, match="locked GOVERNANCE .* make it COMPLIANCE or remove it"):
        await asyncio.to_thread(_copy_all, bucket, chain[:1])
    # COMPLIANCE where the target asks GOVERNANCE is stronger: taken as it is, and made longer in its mode
    Bucket.connect(target).lock(*compliant, time.time() + 5)
    Bucket.connect(target).lock(*compliant, time.time() + 50)
    held = s3.get_object_retention(Bucket=target.bucket, Key=compliant[0], VersionId=compliant[1])["Retention"]
    assert held["Mode"] == "COMPLIANCE" and held["RetainUntilDate"].timestamp() > time.time() + 45


def _compliant(s3: Any, bucket: str) -> tuple[str, str]:
    """An object locked COMPLIANCE for 40 s: (key, version)."""
    key = f"strict-{uuid.uuid4().hex[:6]}"
    version = s3.put_object(Bucket=bucket, Key=key, Body=b"y")["VersionId"]
    s3.put_object_retention(
        Bucket=bucket,
        Key=key,
        VersionId=version,
        Retention={"Mode": "COMPLIANCE", "RetainUntilDate": utc(time.time() + 40)},
    )
    return key, version
