"""Database sources (SQLite and PostgreSQL) through the real migration pipeline.

Real files, a real second PostgreSQL database as the source, the daemon's
database as the target. The pipeline tests drive ``run_pipeline`` with a small
JobContext over the real jobs table; the HTTP tests run the whole daemon.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from nurseryd.config import ConfigError, Settings
from nurseryd.db import Database, open_database
from nurseryd.kinds.base import JobFailed
from nurseryd.kinds.migrate.pipeline import run_pipeline
from nurseryd.kinds.migrate.source_config import database_sources, parse_sources
from nurseryd.kinds.migrate.sources.database import (
    APPLICATION_NAME,
    DatabaseSource,
    ErrorClass,
    classify_pg_error,
    reconnect_policy,
)
from nurseryd.kinds.migrate.tables import ensure_target_table
from nurseryd.kinds.migrate.targets import CHATS_TARGET
from tests.daemon_process import DaemonProcess, make_settings, run_daemon
from tests.pgtools import PgServer
from tests.polling import eventually
from tests.source_dbs import (
    PG_FILL,
    PG_SCHEMA,
    SourceContext,
    StopAfter,
    expected_chat,
    make_sqlite_source,
    new_job,
    plain_settings,
    settings_with,
)
from tests.test_migrate_excel import cut_frames


def source_for(settings: Settings, name: str, **overrides: Any) -> DatabaseSource:
    return DatabaseSource(database_sources(settings)[name], **overrides)


@pytest.fixture
async def target_db(db: Database) -> Database:
    await ensure_target_table(db, CHATS_TARGET)
    return db


@pytest.fixture
async def source_pg(pg_server: PgServer, aio_loop: object) -> AsyncIterator[tuple[str, Database]]:
    """A second database on the test server holding ``legacy_chats``."""
    name = f"src_{uuid.uuid4().hex[:12]}"
    pg_server.create_database(name)
    url = pg_server.url(name)
    try:
        async with open_database(url, min_size=1, max_size=2) as source:
            await source.execute(PG_SCHEMA)
            yield url, source
    finally:
        pg_server.drop_database(name)


async def fill_pg(source: Database, first: int, last: int) -> None:
    await source.execute(PG_FILL, first, last)


async def source_session_gone(source: Database) -> None:
    async def gone() -> bool:
        return await source.fetchval("SELECT count(*) FROM pg_stat_activity "
                                     "WHERE application_name = $1", APPLICATION_NAME) == 0

    await eventually(gone, timeout=1)


async def run(ctx: SourceContext, source: Any) -> dict[str, Any]:
    return await run_pipeline(ctx, source, CHATS_TARGET)


# ---------------------------------------------------------------- SQLite -> PG


async def test_sqlite_100k_rows_exact_then_idempotent(target_db: Database,
                                                      tmp_path: Path) -> None:
    path = make_sqlite_source(tmp_path / "legacy.db", 100_000)
    settings = plain_settings(f"""
        [sources.legacy]
        url = "sqlite:///{path}"
        table = "chats"
        key = ["chat_id"]
        batch_rows = 10000
    """)
    ctx = SourceContext(target_db, await new_job(target_db), settings)
    result = await run(ctx, source_for(settings, "legacy"))
    assert ctx.counters == {"total": 100_000, "processed": 100_000, "failed": 0}
    assert result["inserted"] == 100_000 and result["database"] == "sqlite"
    assert result["ignored_columns"] == ["legacy_note"]  # the target lacks it: reported
    assert result["pages"] == 10
    assert await target_db.fetchval("SELECT count(*) FROM chats") == 100_000
    for i in (1, 7, 14, 99_999, 100_000):
        row = await target_db.fetchrow("SELECT * FROM chats WHERE chat_id = $1", 100000 + i)
        assert {k: row[k] for k in expected_chat(i)} == expected_chat(i)
    committed = await target_db.fetchval("SELECT checkpoint FROM jobs WHERE id = $1", ctx.job_id)
    # Two readers, one range each, cut at the middle row; each range's last relayed key.
    shards = committed["position"]["shards"]
    assert [(s["after"], s["rows"], s["until"]) for s in shards] == [
        ([150_000], 50_000, [150_000]), ([200_000], 100_000, None)]
    assert result["readers"] == 2

    again = SourceContext(target_db, await new_job(target_db), settings)
    result = await run(again, source_for(settings, "legacy"))
    assert result["unchanged"] == 100_000 and result["inserted"] == result["updated"] == 0


async def test_sqlite_resume_after_interruption_applies_each_row_once(
        target_db: Database, tmp_path: Path) -> None:
    path = make_sqlite_source(tmp_path / "legacy.db", 5_000)
    with __import__("sqlite3").connect(path) as conn:  # two rows the target must reject
        conn.execute("UPDATE chats SET message_count = 'many' WHERE chat_id IN (100100, 104000)")
    settings = plain_settings(f"""
        [sources.legacy]
        url = "sqlite:///{path}"
        query = "SELECT * FROM chats WHERE chat_id > 0"
        key = "chat_id"
        batch_rows = 500
        readers = 1
    """)
    job = await new_job(target_db)
    first = SourceContext(target_db, job, settings)
    with pytest.raises(JobFailed, match="interrupted after 4 batches"):
        await run(first, StopAfter(source_for(settings, "legacy"), 4))
    committed = await target_db.fetchval("SELECT checkpoint FROM jobs WHERE id = $1", job)
    assert committed["position"] == {"shards": [{"after": [102000], "rows": 2000,
                                                 "until": None, "done": False}]}
    assert (committed["processed"], committed["failed"]) == (1999, 1)
    assert await target_db.fetchval("SELECT count(*) FROM chats") == 1999

    second = SourceContext(target_db, job, settings, checkpoint=committed)
    result = await run(second, source_for(settings, "legacy"))
    assert second.counters["processed"] == 4998 and second.counters["failed"] == 2
    assert result["inserted"] == 4998 and result["updated"] == 0
    assert await target_db.fetchval("SELECT count(*) FROM chats") == 4998
    rejects = await target_db.fetch("SELECT row_number, column_name FROM migration_rejects "
                                    "WHERE job_id = $1 ORDER BY row_number", job)
    assert [(r["row_number"], r["column_name"]) for r in rejects] == [
        (100, "message_count"), (4000, "message_count")]


async def test_sqlite_missing_file_is_retried_then_fails(target_db: Database,
                                                         tmp_path: Path) -> None:
    settings = plain_settings(f"""
        [sources.gone]
        url = "sqlite:///{tmp_path}/nothing-here.db"
        table = "chats"
        key = ["chat_id"]
        connect_attempts = 3
    """)
    waits: list[float] = []

    async def record(delay: float) -> None:
        waits.append(delay)

    ctx = SourceContext(target_db, await new_job(target_db), settings)
    with pytest.raises(JobFailed, match="unreachable after 3 attempts.*no such file"):
        await run(ctx, source_for(settings, "gone", sleep=record))
    assert len(waits) == 2 and 0.25 <= waits[0] <= 0.5 and 0.5 <= waits[1] <= 1.0


async def test_sqlite_sql_error_fails_at_once_with_the_message(target_db: Database,
                                                              tmp_path: Path) -> None:
    path = make_sqlite_source(tmp_path / "legacy.db", 10)
    settings = plain_settings(f"""
        [sources.typo]
        url = "sqlite:///{path}"
        table = "chat"
        key = ["chat_id"]
    """)
    waits: list[float] = []

    async def record(delay: float) -> None:
        waits.append(delay)

    ctx = SourceContext(target_db, await new_job(target_db), settings)
    with pytest.raises(JobFailed, match=r"^source typo \(sqlite\): no such table: chat$"):
        await run(ctx, source_for(settings, "typo", sleep=record))
    assert waits == []


async def test_sqlite_cancel_interrupts_the_running_statement(target_db: Database,
                                                              tmp_path: Path) -> None:
    path = make_sqlite_source(tmp_path / "legacy.db", 10)
    slow = ("SELECT c.* FROM chats c WHERE (WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL "
            "SELECT i + 1 FROM n WHERE i < 2000000000) SELECT count(*) FROM n) > 0")
    settings = plain_settings(f"""
        [sources.slow]
        url = "sqlite:///{path}"
        query = "{slow}"
        key = ["chat_id"]
    """)
    ctx = SourceContext(target_db, await new_job(target_db), settings)
    with trio.move_on_after(0.3) as scope:  # minutes of work for SQLite: cancelled mid-way
        await run(ctx, source_for(settings, "slow"))
    assert scope.cancelled_caught
    # Without sqlite3 interrupt() the worker thread would hold the cancel for minutes.
    assert trio.current_time() - scope.deadline < 1.0


async def test_reading_and_coercion_stay_out_of_the_daemons_process(
        target_db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The event loop only relays COPY bytes: sqlite3 and the coercer are never
    called in this process, yet every row arrives (from the reader child)."""
    import os
    import sqlite3

    from nurseryd.kinds.migrate.coerce import RowCoercer

    path = make_sqlite_source(tmp_path / "legacy.db", 20_000)
    with sqlite3.connect(path) as conn:  # a reject: coerced (and numbered) in the child too
        conn.execute("UPDATE chats SET message_count = 'many' WHERE chat_id = 100777")
    settings = plain_settings(f"""
        [sources.legacy]
        url = "sqlite:///{path}"
        table = "chats"
        key = ["chat_id"]
        batch_rows = 2000
    """)

    def in_this_process(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("source work on the daemon's event loop process")

    monkeypatch.setattr(sqlite3, "connect", in_this_process)
    monkeypatch.setattr(RowCoercer, "coerce_rows", in_this_process)
    ctx = SourceContext(target_db, await new_job(target_db), settings)
    source = source_for(settings, "legacy")
    ticks = 0

    async def ticker() -> None:  # another task of this loop, running all along
        nonlocal ticks
        while True:
            await trio.sleep(0.001)
            ticks += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        result = await run(ctx, source)
        nursery.cancel_scope.cancel()
    assert ctx.counters == {"total": 20_000, "processed": 19_999, "failed": 1}
    assert result["pages"] == 10 and ticks > 0
    assert len(source.pids) == 2 and os.getpid() not in source.pids  # one per key range
    reject = await target_db.fetchrow("SELECT row_number FROM migration_rejects "
                                      "WHERE job_id = $1", ctx.job_id)
    assert reject["row_number"] == 777


# ------------------------------------------------------------ PostgreSQL -> PG


def pg_settings(url: str, **extra: str) -> Settings:
    lines = "\n".join(f"{key} = {value}" for key, value in extra.items())
    return plain_settings(f"""
        [sources.legacy]
        url = "{url}"
        table = "legacy_chats"
        key = ["chat_id"]
        {lines}
    """)


async def test_postgres_to_postgres_with_aliases_rejects_and_ignored_columns(
        target_db: Database, source_pg: tuple[str, Database]) -> None:
    url, source = source_pg
    await fill_pg(source, 1, 3000)
    await source.execute("ALTER TABLE legacy_chats ALTER external_id DROP NOT NULL")
    await source.execute("UPDATE legacy_chats SET external_id = NULL WHERE chat_id = 100042")
    def renamed(key: str) -> Settings:
        return plain_settings(f"""
            [sources.renamed]
            url = "{url}"
            query = '''SELECT chat_id AS "Chat ID", external_id AS "External ID",
                       customer_name, customer_email, channel AS "Канал", status, created_at,
                       message_count, is_vip AS vip, last_message, legacy_note, 42 AS answer
                       FROM legacy_chats'''
            key = ["{key}"]
            batch_rows = 700
        """)

    # The key names a column of the *result*: the source's own name is refused.
    settings = renamed("chat_id")
    ctx = SourceContext(target_db, await new_job(target_db), settings)
    with pytest.raises(JobFailed, match="key column 'chat_id' is not in the result"):
        await run(ctx, source_for(settings, "renamed"))
    settings = renamed("Chat ID")
    ctx = SourceContext(target_db, await new_job(target_db), settings)
    result = await run(ctx, source_for(settings, "renamed"))
    assert ctx.counters == {"total": 3000, "processed": 2999, "failed": 1}
    # Two ranges of 1500 rows, each in pages of 700 + 700 + 100.
    assert result["database"] == "postgresql" and result["pages"] == 6
    assert sorted(result["ignored_columns"]) == ["answer", "legacy_note"]
    assert "phone" not in result["columns"] and "channel" in result["columns"]
    row = await target_db.fetchrow("SELECT * FROM chats WHERE chat_id = 100014")
    assert {k: row[k] for k in expected_chat(14) if k != "phone"} == {
        k: v for k, v in expected_chat(14).items() if k != "phone"}
    assert row["channel"] == "web" and row["is_vip"] is True
    reject = await target_db.fetchrow("SELECT * FROM migration_rejects WHERE job_id = $1",
                                      ctx.job_id)
    assert reject["row_number"] == 42 and reject["column_name"] == "external_id"
    assert reject["raw"]["chat_id"] == 100042


async def test_postgres_missing_required_column_fails_listing_it(
        target_db: Database, source_pg: tuple[str, Database]) -> None:
    url, source = source_pg
    await fill_pg(source, 1, 10)
    settings = plain_settings(f"""
        [sources.thin]
        url = "{url}"
        query = "SELECT chat_id, customer_name, status FROM legacy_chats"
        key = ["chat_id"]
    """)
    ctx = SourceContext(target_db, await new_job(target_db), settings)
    with pytest.raises(JobFailed) as failure:
        await run(ctx, source_for(settings, "thin"))
    message = str(failure.value)
    for column in ("external_id", "channel", "created_at", "message_count", "is_vip"):
        assert column in message
    assert "customer_name" not in message.split("found:")[0]


async def test_postgres_source_dropped_mid_stream_reconnects_without_duplicates(
        target_db: Database, source_pg: tuple[str, Database]) -> None:
    url, source = source_pg
    await fill_pg(source, 1, 20_000)
    settings = pg_settings(url, batch_rows="1000", retry_backoff_s="0.01")
    ctx = SourceContext(target_db, await new_job(target_db), settings)
    killed: list[bool] = []

    async def kill_source_connection() -> None:  # between pages: the connection is idle
        killed.append(await source.fetchval(
            "SELECT bool_or(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = $1 AND datname = current_database()", APPLICATION_NAME))

    dropping = source_for(settings, "legacy")
    result = await run(ctx, StopAfter(dropping, 3, kill_source_connection))
    assert killed == [True]
    assert result["reconnects"] >= 1
    assert ctx.counters == {"total": 20_000, "processed": 20_000, "failed": 0}
    assert await target_db.fetchval("SELECT count(*) FROM chats") == 20_000
    assert result["inserted"] == 20_000 and result["updated"] == 0


async def test_cancel_mid_stream_cancels_the_query_on_the_source_server(
        target_db: Database, source_pg: tuple[str, Database]) -> None:
    url, source = source_pg
    await fill_pg(source, 1, 50)
    settings = plain_settings(f"""
        [sources.slow]
        url = "{url}"
        query = "SELECT l.*, pg_sleep(30) AS nap FROM legacy_chats l"
        key = ["chat_id"]
    """)
    ctx = SourceContext(target_db, await new_job(target_db), settings)
    running = (
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND state = 'active'"
        " AND query LIKE '%pg_sleep(30)%' AND datname = current_database()")
    cancelled_at: list[float] = []
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:

            async def cancel_when_running() -> None:
                await eventually(lambda: source.fetchval(running, APPLICATION_NAME), timeout=10)
                cancelled_at.append(trio.current_time())
                scope.cancel()

            nursery.start_soon(cancel_when_running)
            await run(ctx, source_for(settings, "slow"))
    assert scope.cancelled_caught
    assert trio.current_time() - cancelled_at[0] < 1.0
    # The statement is gone from the source server (it had 50 x 30 s to run), and so is
    # the connection (its backend exits a moment after the client closes it).
    await source_session_gone(source)
    assert await target_db.fetchval("SELECT count(*) FROM chats") == 0


async def test_unreachable_postgres_is_retried_with_backoff_then_fails(
        target_db: Database) -> None:
    with trio.socket.socket() as probe:  # a port nobody listens on
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = pg_settings(f"postgresql://postgres@127.0.0.1:{port}/x",
                           connect_attempts="4", retry_backoff_s="0.2")
    waits: list[float] = []

    async def record(delay: float) -> None:
        waits.append(delay)

    ctx = SourceContext(target_db, await new_job(target_db), settings)
    with pytest.raises(JobFailed, match=r"unreachable after 4 attempts.*(refused|Connect)"):
        await run(ctx, source_for(settings, "legacy", sleep=record))
    assert len(waits) == 3
    assert 0.1 <= waits[0] <= 0.2 and 0.2 <= waits[1] <= 0.4 and 0.4 <= waits[2] <= 0.8


async def test_authentication_failure_fails_at_once(target_db: Database, pg_server: PgServer,
                                                    source_pg: tuple[str, Database]) -> None:
    url, _ = source_pg
    wrong_role = url.replace("postgresql://postgres", "postgresql://no_such_role", 1)
    settings = pg_settings(wrong_role)
    waits: list[float] = []

    async def record(delay: float) -> None:
        waits.append(delay)

    ctx = SourceContext(target_db, await new_job(target_db), settings)
    with pytest.raises(JobFailed, match='role "no_such_role" does not exist'):
        await run(ctx, source_for(settings, "legacy", sleep=record))
    assert waits == []  # no retry loop


async def test_secret_from_environment(target_db: Database, source_pg: tuple[str, Database],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    url, source = source_pg
    await fill_pg(source, 1, 10)
    settings = pg_settings("env:NURSERYD_TEST_LEGACY_URL")
    ctx = SourceContext(target_db, await new_job(target_db), settings)
    with pytest.raises(JobFailed, match="NURSERYD_TEST_LEGACY_URL .* is not set"):
        await run(ctx, source_for(settings, "legacy"))
    monkeypatch.setenv("NURSERYD_TEST_LEGACY_URL", url)
    ctx = SourceContext(target_db, await new_job(target_db), settings)
    await run(ctx, source_for(settings, "legacy"))
    assert ctx.counters["processed"] == 10


# ------------------------------------------------------------------- pure parts


def test_error_classes() -> None:
    import asyncpg

    assert classify_pg_error(ConnectionRefusedError()) is ErrorClass.TRANSIENT
    assert classify_pg_error(asyncpg.InvalidPasswordError("x")) is ErrorClass.FATAL
    assert classify_pg_error(asyncpg.InvalidCatalogNameError("x")) is ErrorClass.FATAL
    assert classify_pg_error(asyncpg.AdminShutdownError("x")) is ErrorClass.TRANSIENT
    assert classify_pg_error(asyncpg.UndefinedTableError("x")) is ErrorClass.FATAL
    config = parse_sources({"x": {"url": "sqlite:///a.db", "table": "t", "key": ["id"],
                                  "connect_attempts": 11, "retry_backoff_s": 1,
                                  "retry_backoff_max_s": 10}}, {})["x"]
    policy = reconnect_policy(config)
    assert policy.delay(1, fraction=0) == 0.5 and policy.delay(10, fraction=0.999) < 10


async def test_a_reconnected_session_with_other_columns_is_refused() -> None:
    """The pipeline's COPY plan follows the first header: a later session (after a
    reconnect) whose result has other columns must stop the job, not misplace rows."""
    from nurseryd.kinds.migrate.sources import framing
    from nurseryd.kinds.migrate.sources.database import Progress, Shard, _Relay

    config = parse_sources({"x": {"url": "sqlite:///a.db", "table": "t", "key": ["id"]}},
                           {})["x"]
    send, receive = trio.open_memory_channel[Any](5)
    shard = Shard(None, 0)
    relay = _Relay(DatabaseSource(config), Progress([shard]), shard, send)
    first = json.dumps({"columns": ["id", "name"], "ignored": []}).encode()
    await relay.handle(framing.HEADER, first)
    await relay.handle(framing.HEADER, first)  # the same layout again: fine, not re-sent
    assert relay.failure is None and receive.statistics().current_buffer_used == 1
    await relay.handle(framing.HEADER, json.dumps({"columns": ["id"], "ignored": []}).encode())
    assert relay.failure is not None and "columns changed" in relay.failure.reason
    assert relay.failure.kind == "source"


@pytest.mark.parametrize(("toml", "key"), [
    ({"x": {"table": "t", "key": ["id"]}}, "sources.x.url"),
    ({"x": {"url": "mysql://h/db", "table": "t", "key": ["id"]}}, "sources.x.url"),
    ({"x": {"url": "env:1BAD", "table": "t", "key": ["id"]}}, "sources.x.url"),
    ({"x": {"url": "sqlite:///a.db", "key": ["id"]}}, "sources.x"),
    ({"x": {"url": "sqlite:///a.db", "table": "t", "query": "SELECT 1", "key": ["id"]}},
     "sources.x"),
    ({"x": {"url": "sqlite:///a.db", "table": "t; DROP", "key": ["id"]}}, "sources.x.table"),
    ({"x": {"url": "sqlite:///a.db", "query": "DELETE FROM t", "key": ["id"]}},
     "sources.x.query"),
    ({"x": {"url": "sqlite:///a.db", "query": "SELECT 1; SELECT 2", "key": ["id"]}},
     "sources.x.query"),
    ({"x": {"url": "sqlite:///a.db", "table": "t", "key": []}}, "sources.x.key"),
    ({"x": {"url": "sqlite:///a.db", "table": "t", "key": ["id"], "batch_rows": 0}},
     "sources.x.batch_rows"),
    ({"x": {"url": "sqlite:///a.db", "table": "t", "key": ["id"], "pasword": "x"}},
     "sources.x.pasword"),
    ({"x": {"url": "sqlite:///a.db", "table": "t", "key": ["id"], "readers": 0}},
     "sources.x.readers"),
    ({"x": {"url": "sqlite:///a.db", "table": "t", "key": ["id"], "readers": 9}},
     "sources.x.readers"),
])
def test_config_errors_name_the_dotted_key(toml: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_sources(toml, {"sources": toml})
    assert error.value.key == key


def test_secrets_are_not_printed() -> None:
    parsed = parse_sources({"x": {"url": "postgresql://u:hunter2@h/db", "table": "t",
                                  "key": ["id"]}}, {})
    assert "hunter2" not in repr(parsed)


# ------------------------------------------------------------------ over HTTP


async def test_http_database_import_end_to_end(database_url: str, state_dir: Path,
                                               tmp_path: Path) -> None:
    path = make_sqlite_source(tmp_path / "legacy.db", 3000)
    settings = settings_with(make_settings(database_url, state_dir), f"""
        [sources.legacy]
        url = "sqlite:///{path}"
        table = "chats"
        key = ["chat_id"]
        batch_rows = 1000
    """)
    async with run_daemon(settings) as daemon:
        response = await daemon.client.post("/migration/database",
                                            json={"source_identifier": "legacy",
                                                  "target": "chats"})
        assert response.status_code == 202, response.text
        job = response.json()
        assert job["source_type"] == "database" and job["status"] == "queued"
        assert response.headers["location"] == f"/migration/jobs/{job['id']}"
        await daemon.wait_for_status(job["id"], "completed", "failed")
        done = (await daemon.client.get(f"/migration/jobs/{job['id']}")).json()
        assert done["status"] == "completed", done
        assert done["source_type"] == "database"
        assert (done["total"], done["processed"], done["failed"]) == (3000, 3000, 0)
        assert done["result"]["ignored_columns"] == ["legacy_note"]
        assert "url" not in json.dumps(done["result"]) and str(path) not in json.dumps(done)


async def test_http_refuses_connection_strings_and_unknown_sources(
        database_url: str, state_dir: Path) -> None:
    settings = settings_with(make_settings(database_url, state_dir), """
        [sources.legacy]
        url = "sqlite:///nowhere.db"
        table = "chats"
        key = ["chat_id"]
        [sources.archive]
        url = "env:ARCHIVE_URL"
        table = "chats"
        key = ["chat_id"]
    """)
    async with run_daemon(settings) as daemon:
        post = daemon.client.post
        smuggled = await post("/migration/database", json={
            "source_identifier": "legacy", "url": "postgresql://evil@10.0.0.1/db"})
        assert smuggled.status_code == 422 and "never accepted" in smuggled.json()["detail"]
        unknown = await post("/migration/database", json={"source_identifier": "prod"})
        assert unknown.status_code == 404
        assert unknown.json()["known"] == ["archive", "legacy"]
        assert "archive, legacy" in unknown.json()["detail"]
        missing = await post("/migration/database", json={"target": "chats"})
        assert missing.status_code == 422 and missing.json()["field"] == "source_identifier"
        bad_target = await post("/migration/database", json={"source_identifier": "legacy",
                                                             "target": "nope"})
        assert bad_target.status_code == 422 and bad_target.json()["field"] == "target"
        not_json = await post("/migration/database", content=b"{oops")
        assert not_json.status_code == 400
        assert await daemon.services.db.fetchval("SELECT count(*) FROM jobs") == 0


async def test_sigkill_mid_import_then_restart_resumes_exactly(
        database_url: str, state_dir: Path, tmp_path: Path, aio_loop: object) -> None:
    rows = 60_000
    path = make_sqlite_source(tmp_path / "legacy.db", rows)
    bad = [500, 30_001, 59_999]  # in the first range (read before the kill) and the second
    spoil_sqlite(path, *(100000 + i for i in bad))
    config = tmp_path / "nurseryd.toml"
    config.write_text(f'[sources.legacy]\nurl = "sqlite:///{path}"\ntable = "chats"\n'
                      'key = ["chat_id"]\nbatch_rows = 1000\n')
    env = {"NURSERYD_DATABASE_URL": database_url, "NURSERYD_STATE_DIR": str(state_dir),
           "NURSERYD_CONFIG": str(config), "NURSERYD_SHUTDOWN_GRACE": "0"}
    async with DaemonProcess.start(env) as daemon, daemon.client() as client:
        response = await client.post("/migration/database", json={"source_identifier": "legacy"})
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]

        async def some_committed() -> bool:
            job = (await client.get(f"/jobs/{job_id}")).json()
            assert job["status"] in ("queued", "running"), job
            return job["processed"] >= 5000

        await eventually(some_committed, timeout=20)
        daemon.kill()
        await daemon.wait()
    async with open_database(database_url, min_size=1, max_size=1) as db:
        between = await db.fetchrow("SELECT status, processed FROM jobs WHERE id = $1", job_id)
        assert between["status"] == "running" and 5000 <= between["processed"] < rows
        assert await db.fetchval("SELECT count(*) FROM chats") == between["processed"]
        checkpoint = await db.fetchval("SELECT checkpoint FROM jobs WHERE id = $1", job_id)
        # Two ranges read in parallel, cut at row 30,000; each stands at its own batch.
        shards = checkpoint["position"]["shards"]
        assert [s["until"] for s in shards] == [[130_000], None]
        assert sum(s["rows"] - start for s, start in zip(shards, (0, 30_000), strict=True)) \
            == between["processed"] + checkpoint["failed"]
    async with DaemonProcess.start(env) as again, again.client() as client:

        async def finished() -> dict | None:
            job = (await client.get(f"/migration/jobs/{job_id}")).json()
            return job if job["status"] in ("completed", "failed", "cancelled") else None

        done = await eventually(finished, timeout=30)
    assert done["status"] == "completed", done
    good = rows - len(bad)
    assert (done["total"], done["processed"], done["failed"]) == (rows, good, len(bad))
    assert done["attempts"] == 2
    # No batch twice (it would count as unchanged), no row lost.
    assert done["result"]["inserted"] == good and done["result"]["updated"] == 0
    assert done["result"]["unchanged"] == 0
    async with open_database(database_url, min_size=1, max_size=1) as db:
        assert await db.fetchval("SELECT count(*) FROM chats") == good
        assert await db.fetchval("SELECT count(DISTINCT chat_id) FROM chats") == good
        numbers = await db.fetch("SELECT row_number FROM migration_rejects WHERE job_id = $1 "
                                 "ORDER BY row_number", job_id)
        assert [r["row_number"] for r in numbers] == bad


async def test_http_cancel_stops_the_query_on_the_source_server(
        database_url: str, state_dir: Path, source_pg: tuple[str, Database]) -> None:
    url, source = source_pg
    await fill_pg(source, 1, 20)
    settings = settings_with(make_settings(database_url, state_dir), f"""
        [sources.slow]
        url = "{url}"
        query = "SELECT l.*, pg_sleep(30) AS nap FROM legacy_chats l"
        key = ["chat_id"]
    """)
    running = ("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 "
               "AND query LIKE '%pg_sleep(30)%' AND state = 'active'")
    async with run_daemon(settings) as daemon:
        job = (await daemon.client.post("/migration/database",
                                        json={"source_identifier": "slow"})).json()
        await eventually(lambda: source.fetchval(running, APPLICATION_NAME), timeout=10)
        response = await daemon.client.post(f"/jobs/{job['id']}/cancel")
        assert response.status_code == 200 and response.json()["status"] == "cancelled"
        await source_session_gone(source)
        shown = (await daemon.client.get(f"/migration/jobs/{job['id']}")).json()
        assert shown["status"] == "cancelled" and shown["source_type"] == "database"


# ------------------------------------------------- key ranges (parallel readers)


def ranged_sqlite(path: Path, readers: int, batch_rows: int = 1000, **extra: str) -> Settings:
    lines = "\n".join(f"{key} = {value}" for key, value in extra.items())
    return plain_settings(f"""
        [sources.legacy]
        url = "sqlite:///{path}"
        table = "chats"
        key = ["chat_id"]
        batch_rows = {batch_rows}
        readers = {readers}
        {lines}
    """)


async def outcome(db: Database, ctx: Any) -> dict[str, Any]:
    """Everything an import leaves: counters, rejects with their row numbers and raw
    values, and the target's content (a digest of every row, in key order)."""
    rejects = await db.fetch("SELECT row_number, column_name, reason, raw FROM migration_rejects "
                             "WHERE job_id = $1 ORDER BY row_number", ctx.job_id)
    return {"counters": dict(ctx.counters),
            "rejects": [tuple(r) for r in rejects],
            "rows": await db.fetchval("SELECT count(*) FROM chats"),
            "content": await db.fetchval("SELECT md5(string_agg(c::text, '|' ORDER BY chat_id)) "
                                         "FROM chats c")}


def spoil_sqlite(path: Path, *chat_ids: int) -> None:
    import sqlite3

    with sqlite3.connect(path) as conn:
        conn.executemany("UPDATE chats SET message_count = 'many' WHERE chat_id = ?",
                         [(chat_id,) for chat_id in chat_ids])


async def test_ranges_give_exactly_what_one_reader_gives_sqlite(target_db: Database,
                                                                tmp_path: Path) -> None:
    rows = 30_000
    path = make_sqlite_source(tmp_path / "legacy.db", rows)
    # Rejects at both ends, on each side of every cut (2 and 3 ranges), and inside.
    bad = [1, 7_777, 10_000, 10_001, 14_999, 15_000, 15_001, 20_000, 20_001, 29_999, 30_000]
    spoil_sqlite(path, *(100000 + i for i in bad))
    seen: dict[int, dict[str, Any]] = {}
    for readers in (1, 2, 3):
        await target_db.execute("TRUNCATE chats")
        ctx = SourceContext(target_db, await new_job(target_db), ranged_sqlite(path, readers))
        source = source_for(ctx.settings, "legacy")
        result = await run(ctx, source)
        assert result["readers"] == readers and len(source.pids) == readers
        assert result["inserted"] == rows - len(bad)
        seen[readers] = await outcome(target_db, ctx)
    assert seen[1]["counters"] == {"total": rows, "processed": rows - len(bad),
                                   "failed": len(bad)}
    assert [r[0] for r in seen[1]["rejects"]] == bad
    assert seen[2] == seen[1] and seen[3] == seen[1]


async def test_ranges_give_exactly_what_one_reader_gives_postgres(
        target_db: Database, source_pg: tuple[str, Database]) -> None:
    url, source = source_pg
    await fill_pg(source, 1, 9000)
    await source.execute("ALTER TABLE legacy_chats ALTER external_id DROP NOT NULL")
    bad = [1, 4500, 4501, 8999]
    await source.execute("UPDATE legacy_chats SET external_id = NULL WHERE chat_id = ANY($1)",
                         [100000 + i for i in bad])
    seen: dict[int, dict[str, Any]] = {}
    for readers in (1, 2):
        await target_db.execute("TRUNCATE chats")
        settings = pg_settings(url, batch_rows="1000", readers=str(readers))
        ctx = SourceContext(target_db, await new_job(target_db), settings)
        result = await run(ctx, source_for(settings, "legacy"))
        assert result["readers"] == readers
        seen[readers] = await outcome(target_db, ctx)
    assert [r[0] for r in seen[1]["rejects"]] == bad
    assert seen[2] == seen[1]


async def test_one_reader_when_the_source_key_does_not_decide_the_target_key(
        target_db: Database, tmp_path: Path) -> None:
    """Paged by another column than the target's key, two ranges could hold rows of
    one target row, and which one wins would follow the interleaving: one reader."""
    path = make_sqlite_source(tmp_path / "legacy.db", 5000)
    settings = plain_settings(f"""
        [sources.legacy]
        url = "sqlite:///{path}"
        table = "chats"
        key = ["external_id"]
        batch_rows = 500
    """)
    ctx = SourceContext(target_db, await new_job(target_db), settings)
    source = source_for(settings, "legacy")
    result = await run(ctx, source)
    assert result["readers"] == 1 and len(source.pids) == 1
    assert ctx.counters == {"total": 5000, "processed": 5000, "failed": 0}


async def test_interrupted_ranged_import_resumes_each_range_after_its_own_batch(
        target_db: Database, tmp_path: Path) -> None:
    rows = 20_000
    path = make_sqlite_source(tmp_path / "legacy.db", rows)
    bad = [3, 9_999, 10_001, 19_000]
    spoil_sqlite(path, *(100000 + i for i in bad))
    settings = ranged_sqlite(path, 2, batch_rows=500)
    job = await new_job(target_db)
    first = SourceContext(target_db, job, settings)
    with pytest.raises(JobFailed, match="interrupted after 9 batches"):
        await run(first, StopAfter(source_for(settings, "legacy"), 9))
    committed = await target_db.fetchval("SELECT checkpoint FROM jobs WHERE id = $1", job)
    shards = committed["position"]["shards"]
    assert [s["until"] for s in shards] == [[110_000], None]
    # However the two ranges interleaved, the checkpoint holds 9 batches of 500 rows.
    assert sum(s["rows"] - start for s, start in zip(shards, (0, 10_000), strict=True)) == 4500
    assert committed["processed"] + committed["failed"] == 4500
    assert await target_db.fetchval("SELECT count(*) FROM chats") == committed["processed"]

    second = SourceContext(target_db, job, settings, checkpoint=committed)
    resumed = source_for(settings, "legacy")
    result = await run(second, resumed)
    assert len(resumed.pids) == 2  # both ranges continue, none is cut again
    assert second.counters == {"total": rows, "processed": rows - len(bad), "failed": len(bad)}
    # No batch twice (it would count as unchanged), no row lost.
    assert result["unchanged"] == 0 and result["updated"] == 0
    assert await target_db.fetchval("SELECT count(*) FROM chats") == rows - len(bad)
    rejects = await target_db.fetch("SELECT row_number FROM migration_rejects WHERE job_id = $1 "
                                    "ORDER BY row_number", job)
    assert [r["row_number"] for r in rejects] == bad


async def test_a_single_readers_checkpoint_resumes_its_rest_in_ranges(
        target_db: Database, tmp_path: Path) -> None:
    """A checkpoint the one-reader code wrote (``{"after", "rows"}``) resumes exactly;
    what is left of the source is cut into ranges."""
    path = make_sqlite_source(tmp_path / "legacy.db", 12_000)
    bad = [100, 2_001, 7_000, 11_999]
    spoil_sqlite(path, *(100000 + i for i in bad))
    job = await new_job(target_db)
    single = ranged_sqlite(path, 1, batch_rows=500)
    first = SourceContext(target_db, job, single)
    with pytest.raises(JobFailed, match="interrupted after 4 batches"):
        await run(first, StopAfter(source_for(single, "legacy"), 4))
    committed = await target_db.fetchval("SELECT checkpoint FROM jobs WHERE id = $1", job)
    (state,) = committed["position"]["shards"]
    legacy = {**committed, "position": {"after": state["after"], "rows": state["rows"]}}
    assert legacy["position"] == {"after": [102_000], "rows": 2000}

    ranged = ranged_sqlite(path, 2, batch_rows=500)
    second = SourceContext(target_db, job, ranged, checkpoint=legacy)
    result = await run(second, source_for(ranged, "legacy"))
    assert result["readers"] == 2 and result["unchanged"] == 0
    assert second.counters == {"total": 12_000, "processed": 12_000 - 4, "failed": 4}
    rejects = await target_db.fetch("SELECT row_number FROM migration_rejects WHERE job_id = $1 "
                                    "ORDER BY row_number", job)
    assert [r["row_number"] for r in rejects] == bad
    committed = await target_db.fetchval("SELECT checkpoint FROM jobs WHERE id = $1", job)
    # The rest (rows 2001..12000) was cut at its middle row, 7000.
    assert [s["until"] for s in committed["position"]["shards"]] == [[107_000], None]


def gone(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def has_open(pid: int, path: Path) -> bool:
    """Whether process ``pid`` holds ``path`` open (Linux ``/proc``)."""
    import os

    fds = Path(f"/proc/{pid}/fd")
    try:
        return any(os.readlink(fd) == str(path) for fd in fds.iterdir())
    except OSError:  # gone, or an fd closed while listed
        return False


async def test_cancel_stops_every_reader_child(tmp_path: Path) -> None:
    from nurseryd.kinds.migrate.sources.base import SourceBatch

    path = make_sqlite_source(tmp_path / "legacy.db", 60_000)
    settings = ranged_sqlite(path, 3, batch_rows=500)
    source = source_for(settings, "legacy")
    send, receive = trio.open_memory_channel[Any](0)
    started: list[float] = []

    async def all_reading() -> bool:  # each child has the file open; none has ended
        return len(source.pids) == 3 and all(has_open(pid, path.resolve())
                                             for pid in source.pids)

    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(source.run, CHATS_TARGET.columns, None, send)
            while not isinstance(await receive.receive(), SourceBatch):
                pass  # the header and the total; the plan came before the first batch
            # Nothing more is received: the children block on full pipes, mid-range
            # (a range is 40 pages, a pipe holds about 10).
            await eventually(all_reading, timeout=20)
            started.append(trio.current_time())
            scope.cancel()
    stopped = trio.current_time() - started[0]
    assert all(gone(pid) for pid in source.pids)  # stopped and reaped, all three
    assert stopped < 0.5, stopped


async def test_a_crashed_reader_child_fails_the_job_and_stops_the_others(
        target_db: Database, tmp_path: Path) -> None:
    import os
    import signal

    path = make_sqlite_source(tmp_path / "legacy.db", 60_000)
    settings = ranged_sqlite(path, 2, batch_rows=500)
    source = source_for(settings, "legacy")
    killed: list[int] = []

    async def crash_one() -> None:  # once both ranges' children run and batches flow
        async def both() -> bool:
            return len(source.pids) == 2 and source.stats["pages"] >= 2

        await eventually(both, timeout=20)
        killed.append(source.pids[1])
        os.kill(source.pids[1], signal.SIGKILL)

    ctx = SourceContext(target_db, await new_job(target_db), settings)
    failed: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(crash_one)
        try:
            await run(ctx, source)
        except JobFailed as error:
            failed.append(str(error))
    assert failed == ["source legacy (sqlite): the reader process exited with code -9 "
                      "before finishing"]
    assert killed and all(gone(pid) for pid in source.pids)
    committed = await target_db.fetchval("SELECT checkpoint FROM jobs WHERE id = $1", ctx.job_id)
    assert await target_db.fetchval("SELECT count(*) FROM chats") == committed["processed"]


def test_a_batch_frame_carries_its_payload_uncopied_and_arrives_whole() -> None:
    """The child writes the payload object it built (a view, a bytearray, any
    buffer) as a frame piece, not a copy of it; the daemon cuts the frame back out
    of pieces of any size, body equal byte for byte, whatever the split."""
    import os

    from nurseryd.kinds.migrate.coerce import RejectRecord
    from nurseryd.kinds.migrate.sources import framing
    from nurseryd.kinds.migrate.sources.base import SourceBatch

    text = bytearray(b"".join(b"%d\trow %d\n" % (i, i) for i in range(5000)))
    payload = memoryview(text)[10:]
    batch = SourceBatch(payload, 4999, 5000, [RejectRecord(7, "chat_id", "bad", {})],
                        {"after": [5000], "rows": 5000})
    pieces = framing.encode_batch(batch)
    assert pieces[-1] is payload  # written from where it was built
    read, write = os.pipe()
    try:
        out = framing.Output(write)
        out.write(*pieces)
        out.send(framing.DONE, {"rows": 5000})
        os.close(write)
        stream = b""
        while chunk := os.read(read, 1 << 20):
            stream += chunk
    finally:
        os.close(read)
    for piece in (1, 5, 4096, len(stream)):
        got = cut_frames(stream, piece)
        assert [kind for kind, _ in got] == [framing.BATCH, framing.DONE]
        again = framing.decode_batch(got[0][1])
        assert bytes(again.payload) == bytes(payload)
        assert (again.written, again.rejects, again.position) == \
            (4999, batch.rejects, {"after": [5000], "rows": 5000})
