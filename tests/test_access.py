"""Access control end to end: a real daemon, real sockets, the probes of issue 10.

Each probe that got through on the old main (a text/plain POST with a foreign
Origin accepted, a cross-site multipart upload that overwrote rows, a foreign
Host answered, anyone cancelling any job, a public bind accepted silently) has
a test here that it is refused now.
"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.lowlevel

from nurseryd.credentials import parse_access
from tests import xlsx_factory as xf
from tests.daemon_process import InProcessDaemon, make_settings, run_daemon
from tests.polling import eventually

ADMIN = "admin-token-for-tests-0123456789"
READER = "read-token-for-tests-0123456789"
FOREIGN = "https://evil.example"


def with_tokens(settings: Any, **more: Any) -> Any:
    access = parse_access(more or None, {"NURSERYD_API_TOKEN": ADMIN,
                                         "NURSERYD_READ_TOKEN": READER},
                          bind_host="127.0.0.1")
    return dataclasses.replace(settings, access=access)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def open_daemon(database_url: str, state_dir: Path):
    """Protected mode: no token configured, loopback callers served."""
    async with run_daemon(make_settings(database_url, state_dir)) as running:
        yield running


@pytest.fixture
async def daemon(database_url: str, state_dir: Path):
    """Tokens configured: ``api`` (admin) and ``read``."""
    async with run_daemon(with_tokens(make_settings(database_url, state_dir))) as running:
        yield running


async def job_count(daemon: InProcessDaemon) -> int:
    count: int = await daemon.services.db.fetchval("SELECT count(*) FROM jobs")
    return count


async def status_reached(daemon: InProcessDaemon, job_id: int, status: str) -> None:
    async def reached() -> bool:
        job = (await daemon.client.get(f"/jobs/{job_id}", headers=bearer(READER))).json()
        return bool(job["status"] == status)

    await eventually(reached, timeout=10, interval=0.01)


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    return body


# -- the probes ---------------------------------------------------------------------------


async def test_text_plain_post_with_a_foreign_origin_is_refused(
        open_daemon: InProcessDaemon) -> None:
    """The CSRF probe: what a form or fetch() on any web page can send to 127.0.0.1."""
    response = await open_daemon.client.post(
        "/jobs/sleep", content=b'{"seconds": 1}',
        headers={"Content-Type": "text/plain", "Origin": FOREIGN})
    assert "cross-site" in problem(response, 403)["detail"]
    # Without the Origin, text/plain is still not JSON.
    plain = await open_daemon.client.post("/jobs/sleep", content=b'{"seconds": 1}',
                                          headers={"Content-Type": "text/plain"})
    assert "application/json" in problem(plain, 415)["detail"]
    form = await open_daemon.client.post("/jobs/sleep", data={"seconds": "1"})
    problem(form, 415)
    # A browser's own label for a cross-site request is enough, Origin or not.
    labelled = await open_daemon.client.post("/jobs/noop", json={},
                                             headers={"Sec-Fetch-Site": "cross-site"})
    problem(labelled, 403)
    assert await job_count(open_daemon) == 0
    same_origin = await open_daemon.client.post("/jobs/noop", json={}, headers={
        "Origin": open_daemon.base_url, "Sec-Fetch-Site": "same-origin"})
    assert same_origin.status_code == 202, same_origin.text


async def test_a_cross_site_multipart_upload_is_refused_and_stores_nothing(
        open_daemon: InProcessDaemon, tmp_path: Path) -> None:
    """The probe that overwrote rows of ``chats``: a form upload from another site."""
    path = xf.write_openpyxl(tmp_path / "pwned.xlsx", [xf.chat_row(1)])
    content = path.read_bytes()
    for headers in ({"Origin": FOREIGN}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"}):
        response = await open_daemon.client.post(
            "/migration/excel", files={"file": ("pwned.xlsx", content)}, headers=headers)
        problem(response, 403)
    assert await job_count(open_daemon) == 0
    assert await open_daemon.services.db.fetchval("SELECT count(*) FROM chats") == 0


async def test_a_foreign_host_gets_421(open_daemon: InProcessDaemon) -> None:
    """DNS rebinding: the page's own name arrives as Host, with the loopback peer."""
    for method, path in (("GET", "/jobs"), ("POST", "/jobs/noop"), ("GET", "/metrics")):
        response = await open_daemon.client.request(method, path, json={} if method == "POST"
                                                     else None,
                                                     headers={"Host": "evil.example:8084"})
        assert "allowed_hosts" in problem(response, 421)["detail"]
    for host in ("localhost", "127.0.0.1", "localhost:1"):
        ok = await open_daemon.client.get("/jobs", headers={"Host": host})
        assert ok.status_code == 200, (host, ok.text)
    # Probes answer whatever the Host: a kubelet sends the pod's address.
    health = await open_daemon.client.get("/healthz", headers={"Host": "evil.example"})
    assert health.status_code == 200
    assert await job_count(open_daemon) == 0


async def test_configured_allowed_hosts_are_answered(database_url: str,
                                                     state_dir: Path) -> None:
    settings = with_tokens(make_settings(database_url, state_dir),
                           allowed_hosts=["nurseryd.internal"])
    async with run_daemon(settings) as daemon:
        ok = await daemon.client.get("/jobs", headers={"Host": "nurseryd.internal:8084",
                                                       **bearer(READER)})
        assert ok.status_code == 200
        other = await daemon.client.get("/jobs", headers={"Host": "other.internal",
                                                          **bearer(READER)})
        problem(other, 421)


async def test_no_token_or_a_wrong_one_is_401_with_a_bearer_challenge(
        daemon: InProcessDaemon) -> None:
    missing = await daemon.client.get("/jobs")
    assert problem(missing, 401)
    assert missing.headers["www-authenticate"] == 'Bearer realm="nurseryd"'
    wrong = await daemon.client.get("/jobs", headers=bearer("not-the-token-0123456789"))
    problem(wrong, 401)
    assert wrong.headers["www-authenticate"] == 'Bearer realm="nurseryd", error="invalid_token"'
    assert ADMIN not in wrong.text and READER not in wrong.text
    ok = await daemon.client.get("/jobs", headers=bearer(READER))
    assert ok.status_code == 200


async def test_callers_without_a_token_learn_nothing_about_routes_kinds_or_sources(
        daemon: InProcessDaemon) -> None:
    for method, path in (("POST", "/jobs/teleport"), ("GET", "/nowhere"),
                         ("POST", "/migration/database"), ("DELETE", "/jobs/1")):
        response = await daemon.client.request(method, path, json={} if method == "POST"
                                               else None)
        body = problem(response, 401)
        assert set(body) == {"type", "title", "status", "detail"}
        assert "sleep" not in response.text and "known" not in response.text
    with_token = await daemon.client.post("/jobs/teleport", json={}, headers=bearer(ADMIN))
    assert "sleep" in problem(with_token, 404)["known_kinds"]


async def test_health_and_readiness_need_no_token(daemon: InProcessDaemon) -> None:
    assert (await daemon.client.get("/healthz")).status_code == 200
    assert (await daemon.client.get("/readyz")).status_code == 200


async def test_a_token_is_needed_from_loopback_too_once_one_is_configured(
        daemon: InProcessDaemon) -> None:
    problem(await daemon.client.post("/jobs/noop", json={}), 401)
    assert await job_count(daemon) == 0


async def test_protected_mode_does_not_serve_a_proxied_caller(
        open_daemon: InProcessDaemon) -> None:
    """A reverse proxy on the same host connects from 127.0.0.1 for everyone it
    forwards: its forwarding headers make the caller non-local."""
    response = await open_daemon.client.get("/jobs", headers={"X-Forwarded-For": "203.0.113.9"})
    assert "only loopback callers" in problem(response, 401)["detail"]


# -- roles and who did it -------------------------------------------------------------------


async def test_a_read_token_cannot_cancel_or_submit(daemon: InProcessDaemon) -> None:
    job = (await daemon.client.post("/jobs/sleep", json={"seconds": 30},
                                    headers=bearer(ADMIN))).json()
    refused = await daemon.client.post(f"/jobs/{job['id']}/cancel", headers=bearer(READER))
    assert "admin" in problem(refused, 403)["detail"]
    problem(await daemon.client.post("/jobs/noop", json={}, headers=bearer(READER)), 403)
    still = (await daemon.client.get(f"/jobs/{job['id']}", headers=bearer(READER))).json()
    assert still["status"] in ("queued", "running") and still["cancelled_by"] is None
    cancelled = await daemon.client.post(f"/jobs/{job['id']}/cancel", headers=bearer(ADMIN))
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    assert await job_count(daemon) == 1


async def test_jobs_record_who_submitted_and_who_cancelled(
        daemon: InProcessDaemon, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="nurseryd.jobs")
    client = daemon.client
    running = (await client.post("/jobs/sleep", json={"seconds": 30},
                                 headers=bearer(ADMIN))).json()
    assert running["submitted_by"] == "api" and running["cancelled_by"] is None
    await status_reached(daemon, running["id"], "running")
    done = (await client.post(f"/jobs/{running['id']}/cancel", headers=bearer(ADMIN))).json()
    assert (done["status"], done["submitted_by"], done["cancelled_by"]) == (
        "cancelled", "api", "api")
    stored = await daemon.services.db.fetchrow(
        "SELECT submitted_by, cancelled_by FROM jobs WHERE id = $1", running["id"])
    assert (stored["submitted_by"], stored["cancelled_by"]) == ("api", "api")
    lines = [record for record in caplog.records if getattr(record, "job_id", None)
             == running["id"]]
    ended = [record for record in lines if getattr(record, "event", None) == "cancel"]
    assert ended and "cancelled after" in ended[0].getMessage()
    assert " by api" in ended[0].getMessage()
    assert all(getattr(record, "submitted_by", None) == "api" for record in lines)
    assert not any(ADMIN in record.getMessage() for record in caplog.records)


async def test_a_queued_job_cancelled_before_it_starts_records_who(
        database_url: str, state_dir: Path) -> None:
    settings = with_tokens(make_settings(database_url, state_dir))
    limits = dict(settings.kinds)
    limits["sleep"] = dataclasses.replace(limits["sleep"], concurrency=1)
    async with run_daemon(dataclasses.replace(settings, kinds=limits)) as daemon:
        post = daemon.client.post
        await post("/jobs/sleep", json={"seconds": 30}, headers=bearer(ADMIN))
        waiting = (await post("/jobs/sleep", json={"seconds": 30},
                              headers=bearer(ADMIN))).json()
        done = (await post(f"/jobs/{waiting['id']}/cancel", headers=bearer(ADMIN))).json()
        assert (done["status"], done["cancelled_by"]) == ("cancelled", "api")


async def test_protected_mode_records_local(open_daemon: InProcessDaemon) -> None:
    job = (await open_daemon.client.post("/jobs/noop", json={})).json()
    assert job["submitted_by"] == "local"


# -- start-up ---------------------------------------------------------------------------------


def test_a_public_bind_without_a_token_refuses_to_start(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "NURSERYD_BIND": "0.0.0.0:0",
           "NURSERYD_STATE_DIR": str(tmp_path / "var")}
    result = subprocess.run([sys.executable, "-m", "nurseryd.cli", "serve"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "NURSERYD_API_TOKEN" in lines[0] and "0.0.0.0" in lines[0]
    assert not (tmp_path / "var").exists()  # refused before anything was started


async def test_a_public_bind_with_a_token_starts(database_url: str, state_dir: Path) -> None:
    settings = with_tokens(make_settings(database_url, state_dir))
    settings = dataclasses.replace(settings, bind_host="0.0.0.0")
    async with run_daemon(settings) as daemon:
        port = daemon.base_url.rsplit(":", 1)[1]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            assert (await client.get("/jobs")).status_code == 401
            assert (await client.get("/jobs", headers=bearer(READER))).status_code == 200
        await trio.lowlevel.checkpoint()


# -- what a read token sees ---------------------------------------------------------------


async def test_reject_values_are_shown_to_admins_only(database_url: str, state_dir: Path,
                                                      tmp_path: Path) -> None:
    rows = [list(xf.chat_row(i)) for i in range(1, 4)]
    rows[1][9] = "many"  # message_count: a reject with its raw values
    path = xf.write_openpyxl(tmp_path / "chats.xlsx", rows)
    async with run_daemon(with_tokens(make_settings(database_url, state_dir))) as daemon:
        response = await daemon.client.post(
            "/migration/excel", files={"file": ("chats.xlsx", path.read_bytes())},
            headers=bearer(ADMIN))
        assert response.status_code == 202, response.text
        job = response.json()
        assert job["submitted_by"] == "api"

        async def finished() -> bool:
            got = (await daemon.client.get(f"/jobs/{job['id']}", headers=bearer(READER))).json()
            return bool(got["status"] == "completed")

        await eventually(finished, timeout=30, interval=0.05)
        url = f"/jobs/{job['id']}/rejects"
        admin = (await daemon.client.get(url, headers=bearer(ADMIN))).json()
        assert admin["rejects"][0]["values"]["message_count"] == "many"
        assert "values_hidden" not in admin
        reader = (await daemon.client.get(url, headers=bearer(READER))).json()
        assert reader["values_hidden"] is True
        assert [(r["row"], r["column"], r["values"]) for r in reader["rejects"]] == [
            (r["row"], r["column"], None) for r in admin["rejects"]]
        # A read token sees the job itself, params and result included.
        seen = (await daemon.client.get(f"/migration/jobs/{job['id']}",
                                        headers=bearer(READER))).json()
        assert seen["params"]["filename"] == "chats.xlsx" and seen["result"] is not None
