"""The dashboard in a real headless Chromium (issue 11): Debian's ``chromium``
package driven by playwright (``make test`` installs it; playwright never
downloads a browser of its own here).

The daemon runs in this test's Trio run; the browser runs in a worker thread
(playwright's sync API keeps its own event loop there), so the daemon keeps
serving while the page polls it. Every wait is on something the page shows
(a row's status, a bar's value, a message), never a sleep.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from tests import xlsx_factory as xf
from tests.daemon_process import make_settings, run_daemon
from tests.fetch_servers import hang, json_reply, open_local_server
from tests.sheets_server import sheets_server
from tests.source_dbs import make_sqlite_source, settings_with
from tests.test_access import ADMIN, READER, bearer, with_tokens
from tests.test_fetch_api import fetch_daemon, jobs_page, source
from tests.test_migrate_sheets import SHEET_ID, make_sheet

CHROMIUM = shutil.which("chromium")
#: A phone's width: the dashboard must be usable there.
PHONE = {"width": 390, "height": 844}

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                                 "(make test installs it)")]


async def in_browser(scenario: Callable[..., Any], *args: Any) -> Any:
    """Run ``scenario(page, *args)`` in a fresh headless Chromium, in a worker thread."""

    def run() -> Any:
        from playwright.sync_api import sync_playwright

        # trio-asyncio's policy (installed for the daemon) would hand playwright a
        # Trio-bound loop; its thread-local override gives this thread plain asyncio.
        from trio_asyncio._loop import _faked_policy

        _faked_policy.policy = asyncio.DefaultEventLoopPolicy()
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM)
                try:
                    page = browser.new_page(viewport=PHONE)
                    page.set_default_timeout(20_000)
                    return scenario(page, *args)
                finally:
                    browser.close()
        finally:
            _faked_policy.policy = None  # trio reuses its worker threads

    return await trio.to_thread.run_sync(run)


def row(page: Any, job_id: int, status: str | None = None) -> Any:
    selector = f'#jobs tr[data-job="{job_id}"]'
    return page.locator(selector + (f'[data-status="{status}"]' if status else ""))


def show(page: Any, view: str) -> None:
    page.click(f'#nav button[data-view="{view}"]')
    page.locator(f"#view-{view}").wait_for()


def fits_a_phone(page: Any) -> bool:
    """Nothing wider than the screen: no sideways scrolling to reach a button."""
    return bool(page.evaluate("() => document.documentElement.scrollWidth") <= PHONE["width"])


def watch_cancel_and_upload(page: Any, base_url: str, job_id: int, workbook: Path,
                            screenshot: str | None) -> None:
    violations: list[str] = []
    page.on("console", lambda message: violations.append(message.text)
            if "Content Security Policy" in message.text else None)
    page.goto(base_url + "/")
    running = row(page, job_id, "running")
    running.wait_for()
    bar = running.locator("progress")
    first = bar.evaluate("bar => bar.value")
    # The bar advances: wait until the page shows a larger value than the first one seen.
    page.wait_for_function(
        f"""() => {{ const bar = document.querySelector('#jobs tr[data-job="{job_id}"] progress');
                    return bar && bar.value > {first}; }}""")
    page.locator(f'#jobs tr[data-job="{job_id}"] .rate').filter(has_text="/s").wait_for()
    assert fits_a_phone(page)
    assert row(page, job_id).locator("button.cancel").is_visible()
    if screenshot:
        row(page, job_id).click()
        page.locator("#job-status").filter(has_text="running").wait_for()
        page.locator("#job-log li").filter(has_text="attempt 1 started").wait_for()
        page.locator("#feed").filter(has_text="live").wait_for()
        page.set_viewport_size({"width": 1000, "height": 760})
        page.screenshot(path=screenshot, full_page=True)
        page.set_viewport_size(PHONE)
    row(page, job_id).locator("button.cancel").click()
    row(page, job_id, "cancelled").wait_for()

    show(page, "import")
    assert fits_a_phone(page)
    page.set_input_files("#upload-file", str(workbook))
    page.click("#upload-form button[type=submit]")
    page.locator("#message").filter(has_text="import started").wait_for()
    page.locator("#job-status").filter(has_text="completed").wait_for(timeout=60_000)
    assert page.locator("#job-id").inner_text().endswith("migration")
    # 120 bad rows: the rejects table shows them 100 at a time, and the CSV (built in
    # the page) holds them all.
    page.locator("#rejects-page").filter(has_text="1–100 of 120").wait_for()
    assert page.locator("#job-rejects tbody tr").count() == 100
    page.locator("#job-rejects td").filter(has_text="not a number").first.wait_for()
    page.click("#rejects-next")
    page.locator("#rejects-page").filter(has_text="101–120 of 120").wait_for()
    assert page.locator("#job-rejects tbody tr").count() == 20
    assert page.locator("#rejects-next").is_disabled()
    page.click("#rejects-prev")
    page.locator("#rejects-page").filter(has_text="1–100 of 120").wait_for()
    with page.expect_download() as download:
        page.click("#rejects-csv")
    csv = Path(download.value.path()).read_text()
    assert csv.splitlines()[0] == "row,column,reason,values" and "message_count" in csv
    assert len(csv.splitlines()) == 121
    page.locator("#job-log li").filter(has_text="completed: ").wait_for()

    # "Fetch now" posts JSON the API takes: with no source configured, its 409 says so.
    show(page, "fetch")
    page.locator("#fetch-none").wait_for()
    page.click("#fetch-now")
    page.locator("#message").filter(has_text="no fetch sources are configured").wait_for()
    assert violations == [], "the page must run under its own CSP"


async def test_watch_a_job_cancel_it_and_upload_a_workbook(database_url: str, state_dir: Path,
                                                           tmp_path: Path) -> None:
    rows = [list(r) for r in (xf.chat_row(i) for i in range(1, 201))]
    for bad in rows[:120]:
        bad[9] = "many"  # message_count: 120 rejects, more than one page of them
    workbook = xf.write_xlsxwriter(tmp_path / "chats.xlsx", rows)
    async with run_daemon(make_settings(database_url, state_dir)) as daemon:  # protected mode
        post = daemon.client.post
        # Jobs in several states around the one watched (the screenshot shows them).
        done = (await post("/jobs/noop", json={})).json()
        late = (await post("/jobs/sleep", json={"seconds": 30, "timeout_s": 0.2})).json()
        stopped = (await post("/jobs/sleep", json={"seconds": 30})).json()
        await daemon.wait_for_status(done["id"], "completed")
        await daemon.wait_for_status(late["id"], "timed_out")
        await post(f"/jobs/{stopped['id']}/cancel")
        job = (await post("/jobs/sleep", json={"seconds": 120})).json()
        await in_browser(watch_cancel_and_upload, daemon.base_url, job["id"], workbook,
                         os.environ.get("NURSERYD_DASHBOARD_SCREENSHOT"))
        done = (await daemon.client.get(f"/jobs/{job['id']}")).json()
        assert done["status"] == "cancelled" and done["cancelled_by"] == "local"


def sign_in(page: Any, token: str) -> None:
    page.locator("#sign-in").wait_for()
    page.fill("#token", token)
    page.click("#sign-in-form button[type=submit]")
    page.locator("#console").wait_for()


def read_then_admin(page: Any, base_url: str, job_id: int) -> None:
    page.goto(base_url + "/")
    sign_in(page, READER)
    page.locator("#who").filter(has_text="read (read)").wait_for()
    row(page, job_id, "running").wait_for()
    assert not row(page, job_id).locator("button.cancel").is_visible()
    # No button or form that changes something, on any page a read token can reach.
    assert not page.locator('#nav button[data-view="import"]').is_visible()
    assert not page.locator("#bulk-cancel").is_visible()
    assert not page.locator("#bulk-retry").is_visible()
    row(page, job_id).click()
    page.locator("#job-status").filter(has_text="running").wait_for()
    assert not page.locator("#job-cancel").is_visible()
    assert not page.locator("#job-retry").is_visible()
    show(page, "fetch")
    page.locator("#fetch-summary").filter(has_text="No fetch has run yet").wait_for()
    assert not page.locator("#fetch-now").is_visible()
    assert not page.locator("#upload-form").is_visible()
    assert not page.locator("#database-form").is_visible()
    assert page.locator("button:visible").all_inner_texts() == [
        "Jobs", "Fetch", "Sign out", "Pause"], "only navigation and live controls"
    assert READER not in page.content()
    show(page, "jobs")
    page.click("#sign-out")
    sign_in(page, ADMIN)
    page.locator("#who").filter(has_text="api (admin)").wait_for()
    row(page, job_id).locator("button.cancel").click()
    row(page, job_id, "cancelled").wait_for()


async def test_sign_in_with_a_token_and_a_read_token_sees_no_actions(
        database_url: str, state_dir: Path) -> None:
    async with run_daemon(with_tokens(make_settings(database_url, state_dir))) as daemon:
        job = (await daemon.client.post("/jobs/sleep", json={"seconds": 120},
                                        headers=bearer(ADMIN))).json()
        await in_browser(read_then_admin, daemon.base_url, job["id"])
        done = (await daemon.client.get(f"/jobs/{job['id']}", headers=bearer(ADMIN))).json()
        assert done["status"] == "cancelled" and done["cancelled_by"] == "api"


def foreign_form_post(page: Any, base_url: str) -> tuple[int, bool]:
    """Sign in, then submit a form from another origin of the same site (another
    port of 127.0.0.1: SameSite lets the cookie go along) to the daemon."""
    page.goto(base_url + "/")
    sign_in(page, ADMIN)
    foreign = "http://127.0.0.1:9/"  # never reached: the browser gets the page below
    page.route(foreign, lambda route: route.fulfill(content_type="text/html", body=(
        f'<form method="post" action="{base_url}/jobs/noop" enctype="text/plain">'
        '<input name="{&quot;x&quot;:&quot;" value="&quot;}"><button>go</button></form>')))
    page.goto(foreign)
    with page.expect_response(lambda response: "/jobs/noop" in response.url) as answer:
        page.click("button")
    headers = answer.value.request.all_headers()
    return answer.value.status, "nurseryd_session" in headers.get("cookie", "")


async def test_a_cross_site_form_post_with_the_cookie_is_refused(database_url: str,
                                                                 state_dir: Path) -> None:
    async with run_daemon(with_tokens(make_settings(database_url, state_dir))) as daemon:
        status, cookie_sent = await in_browser(foreign_form_post, daemon.base_url)
        assert cookie_sent, "the test must send the cookie for the refusal to mean anything"
        assert status == 403
        jobs = (await daemon.client.get("/jobs", headers=bearer(ADMIN))).json()["jobs"]
        assert jobs == []


def pause_and_filter(page: Any, base_url: str, sleep_id: int, noop_id: int) -> None:
    """The page's timers run on playwright's clock: paused means no request however
    much time passes (ten seconds are fast-forwarded), and resuming asks again."""
    asked: list[str] = []
    page.on("request", lambda request: asked.append(request.url) if "/jobs?" in request.url
            else None)
    page.clock.install()
    page.goto(base_url + "/")
    row(page, sleep_id).wait_for()
    page.click("#pause")
    page.locator("#pause").filter(has_text="Resume").wait_for()
    before = len(asked)
    page.clock.run_for(10_000)
    page.evaluate("() => new Promise(resolve => setTimeout(resolve, 0))")  # flush the page
    assert len(asked) == before, "a paused dashboard must not poll"
    with page.expect_request(lambda request: "/jobs?" in request.url):
        page.click("#pause")  # Resume: the next tick asks again
        page.clock.run_for(1_100)
    # The time filter: the noop job was created two hours ago.
    page.select_option("#filter-since", "3600")
    row(page, noop_id).wait_for(state="detached")
    assert row(page, sleep_id).is_visible()
    # Bulk actions take kind and status only: with a time window set they are not offered.
    assert page.locator("#bulk-cancel").is_disabled()
    page.locator("#bulk-note").filter(has_text="set Created to any time").wait_for()
    page.select_option("#filter-since", "86400")
    row(page, noop_id).wait_for()
    page.select_option("#filter-since", "")
    # Filters: the kind filter leaves only that kind's rows.
    page.fill("#filter-kind", "noop")
    page.dispatch_event("#filter-kind", "change")
    row(page, sleep_id).wait_for(state="detached")
    assert row(page, noop_id).is_visible()
    page.select_option("#filter-status", "queued,running")
    row(page, noop_id).wait_for(state="detached")


async def test_pause_stops_polling_and_filters_narrow_the_list(database_url: str,
                                                                state_dir: Path) -> None:
    async with run_daemon(make_settings(database_url, state_dir)) as daemon:
        sleep = (await daemon.client.post("/jobs/sleep", json={"seconds": 120})).json()
        noop = (await daemon.client.post("/jobs/noop", json={})).json()
        await daemon.wait_for_status(noop["id"], "completed")
        await daemon.services.db.execute(
            "UPDATE jobs SET created_at = now() - interval '2 hours' WHERE id = $1", noop["id"])
        await in_browser(pause_and_filter, daemon.base_url, sleep["id"], noop["id"])


def bulk_cancel_then_retry(page: Any, base_url: str, sleep_ids: list[int], noop_id: int) -> None:
    page.goto(base_url + "/")
    for job_id in sleep_ids:
        row(page, job_id, "running").wait_for()
    # No filter: a bulk action would touch every job, so the page does not offer one.
    assert page.locator("#bulk-cancel").is_disabled()
    page.locator("#bulk-note").filter(has_text="choose a kind or a status").wait_for()
    page.fill("#filter-kind", "sleep")
    page.dispatch_event("#filter-kind", "change")
    row(page, noop_id).wait_for(state="detached")
    page.click("#bulk-cancel")
    page.locator("#confirm-text").filter(has_text="Cancel 3 sleep jobs (queued, running)?") \
        .wait_for()
    page.click("#confirm-no")  # thought better of it: nothing changes
    page.locator("#confirm").wait_for(state="hidden")
    page.click("#bulk-cancel")
    page.locator("#confirm-yes").filter(has_text="Cancel 3 jobs").click()
    page.locator("#message").filter(has_text="cancelled 3 of 3 matching jobs").wait_for()
    for job_id in sleep_ids:
        row(page, job_id, "cancelled").wait_for()

    page.select_option("#filter-status", "cancelled")
    page.click("#bulk-retry")
    page.locator("#confirm-text").filter(has_text="Retry 3 sleep jobs (cancelled)?").wait_for()
    assert page.locator("#bulk-cancel").is_disabled()  # a cancelled job cannot be cancelled
    page.click("#confirm-yes")
    page.locator("#message").filter(has_text="retried 3 of 3 matching jobs").wait_for()
    page.select_option("#filter-status", "")
    for job_id in sleep_ids:
        row(page, job_id, "running").wait_for()
    assert fits_a_phone(page)


async def test_bulk_cancel_and_retry_the_filtered_list_after_confirming(
        database_url: str, state_dir: Path) -> None:
    async with run_daemon(make_settings(database_url, state_dir)) as daemon:
        noop = (await daemon.client.post("/jobs/noop", json={})).json()
        sleeps = [(await daemon.client.post("/jobs/sleep", json={"seconds": 120})).json()["id"]
                  for _ in range(3)]
        await daemon.wait_for_status(noop["id"], "completed")
        await in_browser(bulk_cancel_then_retry, daemon.base_url, sleeps, noop["id"])
        jobs = {job_id: (await daemon.client.get(f"/jobs/{job_id}")).json()
                for job_id in sleeps}
        assert all(job["status"] in ("queued", "running") for job in jobs.values()), jobs
        assert all(job["cancelled_by"] is None for job in jobs.values())  # retry clears it
        assert (await daemon.client.get(f"/jobs/{noop['id']}")).json()["status"] == "completed"


def import_from_a_database_and_retry(page: Any, base_url: str, missing: Path) -> None:
    page.goto(base_url + "/")
    show(page, "import")
    # The form offers the configured names (and never a URL).
    assert page.locator("#database-source option").all_inner_texts() == ["late", "legacy"]
    assert str(missing.parent) not in page.content()
    assert page.locator("#sheets-form button").is_disabled()  # no Google access configured
    assert fits_a_phone(page)
    page.select_option("#database-source", "legacy")
    page.click("#database-form button[type=submit]")
    page.locator("#message").filter(has_text="database import started").wait_for()
    page.locator("#job-status").filter(has_text="completed").wait_for(timeout=60_000)
    page.locator("#job-rate").filter(has_text="3000/3000").wait_for()
    first = page.locator("#job-id").inner_text()

    # A source that is not there yet: the import fails, and says why.
    show(page, "import")
    page.select_option("#database-source", "late")
    page.click("#database-form button[type=submit]")
    page.locator("#job-status").filter(has_text="failed").wait_for(timeout=60_000)
    assert page.locator("#job-id").inner_text() != first
    page.locator("#job-facts dd").filter(has_text="no such file").wait_for()
    page.locator("#job-log li.error").filter(has_text="failed:").wait_for()
    # The operator puts the file in place and retries from the job's page.
    make_sqlite_source(missing, 500)
    page.click("#job-retry")
    page.locator("#message").filter(has_text="retried").wait_for()
    page.locator("#job-log li").filter(has_text="queued again by request").wait_for()
    page.locator("#job-status").filter(has_text="completed").wait_for(timeout=60_000)
    page.locator("#job-log li").filter(has_text="attempt 2 started").wait_for()
    page.locator("#job-rate").filter(has_text="500/500").wait_for()
    assert page.locator("#job-retry").is_hidden()


async def test_a_database_import_from_the_form_and_a_retry_after_it_failed(
        database_url: str, state_dir: Path, tmp_path: Path) -> None:
    present = make_sqlite_source(tmp_path / "legacy.db", 3000)
    missing = tmp_path / "late.db"
    settings = settings_with(make_settings(database_url, state_dir), f"""
        [sources.legacy]
        url = "sqlite:///{present}"
        table = "chats"
        key = ["chat_id"]
        batch_rows = 1000
        [sources.late]
        url = "sqlite:///{missing}"
        table = "chats"
        key = ["chat_id"]
        connect_attempts = 1
    """)
    async with run_daemon(settings) as daemon:
        await in_browser(import_from_a_database_and_retry, daemon.base_url, missing)
        jobs = (await daemon.client.get("/jobs?kind=migration")).json()["jobs"]
    assert [(job["status"], job["processed"], job["attempts"]) for job in jobs] == [
        ("completed", 500, 2), ("completed", 3000, 1)]
    assert jobs[0]["params"]["source_identifier"] == "late"


def bar_value(page: Any, job_id: int) -> float:
    return float(row(page, job_id).locator("progress").evaluate("bar => bar.value"))


def wait_for_bar_above(page: Any, job_id: int, value: float) -> None:
    page.wait_for_function(
        f"""() => {{ const bar = document.querySelector('#jobs tr[data-job="{job_id}"] progress');
                    return bar && bar.value > {value}; }}""")


def live_bar_from_the_stream(page: Any, base_url: str, job_id: int) -> None:
    """Timers frozen: the page cannot poll, so a bar that still advances is moved by
    the event stream alone. Then a second page whose stream is refused polls."""
    page.clock.install()
    page.goto(base_url + "/")
    row(page, job_id, "running").wait_for()
    page.locator("#feed").filter(has_text="live").wait_for()
    page.clock.pause_at(int(page.evaluate("() => Date.now()")) + 60_000)
    seen = bar_value(page, job_id)
    # Two more steps (the sleep job reports once a second) than any poll could have shown.
    wait_for_bar_above(page, job_id, seen + 1)
    page.locator(f'#jobs tr[data-job="{job_id}"] .rate').filter(has_text="ETA").wait_for()

    fallback = page.context.browser.new_page(viewport=PHONE)
    fallback.set_default_timeout(20_000)
    fallback.route("**/events", lambda route: route.fulfill(
        status=503, content_type="application/problem+json",
        body='{"type": "about:blank", "title": "busy", "status": 503, "detail": "busy"}'))
    fallback.goto(base_url + "/")
    fallback.locator("#feed").filter(has_text="polling every 1 s").wait_for()
    seen = bar_value(fallback, job_id)
    wait_for_bar_above(fallback, job_id, seen)
    fallback.close()


async def test_a_live_bar_is_driven_by_the_event_stream_and_polling_is_the_fallback(
        database_url: str, state_dir: Path) -> None:
    async with run_daemon(make_settings(database_url, state_dir)) as daemon:
        job = (await daemon.client.post("/jobs/sleep", json={"seconds": 120})).json()
        await in_browser(live_bar_from_the_stream, daemon.base_url, job["id"])


def fetch_page(page: Any, base_url: str) -> None:
    page.goto(base_url + "/")
    show(page, "fetch")
    page.locator("#fetch-summary").filter(has_text="No fetch has run yet").wait_for()
    cards = page.locator("#fetch-sources li.source")
    assert cards.count() == 3
    assert cards.filter(has_text="never fetched").count() == 3
    assert "s3cret" not in page.content()  # a URL's password is redacted as in the API
    page.click("#fetch-now")
    page.locator("#message").filter(has_text="fetch started").wait_for()
    page.locator('#fetch-sources li[data-source="good"][data-outcome="ok"]').wait_for()
    bad = page.locator('#fetch-sources li[data-source="bad"][data-outcome="error"]')
    bad.wait_for()
    bad.locator("dd").filter(has_text="HTTP 404").first.wait_for()
    # The slow source hangs: the fetch stays running until it is cancelled from the page.
    page.locator("#fetch-summary").filter(has_text="running").wait_for()
    assert fits_a_phone(page)
    page.click("#fetch-cancel")
    page.locator("#fetch-summary").filter(has_text="cancelled").wait_for()
    # Cut off, the slow source records no outcome of its own; the job's result says why.
    slow = page.locator('#fetch-sources li[data-source="slow"][data-run="interrupted"]')
    slow.wait_for()
    assert slow.get_attribute("data-outcome") == ""
    page.locator("#fetch-cancel").wait_for(state="hidden")
    good = page.locator('#fetch-sources li[data-source="good"][data-run="ok"]')
    good.locator("dd").filter(has_text="3 new").wait_for()
    assert re.search(r"\d", good.locator("dd").nth(4).inner_text()), "last success: a time"


async def test_the_fetch_page_shows_each_sources_outcome_and_cancels(
        database_url: str, state_dir: Path) -> None:
    async with open_local_server() as server:
        server.route("/hang", hang)
        sources = [source("good", server.static("/good", jobs_page(3))),
                   source("bad", server.static("/bad", json_reply({}, status=404))),
                   source("slow", server.url("/hang").replace("://", "://feed:s3cret@"),
                          timeout_s=60)]
        async with fetch_daemon(database_url, state_dir, sources) as daemon:
            await in_browser(fetch_page, daemon.base_url)
            status = (await daemon.client.get("/fetch")).json()
    assert status["job"]["status"] == "cancelled"
    assert {entry["name"]: entry["last_outcome"] for entry in status["sources"]} == {
        "good": "ok", "bad": "error", "slow": None}


def import_a_sheet(page: Any, base_url: str) -> None:
    page.goto(base_url + "/")
    show(page, "import")
    assert page.locator("#sheets-spreadsheet option").all_inner_texts() == ["chats"]
    assert SHEET_ID not in page.content()  # the form names it; the id stays in the daemon
    page.fill("#sheets-range", "Chats")
    page.click("#sheets-form button[type=submit]")
    page.locator("#message").filter(has_text="Google Sheets import started").wait_for()
    page.locator("#job-status").filter(has_text="completed").wait_for(timeout=60_000)
    page.locator("#job-rate").filter(has_text="5/5").wait_for()


async def test_a_google_sheets_import_from_the_form(database_url: str,
                                                    state_dir: Path) -> None:
    async with sheets_server() as server:
        server.spreadsheets[SHEET_ID] = [make_sheet(5)]
        settings = settings_with(make_settings(database_url, state_dir), f"""
            [google_sheets]
            api_base = "{server.base_url}"
            api_key = "test-key"
            spreadsheets = {{ chats = "{SHEET_ID}" }}
        """)
        async with run_daemon(settings) as daemon:
            await in_browser(import_a_sheet, daemon.base_url)
            jobs = (await daemon.client.get("/jobs?kind=migration")).json()["jobs"]
    assert [(job["status"], job["params"]["range"]) for job in jobs] == [("completed", "Chats")]
