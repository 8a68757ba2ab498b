"""Core benchmarks: durable no-op jobs/s, trigger→running and cancel latency,
and HTTP trigger throughput beside a bare quart-trio ceiling, and with an API
token configured beside the same daemon without one (the access check's cost:
a SHA-256 and a constant-time compare per request).

Run: ``.venv/bin/python bench/core.py`` (or ``make bench``). Starts its own
PostgreSQL (the embedded pgserver build) in a temporary directory. Every figure
is printed next to a baseline measured in the same run, because this machine is
shared and noisy: compare ratios, not absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import trio
import trio_asyncio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.pgtools import PgServer, start_test_server  # noqa: E402
from tests.polling import eventually  # noqa: E402

from nurseryd.config import KindLimits, load_settings  # noqa: E402
from nurseryd.db import open_database  # noqa: E402
from nurseryd.db.migrate import apply_migrations  # noqa: E402
from nurseryd.kinds.base import JobKind, KindRegistry  # noqa: E402
from nurseryd.kinds.sleep import NOOP_KIND, SLEEP_KIND  # noqa: E402
from nurseryd.supervisor import Supervisor  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def row(name: str, value: str, baseline: str, ratio: str) -> None:
    print(f"| {name} | {value} | {baseline} | {ratio} |", flush=True)


# -- in-process: supervisor throughput and latencies ------------------------------------


async def _supervised(db, registry: KindRegistry, **limits: KindLimits):
    settings = load_settings(None, environ={})
    import dataclasses

    settings = dataclasses.replace(
        settings, queue_size=100_000, kinds={**settings.kinds, **limits}
    )
    return Supervisor(db, settings, registry, owner="bench")


async def bench_noop_jobs(db, jobs: int, submitters: int) -> tuple[float, float]:
    """Durable no-op jobs/s through the supervisor vs. one statement per step."""
    registry = KindRegistry()
    registry.add(NOOP_KIND)
    supervisor = await _supervised(db, registry, noop=KindLimits(60, 60, 10_000))
    await db.execute("TRUNCATE jobs CASCADE")
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        started = time.perf_counter()

        async def submitter(count: int) -> None:
            for _ in range(count):
                await supervisor.submit("noop", {})

        async with trio.open_nursery() as inner:
            for _ in range(submitters):
                inner.start_soon(submitter, jobs // submitters)

        async def all_completed() -> bool:
            done = await db.fetchval("SELECT count(*) FROM jobs WHERE status = 'completed'")
            return done >= jobs

        await eventually(all_completed, timeout=600)
        elapsed = time.perf_counter() - started
        supervisor.request_stop()
    ours = jobs / elapsed

    # Baseline: the same durable steps, one bridged statement each, no batching.
    await db.execute("TRUNCATE jobs CASCADE")
    base_jobs = max(1000, jobs // 10)
    started = time.perf_counter()

    async def naive(count: int) -> None:
        for _ in range(count):
            job_id = await db.fetchval(
                "INSERT INTO jobs (kind, params, timeout_s) VALUES ('noop', '{}', 60) RETURNING id"
            )
            await db.execute("UPDATE jobs SET status = 'running', started_at = now(),"
                             " attempts = 1 WHERE id = $1", job_id)
            await trio.lowlevel.checkpoint()
            await db.execute("UPDATE jobs SET status = 'completed', finished_at = now()"
                             " WHERE id = $1", job_id)

    async with trio.open_nursery() as inner:
        for _ in range(submitters):
            inner.start_soon(naive, base_jobs // submitters)
    baseline = base_jobs / (time.perf_counter() - started)
    return ours, baseline


async def bench_latencies(db, samples: int) -> dict[str, list[float]]:
    """trigger→running and cancel→cancelled-in-DB, one job at a time."""
    entered: dict[int, float] = {}
    waiting: dict[int, trio.Event] = {}

    async def probe(ctx) -> None:
        entered[ctx.job_id] = time.perf_counter()
        waiting.setdefault(ctx.job_id, trio.Event()).set()
        await trio.sleep_forever()

    registry = KindRegistry()
    registry.add(JobKind(name="probe", run=probe, parse_params=dict))
    registry.add(SLEEP_KIND)
    supervisor = await _supervised(db, registry, probe=KindLimits(60, 60, 1000))
    trigger: list[float] = []
    cancel: list[float] = []
    bridge: list[float] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        for _ in range(samples):
            t0 = time.perf_counter()
            job = await supervisor.submit("probe", {})
            event = waiting.setdefault(job["id"], trio.Event())
            await event.wait()
            trigger.append(entered[job["id"]] - t0)
            t1 = time.perf_counter()
            stopped = await supervisor.cancel(job["id"])
            cancel.append(time.perf_counter() - t1)
            assert stopped["status"] == "cancelled", stopped
            t2 = time.perf_counter()
            await db.fetchval("SELECT 1")
            bridge.append(time.perf_counter() - t2)
        supervisor.request_stop()
    return {"trigger": trigger, "cancel": cancel, "bridge": bridge}


# -- HTTP: the daemon vs a bare quart-trio app, both loaded by wrk ------------------------

BARE_APP = textwrap.dedent('''
    import json, math, sys, trio
    from hypercorn.config import Config
    from hypercorn.trio import serve
    from quart import Response, request
    from quart_trio import QuartTrio

    app = QuartTrio("bare")
    send, receive = trio.open_memory_channel(math.inf)
    count = 0

    @app.post("/jobs/sleep")
    async def trigger():
        global count
        params = json.loads(await request.get_data())
        count += 1
        send.send_nowait((count, params))
        return Response(json.dumps({"id": count, "params": params}), status=202,
                        content_type="application/json", headers={"Location": f"/jobs/{count}"})

    async def drain():
        async for _ in receive:
            pass

    async def main():
        config = Config()
        config.bind = [sys.argv[1]]
        config.accesslog = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain)
            await serve(app, config)

    trio.run(main)
''')

WRK_POST = 'wrk.method = "POST"\nwrk.body = \'{"seconds": 0}\'\n' \
           'wrk.headers["Content-Type"] = "application/json"\n'
#: A generated token for the run (never a real secret): what the token daemon wants.
BENCH_TOKEN = "bench-" + os.urandom(16).hex()


def wrk(url: str, seconds: int, connections: int, script: Path) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url],
        capture_output=True, text=True, check=True,
    ).stdout
    result: dict[str, float] = {}
    for line in out.splitlines():
        parts = line.split()
        if line.startswith("Requests/sec"):
            result["rps"] = float(parts[1])
        elif len(parts) == 2 and parts[0] in ("50%", "99%"):
            result[parts[0]] = _ms(parts[1])
        elif "Non-2xx" in line:
            result["non2xx"] = float(parts[-1])
    return result


def _ms(text: str) -> float:
    for suffix, factor in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def _wait_http(url: str, timeout: float = 30) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)  # noqa: S310 - local only
            return
        except Exception:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


def _daemon(server: PgServer, workdir: Path, name: str, port: int,
            **env: str) -> subprocess.Popen[bytes]:
    server.create_database(name)
    return subprocess.Popen([sys.executable, "-m", "nurseryd.cli", "serve"], env={
        **os.environ, "NURSERYD_DATABASE_URL": server.url(name),
        "NURSERYD_STATE_DIR": str(workdir / name), "NURSERYD_BIND": f"127.0.0.1:{port}",
        "NURSERYD_LOG_LEVEL": "WARNING", "NURSERYD_DIAGNOSTICS": "1", **env})


def bench_http(server: PgServer, seconds: int, connections: int, workdir: Path,
               rounds: int = 2) -> None:
    if shutil.which("wrk") is None:
        print("| HTTP POST /jobs/sleep | skipped: wrk not installed (apt-get install wrk) | | |")
        return
    script = workdir / "post.lua"
    script.write_text(WRK_POST)
    token_script = workdir / "post-token.lua"
    token_script.write_text(WRK_POST + f'wrk.headers["Authorization"] = "Bearer {BENCH_TOKEN}"\n')
    daemon = _daemon(server, workdir, "bench_http", 18181)
    with_token = _daemon(server, workdir, "bench_http_token", 18183,
                         NURSERYD_API_TOKEN=BENCH_TOKEN)
    bare_file = workdir / "bare.py"
    bare_file.write_text(BARE_APP)
    bare = subprocess.Popen([sys.executable, str(bare_file), "127.0.0.1:18182"])
    try:
        _wait_http("http://127.0.0.1:18181/readyz")
        _wait_http("http://127.0.0.1:18183/readyz")
        time.sleep(1.0)  # the bare app has no readiness endpoint; it starts in < 1 s
        ceiling = wrk("http://127.0.0.1:18182/jobs/sleep", seconds, connections, script)
        # Interleaved, so that the shared machine's noise falls on both alike.
        plain, tokened = [], []
        for _ in range(rounds):
            plain.append(wrk("http://127.0.0.1:18181/jobs/sleep", seconds, connections, script))
            tokened.append(wrk("http://127.0.0.1:18183/jobs/sleep", seconds, connections,
                               token_script))
    finally:
        for process in (daemon, with_token, bare):
            process.terminate()
            process.wait(30)
    ours = max(plain, key=lambda result: result["rps"])
    token_best = max(tokened, key=lambda result: result["rps"])
    if token_best.get("non2xx") and token_best["non2xx"] > 0.5 * token_best["rps"] * seconds:
        raise RuntimeError("the token daemon refused the requests: check the bench token")
    row(f"HTTP POST /jobs/sleep, {connections} connections (req/s)", f"{ours['rps']:,.0f}",
        f"bare quart-trio {ceiling['rps']:,.0f}", f"{ours['rps'] / ceiling['rps']:.2f}×")
    row("HTTP p50 / p99 latency (ms)", f"{ours['50%']:.1f} / {ours['99%']:.1f}",
        f"{ceiling['50%']:.1f} / {ceiling['99%']:.1f}", "")
    row(f"HTTP POST /jobs/sleep with an API token (req/s, best of {rounds})",
        f"{token_best['rps']:,.0f}", f"no token, same run {ours['rps']:,.0f}",
        f"{token_best['rps'] / ours['rps']:.2f}×")
    print(f"  every round (req/s): no token {[round(r['rps']) for r in plain]}, "
          f"token {[round(r['rps']) for r in tokened]}")
    if ours.get("non2xx"):
        print(f"  note: {ours['non2xx']:.0f} non-2xx answers (503 = queue full)")


async def main_async(args: argparse.Namespace, server: PgServer) -> None:
    server.create_database("bench_core")
    async with trio_asyncio.open_loop(), open_database(
        server.url("bench_core"), min_size=4, max_size=10
    ) as db:
        await apply_migrations(db)
        ours, baseline = await bench_noop_jobs(db, args.jobs, args.submitters)
        row("durable no-op jobs/s", f"{ours:,.0f}", f"one statement per step {baseline:,.0f}",
            f"{ours / baseline:.1f}×")
        lat = await bench_latencies(db, args.samples)
        bridge_p50 = statistics.median(lat["bridge"]) * 1000
        trigger_p50 = statistics.median(lat["trigger"]) * 1000
        row("trigger → running, p50 / p99 (ms)",
            f"{trigger_p50:.2f} / {pct(lat['trigger'], 0.99) * 1000:.2f}",
            f"one bridged SELECT 1: {bridge_p50:.2f}", f"{trigger_p50 / bridge_p50:.1f}×")
        cancel_p50 = statistics.median(lat["cancel"]) * 1000
        row("cancel → cancelled in DB, p50 / p99 (ms)",
            f"{cancel_p50:.2f} / {pct(lat['cancel'], 0.99) * 1000:.2f}",
            f"one bridged SELECT 1: {bridge_p50:.2f}", f"{cancel_p50 / bridge_p50:.1f}×")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--submitters", type=int, default=200)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--http-seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--http-rounds", type=int, default=2,
                        help="interleaved wrk runs per daemon (with and without a token)")
    parser.add_argument("--http-only", action="store_true",
                        help="only the HTTP figures (skip the in-process benchmarks)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nurseryd-bench-") as tmp:
        server = start_test_server(Path(tmp))
        try:
            print(f"nurseryd core benchmark, {time.strftime('%Y-%m-%d %H:%M')}, "
                  f"{os.cpu_count()} cores")
            print("| measurement | nurseryd | baseline (same run) | ratio |")
            print("|---|---|---|---|")
            if not args.http_only:
                trio.run(main_async, args, server)
            bench_http(server, args.http_seconds, args.connections, Path(tmp),
                       rounds=args.http_rounds)
        finally:
            server.stop()
    print(json.dumps({"args": vars(args)}))


if __name__ == "__main__":
    main()
