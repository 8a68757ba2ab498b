"""Google Sheets source: a local server that answers like the Sheets API v4, the
real pipeline, real PostgreSQL. Pure decisions (ranges, bodies, back-off) are
tested with plain values at the end."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
import trio

from nurseryd.backoff import parse_retry_after
from nurseryd.config import ConfigError
from nurseryd.db import Database
from nurseryd.kinds.base import JobFailed, ParamError
from nurseryd.kinds.migrate import MIGRATION_KIND
from nurseryd.kinds.migrate.external_sources import SheetsImportParams
from nurseryd.kinds.migrate.pipeline import run_pipeline
from nurseryd.kinds.migrate.source_config import SheetsConfig, parse_google_sheets, sheets_config
from nurseryd.kinds.migrate.sources import sheets_api as api
from nurseryd.kinds.migrate.sources.google_sheets import SheetsSource, retry_policy
from nurseryd.kinds.migrate.tables import ensure_target_table
from nurseryd.kinds.migrate.targets import CHATS_TARGET
from tests.daemon_process import make_settings, run_daemon
from tests.sheets_server import Sheet, SheetsServer, sheets_server
from tests.source_dbs import (
    SourceContext,
    StopAfter,
    new_job,
    plain_settings,
    settings_with,
)

SHEET_ID = "1BxiMVs0XRA5nFMdKvBdBZjgmUUqptlbs74OgvE2upms"
HEADER = ["Chat ID", "External ID", "Customer", "E-mail", "Phone", "Channel", "Status",
          "Created", "Closed", "Messages", "Rating", "Last message", "VIP"]
BASE_SERIAL = 44927.0  # 2023-01-01 in Google/Excel serial days


def sheet_row(i: int) -> list[Any]:
    """Row i as UNFORMATTED_VALUE/SERIAL_NUMBER returns it; ragged on purpose."""
    closed = i % 3 == 0
    row: list[Any] = [
        100000 + i, f"CH-{i}", f"Customer {i}", f"user{i}@example.org",
        None if i % 7 == 0 else f"+7 916 {i}", "web", "open",
        BASE_SERIAL + i / 24, BASE_SERIAL + i / 24 + 0.5 if closed else None, 1 + i % 40,
        4.5 if closed else None, None, i % 14 == 0]
    if i % 5 == 0:
        row[11] = f"message {i}"
    return row


def make_sheet(rows: int, *, title: str = "Chats", blank_at: int | None = None,
               grid_extra: int = 0) -> Sheet:
    data = [HEADER] + [sheet_row(i) for i in range(1, rows + 1)]
    if blank_at is not None:
        data.insert(blank_at, [None] * 13)
    return Sheet(title, data, row_count=len(data) + grid_extra)


@pytest.fixture
async def target_db(db: Database) -> Database:
    await ensure_target_table(db, CHATS_TARGET)
    return db


def settings_for(server: SheetsServer, **extra: Any) -> Any:
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in extra.items())
    if "credentials_file" not in extra:
        lines += '\napi_key = "test-key"'
    return plain_settings(f"""
        [google_sheets]
        api_base = "{server.base_url}"
        {lines}
    """)


async def run_sheet(db: Database, settings: Any, *, sheet_range: str | None = "Chats",
                    checkpoint: Any = None, job: int | None = None,
                    sleep: Any = None) -> tuple[SourceContext, dict[str, Any], SheetsSource]:
    ctx = SourceContext(db, job or await new_job(db), settings, checkpoint=checkpoint)
    source = SheetsSource(sheets_config(settings), SHEET_ID, sheet_range)
    if sleep is not None:
        source.sleep = sleep
    result = await run_pipeline(ctx, source, CHATS_TARGET)
    return ctx, result, source


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


async def test_api_key_import_in_windows_with_ragged_rows(target_db: Database) -> None:
    async with sheets_server() as server:
        server.spreadsheets[SHEET_ID] = [Sheet("Other", [["x"]]),
                                         make_sheet(40, blank_at=11, grid_extra=30)]
        settings = settings_for(server, window_rows=7)
        ctx, result, _ = await run_sheet(target_db, settings)
    assert ctx.counters == {"total": 40, "processed": 40, "failed": 0}
    assert result["sheet"] == "Chats" and result["auth"] == "api_key"
    assert result["windows"] == 11  # ceil((42 + 30 - 1) / 7): the grid, not just the data
    row = await target_db.fetchrow("SELECT * FROM chats WHERE chat_id = 100015")
    assert row["created_at"] == dt.datetime(2023, 1, 1, 15, tzinfo=dt.UTC)  # serial + 15/24
    assert row["closed_at"] == dt.datetime(2023, 1, 2, 3, tzinfo=dt.UTC)
    assert row["last_message"] == "message 15" and row["is_vip"] is False
    assert row["phone"] == "+7 916 15" and row["rating"] == 4.5
    short = await target_db.fetchrow("SELECT * FROM chats WHERE chat_id = 100014")
    assert short["is_vip"] is True and short["phone"] is None and short["last_message"] is None
    requests = server.values_requests()
    assert requests[0] == "/v4/spreadsheets/" + SHEET_ID + "/values/Chats!A1:M1"
    assert requests[1].endswith("/values/Chats!A2:M8")
    _, _, query = server.log[-1]
    assert query["valueRenderOption"] == ["UNFORMATTED_VALUE"]
    assert query["dateTimeRenderOption"] == ["SERIAL_NUMBER"]


async def test_a_burst_of_429s_backs_off_honouring_retry_after(target_db: Database) -> None:
    sleeps = Sleeps()
    async with sheets_server(throttle_values=3, retry_after="2") as server:
        server.spreadsheets[SHEET_ID] = [make_sheet(10)]
        settings = settings_for(server, backoff_s=0.5, backoff_max_s=30)
        ctx, result, _ = await run_sheet(target_db, settings, sleep=sleeps)
    assert ctx.counters["processed"] == 10 and result["retries"] == 3
    assert len(sleeps.delays) == 3 and all(delay >= 2 for delay in sleeps.delays)


async def test_requests_are_paced_to_the_per_minute_quota(target_db: Database) -> None:
    sleeps = Sleeps()
    async with sheets_server() as server:
        server.spreadsheets[SHEET_ID] = [make_sheet(20)]
        settings = settings_for(server, window_rows=5, requests_per_minute=4)
        ctx, result, _ = await run_sheet(target_db, settings, sleep=sleeps)
    # metadata + header + 4 windows: the 5th and 6th requests wait for the minute to pass.
    assert result["requests"] == 6 and result["quota_waits"] == 2
    assert len(sleeps.delays) == 2 and all(55 < delay <= 60 for delay in sleeps.delays)
    assert ctx.counters["processed"] == 20


async def test_endless_429s_fail_after_the_configured_attempts(target_db: Database) -> None:
    sleeps = Sleeps()
    async with sheets_server(throttle_values=100, retry_after=None) as server:
        server.spreadsheets[SHEET_ID] = [make_sheet(3)]
        settings = settings_for(server, max_attempts=4, backoff_s=1, backoff_max_s=60)
        with pytest.raises(JobFailed, match="after 4 attempts.*429.*Quota exceeded"):
            await run_sheet(target_db, settings, sleep=sleeps)
    assert len(sleeps.delays) == 3
    assert all(0 <= d < 2 ** i for i, d in enumerate(sleeps.delays))  # full jitter, doubling


@pytest.mark.parametrize(("spreadsheet", "message"), [
    ("forbidden-sheet-id", "403 \\(PERMISSION_DENIED\\): The caller does not have permission"),
    ("unknown-sheet-id-0", "404 \\(NOT_FOUND\\): Requested entity was not found"),
])
async def test_403_and_404_fail_at_once_with_googles_message(
        target_db: Database, spreadsheet: str, message: str) -> None:
    sleeps = Sleeps()
    async with sheets_server(forbidden={"forbidden-sheet-id"}) as server:
        server.spreadsheets["forbidden-sheet-id"] = [make_sheet(3)]
        settings = settings_for(server)
        ctx = SourceContext(target_db, await new_job(target_db), settings)
        source = SheetsSource(sheets_config(settings), spreadsheet, None, sleep=sleeps)
        with pytest.raises(JobFailed, match=message):
            await run_pipeline(ctx, source, CHATS_TARGET)
    assert sleeps.delays == [] and len(server.log) == 1


async def test_missing_columns_and_unknown_sheet_fail_clearly(target_db: Database) -> None:
    async with sheets_server() as server:
        server.spreadsheets[SHEET_ID] = [Sheet("Chats", [["Chat ID", "Customer"], [1, "x"]])]
        settings = settings_for(server)
        with pytest.raises(JobFailed, match="lacks required column.*external_id.*is_vip"):
            await run_sheet(target_db, settings)
        with pytest.raises(JobFailed, match="no sheet named 'Nope'.*'Chats'"):
            await run_sheet(target_db, settings, sheet_range="Nope")


def service_account(tmp_path: Path, token_uri: str) -> tuple[Path, bytes]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode()
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    path = tmp_path / "sa.json"
    path.write_text(json.dumps({
        "type": "service_account", "project_id": "test", "private_key_id": "k1",
        "private_key": private_pem, "client_email": "importer@test.iam.gserviceaccount.com",
        "client_id": "1", "token_uri": token_uri}))
    return path, public_pem


async def test_service_account_exchanges_a_signed_jwt_for_a_bearer_token(
        target_db: Database, tmp_path: Path) -> None:
    async with sheets_server(api_key=None) as server:
        path, server.public_key_pem = service_account(tmp_path, server.token_uri)
        server.spreadsheets[SHEET_ID] = [make_sheet(25)]
        settings = settings_for(server, credentials_file=str(path), window_rows=10)
        ctx, result, _ = await run_sheet(target_db, settings)
        assert ctx.counters["processed"] == 25 and result["auth"] == "service_account"
        assert [m for m, p, _ in server.log if p == "/token"] == ["POST"]  # one token, reused
        assert len(server.tokens) == 1
        server.tokens.clear()  # the token is revoked: a 401 makes the source fetch another
        ctx, _, _ = await run_sheet(target_db, settings)
        assert ctx.counters["processed"] == 25 and len(server.tokens) == 1
        bad_path, _ = service_account(tmp_path / "..", server.token_uri)  # another key
        settings = settings_for(server, credentials_file=str(bad_path))
        with pytest.raises(JobFailed, match="token exchange failed: HTTP 400: invalid_grant"):
            await run_sheet(target_db, settings)


async def test_resume_from_the_last_committed_window(target_db: Database) -> None:
    async with sheets_server() as server:
        server.spreadsheets[SHEET_ID] = [make_sheet(50)]
        settings = settings_for(server, window_rows=10)
        job = await new_job(target_db)
        ctx = SourceContext(target_db, job, settings)
        source = SheetsSource(sheets_config(settings), SHEET_ID, "Chats")
        with pytest.raises(JobFailed, match="interrupted after 3 batches"):
            await run_pipeline(ctx, StopAfter(source, 3), CHATS_TARGET)
        committed = await target_db.fetchval("SELECT checkpoint FROM jobs WHERE id = $1", job)
        assert committed["position"] == {"row": 31} and committed["processed"] == 30
        before = len(server.values_requests())
        ctx, result, _ = await run_sheet(target_db, settings, checkpoint=committed, job=job)
        first_window = server.values_requests()[before + 1]
        next_row = committed["position"]["row"] + 1
        assert first_window.endswith(f"!A{next_row}:M{next_row + 9}")
    assert ctx.counters == {"total": 50, "processed": 50, "failed": 0}
    # Counters continue from the checkpoint: every row was applied exactly once.
    assert result["inserted"] == 50 and result["updated"] == result["unchanged"] == 0
    assert await target_db.fetchval("SELECT count(*) FROM chats") == 50


async def test_request_timeout_retries_then_fails(target_db: Database) -> None:
    sleeps = Sleeps()
    async with sheets_server(hang_values=True) as server:
        server.spreadsheets[SHEET_ID] = [make_sheet(3)]
        settings = settings_for(server, request_timeout_s=0.2, max_attempts=2)
        with pytest.raises(JobFailed, match="after 2 attempts: no answer within 0.2 s"):
            await run_sheet(target_db, settings, sleep=sleeps)
    assert len(sleeps.delays) == 1


async def test_cancel_aborts_the_request_in_flight(target_db: Database) -> None:
    async with sheets_server(hang_values=True) as server:
        server.spreadsheets[SHEET_ID] = [make_sheet(3)]
        settings = settings_for(server)
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:

                async def cancel_when_hung() -> None:
                    await server.hung.wait()
                    scope.cancel()

                nursery.start_soon(cancel_when_hung)
                await run_sheet(target_db, settings)
        with trio.fail_after(1):
            await server.hang_ended.wait()  # the server saw the connection close
    assert scope.cancelled_caught


# ------------------------------------------------------------------ pure parts


def test_a1_ranges_and_windows() -> None:
    assert [api.column_letters(n) for n in (1, 26, 27, 52, 702, 703)] == [
        "A", "Z", "AA", "AZ", "ZZ", "AAA"]
    assert api.column_number("AAA") == 703
    assert api.quote_sheet("Sheet1") == "Sheet1"
    assert api.quote_sheet("My sheet") == "'My sheet'"
    assert api.quote_sheet("Bob's") == "'Bob''s'"
    assert api.quote_sheet("AB12") == "'AB12'"  # looks like a cell reference
    assert api.window_range("Data 2024", 2, 5001, 1, 13) == "'Data 2024'!A2:M5001"
    assert api.parse_range("Sheet1") == api.RangeSpec("Sheet1")
    assert api.parse_range("'Bob''s'!B:F") == api.RangeSpec("Bob's", 2, 6)
    assert api.parse_range(None) == api.RangeSpec(None)
    with pytest.raises(api.SheetsProblem):
        api.parse_range("Sheet1!A5:B9")


def test_value_ranges_and_errors() -> None:
    body = {"range": "Sheet1!A1:D5", "majorDimension": "ROWS", "values": [[1, "a"], [], [2]]}
    assert api.window_rows(body, 5) == [[1, "a"], [], [2]]
    assert api.window_rows({"range": "Sheet1!A6:D9", "majorDimension": "ROWS"}, 4) == []
    with pytest.raises(api.SheetsProblem):
        api.window_rows({"majorDimension": "COLUMNS", "values": []}, 3)
    error = json.dumps({"error": {"code": 403, "message": "nope", "status": "PERMISSION_DENIED"}})
    assert api.google_message(403, error.encode()) == "HTTP 403 (PERMISSION_DENIED): nope"
    assert api.google_message(502, b"<html>bad gateway</html>") == \
        "HTTP 502: <html>bad gateway</html>"
    assert api.classify_status(429) is api.Verdict.RETRY
    assert api.classify_status(503) is api.Verdict.RETRY
    assert api.classify_status(501) is api.Verdict.FAIL
    assert api.classify_status(403) is api.Verdict.FAIL
    assert api.classify_status(401) is api.Verdict.REAUTH


def test_backoff_decisions() -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    assert parse_retry_after("7", now) == 7
    assert parse_retry_after("Thu, 01 Jan 2026 00:00:30 GMT", now) == 30
    assert parse_retry_after("soon", now) is None
    policy = retry_policy(SheetsConfig(max_attempts=5, backoff_s=1.0, backoff_max_s=16.0))
    assert policy.delay(1, None, fraction=0.5) == 0.5
    assert policy.delay(4, None, fraction=0.5) == 4.0
    assert policy.delay(2, 3, fraction=0.1) == 3  # honoured
    assert policy.delay(2, 600, fraction=0.1) is None  # over the cap
    assert policy.delay(5, None, fraction=0.5) is None  # bounded
    assert api.quota_wait([], 0, 60) == 0
    assert api.quota_wait([1.0, 2.0], 10.0, 3) == 0  # under the quota: no wait
    assert api.quota_wait([1.0, 2.0, 3.0], 10.0, 3) == 51.0  # the oldest leaves at 61
    assert api.quota_wait([1.0, 2.0, 3.0], 70.0, 3) == 0
    claims = api.jwt_claims("a@b", "https://oauth2.googleapis.com/token", "s", 1000)
    assert claims == {"iss": "a@b", "scope": "s", "aud": "https://oauth2.googleapis.com/token",
                      "iat": 1000, "exp": 4600}


@pytest.mark.parametrize(("raw", "key"), [
    ({"api_base": "ftp://x"}, "google_sheets.api_base"),
    ({"api_key": "env:"}, "google_sheets.api_key"),
    ({"credentials_file": "/nonexistent/sa.json"}, "google_sheets.credentials_file"),
    ({"window_rows": 0}, "google_sheets.window_rows"),
    ({"request_timeout_s": 0}, "google_sheets.request_timeout_s"),
    ({"windows": 5}, "google_sheets.windows"),
    ({"requests_per_minute": 0}, "google_sheets.requests_per_minute"),
])
def test_sheets_config_errors_name_the_dotted_key(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_google_sheets(raw, {})
    assert error.value.key == key


async def test_http_google_sheets_import(database_url: str, state_dir: Path) -> None:
    async with sheets_server() as server:
        server.spreadsheets[SHEET_ID] = [make_sheet(30)]
        settings = settings_with(make_settings(database_url, state_dir), f"""
            [google_sheets]
            api_base = "{server.base_url}"
            api_key = "test-key"
            window_rows = 8
            spreadsheets = {{ chats = "{SHEET_ID}" }}
        """)
        async with run_daemon(settings) as daemon:
            post = daemon.client.post
            response = await post("/migration/google-sheets", json={
                "spreadsheet_id": SHEET_ID, "range": "Chats", "target": "chats"})
            assert response.status_code == 202, response.text
            job = response.json()
            assert job["source_type"] == "google_sheets"
            assert response.headers["location"] == f"/migration/jobs/{job['id']}"
            await daemon.wait_for_status(job["id"], "completed", "failed")
            done = (await daemon.client.get(f"/migration/jobs/{job['id']}")).json()
            assert done["status"] == "completed", done
            assert (done["total"], done["processed"], done["failed"]) == (30, 30, 0)
            assert done["source_type"] == "google_sheets"
            bad_id = await post("/migration/google-sheets", json={"spreadsheet_id": "../x"})
            assert bad_id.status_code == 422 and bad_id.json()["field"] == "spreadsheet_id"
            bad_range = await post("/migration/google-sheets", json={
                "spreadsheet_id": SHEET_ID, "range": "Chats!A1:B2"})
            assert bad_range.status_code == 422 and bad_range.json()["field"] == "range"
            extra = await post("/migration/google-sheets", json={
                "spreadsheet_id": SHEET_ID, "api_key": "mine"})
            assert extra.status_code == 422 and extra.json()["field"] == "api_key"


async def test_http_handler_and_kind_agree_on_the_range(database_url: str,
                                                      state_dir: Path) -> None:
    """One parse for the range: the handler used to parse it while the kind only
    measured it, so each let through values the other refused. Now a range is
    refused over HTTP exactly when the kind refuses it, for the same reason."""
    refused = [
        "Chats!A1:B2",  # rows in the range: the old kind took it, the handler did not
        "   ",  # blank: likewise
        "S" * 250,  # a long sheet name: the old handler took it, the kind did not
    ]
    async with sheets_server() as server:
        server.spreadsheets[SHEET_ID] = [make_sheet(3, title="Bob's")]
        settings = settings_with(make_settings(database_url, state_dir), f"""
            [google_sheets]
            api_base = "{server.base_url}"
            api_key = "test-key"
            spreadsheets = {{ chats = "{SHEET_ID}" }}
        """)
        async with run_daemon(settings) as daemon:
            for sheet_range in refused:
                params = {"source_type": "google_sheets", "spreadsheet_id": SHEET_ID,
                          "range": sheet_range, "target": "chats"}
                with pytest.raises(ParamError) as by_kind:
                    MIGRATION_KIND.parse_params(params)
                response = await daemon.client.post("/migration/google-sheets", json={
                    "spreadsheet_id": SHEET_ID, "range": sheet_range})
                assert response.status_code == 422, sheet_range
                assert response.json()["invalid_params"] == [
                    {"name": "range", "reason": by_kind.value.message}]
            assert await daemon.services.db.fetchval("SELECT count(*) FROM jobs") == 0

            accepted = "'Bob''s'!A:M"
            params = {"source_type": "google_sheets", "spreadsheet_id": SHEET_ID,
                      "range": accepted, "target": "chats"}
            assert MIGRATION_KIND.parse_params(params) == params
            response = await daemon.client.post("/migration/google-sheets", json={
                "spreadsheet_id": SHEET_ID, "range": accepted})
            assert response.status_code == 202, response.text
            job = response.json()
            assert job["params"] == params
            await daemon.wait_for_status(job["id"], "completed", "failed")
            done = (await daemon.client.get(f"/migration/jobs/{job['id']}")).json()
            assert done["status"] == "completed" and done["processed"] == 3, done


def test_sheets_params_round_trip_through_their_json() -> None:
    params = SheetsImportParams.parse({"spreadsheet_id": SHEET_ID, "target": "chats"})
    assert params.range is None and params.to_json()["source_type"] == "google_sheets"
    assert SheetsImportParams.parse(params.to_json()) == params
    with pytest.raises(ParamError) as other_type:
        SheetsImportParams.parse({**params.to_json(), "source_type": "database"})
    assert other_type.value.field == "source_type"


async def test_http_google_sheets_unconfigured_is_409(database_url: str,
                                                      state_dir: Path) -> None:
    async with run_daemon(make_settings(database_url, state_dir)) as daemon:
        response = await daemon.client.post("/migration/google-sheets",
                                            json={"spreadsheet_id": SHEET_ID})
        assert response.status_code == 409
        assert "api_key or credentials_file" in response.json()["detail"]
