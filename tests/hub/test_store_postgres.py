"""PostgreSQL's failures as the hub sees them: a server that refuses connections, and one stopped while a
call runs, are a typed StoreUnavailable naming the server (never the password), not a hang; once the
server is back, the next call connects again."""

from __future__ import annotations

import asyncio
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from sendense_nbd.errors import StoreError, StoreUnavailable
from sendense_nbd.hub.db import Database
from tests.conftest import POSTGRES_PREFIX, _simulator_module

#: Bounds for "not a hang" (never asserted as timings: a call that does not return fails the test).
NO_HANG = 60


@pytest.fixture
def own_cluster() -> Iterator[tuple[Any, Any]]:
    """A PostgreSQL of this test alone (it is stopped mid-test): the module and its Cluster."""
    module = _simulator_module("postgres_cluster")
    directory = tempfile.mkdtemp(prefix=POSTGRES_PREFIX)
    try:
        module.claim(directory)
        yield module, module.start(directory)
    finally:
        module.stop(directory)
        shutil.rmtree(directory, ignore_errors=True)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # nothing listens there once closed


def test_a_refused_connection_is_a_typed_error_without_the_password() -> None:
    url = f"postgresql://hub:s3cret-pw@127.0.0.1:{_closed_port()}/hubs"
    with pytest.raises(StoreUnavailable) as raised:
        Database(url, connect_timeout=5)
    message = str(raised.value)
    assert "s3cret-pw" not in message and "postgresql://hub@127.0.0.1:" in message and "/hubs" in message
    assert "is PostgreSQL running" in message


def test_an_unparsable_url_is_refused_without_its_password() -> None:
    for url in ("postgresql://hub:s3cret-pw%zz@db/hubs", "postgresql://hub:s3cret-pw@[::1/hubs"):
        with pytest.raises(StoreError) as raised:
            Database(url)
        assert "not a valid PostgreSQL URL" in str(raised.value) and "s3cret-pw" not in str(raised.value)
        assert raised.value.__cause__ is None and raised.value.__suppress_context__  # libpq's error not chained


def test_a_keyword_conninfo_or_a_name_with_spaces_is_not_an_sqlite_path(tmp_path: Path) -> None:
    for target in ("host=db user=hub password=s3cret-pw", str(tmp_path / "my store.db")):
        with pytest.raises(StoreError, match="sqlite:PATH") as raised:
            Database(target)
        assert "s3cret-pw" not in str(raised.value)
    assert list(tmp_path.iterdir()) == []
    odd = tmp_path / "a=b c.db"
    Database(f"sqlite:{odd}").close()
    assert odd.is_file()


async def test_a_server_stopped_mid_call_fails_the_call_and_the_next_call_reconnects(
    own_cluster: tuple[Any, Any],
) -> None:
    module, cluster = own_cluster
    db = Database(module.create_database(cluster, "stopped"), connect_timeout=5)
    try:
        await db.run(
            lambda c: c.execute("INSERT INTO policies (name, spec, created, updated) VALUES ('p', '{}', 0, 0)")
        )
        slow = asyncio.ensure_future(db.run(lambda c: c.execute("SELECT pg_sleep(600)")))
        await _until_sleeping(cluster)
        await asyncio.to_thread(module.stop, cluster.directory)
        with pytest.raises(StoreUnavailable, match="failed.*the next call connects again"):
            await asyncio.wait_for(slow, NO_HANG)
        with pytest.raises(StoreUnavailable, match="cannot connect to the hub store"):  # still down
            await asyncio.wait_for(db.run(lambda c: c.execute("SELECT 1")), NO_HANG)
        await asyncio.to_thread(module.start, cluster.directory)
        count = await asyncio.wait_for(
            db.run(lambda c: c.execute("SELECT COUNT(*) FROM policies").fetchone()[0]), NO_HANG
        )
        assert count == 1
    finally:
        db.close()


async def _until_sleeping(cluster: Any) -> None:
    """Until the server runs our pg_sleep (seen over a connection of its own: the call holds the writer lock)."""
    import psycopg

    with psycopg.connect(cluster.url("stopped"), autocommit=True) as probe:
        for _ in range(600):
            found = probe.execute(
                "SELECT COUNT(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(600)'"
            ).fetchone()
            if found and found[0]:
                return
            await asyncio.sleep(0.05)
    raise AssertionError("the slow call never reached the server")


def test_a_held_writer_lock_fails_the_call_within_the_lock_bound(postgres_cluster: Any) -> None:
    import psycopg

    from sendense_nbd.hub.db.postgres import WRITER_LOCK, Limits

    url = postgres_cluster.new_database()
    db = Database(url, connect_timeout=5, limits=Limits(lock=0.5))
    try:
        with psycopg.connect(url, autocommit=True) as holder:
            holder.execute("SELECT pg_advisory_lock(%s::bigint)", (WRITER_LOCK,))
            with pytest.raises(StoreUnavailable, match=r"is locked: the writer lock was not free within 0\.5 s"):
                db.call(lambda c: c.execute("SELECT 1"))
        assert db.call(lambda c: c.execute("SELECT 1").fetchone()[0]) == 1  # the holder is gone: free again
    finally:
        db.close()


def test_a_statement_past_the_statement_bound_is_a_typed_error(postgres_cluster: Any) -> None:
    from sendense_nbd.hub.db.postgres import Limits

    db = Database(postgres_cluster.new_database(), connect_timeout=5, limits=Limits(statement=0.2))
    try:
        with pytest.raises(StoreUnavailable, match=r"did not answer within 0\.2 s"):
            db.call(lambda c: c.execute("SELECT pg_sleep(30)"))
        assert db.call(lambda c: c.execute("SELECT 1").fetchone()[0]) == 1
    finally:
        db.close()


def test_the_default_bounds_are_set_on_every_connection(postgres_cluster: Any) -> None:
    db = Database(postgres_cluster.new_database(), connect_timeout=5)
    try:
        shown = db.call(
            lambda c: [
                c.execute(f"SHOW {name}").fetchone()[0]
                for name in ("lock_timeout", "statement_timeout", "idle_in_transaction_session_timeout")
            ]
        )
        assert shown == ["1min", "2min", "2min"]
    finally:
        db.close()


def test_transactions_read_committed_whatever_the_databases_default(postgres_cluster: Any) -> None:
    """A database (or role) whose default is repeatable read would take each transaction's snapshot before the
    writer lock is granted, so a hub would not see what the writer before it committed: the hub's
    transactions are read committed anyway, and see each other's commits."""
    url = postgres_cluster.new_database()
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f"ALTER DATABASE {name} SET default_transaction_isolation = 'repeatable read'")
    first = Database(url, connect_timeout=5)
    try:
        assert first.call(lambda c: c.execute("SHOW transaction_isolation").fetchone()[0]) == "read committed"
        first.call(lambda c: c.execute("CREATE TABLE IF NOT EXISTS seen (n INTEGER)"))

        def count_then_insert(c: Any) -> int:
            (count,) = c.execute("SELECT COUNT(*) FROM seen").fetchone()
            with psycopg.connect(url, autocommit=True) as other:  # another writer commits meanwhile
                other.execute("INSERT INTO seen VALUES (1)")
            (after,) = c.execute("SELECT COUNT(*) FROM seen").fetchone()
            return int(after) - int(count)

        assert first.call(count_then_insert) == 1  # repeatable read would see 0
    finally:
        first.close()


def test_a_connection_the_server_ended_while_idle_is_replaced_and_the_call_succeeds(
    postgres_cluster: Any,
) -> None:
    import psycopg

    url = postgres_cluster.new_database()
    db = Database(url, connect_timeout=5)
    try:
        backend_pid = db.call(lambda c: c.execute("SELECT pg_backend_pid()").fetchone()[0])
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s, 10000)", (backend_pid,))
        again = db.call(lambda c: c.execute("SELECT pg_backend_pid()").fetchone()[0])
        assert again != backend_pid
    finally:
        db.close()


async def test_the_first_call_after_a_server_restart_succeeds(own_cluster: tuple[Any, Any]) -> None:
    module, cluster = own_cluster
    db = Database(module.create_database(cluster, "restarted"), connect_timeout=5)
    try:
        await db.run(
            lambda c: c.execute("INSERT INTO policies (name, spec, created, updated) VALUES ('p', '{}', 0, 0)")
        )
        await asyncio.to_thread(module.stop, cluster.directory)
        await asyncio.to_thread(module.start, cluster.directory)
        count = await asyncio.wait_for(
            db.run(lambda c: c.execute("SELECT COUNT(*) FROM policies").fetchone()[0]), NO_HANG
        )
        assert count == 1
    finally:
        db.close()


async def test_the_api_answers_503_store_unavailable_while_postgresql_is_down(
    own_cluster: tuple[Any, Any], tmp_path: Path
) -> None:
    import time

    from sendense_nbd.hub.clock import ManualClock
    from tests.hub.operating import local_hub

    module, cluster = own_cluster
    url = module.create_database(cluster, "api")
    async with local_hub(tmp_path / "repo", clock=ManualClock(time.time()), db=url) as hub:
        assert (await hub.call("GET", "/backups"))[0] == 200
        await asyncio.to_thread(module.stop, cluster.directory)
        try:
            status, answer = await asyncio.wait_for(hub.call("GET", "/backups"), NO_HANG)
        finally:
            await asyncio.to_thread(module.start, cluster.directory)
        assert status == 503 and answer["error"]["code"] == "store_unavailable", answer
        assert "postgresql://" in answer["error"]["message"]
        assert (await asyncio.wait_for(hub.call("GET", "/backups"), NO_HANG))[0] == 200


def test_postgresqls_disk_full_is_insufficient_space(postgres_cluster: Any) -> None:
    from sendense_nbd.hub.service import _out_of_space

    db = Database(postgres_cluster.new_database(), connect_timeout=5)
    try:
        with pytest.raises(StoreError) as raised:  # the server's own disk_full, as a full volume raises it
            db.call(lambda c: c.execute("DO $$ BEGIN RAISE SQLSTATE '53100'; END $$"))
        assert _out_of_space(raised.value)
        with pytest.raises(StoreError) as other:
            db.call(lambda c: c.execute("DO $$ BEGIN RAISE SQLSTATE '53200'; END $$"))  # out_of_memory
        assert not _out_of_space(other.value)
    finally:
        db.close()


def test_the_test_cluster_admits_over_tcp_only_with_its_password(postgres_cluster: Any) -> None:
    import psycopg

    cluster = postgres_cluster.cluster
    assert len(cluster.password) >= 20
    with psycopg.connect(cluster.url(), connect_timeout=10) as admitted:
        assert admitted.execute("SELECT 1").fetchone() == (1,)
    for wrong in ("", "not-the-password"):
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(f"postgresql://{cluster.user}:{wrong}@{cluster.host}:{cluster.port}/postgres")
    assert Path(cluster.socket_dir).stat().st_mode & 0o777 == 0o700
    assert (Path(cluster.directory) / "cluster.json").stat().st_mode & 0o777 == 0o600
