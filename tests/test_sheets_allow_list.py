"""Only the spreadsheets the config file lists are read (issue 10).

A service account reads every sheet shared with it; without an allow-list any
caller could have the daemon import any of them into a target table.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nurseryd.config import ConfigError
from nurseryd.kinds.migrate.source_config import parse_google_sheets
from tests.daemon_process import make_settings, run_daemon
from tests.sheets_server import sheets_server
from tests.source_dbs import settings_with
from tests.test_migrate_sheets import SHEET_ID, make_sheet

OTHER_ID = "1ZZZotherSpreadsheetTheServiceAccountCanAlsoRead0"


async def test_only_listed_spreadsheets_are_imported(database_url: str,
                                                     state_dir: Path) -> None:
    async with sheets_server() as server:
        server.spreadsheets[SHEET_ID] = [make_sheet(5)]
        server.spreadsheets[OTHER_ID] = [make_sheet(5)]
        settings = settings_with(make_settings(database_url, state_dir), f"""
            [google_sheets]
            api_base = "{server.base_url}"
            api_key = "test-key"
            spreadsheets = {{ chats = "{SHEET_ID}" }}
        """)
        async with run_daemon(settings) as daemon:
            post = daemon.client.post
            other = await post("/migration/google-sheets", json={"spreadsheet_id": OTHER_ID})
            assert other.status_code == 403, other.text
            assert other.json()["field"] == "spreadsheet_id"
            assert OTHER_ID not in other.text and SHEET_ID not in other.text
            unknown = await post("/migration/google-sheets", json={"spreadsheet": "secret"})
            assert unknown.status_code == 404 and unknown.json()["field"] == "spreadsheet"
            both = await post("/migration/google-sheets",
                              json={"spreadsheet": "chats", "spreadsheet_id": SHEET_ID})
            assert both.status_code == 422
            assert await daemon.services.db.fetchval("SELECT count(*) FROM jobs") == 0
            assert not any(OTHER_ID in path for _, path, _ in server.log)

            by_name = await post("/migration/google-sheets",
                                 json={"spreadsheet": "chats", "range": "Chats"})
            assert by_name.status_code == 202, by_name.text
            job = by_name.json()
            assert job["params"]["spreadsheet_id"] == SHEET_ID
            done = await daemon.wait_for_status(job["id"], "completed", "failed", timeout=30)
            assert done["status"] == "completed" and done["processed"] == 5, done


async def test_a_spreadsheet_removed_from_the_list_fails_its_job(database_url: str,
                                                                 state_dir: Path) -> None:
    """Checked again when the job runs: a queued or resumed job whose spreadsheet
    the operator has since removed reads nothing."""
    async with sheets_server() as server:
        server.spreadsheets[OTHER_ID] = [make_sheet(5)]
        settings = settings_with(make_settings(database_url, state_dir), f"""
            [google_sheets]
            api_base = "{server.base_url}"
            api_key = "test-key"
        """)
        async with run_daemon(settings) as daemon:
            job = await daemon.supervisor.submit("migration", {
                "source_type": "google_sheets", "spreadsheet_id": OTHER_ID, "range": None,
                "target": "chats"})
            done = await daemon.wait_for_status(job["id"], "completed", "failed", timeout=30)
            assert done["status"] == "failed" and "google_sheets.spreadsheets" in done["error"]
            assert not any(OTHER_ID in path for _, path, _ in server.log)


@pytest.mark.parametrize(("raw", "key"), [
    ({"spreadsheets": {"chats": "../etc"}}, "google_sheets.spreadsheets.chats"),
    ({"spreadsheets": {"bad name!": SHEET_ID}}, "google_sheets.spreadsheets.bad name!"),
    ({"spreadsheets": ["x"]}, "google_sheets.spreadsheets"),
])
def test_bad_allow_lists_are_refused(raw: dict, key: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_google_sheets(raw, {})
    assert error.value.key == key
