"""Fetch benchmark: N local JSON sources × M items, the fetch job vs. a plain script.

Run: ``.venv/bin/python bench/fetch.py`` (defaults: 50 sources × 1,000 items, 4
pages each). It starts its own PostgreSQL (the embedded pgserver build, in a
temporary directory) and serves the sources from a *separate process* (so the
server's CPU is not charged to the measured process), then measures in one run:

1. the fetch job, submitted to the real supervisor (concurrent sources, batched
   upserts, counters and result written to the jobs table) on an empty table, and
   again on the now-full table (every item unchanged);
2. the baseline a script would be: a sequential ``httpx`` loop over the same
   kind of sources and pages, one ``INSERT ... ON CONFLICT`` per item
   (autocommit), on ``--baseline-sources`` of them (items/s are compared);
   job and baseline runs alternate, ``--repeat`` times, so load from other
   processes hits both alike;
3. memory: the job's peak RSS growth for N and for 2N sources; it should track
   the concurrency limit, not the number of sources.

Compare ratios, not absolute numbers: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
import httpx  # noqa: E402
import psutil  # noqa: E402
import trio  # noqa: E402
import trio_asyncio  # noqa: E402
from tests.fetch_servers import Reply, Request, open_local_server  # noqa: E402
from tests.fetch_support import fetch_settings  # noqa: E402
from tests.pgtools import start_test_server  # noqa: E402

from nurseryd.db import open_database  # noqa: E402
from nurseryd.db.migrate import apply_migrations  # noqa: E402
from nurseryd.kinds.base import KindRegistry  # noqa: E402
from nurseryd.kinds.fetch import FETCH_KIND  # noqa: E402
from nurseryd.supervisor import Supervisor  # noqa: E402

# -- the sources (served by the child process) ---------------------------------------------


def page_body(source: int, page: int, items: int, page_size: int) -> bytes:
    """A realistic job-board page: nested objects, text, dates, a next link."""
    first = page * page_size
    jobs = [{
        "id": f"{source}-{n}",
        "title": f"Senior Python engineer #{n} (remote, EU)",
        "link": {"href": f"https://jobs.example.org/{source}/{n}", "apply": f"/apply/{n}"},
        "posted_at": f"2025-06-{1 + n % 28:02d}T{n % 24:02d}:15:00Z",
        "company": {"name": f"Company {n % 97}", "size": "51-200"},
        "summary": "Build and run data pipelines in Python and PostgreSQL. " * 3,
        "tags": ["python", "postgresql", "trio"][: 1 + n % 3],
        "salary": {"min": 60000 + n, "max": 90000 + n, "currency": "EUR"},
    } for n in range(first, min(first + page_size, items))]
    body: dict[str, Any] = {"data": {"jobs": jobs}}
    if first + page_size < items:
        body["links"] = {"next": f"/s{source}?page={page + 1}"}
    return json.dumps(body).encode()


async def serve(items: int, page_size: int) -> None:
    cache: dict[tuple[int, int], bytes] = {}

    async def handler(request: Request) -> Reply:
        source = int(request.path[2:])
        page = int(request.query.partition("=")[2] or 0)
        key = (source, page)
        if key not in cache:
            cache[key] = page_body(source, page, items, page_size)
        return Reply(body=cache[key])

    async with open_local_server() as server:
        server.fallback = handler
        print(f"PORT {server.port}", flush=True)
        await trio.sleep_forever()


# -- the measured process ------------------------------------------------------------------


def sources_config(port: int, count: int) -> list[dict[str, Any]]:
    return [{
        "name": f"s{i}", "url": f"http://127.0.0.1:{port}/s{i}", "format": "json",
        "items": "data.jobs", "id": "id", "next": "links.next", "max_pages": 100,
        "fields": {"title": "title", "url": "link.href", "published_at": "posted_at",
                   "company": "company.name", "summary": "summary"},
    } for i in range(count)]


def postgres_cpu() -> dict[int, float]:
    """CPU seconds used so far by each PostgreSQL process, by pid."""
    found = {}
    for proc in psutil.process_iter(["name", "cpu_times"]):
        if (proc.info["name"] or "").startswith("postgres") and proc.info["cpu_times"]:
            found[proc.pid] = proc.info["cpu_times"].user + proc.info["cpu_times"].system
    return found


def cpu_since(before: dict[int, float]) -> float:
    """PostgreSQL CPU since ``before`` (processes that exited meanwhile are not counted)."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in postgres_cpu().items())


class PeakRss:
    """Samples this process's RSS every few ms while a block runs."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.start = self.peak = 0
        self.cpu_s = self.pg_cpu_s = 0.0

    async def sample(self) -> None:
        while True:
            self.peak = max(self.peak, self.process.memory_info().rss)
            await trio.sleep(0.005)

    @property
    def peak_mib(self) -> float:
        return self.peak / 2**20


async def run_job(db: Any, port: int, sources: int, concurrency: int) -> tuple[float, PeakRss,
                                                                             dict[str, Any]]:
    """One fetch job through the real supervisor: submit, run, final write."""
    settings = dataclasses.replace(
        fetch_settings(sources_config(port, sources), concurrency=concurrency),
        database_url="postgresql://bench")
    registry = KindRegistry()
    registry.add(FETCH_KIND)
    supervisor = Supervisor(db, settings, registry, owner=f"bench-{os.getpid()}")
    rss = PeakRss()
    rss.start = rss.peak = rss.process.memory_info().rss
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        nursery.start_soon(rss.sample)
        cpu, pg_cpu = rss.process.cpu_times(), postgres_cpu()
        started = time.perf_counter()
        job = await supervisor.submit("fetch", {"trigger": "api"}, timeout_s=600)
        handle = supervisor.registry.get(job["id"])
        if handle is not None:
            await handle.finished.wait()  # set after the job's final write
        job = await supervisor.get_job(job["id"])
        assert job is not None
        elapsed = time.perf_counter() - started
        after = rss.process.cpu_times()
        rss.cpu_s = (after.user + after.system) - (cpu.user + cpu.system)
        rss.pg_cpu_s = cpu_since(pg_cpu)
        supervisor.request_stop()
        supervisor.request_stop()
        nursery.cancel_scope.cancel()
    assert job["status"] == "completed", job
    failed = {name: s["error"] for name, s in job["result"]["sources"].items() if s["error"]}
    assert not failed, failed
    return elapsed, rss, job


async def measure(dsn: str, port: int, args: argparse.Namespace) -> dict[str, Any]:
    """Timed job runs and baseline runs, interleaved, ``args.repeat`` times each."""
    out: dict[str, Any] = {"cold": [], "warm": [], "base": [], "cpu": [], "pg_cpu": []}
    async with trio_asyncio.open_loop(), open_database(dsn, max_size=10) as db:
        await apply_migrations(db)
        await db.execute("TRUNCATE items, fetch_sources, jobs CASCADE")
        # Warm-up (not timed): one-time allocations (TLS context, thread pool,
        # statement caches) must not count as memory that grows with sources.
        _, warmup, _ = await run_job(db, port, args.concurrency, args.concurrency)
        for _ in range(args.repeat):
            await db.execute("TRUNCATE items, fetch_sources")
            cold, rss, first = await run_job(db, port, args.sources, args.concurrency)
            count = await db.fetchval("SELECT count(*) FROM items")
            assert count == args.sources * args.items, count
            # Same sources again: all unchanged (no 304: the server sends no validators).
            warm, _, again = await run_job(db, port, args.sources, args.concurrency)
            assert sum(s["unchanged"] for s in again["result"]["sources"].values()) == count
            out["cold"].append(cold)
            out["warm"].append(warm)
            out["cpu"].append(rss.cpu_s)
            out["pg_cpu"].append(rss.pg_cpu_s)
            await db.execute("TRUNCATE items, fetch_sources")
            out["base"].append(await trio_asyncio.aio_as_trio(baseline)(dsn, port, args))
        out["rss"] = rss.peak_mib
        await db.execute("TRUNCATE items, fetch_sources")
        _, rss_double, _ = await run_job(db, port, 2 * args.sources, args.concurrency)
        # Exact Python heap peaks (tracemalloc; slow, so not timed): RSS also moves
        # with allocator fragmentation, this shows what the job itself holds.
        heap = {}
        for sources in (args.sources // 2, args.sources, 2 * args.sources):
            await db.execute("TRUNCATE items, fetch_sources")
            tracemalloc.start()
            await run_job(db, port, sources, args.concurrency)
            heap[sources] = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
        await db.execute("TRUNCATE items, fetch_sources")
    out.update(items=count, rss_warmup=warmup.peak_mib, rss_double=rss_double.peak_mib,
               heap=heap, counters={key: first[key] for key in ("total", "processed", "failed")})
    return out


async def baseline(dsn: str, port: int, args: argparse.Namespace) -> float:
    """What a script does: fetch each page in turn, INSERT each item (autocommit).
    Runs on the asyncio side (plain asyncpg); returns items per second."""
    conn = await asyncpg.connect(dsn)
    sql = """INSERT INTO items (source, external_id, title, url, published_at, author, summary,
                                raw, content_hash)
             VALUES ($1, $2, $3, $4, $5::text::timestamptz, $6, $7, $8::jsonb, $9)
             ON CONFLICT (source, external_id) DO UPDATE SET title = EXCLUDED.title,
                 url = EXCLUDED.url, published_at = EXCLUDED.published_at,
                 author = EXCLUDED.author, summary = EXCLUDED.summary, raw = EXCLUDED.raw,
                 content_hash = EXCLUDED.content_hash, last_seen_at = now()"""
    started = time.perf_counter()
    written = 0
    async with httpx.AsyncClient(timeout=30) as client:
        for i in range(args.baseline_sources):
            url: str | None = f"http://127.0.0.1:{port}/s{i}"
            while url:
                document = (await client.get(url)).raise_for_status().json()
                for job in document["data"]["jobs"]:
                    raw = json.dumps(job)
                    await conn.execute(
                        sql, f"s{i}", job["id"], job["title"], job["link"]["href"],
                        job["posted_at"], job["company"]["name"], job["summary"], raw,
                        hashlib.sha256(raw.encode()).digest())
                    written += 1
                following = document.get("links", {}).get("next")
                url = f"http://127.0.0.1:{port}{following}" if following else None
    elapsed = time.perf_counter() - started
    await conn.execute("TRUNCATE items, fetch_sources")
    await conn.close()
    return written / elapsed


def spread(values: list[float], fmt: str = ",.0f") -> str:
    """median [min–max], the way shared/bench/README.md reports noisy timings."""
    return (f"{format(statistics.median(values), fmt)} "
            f"[{format(min(values), fmt)}–{format(max(values), fmt)}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sources", type=int, default=50)
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--page-size", type=int, default=250)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--baseline-sources", type=int, default=10,
                        help="sources the baseline fetches; items/s are compared, and a "
                             "subset keeps each slow baseline run short (default 10)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        trio.run(serve, args.items, args.page_size)
        return
    args.baseline_sources = min(args.baseline_sources, args.sources)

    with tempfile.TemporaryDirectory(prefix="nurseryd-bench-fetch-") as tmp:
        pg = start_test_server(Path(tmp))
        child = subprocess.Popen(
            [sys.executable, __file__, "--serve", "--items", str(args.items),
             "--page-size", str(args.page_size)],
            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        try:
            assert child.stdout is not None
            port = int(child.stdout.readline().split()[1])
            pg.create_database("bench_fetch")
            result = trio.run(measure, pg.url("bench_fetch"), port, args)
        finally:
            child.kill()
            child.wait()
            pg.stop()

    total = result["items"]
    cold = [total / s for s in result["cold"]]
    warm = [total / s for s in result["warm"]]
    base = result["base"]
    ratio_cold = [c / b for c, b in zip(cold, base, strict=True)]
    ratio_warm = [w / b for w, b in zip(warm, base, strict=True)]
    print(f"fetch benchmark: {args.sources} local JSON sources × {args.items} items "
          f"({args.page_size} per page), concurrency {args.concurrency}, "
          f"{os.cpu_count()} CPUs; {args.repeat} interleaved runs, median [min–max]\n")
    print("| run | items | wall s | items/s | vs baseline (same round) |")
    print("|---|---|---|---|---|")
    print(f"| fetch job, empty table | {total:,} | {spread(result['cold'], '.2f')} | "
          f"{spread(cold)} | {spread(ratio_cold, '.1f')}× |")
    print(f"| fetch job, all unchanged | {total:,} | {spread(result['warm'], '.2f')} | "
          f"{spread(warm)} | {spread(ratio_warm, '.1f')}× |")
    print(f"| baseline: sequential httpx + one INSERT per item | "
          f"{args.baseline_sources * args.items:,} | | {spread(base)} | 1× |")
    print(f"\njob counters: {result['counters']}")
    print(f"CPU per empty-table job: this process {spread(result['cpu'], '.2f')} s, "
          f"PostgreSQL {spread(result['pg_cpu'], '.2f')} s")
    print(f"peak RSS of this process: {result['rss_warmup']:.0f} MiB in the warm-up "
          f"({args.concurrency} sources), {result['rss']:.0f} MiB with {args.sources} sources, "
          f"{result['rss_double']:.0f} MiB with {2 * args.sources} sources "
          f"(concurrency {args.concurrency} each time)")
    print("peak Python heap during the job (tracemalloc): " + ", ".join(
        f"{mib:.1f} MiB with {sources} sources" for sources, mib in result["heap"].items()))


if __name__ == "__main__":
    main()
