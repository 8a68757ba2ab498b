"""The fetch's pure parts with plain values: config validation, retry decisions,
parsing, and the schedule under Trio's MockClock (no real sleeping)."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from typing import Any

import pytest
import trio
import trio.testing

from nurseryd.backoff import (
    GaveUp,
    RetryPolicy,
    TryAgain,
    backoff_delay,
    is_retryable_status,
    parse_retry_after,
    retry,
)
from nurseryd.config import ConfigError, load_settings
from nurseryd.kinds.base import ParamError
from nurseryd.kinds.fetch.client import StatusClass, classify_status
from nurseryd.kinds.fetch.config import parse_fetch_section, parse_source
from nurseryd.kinds.fetch.job import parse_fetch_params
from nurseryd.kinds.fetch.parse import (
    MISSING,
    ParseError,
    as_datetime,
    clean_json,
    get_path,
    parse_json_page,
)
from nurseryd.kinds.fetch.schedule import first_due, next_due, schedule_loop

# --- config ---------------------------------------------------------------------------------

GOOD = {"name": "b", "url": "https://example.org/api", "format": "json"}


def fetch_error(raw: Any, whole: dict[str, Any] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse_fetch_section(raw, whole or {"fetch": raw})
    return caught.value


def test_config_example_from_the_docs_parses(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("BOARD_TOKEN", "t")
    path = tmp_path / "nurseryd.toml"
    path.write_text("""
[fetch]
interval = "15m"
run_at_start = false
timeout_s = 300
concurrency = 8

[[fetch.sources]]
name = "board-json"
url = "https://example.org/api/jobs"
format = "json"
items = "data.jobs"
id = "id"
next = "links.next"
timeout_s = 30
headers = { Authorization = "env:BOARD_TOKEN" }
include = ["python"]
[fetch.sources.fields]
title = "title"
url = "url"
published_at = "posted_at"
company = "company.name"

[[fetch.sources]]
name = "board-rss"
url = "https://example.org/feed.xml"
format = "rss"
""")
    config = load_settings(path, environ={}).section("fetch")
    assert config.interval_s == 900 and config.timeout_s == 300 and config.concurrency == 8
    board, rss = config.sources
    assert board.items == ("data", "jobs") and board.next == ("links", "next")
    assert board.fields["author"] == ("company", "name")
    assert board.fields["summary"] == ("summary",)  # unmapped fields default to their name
    assert board.headers[0].resolve() == "t" and board.include == ("python",)
    assert rss.format == "rss" and rss.timeout_s == 30


@pytest.mark.parametrize(("raw", "key", "says"), [
    ({"sources": [GOOD, {**GOOD, "name": "c", "format": "xml"}]},
     "fetch.sources[1].format", "expected one of json, rss, atom"),
    ({"sources": [{**GOOD, "url": "file:///etc/passwd"}]}, "fetch.sources[0].url", "http"),
    ({"sources": [GOOD, GOOD]}, "fetch.sources[1].name", "duplicate"),
    ({"sources": [{**GOOD, "format": "rss", "items": "x"}]}, "fetch.sources[0].items",
     "only for format"),
    ({"sources": [{**GOOD, "fields": {"salary": "s"}}]}, "fetch.sources[0].fields.salary",
     "unknown field"),
    ({"sources": [{**GOOD, "items": "a..b"}]}, "fetch.sources[0].items", "empty segment"),
    ({"sources": [{**GOOD, "headers": {"X": "env:NURSERYD_TEST_UNSET_VAR"}}]},
     "fetch.sources[0].headers.X", "is not set"),
    ({"sources": [{**GOOD, "max_bytes": "lots"}]}, "fetch.sources[0].max_bytes", "size"),
    ({"sources": [{**GOOD, "timeout_s": 0}]}, "fetch.sources[0].timeout_s", "> 0"),
    ({"sources": [{**GOOD, "surprise": 1}]}, "fetch.sources[0].surprise", "unknown key"),
    ({"sources": [{"url": "https://e.org"}]}, "fetch.sources[0].name", "missing"),
    ({"interval": "often"}, "fetch.interval", "duration"),
    ({"interval": 0.5}, "fetch.interval", "at least 1 second"),
    ({"concurrency": 0}, "fetch.concurrency", ">= 1"),
    ({"timeout_s": 7200}, "fetch.timeout_s", "kinds.fetch.max_timeout_s"),
    ({"run_at_start": "yes"}, "fetch.run_at_start", "true or false"),
    ({"sources": {"name": "x"}}, "fetch.sources", "array of tables"),
])
def test_config_errors_name_the_key(raw: dict[str, Any], key: str, says: str) -> None:
    error = fetch_error(raw)
    assert error.key == key and says in str(error)


def test_fetch_timeout_may_exceed_default_limit_when_kind_limit_is_raised() -> None:
    raw = {"timeout_s": 7200}
    config = parse_fetch_section(raw, {"fetch": raw, "kinds": {"fetch": {"max_timeout_s": 9000}}})
    assert config.timeout_s == 7200


def test_absent_section_means_no_sources_and_no_schedule() -> None:
    config = parse_fetch_section(None, {})
    assert config.sources == () and config.interval_s == 0


def test_source_defaults() -> None:
    source = parse_source("s", {**GOOD, "format": "atom"})
    assert source.timeout_s == 30 and source.max_bytes == 10 * 1024**2 and source.max_pages == 10


def test_params_take_no_urls() -> None:
    assert parse_fetch_params({}) == {"trigger": "api"}
    with pytest.raises(ParamError, match="configured in the"):
        parse_fetch_params({"url": "http://x"})
    with pytest.raises(ParamError):
        parse_fetch_params({"trigger": "cron"})


# --- retry decisions ------------------------------------------------------------------------

@pytest.mark.parametrize(("status", "verdict"), [
    (200, StatusClass.OK), (204, StatusClass.OK), (304, StatusClass.NOT_MODIFIED),
    (429, StatusClass.RETRY), (500, StatusClass.RETRY), (503, StatusClass.RETRY),
    (408, StatusClass.RETRY), (501, StatusClass.FAIL), (404, StatusClass.FAIL),
    (401, StatusClass.FAIL), (302, StatusClass.FAIL),
])
def test_classify_status(status: int, verdict: StatusClass) -> None:
    assert classify_status(status) is verdict


def test_retry_after_seconds_and_http_date() -> None:
    now = datetime(2025, 6, 2, 10, 0, 0, tzinfo=UTC)
    assert parse_retry_after("7", now) == 7
    assert parse_retry_after("Mon, 02 Jun 2025 10:00:30 GMT", now) == 30
    assert parse_retry_after("Mon, 02 Jun 2025 09:00:00 GMT", now) == 0
    assert parse_retry_after("soon", now) is None and parse_retry_after(None, now) is None


def test_backoff_is_exponential_capped_and_jittered() -> None:
    assert [backoff_delay(n, 0.5, 30, 0.999) for n in (1, 2, 3)] == pytest.approx(
        [0.4995, 0.999, 1.998])
    assert backoff_delay(10, 0.5, 30, 0.5) == 15  # capped at 30, then jittered
    draws = {backoff_delay(3, 0.5, 30, random.Random(seed).random()) for seed in range(20)}
    assert len(draws) == 20 and all(0 <= draw < 2 for draw in draws)


def test_retry_delay_gives_up_when_out_of_attempts_or_budget() -> None:
    policy = RetryPolicy(max_attempts=3, base_s=1.0, cap_s=30.0)  # as the fetch builds it
    common = {"remaining": 10, "fraction": 0.5}
    assert policy.delay(1, None, **common) == 0.5
    assert policy.delay(3, None, **common) is None
    assert policy.delay(1, 5, **common) == 5
    assert policy.delay(1, 60, **common) is None


@pytest.mark.parametrize(("status", "retryable"), [
    (408, True), (425, True), (429, True), (500, True), (502, True), (503, True),
    (504, True), (599, True), (501, False), (505, False), (400, False), (401, False),
    (403, False), (404, False), (304, False), (200, False),
])
def test_one_status_classifier_for_every_http_client(status: int, retryable: bool) -> None:
    assert is_retryable_status(status) is retryable


def test_equal_jitter_never_retries_at_once() -> None:
    policy = RetryPolicy(10, 1.0, 8.0, jitter_floor=0.5)
    assert policy.delay(1, fraction=0) == 0.5 and policy.delay(1, fraction=0.999) < 1
    assert policy.delay(5, fraction=0) == 4 and policy.delay(9, fraction=0.999) < 8


async def test_retry_loop_sleeps_on_the_trio_clock(autojump_clock: trio.testing.MockClock,
                                                  ) -> None:
    calls: list[float] = []
    retries: list[tuple[int, float]] = []

    async def flaky(number: int) -> str:
        calls.append(trio.current_time())
        if number < 3:
            raise TryAgain(f"no {number}", retry_after=10.0 if number == 2 else None)
        return "yes"

    policy = RetryPolicy(max_attempts=3, base_s=1.0, cap_s=30.0)
    result = await retry(policy, flaky, on_retry=lambda n, d, _: retries.append((n, d)))
    assert result == "yes" and [n for n, _ in retries] == [1, 2]
    assert 0 <= retries[0][1] < 1 and retries[1][1] == 10  # jittered, then Retry-After
    assert calls[2] - calls[1] == pytest.approx(10)

    async def never(number: int) -> str:
        raise TryAgain(f"down {number}")

    start = trio.current_time()
    with pytest.raises(GaveUp) as gave_up:
        await retry(policy, never, deadline=start + 100)
    assert gave_up.value.attempts == 3 and gave_up.value.reason == "down 3"
    with pytest.raises(GaveUp) as gave_up:  # a wait that does not fit the deadline
        await retry(policy, lambda n: _later(60), deadline=trio.current_time() + 30)
    assert gave_up.value.attempts == 1 and gave_up.value.reason == "later"


async def _later(seconds: float) -> str:
    raise TryAgain("later", retry_after=seconds)


# --- parsing --------------------------------------------------------------------------------

def test_dotted_paths_through_objects_and_lists() -> None:
    document = {"a": {"b": [{"c": 1}, {"c": 2}]}}
    assert get_path(document, ("a", "b", "1", "c")) == 2
    assert get_path(document, ("a", "b", "-1", "c")) == 2
    assert get_path(document, ()) is document
    assert get_path(document, ("a", "x")) is MISSING
    assert get_path(document, ("a", "b", "9")) is MISSING
    assert get_path(document, ("a", "b", "c")) is MISSING


@pytest.mark.parametrize(("value", "expected"), [
    ("2025-06-01T12:00:00Z", "2025-06-01T12:00:00+00:00"),
    ("2025-06-01T12:00:00+02:00", "2025-06-01T12:00:00+02:00"),
    ("2025-06-01", "2025-06-01T00:00:00+00:00"),
    ("Mon, 02 Jun 2025 10:00:00 GMT", "2025-06-02T10:00:00+00:00"),
    (1748772000, "2025-06-01T10:00:00+00:00"),
    (1748772000000, "2025-06-01T10:00:00+00:00"),
    ("yesterday", None), (None, None), (True, None), (float("nan"), None),
])
def test_dates(value: Any, expected: str | None) -> None:
    parsed = as_datetime(value)
    assert (parsed.isoformat() if parsed else None) == expected


def test_clean_json_makes_values_storable() -> None:
    value = {"a\x00": "x\x00y", "n": float("inf"), "s": "\ud800", "l": [1, None, True]}
    cleaned = clean_json(value)
    assert cleaned == {"a": "xy", "n": None, "s": "?", "l": [1, None, True]}
    json.dumps(cleaned, allow_nan=False)


def test_json_page_ids_fields_and_next_link() -> None:
    source = parse_source("s", {**GOOD, "items": "data", "next": "next",
                                "fields": {"title": "t", "author": "who.name"}})
    body = json.dumps({"data": [{"id": "x1", "t": "T", "who": {"name": "W"}},
                                {"id": 7, "t": 7}, {"id": 1.5}, {"id": {"no": 1}}],
                       "next": "/api?page=2"}).encode()
    page = parse_json_page(body, "application/json", source, "https://example.org/api")
    assert [(item.external_id, item.title, item.author) for item in page.items] == [
        ("x1", "T", "W"), ("7", "7", None)]
    assert page.rejected == 2 and page.seen == 4
    assert page.next_url == "https://example.org/api?page=2"


def test_next_link_to_another_origin_is_not_followed() -> None:
    source = parse_source("s", {**GOOD, "items": "data", "next": "next"})
    body = json.dumps({"data": [], "next": "http://169.254.169.254/latest"}).encode()
    page = parse_json_page(body, None, source, "https://example.org/api")
    assert page.next_url is None and "another origin" in page.notes[0]


def test_content_hash_tracks_any_change() -> None:
    source = parse_source("s", {**GOOD})

    def one(item: dict[str, Any]) -> bytes:
        body = json.dumps([item]).encode()
        return parse_json_page(body, None, source, GOOD["url"]).items[0].content_hash

    assert one({"id": 1, "title": "a"}) == one({"title": "a", "id": 1})
    assert one({"id": 1, "title": "a"}) != one({"id": 1, "title": "b"})
    assert one({"id": 1, "title": "a"}) != one({"id": 1, "title": "a", "extra": 0})


def test_json_errors_are_parse_errors() -> None:
    source = parse_source("s", {**GOOD, "items": "data"})
    with pytest.raises(ParseError, match="not valid JSON"):
        parse_json_page(b"<html>", None, source, GOOD["url"])
    with pytest.raises(ParseError, match="no list of items at 'data'"):
        parse_json_page(b'{"data": {}}', None, source, GOOD["url"])
    with pytest.raises(ParseError, match="not valid JSON"):
        parse_json_page(b"[" * 100_000, None, source, GOOD["url"])


# --- schedule -------------------------------------------------------------------------------

def test_first_due() -> None:
    assert first_due(100, 900, run_at_start=True, since_last=None) == 100
    assert first_due(100, 900, run_at_start=False, since_last=None) == 1000
    assert first_due(100, 900, run_at_start=False, since_last=300) == 700
    # Overdue after downtime: once, now; not once per missed interval.
    assert first_due(100, 900, run_at_start=False, since_last=86_400) == 100
    assert first_due(100, 900, run_at_start=False, since_last=-5) == 1000  # clock skew


def test_next_due_collapses_missed_ticks() -> None:
    assert next_due(900, 900.5, 900) == 1800
    assert next_due(900, 2900, 900) == 3600  # 1800 and 2700 were missed: skipped
    assert next_due(900, 1800, 900) == 2700


async def run_schedule_for(seconds: float, trigger_cost: dict[int, float], **options: Any
                           ) -> list[float]:
    """Run the loop for ``seconds`` of mock time; returns when each tick fired."""
    fired: list[float] = []
    start = trio.current_time()

    async def trigger() -> None:
        fired.append(trio.current_time() - start)
        await trio.sleep(trigger_cost.get(len(fired), 0))

    with trio.move_on_after(seconds):
        await schedule_loop(trigger=trigger, **options)
    return fired


async def test_schedule_ticks_every_interval(autojump_clock: trio.testing.MockClock) -> None:
    fired = await run_schedule_for(3000, {}, interval=900, run_at_start=False, since_last=None)
    assert fired == [900, 1800, 2700]


async def test_schedule_run_at_start(autojump_clock: trio.testing.MockClock) -> None:
    fired = await run_schedule_for(1000, {}, interval=900, run_at_start=True, since_last=None)
    assert fired == [0, 900]


async def test_slow_tick_does_not_pile_up(autojump_clock: trio.testing.MockClock) -> None:
    # The first tick blocks for 2000 s (a stalled submit): 1800 and 2700 are skipped.
    fired = await run_schedule_for(4000, {1: 2000}, interval=900, run_at_start=False,
                                   since_last=None)
    assert fired == [900, 3600]


async def test_restart_after_downtime_fetches_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fired = await run_schedule_for(1000, {}, interval=900, run_at_start=False,
                                   since_last=10 * 900)
    assert fired == [0, 900]
