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
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from tests import xlsx_factory as xf
from tests.daemon_process import make_settings, run_daemon
from tests.test_access import ADMIN, READER, bearer, with_tokens

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
    # One bad row: the rejects table shows it, and the CSV is built in the page.
    page.locator("#job-rejects td").filter(has_text="not a number").wait_for()
    with page.expect_download() as download:
        page.click("#rejects-csv")
    csv = Path(download.value.path()).read_text()
    assert csv.splitlines()[0] == "row,column,reason,values" and "message_count" in csv
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
    rows[5][9] = "many"  # message_count: one reject
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
        await in_browser(pause_and_filter, daemon.base_url, sleep["id"], noop["id"])
