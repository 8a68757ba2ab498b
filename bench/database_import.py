"""Database migration benchmark: 1,000,000 rows SQLite -> PostgreSQL and
PostgreSQL -> PostgreSQL through the real daemon (HTTP trigger, job, pipeline),
with pgloader loading the same SQLite file before and after the daemon's imports when it
is installed (the ratio is against the mean of its two runs).

Run: ``.venv/bin/python bench/database_import.py [--rows N] [--batch-rows N]``.
Starts its own PostgreSQL (the embedded pgserver build) in a temporary
directory, or uses ``NURSERYD_TEST_DATABASE_URL``. Source data is generated
server-side (see ``tests/source_dbs.py``): 14 columns, one of which the target
lacks. Peak RSS is sampled every 20 ms from the daemon process (and from
pgloader's process tree); CPU seconds of the daemon, its reader children (together) and the
PostgreSQL server show which process bounds a run; ``--readers N`` sets the sources' reader
processes (one per key range); ``--readers 1,2,2,1`` runs one import per count, each between
two pgloader runs. The machine is shared and noisy: compare the ratio
measured in the same run, not absolute numbers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import psutil
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.daemon_process import DaemonProcess  # noqa: E402
from tests.pgtools import PgServer, start_test_server  # noqa: E402
from tests.source_dbs import PG_FILL, PG_SCHEMA, make_sqlite_source  # noqa: E402


class PeakRss:
    """Samples the RSS of a process (and its children) until stopped."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0

    def sample(self) -> int:
        try:
            procs = [self.process, *self.process.children(recursive=True)]
            rss = sum(p.memory_info().rss for p in procs)
        except psutil.Error:
            return self.peak
        self.peak = max(self.peak, rss)
        return rss

    async def run(self, interval: float = 0.02) -> None:
        while True:
            self.sample()
            await trio.sleep(interval)


class CpuSeconds:
    """CPU seconds spent by the daemon itself, by its finished children (the reader
    process), and by the PostgreSQL server's processes: where the time of a run goes."""

    def __init__(self, daemon_pid: int, server: PgServer) -> None:
        self.daemon = psutil.Process(daemon_pid)
        self.postmaster: psutil.Process | None = None
        if server.pgdata is not None:
            pid = int((Path(server.pgdata) / "postmaster.pid").read_text().split()[0])
            self.postmaster = psutil.Process(pid)

    def snapshot(self) -> tuple[float, float, float]:
        times = self.daemon.cpu_times()
        server = 0.0
        if self.postmaster is not None:
            for process in [self.postmaster, *self.postmaster.children(recursive=True)]:
                try:
                    server += sum(process.cpu_times()[:2])
                except psutil.Error:
                    pass  # a backend that just exited
        return (times.user + times.system, times.children_user + times.children_system,
                server)

    @staticmethod
    def spent(before: tuple[float, float, float], after: tuple[float, float, float]) -> str:
        daemon, child, server = (b - a for a, b in zip(before, after, strict=True))
        return f"CPU s: daemon {daemon:.1f}, reader children {child:.1f}, PostgreSQL ≥{server:.1f}"


def fill_postgres(server: PgServer, database: str, rows: int) -> None:
    server.psql(PG_SCHEMA, database)
    step = 250_000
    for first in range(1, rows + 1, step):
        last = min(rows, first + step - 1)
        server.psql(PG_FILL.replace("$1::bigint", str(first)).replace("$2::bigint", str(last)),
                    database)
    server.psql("VACUUM ANALYZE legacy_chats", database)


async def daemon_import(client: httpx.AsyncClient, server: PgServer, target_db: str,
                        source: str, rss: PeakRss, rows: int,
                        cpu: CpuSeconds | None = None) -> tuple[float, dict]:
    server.psql("TRUNCATE chats", target_db)
    rss.peak = 0
    before = cpu.snapshot() if cpu else None
    started = time.perf_counter()
    response = await client.post("/migration/database", json={"source_identifier": source})
    response.raise_for_status()
    job_id = response.json()["id"]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rss.run)
        while True:
            job = (await client.get(f"/migration/jobs/{job_id}")).json()
            if job["status"] not in ("queued", "running"):
                break
            await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    elapsed = time.perf_counter() - started
    if job["status"] != "completed" or job["processed"] != rows:
        raise SystemExit(f"{source}: {job['status']} {job['processed']}/{rows}: {job['error']}")
    if cpu and before:
        print(f"{source}: {elapsed:.2f} s; {cpu.spent(before, cpu.snapshot())}", flush=True)
    return elapsed, job


def pgloader_url(server: PgServer, database: str) -> str:
    parts = urlsplit(server.base_url)
    host = parse_qs(parts.query).get("host", [None])[0]
    if host:  # pgserver listens on a Unix socket: pgloader's unix:<dir>:<port> syntax
        sockets = sorted(Path(host).glob(".s.PGSQL.*"))
        port = sockets[0].name.rsplit(".", 1)[1] if sockets else "5432"
        return f"postgresql://{parts.username or 'postgres'}@unix:{host}:{port}/{database}"
    return server.url(database)


async def run_pgloader(server: PgServer, sqlite_path: Path, database: str,
                       rows: int) -> tuple[float, int] | None:
    binary = shutil.which("pgloader")
    if binary is None:
        return None
    server.create_database(database)
    started = time.perf_counter()
    process = await trio.lowlevel.open_process(
        [binary, "--quiet", "--on-error-stop", str(sqlite_path), pgloader_url(server, database)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rss = PeakRss(process.pid)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rss.run)
        await process.wait()
        nursery.cancel_scope.cancel()
    elapsed = time.perf_counter() - started
    loaded = int(server.psql("SELECT count(*) FROM chats", database).strip() or 0)
    if process.returncode != 0 or loaded != rows:
        print(f"pgloader exited {process.returncode}, loaded {loaded}/{rows}", flush=True)
    return elapsed, rss.peak


def line(name: str, seconds: float, rows: int, rss: int, ratio: str = "") -> None:
    print(f"| {name} | {seconds:.2f} s | {rows / seconds:,.0f} rows/s | "
          f"{rss / 1024**2:.0f} MB | {ratio} |", flush=True)


def reader_counts(text: str) -> list[int | None]:
    """``--readers 1,2,2,1`` -> [1, 2, 2, 1]; ``""`` -> [None] (the daemon's default)."""
    return [int(part) for part in text.split(",") if part.strip()] or [None]


def source_config(name: str, url: str, table: str, batch_rows: int, readers: int | None) -> str:
    line = f"readers = {readers}\n" if readers else ""
    return (f'[sources.{name}]\nurl = "{url}"\ntable = "{table}"\nkey = ["chat_id"]\n'
            f"batch_rows = {batch_rows}\n{line}\n")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch-rows", type=int, default=10_000)
    parser.add_argument("--readers", type=reader_counts, default=[None],
                        help="reader processes per import, one import each: '1,2,2,1' "
                             "(default: one import with the daemon's default); with several, "
                             "pgloader runs between them and each import's ratio is against "
                             "the mean of the pgloader runs right before and after it")
    parser.add_argument("--sqlite-only", action="store_true",
                        help="skip the PostgreSQL -> PostgreSQL imports")
    args = parser.parse_args()
    rows = args.rows
    work = Path(tempfile.mkdtemp(prefix="nurseryd-bench-db-"))
    server = start_test_server(work)
    try:
        suffix = str(os.getpid())
        target_db, source_db = f"bench_target_{suffix}", f"bench_source_{suffix}"
        server.create_database(target_db)
        server.create_database(source_db)
        started = time.perf_counter()
        sqlite_path = make_sqlite_source(work / "legacy.db", rows)
        if not args.sqlite_only:
            fill_postgres(server, source_db, rows)
        print(f"generated {rows:,} source rows in {time.perf_counter() - started:.1f} s",
              flush=True)
        config = work / "nurseryd.toml"
        counts = list(dict.fromkeys(args.readers))

        def named(kind: str, readers: int | None) -> str:
            return f"{kind}_r{readers}" if readers else kind

        config.write_text("".join(
            source_config(named("sqlite", n), f"sqlite:///{sqlite_path}", "chats",
                          args.batch_rows, n)
            + source_config(named("pg", n), server.url(source_db), "legacy_chats",
                            args.batch_rows, n)
            for n in counts))
        env = {"NURSERYD_DATABASE_URL": server.url(target_db),
               "NURSERYD_STATE_DIR": str(work / "state"), "NURSERYD_CONFIG": str(config)}
        # pgloader runs before and after each import: on a shared machine the load
        # changes within minutes, and each ratio is against the mean of the two around it.
        loaders = [await run_pgloader(server, sqlite_path, f"bench_pgloader_{suffix}_0", rows)]
        results: list[tuple[int | None, float, int, float | None, int]] = []
        async with DaemonProcess.start(env) as daemon, daemon.client(timeout=30) as client:
            rss = PeakRss(daemon.process.pid)
            cpu = CpuSeconds(daemon.process.pid, server)
            idle = rss.sample()
            for number, readers in enumerate(args.readers, 1):
                print(f"readers={readers or 'default'}, {os.getloadavg()[0]:.1f} load",
                      flush=True)
                sqlite_s, _ = await daemon_import(client, server, target_db,
                                                  named("sqlite", readers), rss, rows, cpu)
                sqlite_rss = rss.peak
                pg_s: float | None = None
                pg_rss = 0
                if not args.sqlite_only:
                    pg_s, _ = await daemon_import(client, server, target_db,
                                                  named("pg", readers), rss, rows, cpu)
                    pg_rss = rss.peak
                results.append((readers, sqlite_s, sqlite_rss, pg_s, pg_rss))
                if len(args.readers) > 1 or number == len(args.readers):
                    loaders.append(await run_pgloader(
                        server, sqlite_path, f"bench_pgloader_{suffix}_{number}", rows))
        print(f"\n{rows:,} rows, batch_rows={args.batch_rows}\n")
        print("| load | time | rate | peak RSS | speed vs pgloader (same file, >1 = faster) |")
        print("|---|---|---|---|---|")
        for index, (readers, sqlite_s, sqlite_rss, pg_s, pg_rss) in enumerate(results):
            around = [run for run in (loaders[index] if len(results) > 1 else loaders[0],
                                      loaders[index + 1] if len(results) > 1 else loaders[-1])
                      if run is not None]
            mean = sum(run[0] for run in around) / len(around) if around else None
            ratio = f"{mean / sqlite_s:.2f}× (pgloader {mean:.2f} s)" if mean \
                else "pgloader not installed"
            label = f"readers={readers}" if readers else "default readers"
            line(f"nurseryd SQLite -> PG, {label}", sqlite_s, rows, sqlite_rss, ratio)
            if pg_s is not None:
                line(f"nurseryd PG -> PG, {label}", pg_s, rows, pg_rss, "")
        for index, run in enumerate(loaders):
            if run is not None:
                line(f"pgloader SQLite -> PG (run {index})", run[0], rows, run[1], "")
        print(f"\ndaemon RSS idle before the imports: {idle / 1024**2:.0f} MB")
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    trio.run(main)
