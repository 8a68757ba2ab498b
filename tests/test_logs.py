"""Log lines an operator can follow: one when a job starts and one when it ends, JSON
lines when asked for, an access log when asked for, and never a secret.

The JSON test runs ``nurseryd serve`` as a real subprocess, configured only through
its environment, and parses every line it wrote to stderr.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from nurseryd.config import ConfigError, load_settings
from nurseryd.kinds.fetch.config import parse_fetch_section
from nurseryd.observe.logs import JsonFormatter, TextFormatter, redact
from tests import xlsx_factory as xf
from tests.daemon_process import DaemonProcess, make_settings, run_daemon
from tests.fetch_servers import Reply, open_local_server
from tests.polling import eventually


class Captured(logging.Handler):
    """Formatted lines of the loggers it is attached to; waits for a line without polling."""

    def __init__(self, formatter: logging.Formatter) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(formatter)
        self.lines: list[str] = []
        self._changed = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, predicate: Callable[[str], bool]) -> str:
        with trio.fail_after(10):
            while True:
                found = [line for line in self.lines if predicate(line)]
                if found:
                    return found[0]
                await self._changed.wait()


@contextmanager
def captured(formatter: logging.Formatter, *names: str) -> Iterator[Captured]:
    handler = Captured(formatter)
    loggers = [logging.getLogger(name) for name in names or ("nurseryd",)]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)


async def test_json_log_lines_of_real_jobs_from_the_daemon_process(
    database_url: str, state_dir: Path,
) -> None:
    env = {"NURSERYD_DATABASE_URL": database_url, "NURSERYD_STATE_DIR": str(state_dir),
           "NURSERYD_LOG_FORMAT": "json", "NURSERYD_ACCESS_LOG": "true"}
    async with DaemonProcess.start(env) as daemon, daemon.client() as client:
        done = (await client.post("/jobs/sleep", json={"seconds": 0.2})).json()
        late = (await client.post("/jobs/sleep?timeout_s=0.2", json={"seconds": 30})).json()

        async def ended(job_id: int, status: str) -> bool:
            return (await client.get(f"/jobs/{job_id}")).json()["status"] == status

        await eventually(lambda: ended(done["id"], "completed"))
        await eventually(lambda: ended(late["id"], "timed_out"))
        daemon.send_signal(signal.SIGTERM)
        assert await daemon.wait() == 0

    records = [json.loads(line) for line in daemon.log if line.strip()]  # every line
    assert records, daemon.log_text()
    for record in records:
        assert {"timestamp", "level", "logger", "message"} <= set(record), record
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$", record["timestamp"])

    def lines_of(job_id: int) -> dict[str, dict[str, Any]]:
        return {r["event"]: r for r in records if r.get("job_id") == job_id and "event" in r}

    completed = lines_of(done["id"])
    assert set(completed) == {"start", "complete"}
    start, end = completed["start"], completed["complete"]
    assert start["logger"] == "nurseryd.jobs" and start["level"] == "INFO"
    assert (start["kind"], start["status"], start["attempt"]) == ("sleep", "running", 1)
    assert start["queue_wait_s"] >= 0
    assert start["message"].startswith(f"job {done['id']} sleep started (attempt 1, queued ")
    assert (end["kind"], end["status"], end["level"]) == ("sleep", "completed", "INFO")
    assert 0.2 <= end["duration_s"] < 10
    assert (end["processed"], end["failed"], end["total"]) == (1, 0, 1)
    assert re.fullmatch(rf"job {done['id']} sleep completed in \d+ ms: 1 processed, 0 failed",
                        end["message"]), end["message"]

    timed_out = lines_of(late["id"])["time_out"]
    assert (timed_out["status"], timed_out["level"]) == ("timed_out", "WARNING")
    assert 0.2 <= timed_out["duration_s"] < 10
    assert "time limit" in timed_out["error"] and "timed out after" in timed_out["message"]

    messages = [r["message"] for r in records]
    assert any(m.startswith("drain: 0 running job(s)") for m in messages), messages
    access = [r for r in records if r["logger"] == "hypercorn.access"]
    assert any(f'"GET /jobs/{done["id"]} HTTP/1.1" 200' in r["message"] for r in access)


async def test_text_lines_name_the_import_and_its_counts(database_url: str, state_dir: Path,
                                                         tmp_path: Path) -> None:
    rows = [xf.chat_row(i) for i in range(1, 31)]
    rows[3][9] = "many"  # a reject
    workbook = xf.write_xlsxwriter(tmp_path / "chats.xlsx", rows)
    with captured(TextFormatter()) as log:
        async with run_daemon(make_settings(database_url, state_dir)) as daemon:
            response = await daemon.client.post(
                "/migration/excel", files={"file": ("chats.xlsx", workbook.read_bytes())})
            job_id = response.json()["id"]
            end = await log.wait_for(lambda line: f"job {job_id} " in line
                                     and " completed in " in line)
    start = next(line for line in log.lines if f"job {job_id} " in line and "started" in line)
    assert re.search(rf"INFO nurseryd\.jobs: job {job_id} migration excel chats\.xlsx → chats "
                     r"started \(attempt 1, queued \d+ ms\)$", start), start
    assert re.search(rf"INFO nurseryd\.jobs: job {job_id} migration excel chats\.xlsx → chats "
                     r"completed in [\d.]+ m?s: 29 processed, 1 failed \(29 inserted, 0 "
                     r"updated, 0 unchanged\)$", end), end


async def test_a_failing_source_url_with_secrets_is_redacted_in_the_log(
    database_url: str, state_dir: Path,
) -> None:
    async with open_local_server() as server:
        server.static("/feed", Reply(status=500, body=b"down"))
        url = (f"http://reader:pa55word@127.0.0.1:{server.port}/feed"
               "?api_key=s3cret&page=1")
        raw = {"retries": 1, "backoff_s": 0.01, "backoff_max_s": 0.01, "sources": [
            {"name": "board", "url": url, "format": "json", "items": "data"}]}
        settings = make_settings(database_url, state_dir,
                                 sections={"fetch": parse_fetch_section(raw, {"fetch": raw})})
        with captured(JsonFormatter()) as log:
            async with run_daemon(settings) as daemon:
                job_id = (await daemon.client.post("/fetch")).json()["id"]
                line = await log.wait_for(lambda text: f'"job_id": {job_id}' in text
                                          and '"status": "failed"' in text)
    record = json.loads(line)
    assert "HTTP 500 from http://" in record["error"], record
    assert "api_key=***&page=1" in record["error"] and "api_key=***" in record["message"]
    for text in log.lines:
        assert "s3cret" not in text and "pa55word" not in text, text


async def test_access_log_is_off_by_default_and_redacted_when_on(
    database_url: str, state_dir: Path,
) -> None:
    with captured(TextFormatter(), "hypercorn.access") as log:
        settings = make_settings(database_url, state_dir)
        async with run_daemon(settings) as daemon:
            await daemon.client.get("/jobs?limit=1&token=abc123")
            await daemon.client.get("/healthz")
        assert log.lines == []
        async with run_daemon(dataclasses.replace(settings, access_log=True)) as daemon:
            await daemon.client.get("/jobs?limit=1&token=abc123")
            line = await log.wait_for(lambda text: "GET /jobs?" in text)
    assert '"GET /jobs?limit=1&token=*** HTTP/1.1" 200' in line
    assert "abc123" not in line


# -- the parts ------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("GET https://bob:hunter2@example.org/feed?api_key=s3cret&page=2 failed",
     "GET https://***@example.org/feed?api_key=***&page=2 failed"),
    ("cannot reach postgresql://nurseryd:pw@db.internal:5432/app?sslmode=require",
     "cannot reach postgresql://***@db.internal:5432/app?sslmode=require"),
    ("https://s3.example/x?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=abcd&X-Amz-Expires=60",
     "https://s3.example/x?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Expires=60"),
    ("token=abc password=def access_token=ghi limit=5",
     "token=*** password=*** access_token=*** limit=5"),
    ("http://127.0.0.1:8084/jobs/12?status=running",
     "http://127.0.0.1:8084/jobs/12?status=running"),
    ("https://example.org/users/a@b then mail a@b.c",
     "https://example.org/users/a@b then mail a@b.c"),
])
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_json_formatter_fields_exceptions_and_redaction() -> None:
    logger = logging.getLogger("nurseryd.test-json")
    record = logger.makeRecord(
        logger.name, logging.ERROR, __file__, 1, "job %d failed: %s",
        (7, "see https://u:p@h/x?key=k"), None,
        extra={"job_id": 7, "kind": "fetch", "duration_s": 1.5, "url": "https://u:p@h/"})
    try:
        raise ValueError("boom at postgresql://u:secret@db/x")
    except ValueError:
        record.exc_info = sys.exc_info()
    out = json.loads(JsonFormatter().format(record))
    assert out["level"] == "ERROR" and out["logger"] == "nurseryd.test-json"
    assert out["message"] == "job 7 failed: see https://***@h/x?key=***"
    assert (out["job_id"], out["kind"], out["duration_s"]) == (7, "fetch", 1.5)
    assert out["url"] == "https://***@h/"
    assert "ValueError: boom at postgresql://***@db/x" in out["exception"]
    assert "secret" not in json.dumps(out)


def test_log_settings_are_validated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert load_settings(None, environ={}).log_format == "text"
    assert load_settings(None, environ={"NURSERYD_LOG_FORMAT": "JSON"}).log_format == "json"
    with pytest.raises(ConfigError, match="log_format: expected one of text, json"):
        load_settings(None, environ={"NURSERYD_LOG_FORMAT": "xml"})
    with pytest.raises(ConfigError, match="access_log: expected true or false"):
        load_settings(None, environ={"NURSERYD_ACCESS_LOG": "sometimes"})
    assert load_settings(None, environ={"NURSERYD_ACCESS_LOG": "on"}).access_log is True
    config = tmp_path / "nurseryd.toml"
    config.write_text('metrics_token = "env:NURSERYD_TEST_SCRAPE_TOKEN"\n')
    with pytest.raises(ConfigError, match="NURSERYD_TEST_SCRAPE_TOKEN is not set"):
        load_settings(config, environ={})
    monkeypatch.setenv("NURSERYD_TEST_SCRAPE_TOKEN", "from-the-env")
    settings = load_settings(config, environ={})
    assert settings.metrics_token == "from-the-env"
    assert "from-the-env" not in repr(settings)
