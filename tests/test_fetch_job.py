"""The fetch kind end to end at unit level: local HTTP servers, real PostgreSQL,
the kind's run function driven through a plain JobContext."""

from __future__ import annotations

import gzip
from typing import Any

import pytest
import trio

from nurseryd.db import Database
from nurseryd.kinds.base import JobFailed
from nurseryd.kinds.fetch.job import run_fetch
from tests.fetch_servers import Reply, Request, hang, json_reply, open_local_server
from tests.fetch_support import context

RSS = b"""<?xml version="1.0" encoding="UTF-8"?>
<rss version="2.0"><channel><title>Jobs</title><link>https://example.org/</link>
<description>d</description>
<item><title>Python developer</title><link>https://example.org/j/1</link>
<guid>job-1</guid><pubDate>Mon, 02 Jun 2025 10:00:00 GMT</pubDate>
<author>acme@example.org (ACME)</author><description>Remote Python role</description></item>
<item><title>Go developer</title><link>https://example.org/j/2</link>
<guid>job-2</guid><pubDate>Tue, 03 Jun 2025 11:30:00 GMT</pubDate>
<description>Onsite</description></item>
<item><title>No id at all</title><description>neither guid nor link</description></item>
</channel></rss>"""

ATOM = """<?xml version="1.0" encoding="utf-8"?>
<feed xmlns="http://www.w3.org/2005/Atom"><title>Board</title><id>urn:board</id>
<updated>2025-06-03T00:00:00Z</updated>
<entry><title>Rust engineer – Kyiv</title><id>urn:job:10</id>
<link href="https://example.org/j/10"/><updated>2025-06-01T08:00:00Z</updated>
<author><name>Initech</name></author><summary>Системне програмування</summary></entry>
</feed>""".encode()


def job_items(start: int, count: int, **extra: Any) -> list[dict[str, Any]]:
    return [{"id": n, "title": f"Job {n}", "link": {"href": f"https://example.org/{n}"},
             "posted_at": "2025-06-01T12:00:00Z", "company": "ACME", **extra}
            for n in range(start, start + count)]


def one_page(count: int) -> Reply:
    return json_reply({"data": {"jobs": job_items(0, count)}})


def paged_json(pages: int, per_page: int):
    async def handler(request: Request) -> Reply:
        page = int(request.query.partition("=")[2] or 1)
        body: dict[str, Any] = {"data": {"jobs": job_items((page - 1) * per_page, per_page)}}
        if page < pages:
            body["links"] = {"next": f"{request.path}?page={page + 1}"}
        return json_reply(body)

    return handler


def json_source(name: str, url: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "url": url, "format": "json", "items": "data.jobs", "id": "id",
            "fields": {"title": "title", "url": "link.href", "published_at": "posted_at",
                       "company": "company"}, **extra}


async def items_of(db: Database, source: str) -> list[dict[str, Any]]:
    rows = await db.fetch("SELECT * FROM items WHERE source = $1 ORDER BY external_id", source)
    return [dict(row) for row in rows]


async def test_json_with_paging_rss_and_atom_are_upserted(db: Database) -> None:
    async with open_local_server() as server:
        server.route("/api/jobs", paged_json(pages=3, per_page=4))
        server.static("/feed.xml", Reply(body=RSS, content_type="application/rss+xml"))
        server.static("/atom.xml", Reply(body=ATOM, content_type="application/atom+xml"))
        ctx = context(db, [
            json_source("board-json", server.url("/api/jobs"), next="links.next"),
            {"name": "board-rss", "url": server.url("/feed.xml"), "format": "rss"},
            {"name": "board-atom", "url": server.url("/atom.xml"), "format": "atom"},
        ])
        await run_fetch(ctx)

    board = ctx.source("board-json")
    assert board["outcome"] == "ok" and board["pages"] == 3 and board["new"] == 12
    assert board["http_status"] == 200 and board["duration_s"] is not None
    rows = await items_of(db, "board-json")
    assert len(rows) == 12
    first = next(row for row in rows if row["external_id"] == "0")
    assert first["title"] == "Job 0" and first["url"] == "https://example.org/0"
    assert first["author"] == "ACME"
    assert first["published_at"].isoformat() == "2025-06-01T12:00:00+00:00"
    assert first["raw"]["link"] == {"href": "https://example.org/0"}
    assert first["first_seen_at"] == first["last_seen_at"] == first["updated_at"]

    rss = ctx.source("board-rss")
    assert rss == {**rss, "outcome": "ok", "new": 2, "errors": 1, "seen": 3}
    assert "no id/guid and no link" in rss["notes"][0]
    rss_rows = await items_of(db, "board-rss")
    assert [row["external_id"] for row in rss_rows] == ["job-1", "job-2"]
    assert rss_rows[0]["published_at"].isoformat() == "2025-06-02T10:00:00+00:00"
    assert rss_rows[0]["summary"] == "Remote Python role"

    atom_rows = await items_of(db, "board-atom")
    assert len(atom_rows) == 1
    assert atom_rows[0]["external_id"] == "urn:job:10"
    assert atom_rows[0]["title"] == "Rust engineer – Kyiv"
    assert atom_rows[0]["author"] == "Initech"
    assert atom_rows[0]["summary"] == "Системне програмування"
    assert atom_rows[0]["url"] == "https://example.org/j/10"
    assert ctx.counters == {"total": 12 + 3 + 1, "processed": 12 + 2 + 1, "failed": 1}
    assert ctx.result["summary"] == {"ok": 3}


async def test_second_fetch_counts_unchanged_and_updated_and_keeps_first_seen(
    db: Database,
) -> None:
    version = {"title": "Job 1"}

    async def handler(request: Request) -> Reply:
        return json_reply({"data": {"jobs": [
            {"id": 1, "title": version["title"]}, {"id": 2, "title": "Job 2"}]}})

    async with open_local_server() as server:
        sources = [json_source("b", server.route("/j", handler))]
        await run_fetch(context(db, sources))
        before = {row["external_id"]: row for row in await items_of(db, "b")}
        version["title"] = "Job 1 (edited)"
        ctx = context(db, sources)
        await run_fetch(ctx)
    assert ctx.source("b") | {"new": 0, "updated": 1, "unchanged": 1} == ctx.source("b")
    after = {row["external_id"]: row for row in await items_of(db, "b")}
    assert after["1"]["title"] == "Job 1 (edited)"
    assert after["1"]["first_seen_at"] == before["1"]["first_seen_at"]
    assert after["1"]["updated_at"] > before["1"]["updated_at"]
    # Unchanged: seen again, not rewritten.
    assert after["2"]["updated_at"] == before["2"]["updated_at"]
    assert after["2"]["last_seen_at"] > before["2"]["last_seen_at"]
    assert ctx.counters == {"total": 2, "processed": 2, "failed": 0}


async def test_304_on_second_fetch_is_unchanged(db: Database) -> None:
    async def handler(request: Request) -> Reply:
        if request.headers.get("if-none-match") == '"v1"':
            return Reply(304, content_type=None, headers=[("ETag", '"v1"')])
        return json_reply({"data": {"jobs": job_items(0, 3)}},
                          headers=[("ETag", '"v1"'),
                                   ("Last-Modified", "Mon, 02 Jun 2025 10:00:00 GMT")])

    async with open_local_server() as server:
        sources = [json_source("b", server.route("/j", handler))]
        first = context(db, sources)
        await run_fetch(first)
        second = context(db, sources)
        await run_fetch(second)
        sent = server.requests_to("/j")[1].headers
    assert first.source("b")["new"] == 3
    assert second.source("b") | {"outcome": "unchanged", "http_status": 304, "new": 0} \
        == second.source("b")
    assert sent["if-none-match"] == '"v1"'
    assert sent["if-modified-since"] == "Mon, 02 Jun 2025 10:00:00 GMT"
    state = await db.fetchrow("SELECT * FROM fetch_sources WHERE name = 'b'")
    assert state["etag"] == '"v1"' and state["last_outcome"] == "unchanged"


async def test_hanging_source_times_out_and_others_complete(db: Database) -> None:
    async with open_local_server() as server:
        ctx = context(db, [
            {**json_source("slow", server.route("/hang", hang)), "timeout_s": 0.3},
            json_source("fine", server.static("/ok", one_page(2))),
        ])
        started = trio.current_time()
        await run_fetch(ctx)
        elapsed = trio.current_time() - started
        with trio.fail_after(2):
            await server.abandoned_event.wait()  # the client really hung up
    assert 0.3 <= elapsed < 2
    slow = ctx.source("slow")
    assert slow["outcome"] == "error" and "timed out after 0.3 s" in slow["error"]
    assert ctx.source("fine")["outcome"] == "ok"
    state = await db.fetchrow("SELECT * FROM fetch_sources WHERE name = 'slow'")
    assert "timed out" in state["last_error"] and state["last_success_at"] is None


async def test_500s_then_success_is_retried(db: Database) -> None:
    calls = []

    async def flaky(request: Request) -> Reply:
        calls.append(request.at)
        if len(calls) < 3:
            return Reply(500, b"oops", content_type="text/plain")
        return json_reply({"data": {"jobs": job_items(0, 1)}})

    async with open_local_server() as server:
        ctx = context(db, [json_source("f", server.route("/f", flaky))], retries=3)
        await run_fetch(ctx)
    assert len(calls) == 3
    assert ctx.source("f") | {"outcome": "ok", "attempts": 3, "new": 1} == ctx.source("f")


async def test_500s_beyond_retries_fail_the_source_and_all_failing_fails_the_job(
    db: Database,
) -> None:
    async with open_local_server() as server:
        url = server.static("/down", Reply(503, b"down", content_type="text/plain"))
        ctx = context(db, [json_source("d", url)], retries=2)
        with pytest.raises(JobFailed, match=r"all 1 sources failed: d: HTTP 503"):
            await run_fetch(ctx)
        assert len(server.requests_to("/down")) == 2
    assert ctx.source("d")["outcome"] == "error" and ctx.source("d")["http_status"] == 503
    assert "gave up after 2 attempts" in ctx.source("d")["error"]


async def test_429_honours_retry_after(db: Database) -> None:
    async def limited(request: Request) -> Reply:
        if len(server.requests_to("/r")) == 1:
            return Reply(429, b"slow down", headers=[("Retry-After", "1")])
        return json_reply({"data": {"jobs": job_items(0, 1)}})

    async with open_local_server() as server:
        ctx = context(db, [json_source("r", server.route("/r", limited))])
        await run_fetch(ctx)
        first, second = server.requests_to("/r")
    assert second.at - first.at >= 1.0
    assert ctx.source("r")["outcome"] == "ok"


async def test_retry_after_longer_than_budget_gives_up_at_once(db: Database) -> None:
    async with open_local_server() as server:
        url = server.static("/r", Reply(429, b"", headers=[("Retry-After", "3600")]))
        ok = server.static("/ok", json_reply({"data": {"jobs": []}}))
        ctx = context(db, [json_source("r", url), json_source("ok", ok)])
        with trio.fail_after(2):
            await run_fetch(ctx)
    assert ctx.source("r")["outcome"] == "error" and ctx.source("r")["http_status"] == 429


async def test_malformed_feed_oversized_body_and_redirect_loop_are_source_errors(
    db: Database,
) -> None:
    async def endless() -> Any:
        while True:
            yield b"x" * 65536

    async with open_local_server() as server:
        ctx = context(db, [
            {"name": "broken", "format": "rss", "url": server.static(
                "/broken", Reply(body=b"<rss><channel><item><title>unterminated",
                                 content_type="application/rss+xml"))},
            {"name": "truncated", "format": "rss", "url": server.static(
                "/truncated", Reply(body=b'<rss version="2.0"><channel><item><guid>g1</guid>'
                                    b'<title>ok</title></item><item><guid>g2</guid><title>cu',
                                    content_type="application/rss+xml"))},
            {"name": "html", "format": "atom", "url": server.static(
                "/html", Reply(body=b"<!doctype html><p>hello", content_type="text/html"))},
            {**json_source("huge", server.static(
                "/huge", Reply(body=b"[" + b"1," * 600_000 + b"1]"))), "max_bytes": "1MiB"},
            {**json_source("endless", server.static(
                "/endless", Reply(body=endless, chunked=True))), "max_bytes": "1MiB"},
            json_source("loop", server.static(
                "/loop", Reply(302, headers=[("Location", "/loop")]))),
            json_source("ok", server.static("/ok", one_page(1))),
        ])
        await run_fetch(ctx)
    assert "malformed feed, no usable entry: " in ctx.source("broken")["error"]
    assert "malformed feed, no usable entry: " in ctx.source("html")["error"]
    truncated = ctx.source("truncated")
    assert truncated["outcome"] == "ok" and truncated["new"] == 2
    assert truncated["notes"][0].startswith("feed is not well-formed")
    assert [row["external_id"] for row in await items_of(db, "truncated")] == ["g1", "g2"]
    assert "over the limit of 1048576" in ctx.source("huge")["error"]
    assert "exceeded the limit of 1048576" in ctx.source("endless")["error"]
    assert "redirect loop" in ctx.source("loop")["error"]
    assert ctx.source("ok")["outcome"] == "ok"
    assert ctx.result["summary"] == {"error": 5, "ok": 2}


async def test_gzip_bomb_is_capped_after_decompression(db: Database) -> None:
    bomb = gzip.compress(b"[" + b" " * 5_000_000 + b"]")
    async with open_local_server() as server:
        url = server.static("/bomb", Reply(body=bomb, headers=[("Content-Encoding", "gzip")]))
        ctx = context(db, [{**json_source("bomb", url), "max_bytes": "1MiB"}])
        with pytest.raises(JobFailed):
            await run_fetch(ctx)
    assert "exceeded the limit" in ctx.source("bomb")["error"]


async def test_non_utf8_bytes_are_replaced_not_fatal(db: Database) -> None:
    latin1_feed = ("""<?xml version="1.0" encoding="ISO-8859-1"?>
<rss version="2.0"><channel><title>t</title><link>https://e.org/</link><description>d</description>
<item><title>Café développeur</title><guid>c1</guid><link>https://e.org/c1</link></item>
</channel></rss>""").encode("latin-1")
    bad_json = b'{"data": {"jobs": [{"id": "a", "title": "bad \xff\xfe bytes \\u0000 nul"}]}}'
    async with open_local_server() as server:
        ctx = context(db, [
            {"name": "latin", "format": "rss", "url": server.static(
                "/latin", Reply(body=latin1_feed, content_type="application/rss+xml"))},
            json_source("bad", server.static("/bad", Reply(body=bad_json))),
        ])
        await run_fetch(ctx)
    assert (await items_of(db, "latin"))[0]["title"] == "Café développeur"
    row = (await items_of(db, "bad"))[0]
    assert row["title"] == "bad \ufffd\ufffd bytes  nul"
    assert row["raw"]["title"] == "bad \ufffd\ufffd bytes  nul"


async def test_filters_and_rejected_items_are_counted(db: Database) -> None:
    jobs = [{"id": 1, "title": "Senior Python"}, {"id": 2, "title": "Python intern"},
            {"id": 3, "title": "Java"}, {"title": "no id"}, "not an object",
            {"id": 1, "title": "duplicate"}]
    async with open_local_server() as server:
        url = server.static("/j", json_reply({"data": {"jobs": jobs}}))
        ctx = context(db, [{**json_source("k", url), "include": ["python"],
                            "exclude": ["intern"]}])
        await run_fetch(ctx)
    assert ctx.source("k") | {"new": 1, "filtered": 2, "errors": 3, "seen": 6} == ctx.source("k")
    assert [row["external_id"] for row in await items_of(db, "k")] == ["1"]
    assert ctx.counters == {"total": 6, "processed": 1, "failed": 3}


async def test_env_header_is_sent(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOARD_TOKEN", "Bearer s3cret")
    async with open_local_server() as server:
        url = server.static("/j", json_reply({"data": {"jobs": []}}))
        ctx = context(db, [{**json_source("h", url),
                            "headers": {"Authorization": "env:BOARD_TOKEN", "X-Plain": "1"}}])
        await run_fetch(ctx)
        sent = server.requests_to("/j")[0].headers
    assert sent["authorization"] == "Bearer s3cret" and sent["x-plain"] == "1"


async def test_cancel_mid_fetch_is_prompt_keeps_items_and_leaves_no_task(db: Database) -> None:
    async with open_local_server() as server:
        ok = server.static("/ok", json_reply({"data": {"jobs": job_items(0, 5)}}))
        ctx = context(db, [json_source("ok", ok)]
                      + [{**json_source(f"hang{n}", server.route(f"/hang{n}", hang)),
                          "timeout_s": 60} for n in range(3)])
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()

            async def job() -> None:
                with scope:
                    await run_fetch(ctx)

            nursery.start_soon(job)
            with trio.fail_after(5):
                await server.wait_until(lambda: len(server.requests) == 4)
                await ctx.wait_until(lambda: ctx.source("ok")["outcome"] == "ok")
            cancelled_at = trio.current_time()
            scope.cancel()
        stopped_in = trio.current_time() - cancelled_at
        with trio.fail_after(2):  # every in-flight request was really dropped
            await server.wait_until(lambda: server.abandoned == 3)
    assert stopped_in < 0.1
    assert scope.cancelled_caught
    assert {name: s["outcome"] for name, s in ctx.result["sources"].items()} == {
        "ok": "ok", "hang0": "interrupted", "hang1": "interrupted", "hang2": "interrupted"}
    assert len(await items_of(db, "ok")) == 5


async def test_no_sources_fails_with_a_clear_reason(db: Database) -> None:
    with pytest.raises(JobFailed, match=r"add \[\[fetch.sources\]\]"):
        await run_fetch(context(db, []))
