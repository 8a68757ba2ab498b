"""What every answer carries and what none gives away (issue 10): generic 500s with a
reference, rate-limited tracebacks, hardening headers, no server banner, URLs
shown without their secrets, the Sheets key kept out of URLs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from nurseryd.http.errors import TracebackBudget
from nurseryd.kinds.fetch.config import parse_fetch_section
from tests.daemon_process import InProcessDaemon, make_settings, run_daemon


@pytest.fixture
async def daemon(database_url: str, state_dir: Path):
    async with run_daemon(make_settings(database_url, state_dir)) as running:
        yield running


async def test_a_500_says_nothing_internal_and_logs_a_reference(
        daemon: InProcessDaemon, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    async def broken(**_: Any) -> Any:
        raise RuntimeError('DETAIL: Key (email)=(alice@example.org) already exists')

    monkeypatch.setattr(daemon.supervisor, "list_jobs", broken)
    caplog.set_level(logging.ERROR)
    response = await daemon.client.get("/jobs")
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert "alice" not in response.text and "RuntimeError" not in response.text
    reference = body["error_id"]
    assert reference in body["detail"]
    logged = [record for record in caplog.records if reference in record.getMessage()]
    assert logged and logged[0].exc_info is not None  # the log has the traceback


def test_tracebacks_are_rate_limited() -> None:
    now = [0.0]
    budget = TracebackBudget(limit=3, window_s=60, clock=lambda: now[0])
    assert [budget.take() for _ in range(5)] == [True, True, True, False, False]
    now[0] = 61.0
    assert budget.take()


async def test_answers_carry_hardening_headers_and_no_banner(daemon: InProcessDaemon) -> None:
    for path in ("/jobs", "/healthz", "/nowhere"):
        response = await daemon.client.get(path)
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["cache-control"] == "no-store"
        assert "server" not in response.headers, response.headers


async def test_get_fetch_shows_source_urls_without_their_secrets(database_url: str,
                                                                state_dir: Path) -> None:
    raw = {"sources": [{"name": "board", "format": "json", "items": "data.jobs",
                        "url": "https://robot:hunter2@feeds.example/jobs?api_key=abc123&page=1"}]}
    settings = make_settings(database_url, state_dir,
                             sections={"fetch": parse_fetch_section(raw, {"fetch": raw})})
    async with run_daemon(settings) as daemon:
        response = await daemon.client.get("/fetch")
        assert response.status_code == 200
        assert "hunter2" not in response.text and "abc123" not in response.text
        url = response.json()["sources"][0]["url"]
        assert url == "https://***@feeds.example/jobs?api_key=***&page=1"


async def test_the_state_dir_is_private_and_a_shared_one_is_warned_about(
        database_url: str, tmp_path: Path) -> None:
    import stat

    from tests.daemon_process import DaemonProcess

    fresh = tmp_path / "fresh"
    async with DaemonProcess.start({"NURSERYD_DATABASE_URL": database_url,
                                    "NURSERYD_STATE_DIR": str(fresh)}) as proc:
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
        assert "accessible to other users" not in proc.log_text()
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    async with DaemonProcess.start({"NURSERYD_DATABASE_URL": database_url,
                                    "NURSERYD_STATE_DIR": str(shared)}) as proc:
        assert "accessible to other users (mode 755)" in proc.log_text()
