"""``GET /metrics`` after real jobs: the whole daemon in this Trio run, real HTTP, real
PostgreSQL, the exposition parsed by prometheus_client's own parser.

Every wait is for a job's status (through the API) and then for its handle to be
released, which happens only after the final write committed and was published to
the job observer: a counter asserted after that cannot still be on its way.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import trio
from prometheus_client import generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from nurseryd.config import KindLimits
from nurseryd.kinds.fetch.config import parse_fetch_section
from nurseryd.kinds.fetch.freshness import freshness_families
from nurseryd.observe import hub
from nurseryd.observe.jobs import Attempt
from nurseryd.observe.metrics import Metrics
from nurseryd.observe.state import StateCollector
from nurseryd.store.base import ChangeFeed
from tests import xlsx_factory as xf
from tests.daemon_process import InProcessDaemon, make_settings, run_daemon
from tests.fetch_servers import LocalServer, Reply, Request, json_reply, open_local_server
from tests.pgtools import PgServer

ROOT = Path(__file__).resolve().parent.parent
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> tuple[dict[str, str], Samples]:
    """(family name -> type, (sample name, labels) -> value)."""
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return types, samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def scrape(daemon: InProcessDaemon, **headers: str) -> tuple[dict[str, str], Samples]:
    response = await daemon.client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "# HELP nurseryd_jobs_finished_total" in response.text
    return parse(response.text)


async def settled(daemon: InProcessDaemon, job_id: int, *statuses: str) -> dict[str, Any]:
    """The job reached one of ``statuses`` and its final write has been published."""
    job = await daemon.wait_for_status(job_id, *statuses)
    handle = daemon.supervisor.registry.get(job_id)
    if handle is not None:
        await handle.finished.wait()
    return job


@pytest.fixture
def fresh_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every scrape reads the database again (the 5 s cache would hide changes)."""
    monkeypatch.setattr(hub, "REFRESH_S", 0.0)


@pytest.fixture
async def server() -> AsyncIterator[LocalServer]:
    async with open_local_server() as local:
        yield local


def fetching_settings(database_url: str, state_dir: Path, url: str, **overrides: Any) -> Any:
    raw = {"interval": "1h", "retries": 1, "backoff_s": 0.01, "backoff_max_s": 0.01,
           "sources": [{"name": "board", "url": url, "format": "json", "items": "data.jobs"}]}
    settings = make_settings(database_url, state_dir, **overrides,
                             sections={"fetch": parse_fetch_section(raw, {"fetch": raw})})
    return dataclasses.replace(
        settings, kinds={**settings.kinds, "sleep": KindLimits(60, 60, concurrency=1)})


async def test_job_metrics_after_completed_failed_and_cancelled_jobs(
    database_url: str, state_dir: Path, server: LocalServer, fresh_reads: None,
) -> None:
    board_up = False

    async def board(request: Request) -> Reply:
        if not board_up:
            return Reply(status=500, body=b"down")
        return json_reply({"data": {"jobs": [{"id": 1, "title": "a"}, {"id": 2, "title": "b"}]}})

    url = server.route("/board", board) + "?api_key=s3cret"
    async with run_daemon(fetching_settings(database_url, state_dir, url)) as daemon:
        noop = (await daemon.client.post("/jobs/noop", json={})).json()
        await settled(daemon, noop["id"], "completed")
        fetch = (await daemon.client.post("/fetch")).json()
        assert (await settled(daemon, fetch["id"], "completed", "failed"))["status"] == "failed"

        # sleep has one worker slot here: the first runs, the second waits.
        first = (await daemon.client.post("/jobs/sleep", json={"seconds": 30})).json()
        await daemon.wait_for_status(first["id"], "running")
        second = (await daemon.client.post("/jobs/sleep", json={"seconds": 30})).json()
        types, live = await scrape(daemon)
        assert value(live, "nurseryd_jobs_running", kind="sleep") == 1
        assert value(live, "nurseryd_jobs_queued", kind="sleep") == 1
        assert value(live, "nurseryd_jobs_running", kind="noop") == 0
        assert value(live, "nurseryd_cluster_jobs", kind="sleep", status="running") == 1
        assert value(live, "nurseryd_cluster_jobs", kind="sleep", status="queued") == 1
        assert value(live, "nurseryd_cluster_jobs", kind="noop", status="queued") == 0
        for job in (second, first):
            response = await daemon.client.post(f"/jobs/{job['id']}/cancel")
            assert response.json()["status"] == "cancelled"
            await settled(daemon, job["id"], "cancelled")

        board_up = True
        again = (await daemon.client.post("/fetch")).json()
        assert (await settled(daemon, again["id"], "completed", "failed"))["status"] == \
            "completed"
        assert (await daemon.client.get("/nowhere")).status_code == 404
        types, samples = await scrape(daemon)

    assert types["nurseryd_jobs_submitted"] == "counter"
    assert types["nurseryd_job_duration_seconds"] == "histogram"
    assert types["nurseryd_jobs_running"] == "gauge"
    assert value(samples, "nurseryd_jobs_submitted_total", kind="noop") == 1
    assert value(samples, "nurseryd_jobs_submitted_total", kind="sleep") == 2
    assert value(samples, "nurseryd_jobs_submitted_total", kind="fetch") == 2
    assert value(samples, "nurseryd_jobs_submitted_total", kind="migration") == 0
    finished = {(kind, status): value(samples, "nurseryd_jobs_finished_total", kind=kind,
                                      status=status)
                for kind in ("noop", "sleep", "fetch")
                for status in ("completed", "failed", "cancelled", "timed_out")}
    assert finished == {
        ("noop", "completed"): 1, ("noop", "failed"): 0, ("noop", "cancelled"): 0,
        ("noop", "timed_out"): 0,
        ("sleep", "completed"): 0, ("sleep", "failed"): 0, ("sleep", "cancelled"): 2,
        ("sleep", "timed_out"): 0,
        ("fetch", "completed"): 1, ("fetch", "failed"): 1, ("fetch", "cancelled"): 0,
        ("fetch", "timed_out"): 0,
    }
    # Durations of the attempts that ran: the queued sleep was cancelled before it did.
    duration = "nurseryd_job_duration_seconds_count"
    assert value(samples, duration, kind="noop", status="completed") == 1
    assert value(samples, duration, kind="sleep", status="cancelled") == 1
    assert value(samples, duration, kind="fetch", status="failed") == 1
    assert 0 < value(samples, "nurseryd_job_duration_seconds_sum", kind="sleep",
                     status="cancelled") < 30
    assert value(samples, "nurseryd_job_duration_seconds_bucket", kind="sleep",
                 status="cancelled", le="+Inf") == 1
    assert value(samples, "nurseryd_job_queue_wait_seconds_count", kind="sleep") == 1
    assert value(samples, "nurseryd_job_queue_wait_seconds_count", kind="fetch") == 2
    assert value(samples, "nurseryd_job_retries_total", kind="sleep") == 0
    assert value(samples, "nurseryd_jobs_adopted_total") == 0
    assert value(samples, "nurseryd_jobs_running", kind="sleep") == 0
    assert value(samples, "nurseryd_jobs_queued", kind="sleep") == 0
    assert value(samples, "nurseryd_cluster_jobs", kind="sleep", status="running") == 0

    # The fetch: one failed run (HTTP 500), one that stored two new items.
    assert value(samples, "nurseryd_fetch_requests_total", source="board",
                 outcome="http_5xx") == 1
    assert value(samples, "nurseryd_fetch_requests_total", source="board", outcome="new") == 1
    assert value(samples, "nurseryd_fetch_items_total", source="board", result="new") == 2
    assert value(samples, "nurseryd_fetch_items_total", source="board", result="rejected") == 0
    last_success = value(samples, "nurseryd_fetch_last_success_timestamp_seconds",
                         source="board")
    assert last_success is not None and abs(last_success - time.time()) < 60
    assert value(samples, "nurseryd_fetch_overdue_seconds", source="board") == 0

    # HTTP: route templates, never raw paths; a path with no route is "unmatched".
    http = {labels: count for (name, labels), count in samples.items()
            if name == "nurseryd_http_requests_total"}
    routes = {dict(labels)["route"] for labels in http}
    assert {"/jobs/<kind>", "/jobs/<job_id>", "/jobs/<job_id>/cancel", "/fetch", "/metrics",
            "unmatched"} <= routes
    assert not any(str(noop["id"]) in route for route in routes)
    assert value(samples, "nurseryd_http_requests_total", route="/jobs/<kind>", method="POST",
                 status="202") == 3
    assert value(samples, "nurseryd_http_requests_total", route="unmatched", method="GET",
                 status="404") == 1
    assert value(samples, "nurseryd_http_request_duration_seconds_count",
                 route="/jobs/<job_id>/cancel") == 2

    # Health.
    assert value(samples, "nurseryd_draining") == 0
    assert value(samples, "nurseryd_event_loop_lag_seconds") >= 0
    assert value(samples, "nurseryd_db_pool_max_connections", pool="control") == 4
    assert value(samples, "nurseryd_db_pool_max_connections", pool="work") == 10
    in_use = value(samples, "nurseryd_db_pool_connections_in_use", pool="control")
    assert 0 <= in_use <= value(samples, "nurseryd_db_pool_connections", pool="control")
    build = [labels for (name, labels) in samples if name == "nurseryd_build_info"]
    assert len(build) == 1 and dict(build[0])["version"]

    # Every metric the operations guide and the dashboard query is one the daemon serves.
    served = {name for name, _ in samples} | set(types)
    served |= {f"{name}{suffix}" for name, kind in types.items() if kind == "counter"
               for suffix in ("_total",)}
    served |= {f"{name}{suffix}" for name, kind in types.items() if kind == "histogram"
               for suffix in ("_bucket", "_sum", "_count")}
    for doc in (ROOT / "docs" / "operations.md", ROOT / "deploy" / "grafana-nurseryd.json"):
        named = set(re.findall(r"\bnurseryd_[a-z_]+[a-z]", doc.read_text()))
        assert named and named <= served, (doc.name, sorted(named - served))


async def test_migration_rows_by_outcome(database_url: str, state_dir: Path,
                                         tmp_path: Path) -> None:
    settings = make_settings(database_url, state_dir)
    migration = dataclasses.replace(settings.section("migration"), batch_rows=100)
    settings = dataclasses.replace(settings, sections={**settings.sections,
                                                       "migration": migration})
    rows = [xf.chat_row(i) for i in range(1, 301)]
    rows[10][9] = "many"  # message_count: a reject
    workbook = xf.write_xlsxwriter(tmp_path / "chats.xlsx", rows)
    async with run_daemon(settings) as daemon:
        for _ in range(2):  # an import, then the same file again: all unchanged
            response = await daemon.client.post(
                "/migration/excel", files={"file": ("chats.xlsx", workbook.read_bytes())})
            assert response.status_code == 202, response.text
            done = await settled(daemon, response.json()["id"], "completed", "failed")
            assert done["status"] == "completed", done
        _, samples = await scrape(daemon)

    def rows_of(outcome: str) -> float | None:
        return value(samples, "nurseryd_migration_rows_total", source_type="excel",
                     target="chats", outcome=outcome)

    assert (rows_of("inserted"), rows_of("unchanged"), rows_of("rejected")) == (299, 299, 2)
    assert rows_of("updated") is None  # nothing was updated: no series
    assert value(samples, "nurseryd_jobs_finished_total", kind="migration",
                 status="completed") == 2
    assert value(samples, "nurseryd_migration_rows_per_second", source_type="excel") is None


async def test_adoption_retry_and_interrupt_are_counted(
    database_url: str, state_dir: Path, pg_server: PgServer,
) -> None:
    async with run_daemon(make_settings(database_url, state_dir)):
        pass  # creates the schema
    name = urlsplit(database_url).path.lstrip("/")
    pg_server.psql("INSERT INTO jobs (kind, params, timeout_s, status, owner, attempts)"
                   " VALUES ('noop', '{}', 60, 'running', 'dead-host:1:abc', 1)", name)
    async with run_daemon(make_settings(database_url, state_dir)) as daemon:
        job_id = int(pg_server.psql("SELECT max(id) FROM jobs", name))
        assert (await settled(daemon, job_id, "completed"))["attempts"] == 2
        sleeping = (await daemon.client.post("/jobs/sleep", json={"seconds": 30})).json()
        await daemon.wait_for_status(sleeping["id"], "running")
        _, samples = await scrape(daemon)
        registry = daemon.services.observability.metrics.registry
    # Leaving the block drained the daemon: the sleep went back to queued.
    _, after = parse(generate_latest(registry).decode())
    assert value(samples, "nurseryd_jobs_adopted_total") == 1
    assert value(samples, "nurseryd_job_retries_total", kind="noop") == 1
    assert value(samples, "nurseryd_jobs_finished_total", kind="noop", status="completed") == 1
    assert value(samples, "nurseryd_jobs_submitted_total", kind="noop") == 0  # not ours
    assert value(samples, "nurseryd_job_queue_wait_seconds_count", kind="noop") is None
    assert value(after, "nurseryd_jobs_interrupted_total", kind="sleep") == 1
    assert value(after, "nurseryd_jobs_finished_total", kind="sleep", status="cancelled") == 0


async def test_metrics_token_is_required_when_configured(database_url: str,
                                                         state_dir: Path) -> None:
    settings = make_settings(database_url, state_dir, metrics_token="t0ken-for-tests")
    async with run_daemon(settings) as daemon:
        for headers in ({}, {"Authorization": "Bearer wrong"},
                        {"Authorization": "Basic t0ken-for-tests"}):
            response = await daemon.client.get("/metrics", headers=headers)
            assert response.status_code == 401, headers
            assert response.headers["content-type"] == "application/problem+json"
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert "nurseryd_" not in response.text
        await scrape(daemon, Authorization="Bearer t0ken-for-tests")
        _, samples = await scrape(daemon, Authorization="Bearer t0ken-for-tests")
    assert value(samples, "nurseryd_http_requests_total", route="/metrics", method="GET",
                 status="401") == 3


# -- the parts, with plain values -------------------------------------------------------


@dataclasses.dataclass
class FakeKind:
    name: str


@dataclasses.dataclass
class FakeHandle:
    kind: FakeKind
    running: bool
    processed: int = 0
    failed: int = 0


@dataclasses.dataclass
class FakeSupervisor:
    registry: dict[int, FakeHandle]
    draining: bool = False


def test_rows_per_second_counts_this_attempt_of_running_migrations_only() -> None:
    now = 100.0
    supervisor = FakeSupervisor({
        1: FakeHandle(FakeKind("migration"), True, processed=6_000, failed=500),
        2: FakeHandle(FakeKind("migration"), True, processed=1_000),
        3: FakeHandle(FakeKind("migration"), False, processed=9_000),  # finishing
        4: FakeHandle(FakeKind("sleep"), True, processed=5),
    })
    attempts = {
        1: Attempt("migration", "excel", clock=90.0, done_before=1_500),  # resumed job
        2: Attempt("migration", "database", clock=98.0, done_before=0),
        3: Attempt("migration", "excel", clock=10.0, done_before=0),
        4: Attempt("sleep", None, clock=99.0, done_before=0),
    }
    collector = StateCollector(supervisor, attempts, {}, ["migration", "sleep"], lambda: 0.5,
                               clock=lambda: now)
    supervisor.draining = True
    families = {family.name: family for family in collector.collect()}
    rates = {sample.labels["source_type"]: sample.value
             for sample in families["nurseryd_migration_rows_per_second"].samples}
    assert rates == {"excel": 500.0, "database": 500.0}
    running = {s.labels["kind"]: s.value for s in families["nurseryd_jobs_running"].samples}
    assert running == {"migration": 2, "sleep": 1}
    assert families["nurseryd_jobs_queued"].samples[0].labels == {"kind": "migration"}
    assert families["nurseryd_jobs_queued"].samples[0].value == 1
    assert families["nurseryd_draining"].samples[0].value == 1
    assert families["nurseryd_event_loop_lag_seconds"].samples[0].value == 0.5
    assert "nurseryd_cluster_jobs" not in families  # not read (or the read failed)


def test_fetch_freshness_overdue_counts_past_interval_plus_timeout() -> None:
    families = freshness_families(
        ["fresh", "late", "never"], {"fresh": 1_000.0, "late": 100.0},
        interval_s=600, timeout_s=300, now=1_500.0, since=200.0)
    by_name = {family.name: {s.labels["source"]: s.value for s in family.samples}
               for family in families}
    assert by_name["nurseryd_fetch_last_success_timestamp_seconds"] == {
        "fresh": 1_000.0, "late": 100.0}
    assert by_name["nurseryd_fetch_overdue_seconds"] == {"fresh": 0.0, "late": 500.0,
                                                         "never": 400.0}
    off = freshness_families(["late"], {"late": 100.0}, interval_s=0, timeout_s=300,
                             now=1_500.0, since=200.0)
    assert [family.name for family in off] == ["nurseryd_fetch_last_success_timestamp_seconds"]


def test_label_values_stay_bounded() -> None:
    metrics = Metrics(["noop"])
    metrics.http_request("unmatched", "BREW", 418, 0.01)
    metrics.http_request("/jobs/<job_id>", "GET", 200, 0.01)
    _, samples = parse(generate_latest(metrics.registry).decode())
    assert value(samples, "nurseryd_http_requests_total", route="unmatched", method="other",
                 status="418") == 1
    assert not any(dict(labels).get("method") == "BREW" for _, labels in samples)


async def test_a_scrape_answers_without_what_the_database_cannot_give(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hub, "READ_TIMEOUT_S", 0.05)

    class DownDatabase:
        async def fetch(self, *args: Any) -> list[Any]:
            raise OSError("connection refused")

    async def broken(services: Any) -> list[Any]:
        raise RuntimeError("no table")

    async def hung(services: Any) -> list[Any]:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def fine(services: Any) -> list[Any]:
        return [GaugeMetricFamily("nurseryd_test_state", "A feature's state.", value=3)]

    observability = hub.Observability(
        Metrics(["noop"]), FakeSupervisor({}), ChangeFeed(), db=DownDatabase(),  # type: ignore[arg-type]
        pools={}, hooks=[broken, hung, fine])
    with trio.fail_after(5):
        text = (await observability.render(None)).decode()  # type: ignore[arg-type]
    types, samples = parse(text)
    assert "nurseryd_cluster_jobs" not in types  # not shown stale, not shown as 0
    assert value(samples, "nurseryd_test_state") == 3
    assert value(samples, "nurseryd_jobs_running", kind="noop") == 0
