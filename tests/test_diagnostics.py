"""Diagnostic kinds are off unless asked for, and bounded when on.

``sleep``, ``sql_sleep`` and ``noop`` let any caller hold a slot (``sql_sleep``: a
database connection) for as long as they like, so a production daemon must not
serve them by default; the tests and the README's examples switch them on.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nurseryd.config import ConfigError, load_settings
from nurseryd.kinds.sleep import MAX_SQL_SLEEP_S
from tests.daemon_process import make_settings, run_daemon


def test_diagnostics_are_off_by_default_and_switched_on_by_file_or_environment(
    tmp_path: Path,
) -> None:
    assert load_settings(None, environ={}).diagnostics is False
    assert load_settings(None, environ={"NURSERYD_DIAGNOSTICS": "1"}).diagnostics is True
    config = tmp_path / "nurseryd.toml"
    config.write_text("[diagnostics]\nenabled = true\n")
    assert load_settings(config, environ={}).diagnostics is True
    assert load_settings(config, environ={"NURSERYD_DIAGNOSTICS": "0"}).diagnostics is False


@pytest.mark.parametrize(("text", "environ", "key"), [
    ("[diagnostics]\nenabled = 'maybe'\n", {}, "diagnostics.enabled"),
    ("[diagnostics]\nenable = true\n", {}, "diagnostics.enable"),
    ("diagnostics = true\n", {}, "diagnostics"),
    ("", {"NURSERYD_DIAGNOSTICS": "perhaps"}, "NURSERYD_DIAGNOSTICS"),
    ("[kinds.sql_sleep]\nmax_attempts = 0\n", {}, "kinds.sql_sleep.max_attempts"),
])
def test_bad_diagnostics_values_name_the_key(
    tmp_path: Path, text: str, environ: dict[str, str], key: str
) -> None:
    config = tmp_path / "nurseryd.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_settings(config, environ=environ)
    assert caught.value.key == key


def test_sql_sleep_is_bounded_by_default() -> None:
    limits = load_settings(None, environ={}).limits("sql_sleep")
    assert limits.concurrency < 10  # fewer than the work pool's connections
    assert limits.max_timeout_s <= 600


async def test_a_daemon_without_diagnostics_does_not_serve_their_kinds(
    database_url: str, state_dir: Path
) -> None:
    settings = make_settings(database_url, state_dir, diagnostics=False)
    async with run_daemon(settings) as daemon:
        for kind in ("sleep", "sql_sleep", "noop"):
            response = await daemon.client.post(f"/jobs/{kind}", json={"seconds": 1})
            assert response.status_code == 404, response.text
            assert response.headers["content-type"] == "application/problem+json"
        assert await daemon.services.db.fetchval("SELECT count(*) FROM jobs") == 0


async def test_sql_sleep_refuses_more_than_its_own_maximum(
    database_url: str, state_dir: Path
) -> None:
    async with run_daemon(make_settings(database_url, state_dir)) as daemon:
        too_long = await daemon.client.post("/jobs/sql_sleep",
                                            json={"seconds": MAX_SQL_SLEEP_S + 1})
        assert too_long.status_code == 422, too_long.text
        assert str(MAX_SQL_SLEEP_S) in too_long.json()["detail"]
        assert (await daemon.client.post("/jobs/sleep",
                                         json={"seconds": MAX_SQL_SLEEP_S + 1})).status_code == 202
