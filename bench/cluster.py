"""Cluster benchmarks: durable no-op jobs/s with 1, 2 and 3 daemons on one PostgreSQL,
and the latency of a cancel posted to one daemon for a job running on another,
beside the single-daemon figures of the same run.

Run: ``.venv/bin/python bench/cluster.py`` (it starts its own PostgreSQL, the
embedded pgserver build, in a temporary directory). Each daemon is a process of
its own (this script run with ``--worker``): a supervisor on the real job store,
holding its real owner lock, sharing the database with the others, driven over
its stdin by the parent. No HTTP: the figures are the supervisors' and the
database's, as ``bench/core.py``'s are (HTTP is measured there).

Two ways to submit:

- **spread**: every daemon gets an equal share of the submissions (a load balancer
  in front); each runs what it accepted on its fast path.
- **one entry**: every job is submitted to the first daemon, whose ``noop`` slots
  (``--entry-slots``) are few: what it has no slot for waits in the table and all
  daemons (the first one too) claim it. This is the shared queue's own path.

This machine is small (2 cores) and shared: the daemons compete with each other
and with PostgreSQL for the same cores, so more daemons cannot mean more jobs/s
here; the figures say what sharing costs, and what it buys on a larger machine is
told in docs/operations.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.pgtools import PgServer, start_test_server  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def row(name: str, value: str, baseline: str, ratio: str) -> None:
    print(f"| {name} | {value} | {baseline} | {ratio} |", flush=True)


# -- a daemon: one supervisor in its own process, driven over stdin -------------------------


async def _worker(dsn: str, owner: str, shared: bool, noop_slots: int) -> None:
    import trio
    import trio_asyncio

    from nurseryd.config import KindLimits, load_settings
    from nurseryd.db import open_database
    from nurseryd.db.owner_lock import hold_owner_lock
    from nurseryd.kinds.base import JobKind, KindRegistry
    from nurseryd.kinds.sleep import NOOP_KIND
    from nurseryd.supervisor import Supervisor

    entered: dict[int, trio.Event] = {}

    async def probe(ctx) -> None:  # noqa: ANN001 - a JobContext
        entered.setdefault(ctx.job_id, trio.Event()).set()
        await trio.sleep_forever()

    registry = KindRegistry()
    registry.add(NOOP_KIND)
    registry.add(JobKind(name="probe", run=probe, parse_params=dict))
    base = load_settings(None, environ={})
    settings = dataclasses.replace(
        base, queue_size=100_000,
        kinds={**base.kinds, "noop": KindLimits(60, 60, noop_slots),
               "probe": KindLimits(60, 60, 1000)},
        cluster=dataclasses.replace(base.cluster, shared_queue=shared))
    stdin = trio.wrap_file(sys.stdin)

    def say(*words: object) -> None:
        print(*words, flush=True)

    async with trio_asyncio.open_loop(), \
            open_database(dsn, min_size=2, max_size=4) as db, \
            open_database(dsn, min_size=1, max_size=4) as work_db:
        supervisor = Supervisor(db, settings, registry, owner, work_db=work_db)
        async with hold_owner_lock(db, owner, on_lost=supervisor.claim_lost,
                                   on_regained=supervisor.claim_regained), \
                trio.open_nursery() as nursery:
            await nursery.start(supervisor.run)
            say("ready")
            while line := (await stdin.readline()).split():
                command = line[0]
                if command == "submit":
                    count, submitters = int(line[1]), int(line[2])

                    async def submitter(share: int) -> None:
                        for _ in range(share):
                            await supervisor.submit("noop", {})

                    async with trio.open_nursery() as inner:
                        for index in range(submitters):
                            inner.start_soon(submitter, count // submitters
                                             + (index < count % submitters))
                    say("submitted")
                elif command == "probe":
                    job = await supervisor.submit("probe", {})
                    await entered.setdefault(job["id"], trio.Event()).wait()
                    say("probe", job["id"])
                elif command == "cancel":
                    started = time.perf_counter()
                    job = await supervisor.cancel(int(line[1]))
                    took = time.perf_counter() - started
                    assert job["status"] == "cancelled", job
                    say("cancelled", took)
                elif command == "quit":
                    break
            supervisor.request_stop()
            supervisor.request_stop()


class Daemon:
    def __init__(self, dsn: str, name: str, *, shared: bool, noop_slots: int) -> None:
        self.name = name
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--worker", dsn, name, str(int(shared)),
             str(noop_slots)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(
                [str(ROOT / "daemon"), str(ROOT), os.environ.get("PYTHONPATH", "")])})
        self.expect("ready")

    def send(self, *words: object) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(" ".join(map(str, words)) + "\n")
        self.process.stdin.flush()

    def expect(self, word: str) -> list[str]:
        assert self.process.stdout is not None
        while True:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"daemon {self.name} exited (waiting for {word!r})")
            parts = line.split()
            if parts and parts[0] == word:
                return parts[1:]

    def stop(self) -> None:
        self.send("quit")
        self.process.wait(60)


def _completed(server: PgServer, database: str) -> int:
    return int(server.psql("SELECT count(*) FROM jobs WHERE status = 'completed'",
                           database).strip())


def bench_jobs(server: PgServer, database: str, daemons: int, jobs: int, submitters: int,
               *, entry_only: bool, entry_slots: int) -> tuple[float, dict[str, int]]:
    """jobs/s from the first submission to the last completion; and who ran how many."""
    server.psql("TRUNCATE jobs CASCADE; TRUNCATE cluster_members", database)
    dsn = server.url(database)
    started_daemons = [
        Daemon(dsn, f"bench-{daemons}-{index}", shared=True,
               noop_slots=entry_slots if entry_only and index == 0 else 10_000)
        for index in range(daemons)]
    try:
        started = time.perf_counter()
        if entry_only:
            started_daemons[0].send("submit", jobs, submitters)
        else:
            for index, daemon in enumerate(started_daemons):
                daemon.send("submit", jobs // daemons + (index < jobs % daemons),
                            max(1, submitters // daemons))
        while _completed(server, database) < jobs:
            time.sleep(0.02)
        elapsed = time.perf_counter() - started
        for daemon in started_daemons[:1] if entry_only else started_daemons:
            daemon.expect("submitted")
        ran = {line.split("|")[0]: int(line.split("|")[1]) for line in server.psql(
            "SELECT owner, count(*) FROM jobs GROUP BY owner ORDER BY owner",
            database).split()}
    finally:
        for daemon in started_daemons:
            daemon.stop()
    return jobs / elapsed, ran


def bench_cancel(server: PgServer, database: str, samples: int) -> dict[str, list[float]]:
    """A cancel answered once the job is ``cancelled`` in the table: asked of the
    daemon that runs the job, and of another one."""
    server.psql("TRUNCATE jobs CASCADE; TRUNCATE cluster_members", database)
    dsn = server.url(database)
    first = Daemon(dsn, "cancel-a", shared=True, noop_slots=10_000)
    second = Daemon(dsn, "cancel-b", shared=True, noop_slots=10_000)
    times: dict[str, list[float]] = {"local": [], "cross": []}
    try:
        for index in range(2 * samples):
            first.send("probe")
            [job_id] = first.expect("probe")
            asked = first if index % 2 == 0 else second  # interleaved: the same noise
            asked.send("cancel", job_id)
            [took] = asked.expect("cancelled")
            times["local" if asked is first else "cross"].append(float(took))
    finally:
        first.stop()
        second.stop()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--submitters", type=int, default=200)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--entry-slots", type=int, default=100,
                        help="noop slots of the one daemon that takes every submission")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import trio

        dsn, owner, shared, slots = args.worker
        trio.run(_worker, dsn, owner, shared == "1", int(slots))
        return
    with tempfile.TemporaryDirectory(prefix="nurseryd-bench-") as tmp:
        server = start_test_server(Path(tmp))
        try:
            server.create_database("bench_cluster")
            # The schema: one daemon applies the migrations (as serve would).
            from nurseryd.db.migrate import bundled_migrations

            for migration in bundled_migrations():
                server.psql(migration.sql, "bench_cluster")
            print(f"nurseryd cluster benchmark, {time.strftime('%Y-%m-%d %H:%M')}, "
                  f"{os.cpu_count()} cores, {args.jobs} no-op jobs per run")
            print("| measurement | nurseryd | baseline (same run) | ratio |")
            print("|---|---|---|---|")
            for entry_only in (False, True):
                how = (f"one entry daemon with {args.entry_slots} slots" if entry_only
                       else "submissions spread")
                single = 0.0
                for daemons in (1, 2, 3):
                    rate, ran = bench_jobs(server, "bench_cluster", daemons, args.jobs,
                                           args.submitters, entry_only=entry_only,
                                           entry_slots=args.entry_slots)
                    if daemons == 1:
                        single = rate
                    shares = "/".join(str(count) for count in ran.values())
                    row(f"durable no-op jobs/s, {daemons} daemon(s), {how} (ran: {shares})",
                        f"{rate:,.0f}", f"1 daemon, same way: {single:,.0f}",
                        f"{rate / single:.2f}×")
            lat = bench_cancel(server, "bench_cluster", args.samples)
            local_p50 = statistics.median(lat["local"]) * 1000
            cross_p50 = statistics.median(lat["cross"]) * 1000
            row("cancel → cancelled in DB, asked of another daemon, p50 / p99 (ms)",
                f"{cross_p50:.2f} / {pct(lat['cross'], 0.99) * 1000:.2f}",
                f"asked of the daemon running it: {local_p50:.2f} / "
                f"{pct(lat['local'], 0.99) * 1000:.2f}", f"{cross_p50 / local_p50:.1f}×")
        finally:
            server.stop()
    print(json.dumps({"args": {key: value for key, value in vars(args).items()
                               if key != "worker"}}))


if __name__ == "__main__":
    main()
