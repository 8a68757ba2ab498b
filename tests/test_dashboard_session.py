"""The dashboard's sign-in over plain HTTP (issue 11): the cookie's attributes, what
it grants, the same-origin proof a cookie write needs, and clean 4xx for bad input.
The browser side is tests/test_dashboard_browser.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from nurseryd.credentials import Principal, Role
from nurseryd.http.sessions import COOKIE_NAME, SessionStore
from tests.daemon_process import InProcessDaemon, make_settings, run_daemon
from tests.source_dbs import settings_with
from tests.test_access import ADMIN, READER, with_tokens


@pytest.fixture
async def daemon(database_url: str, state_dir: Path):
    async with run_daemon(with_tokens(make_settings(database_url, state_dir))) as running:
        yield running


def same_origin(daemon: InProcessDaemon) -> dict[str, str]:
    return {"Origin": daemon.base_url}


async def sign_in(daemon: InProcessDaemon, token: str) -> str:
    response = await daemon.client.post("/session", json={"token": token},
                                        headers=same_origin(daemon))
    assert response.status_code == 200, response.text
    return response.cookies[COOKIE_NAME]


async def test_sign_in_sets_a_strict_http_only_cookie_and_never_echoes_the_token(
        daemon: InProcessDaemon, caplog: pytest.LogCaptureFixture) -> None:
    response = await daemon.client.post("/session", json={"token": ADMIN},
                                        headers=same_origin(daemon))
    assert response.status_code == 200
    assert response.json() == {"name": "api", "role": "admin", "via": "cookie",
                               "protected_mode": False}
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE_NAME}=") and "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie and "Path=/" in cookie
    assert ADMIN not in cookie and ADMIN not in response.text and ADMIN not in caplog.text
    wrong = await daemon.client.post("/session", json={"token": "wrong-" + ADMIN})
    assert wrong.status_code == 401 and ADMIN not in wrong.text
    assert wrong.headers["content-type"] == "application/problem+json"


async def test_the_cookie_reads_and_writes_from_this_origin_only(daemon: InProcessDaemon) -> None:
    session = await sign_in(daemon, ADMIN)
    assert daemon.client.cookies[COOKIE_NAME] == session  # the client keeps it, as a browser
    me = await daemon.client.get("/session")
    assert me.json()["name"] == "api"
    assert (await daemon.client.get("/jobs")).status_code == 200
    # A write with the cookie but without proof of origin: refused, nothing started.
    bare = await daemon.client.post("/jobs/noop", json={})
    assert bare.status_code == 403
    other_port = await daemon.client.post("/jobs/noop", json={},
                                          headers={"Origin": "http://127.0.0.1:1"})
    assert other_port.status_code == 403
    assert (await daemon.client.get("/jobs")).json()["jobs"] == []
    ok = await daemon.client.post("/jobs/noop", json={},
                                  headers=same_origin(daemon))
    assert ok.status_code == 202 and ok.json()["submitted_by"] == "api"
    out = await daemon.client.post("/session/logout",
                                   headers=same_origin(daemon))
    assert out.status_code == 204 and "Max-Age=0" in out.headers["set-cookie"]
    daemon.client.cookies.set(COOKIE_NAME, session)  # the old value, replayed
    assert (await daemon.client.get("/session")).status_code == 401


async def test_a_read_session_cannot_write(daemon: InProcessDaemon) -> None:
    await sign_in(daemon, READER)
    assert (await daemon.client.get("/session")).json()["role"] == "read"
    refused = await daemon.client.post("/fetch", json={},
                                       headers=same_origin(daemon))
    assert refused.status_code == 403


async def test_form_sign_in_redirects_to_the_dashboard(daemon: InProcessDaemon) -> None:
    response = await daemon.client.post("/session", data={"token": ADMIN},
                                        headers=same_origin(daemon))
    assert response.status_code == 303 and response.headers["location"] == "/"
    assert COOKIE_NAME in response.cookies


@pytest.mark.parametrize(("kwargs", "status"), [
    ({"content": b"{not json", "headers": {"Content-Type": "application/json"}}, 400),
    ({"json": {"token": 5}}, 422),
    ({"json": {}}, 422),
    ({"content": b"token=x", "headers": {"Content-Type": "text/plain"}}, 415),
    ({"data": {"token": ["a", "b"]}}, 422),
])
async def test_bad_sign_in_bodies_are_4xx_problems(daemon: InProcessDaemon, kwargs: dict,
                                                   status: int) -> None:
    response = await daemon.client.post("/session", **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"


async def test_a_cross_site_sign_in_is_refused(daemon: InProcessDaemon) -> None:
    response = await daemon.client.post("/session", data={"token": ADMIN},
                                        headers={"Origin": "https://evil.example"})
    assert response.status_code == 403 and COOKIE_NAME not in response.cookies


async def test_protected_mode_needs_no_sign_in(database_url: str, state_dir: Path) -> None:
    async with run_daemon(make_settings(database_url, state_dir)) as daemon:
        me = await daemon.client.get("/session")
        assert me.json() == {"name": "local", "role": "admin", "via": "loopback",
                             "protected_mode": True}
        refused = await daemon.client.post("/session", json={"token": ADMIN})
        assert refused.status_code == 409


async def test_the_page_carries_a_strict_content_security_policy(
        daemon: InProcessDaemon) -> None:
    page = await daemon.client.get("/")  # no credential needed to load the sign-in page
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    assert "frame-ancestors 'none'" in policy
    for asset in ("/dashboard.js", "/dashboard.css"):
        assert (await daemon.client.get(asset)).status_code == 200
    assert (await daemon.client.get("/", headers={"Host": "evil.example"})).status_code == 421


def test_sessions_expire_and_are_bounded() -> None:
    store = SessionStore(lifetime_s=10, max_sessions=2)
    who = Principal("api", Role.ADMIN)
    first = store.create(who, now=0)
    assert store.resolve(first, now=5) == Principal("api", Role.ADMIN, via="cookie")
    assert store.resolve(first, now=10) is None
    ids = [store.create(who, now=20) for _ in range(3)]
    assert len(store) == 2 and store.resolve(ids[0], now=21) is None
    assert store.resolve(ids[2], now=21) is not None
    assert store.resolve("x" * 500) is None


async def test_the_forms_learn_configured_names_and_never_urls_or_ids(
        database_url: str, state_dir: Path) -> None:
    settings = settings_with(with_tokens(make_settings(database_url, state_dir)), """
        [sources.legacy]
        url = "postgresql://migrator:hunter2@db.internal/legacy"
        table = "chats"
        key = ["chat_id"]
        [sources.archive]
        url = "env:ARCHIVE_URL"
        table = "chats"
        key = ["chat_id"]
        [google_sheets]
        api_key = "sheets-key"
        spreadsheets = { chats = "1BxiMVs0XRA5nFMdKvBdBZjgmUUqptlbs74OgvE2upms" }
    """)
    async with run_daemon(settings) as daemon:
        assert (await daemon.client.get("/dashboard/options")).status_code == 401
        await sign_in(daemon, READER)  # reading names needs no admin
        answer = await daemon.client.get("/dashboard/options")
    assert answer.status_code == 200
    assert answer.json() == {"targets": ["chats"], "default_target": "chats",
                             "database_sources": ["archive", "legacy"],
                             "spreadsheets": ["chats"], "google_sheets": True}
    for secret in ("hunter2", "db.internal", "ARCHIVE_URL", "sheets-key", "1BxiMVs0XRA5"):
        assert secret not in answer.text


async def test_without_google_access_no_spreadsheet_is_offered(database_url: str,
                                                               state_dir: Path) -> None:
    async with run_daemon(make_settings(database_url, state_dir)) as daemon:
        answer = (await daemon.client.get("/dashboard/options")).json()
    assert answer["google_sheets"] is False and answer["spreadsheets"] == []
    assert answer["database_sources"] == []
