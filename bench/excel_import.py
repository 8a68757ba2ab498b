"""Excel import benchmark: the chats workbook, upload -> ``completed``, beside the DuckDB
one-liner (``read_xlsx`` -> PostgreSQL) and pandas (``read_excel`` + ``to_sql``) in the same run.

Run: ``.venv/bin/python bench/excel_import.py [--runs 3] [--rows 155000] [--no-baseline]
[--no-pandas]`` (``--rows 1000000`` for the large workbook; pandas is skipped above 200k rows).

* generates the workbook with ``../shared/bench/gen_chats_xlsx.py`` (cached in
  ``bench/out/``), starts its own PostgreSQL (embedded pgserver build) and a real
  ``nurseryd serve``, uploads over HTTP (the curl path), polls
  ``/migration/jobs/{id}`` until ``completed``;
* samples the RSS of the daemon and of its parser child every 10 ms (peak of
  each, and of their sum); waits for each job's end on its event stream
  (``GET /jobs/{id}/events`` ends with the terminal event) instead of polling;
* measures the latency of ``GET /healthz`` idle and during one extra, untimed
  import (50 pings a second would otherwise take CPU from the timed imports);
* times the DuckDB one-liner ``CREATE TABLE pg.public.chats_duckdb AS SELECT *
  FROM read_xlsx(...)`` (excel + postgres extensions from PyPI's
  ``duckdb-ext-excel``/``duckdb-ext-postgres``) into the same PostgreSQL, once per
  nurseryd run, interleaved with them, and prints the ratio of the medians;
* times the pandas baseline into the same PostgreSQL (installs the ``bench``
  extra if missing; ``--no-baseline`` or an offline box skips the baselines).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.pgtools import PgServer, start_test_server  # noqa: E402

GENERATOR = ROOT.parent / "shared" / "bench" / "gen_chats_xlsx.py"
OUT = ROOT / "bench" / "out"
BASELINE_PACKAGES = ["pandas", "sqlalchemy", "psycopg[binary]"]
DUCKDB_PACKAGES = ["duckdb==1.4.4", "duckdb-ext-excel==1.4.4.20260205",
                   "duckdb-ext-postgres==1.4.4.20260205"]

# The extensions ship inside their wheels in DuckDB's extension-directory layout.
DUCKDB_SCRIPT = r"""
import json, os, resource, sys, time
import duckdb, duckdb_ext
path, url = sys.argv[1], sys.argv[2]
con = duckdb.connect()
con.execute("SET extension_directory = ?", [os.path.join(duckdb_ext.__path__[0], "extensions")])
con.execute("LOAD excel")
con.execute("LOAD postgres")
con.execute(f"ATTACH '{url}' AS pg (TYPE postgres)")
con.execute("DROP TABLE IF EXISTS pg.public.chats_duckdb")
t0 = time.perf_counter()
con.execute(f"CREATE TABLE pg.public.chats_duckdb AS SELECT * FROM read_xlsx('{path}')")
seconds = time.perf_counter() - t0
rows = con.execute("SELECT count(*) FROM pg.public.chats_duckdb").fetchone()[0]
print(json.dumps({"seconds": seconds, "rows": rows,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

PANDAS_SCRIPT = r"""
import json, resource, sys, time
import pandas as pd
from sqlalchemy import create_engine
path, url = sys.argv[1], sys.argv[2]
engine = create_engine(url)
t0 = time.perf_counter()
frame = pd.read_excel(path, engine="openpyxl")
t1 = time.perf_counter()
frame.to_sql("chats_pandas", engine, if_exists="replace", index=False, method="multi",
             chunksize=1000)
t2 = time.perf_counter()
print(json.dumps({"read_s": t1 - t0, "to_sql_s": t2 - t1, "seconds": t2 - t0,
                  "rows": len(frame),
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def workbook(rows: int) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"chats{rows // 1000}k.xlsx"
    if not path.exists():
        print(f"generating {path.name} with {GENERATOR.name} (takes ~20 s for 155k rows)",
              flush=True)
        subprocess.run([sys.executable, str(GENERATOR), str(path), "--rows", str(rows)],
                       check=True)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as file:
            return int(file.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _children(pid: int) -> list[int]:
    """Child pids from /proc/PID/task/*/children: cheap, unlike scanning all of /proc
    (psutil.children does that, and at 100 Hz it took a visible share of 2 cores)."""
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as file:
                found += [int(child) for child in file.read().split()]
    except OSError:
        pass
    return found


class Sampler(threading.Thread):
    """Peak RSS of a process and of its children, sampled every 10 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.stop_event = threading.Event()
        self.peak_self = self.peak_children = self.peak_sum = 0

    def run(self) -> None:
        while not self.stop_event.is_set():
            own = _rss(self.pid)
            children = sum(_rss(child) for child in _children(self.pid))
            self.peak_self = max(self.peak_self, own)
            self.peak_children = max(self.peak_children, children)
            self.peak_sum = max(self.peak_sum, own + children)
            time.sleep(0.01)

    def reset(self) -> None:
        self.peak_self = self.peak_children = self.peak_sum = 0


class Pinger(threading.Thread):
    """GET /healthz every 20 ms; latencies by phase."""

    def __init__(self, base_url: str) -> None:
        super().__init__(daemon=True)
        self.client = httpx.Client(base_url=base_url, timeout=10)
        self.phase: str | None = "idle"
        self.samples: dict[str, list[float]] = {"idle": [], "import": []}
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            if self.phase is None:  # paused: the timed imports run without it
                time.sleep(0.02)
                continue
            begin = time.perf_counter()
            self.client.get("/healthz")
            self.samples.setdefault(self.phase, []).append(time.perf_counter() - begin)
            time.sleep(0.02)


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] if ordered else float("nan")


def import_once(client: httpx.Client, path: Path) -> tuple[float, dict]:
    begin = time.perf_counter()
    with open(path, "rb") as file:
        response = client.post("/migration/excel", files={"file": (path.name, file)})
    response.raise_for_status()
    job_id = response.json()["id"]
    uploaded = time.perf_counter() - begin
    # The job's event stream ends with its terminal event: the end is awaited, not
    # polled (polling every 5 ms cost the daemon a visible share of a core).
    with client.stream("GET", f"/jobs/{job_id}/events") as stream:
        for _ in stream.iter_raw():
            pass
    elapsed = time.perf_counter() - begin
    job = client.get(f"/migration/jobs/{job_id}").json()
    job["upload_s"] = uploaded
    if job["status"] != "completed":
        raise SystemExit(f"import ended {job['status']}: {job.get('error')}")
    return elapsed, job


def ensure_baseline_packages() -> bool:
    try:
        import pandas  # noqa: F401
        import psycopg  # noqa: F401
        import sqlalchemy  # noqa: F401
        return True
    except ImportError:
        pass
    print(f"installing the bench extra ({', '.join(BASELINE_PACKAGES)}) for the baseline...",
          flush=True)
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet",
                             *BASELINE_PACKAGES], capture_output=True, text=True)
    if result.returncode != 0:
        print("baseline skipped: could not install pandas/SQLAlchemy/psycopg "
              f"({result.stderr.strip().splitlines()[-1:] or 'no network?'})")
        return False
    return True


def ensure_duckdb() -> bool:
    try:
        import duckdb_ext  # noqa: F401
        return True
    except ImportError:
        pass
    print(f"installing {', '.join(DUCKDB_PACKAGES)} for the DuckDB baseline...", flush=True)
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet",
                             *DUCKDB_PACKAGES], capture_output=True, text=True)
    if result.returncode != 0:
        print("DuckDB baseline skipped: could not install it "
              f"({result.stderr.strip().splitlines()[-1:] or 'no network?'})")
        return False
    return True


def duckdb_once(path: Path, server: PgServer, database: str) -> dict | None:
    """The one-liner a user would pick instead, into the same PostgreSQL."""
    result = subprocess.run([sys.executable, "-c", DUCKDB_SCRIPT, str(path),
                             server.url(database)], capture_output=True, text=True)
    if result.returncode != 0:
        print("DuckDB baseline failed:", result.stderr[-2000:])
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def baseline(path: Path, server: PgServer) -> dict | None:
    if not ensure_baseline_packages():
        return None
    server.create_database("bench_pandas")
    url = server.url("bench_pandas").replace("postgresql://", "postgresql+psycopg://", 1)
    result = subprocess.run([sys.executable, "-c", PANDAS_SCRIPT, str(path), url],
                            capture_output=True, text=True)
    if result.returncode != 0:
        print("baseline failed:", result.stderr[-2000:])
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=155_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--no-pandas", action="store_true")
    parser.add_argument("--reader", default="auto",
                        help="migration.reader of the daemon (auto = calamine-stream; "
                             "calamine = the whole-sheet load, for comparison)")
    args = parser.parse_args()
    path = workbook(args.rows)
    with tempfile.TemporaryDirectory(prefix="nurseryd-excel-bench-") as tmp:
        server = start_test_server(Path(tmp))
        try:
            run(args, path, server, Path(tmp))
        finally:
            server.stop()


def run(args: argparse.Namespace, path: Path, server: PgServer, workdir: Path) -> None:
    server.create_database("bench_excel")
    port = free_port()
    env = {**os.environ, "NURSERYD_DATABASE_URL": server.url("bench_excel"),
           "NURSERYD_STATE_DIR": str(workdir / "state"), "NURSERYD_BIND": f"127.0.0.1:{port}",
           "NURSERYD_LOG_LEVEL": "WARNING"}
    if args.reader != "auto":
        config = workdir / "nurseryd.toml"
        config.write_text(f'[migration]\nreader = "{args.reader}"\n')
        env["NURSERYD_CONFIG"] = str(config)
    daemon = subprocess.Popen([sys.executable, "-m", "nurseryd.cli", "serve"], env=env)
    base_url = f"http://127.0.0.1:{port}"
    results: list[tuple[float, dict, int, int, int]] = []
    ducks: list[dict] = []
    use_duckdb = not args.no_baseline and ensure_duckdb()
    try:
        client = httpx.Client(base_url=base_url, timeout=120)
        deadline = time.time() + 60
        while True:
            try:
                if client.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                raise SystemExit("daemon did not become ready")
            time.sleep(0.05)
        sampler = Sampler(daemon.pid)
        sampler.start()
        pinger = Pinger(base_url)
        pinger.start()
        time.sleep(1.0)  # idle latency samples
        pinger.phase = None
        for _ in range(args.runs):
            server.psql("TRUNCATE chats", "bench_excel")
            server.psql("CHECKPOINT", "bench_excel")  # as in ../shared/bench: no WAL debt
            sampler.reset()
            elapsed, job = import_once(client, path)
            results.append((elapsed, job, sampler.peak_self, sampler.peak_children,
                            sampler.peak_sum))
            time.sleep(0.5)
            if use_duckdb:  # interleaved: both see the same machine, run by run
                server.psql("CHECKPOINT", "bench_excel")
                duck = duckdb_once(path, server, "bench_excel")
                if duck is not None:
                    ducks.append(duck)
                time.sleep(0.5)
        reimport, rejob = import_once(client, path)  # unchanged file over the loaded table
        # Latency while importing, in a run of its own (not timed): 50 pings a second
        # take CPU the timed imports should not lose to the bench itself.
        server.psql("TRUNCATE chats", "bench_excel")
        pinger.phase = "import"
        import_once(client, path)
        pinger.phase = None
        pinger.stop_event.set()
        sampler.stop_event.set()
    finally:
        daemon.terminate()
        daemon.wait(60)

    mib = 1024**2
    times = [r[0] for r in results]
    median = statistics.median(times)
    job = results[0][1]
    rows = job["processed"]
    print(f"nurseryd Excel import, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, "
          f"{path.name} ({path.stat().st_size / 1e6:.1f} MB, {rows:,} rows), "
          f"reader {job['result'].get('reader')}")
    print("| measurement | value |")
    print("|---|---|")
    print(f"| upload → completed, median [min–max] of {len(times)} (s) | {median:.2f} "
          f"[{min(times):.2f}–{max(times):.2f}] |")
    print(f"| rows/s (median) | {rows / median:,.0f} |")
    print(f"| of which upload (HTTP 202), median (s) | "
          f"{statistics.median(r[1]['upload_s'] for r in results):.2f} |")
    print(f"| counters | total {job['total']:,}, processed {job['processed']:,}, "
          f"failed {job['failed']:,} |")
    print(f"| peak RSS daemon / parser child / sum (MiB) | "
          f"{max(r[2] for r in results) / mib:.0f} / {max(r[3] for r in results) / mib:.0f} / "
          f"{max(r[4] for r in results) / mib:.0f} |")
    print(f"| re-import of the unchanged file (s) | {reimport:.2f} "
          f"(unchanged {rejob['result']['unchanged']:,}) |")
    print(f"| GET /healthz p50 / p99 idle (ms) | "
          f"{statistics.median(pinger.samples['idle']) * 1000:.1f} / "
          f"{p99(pinger.samples['idle']) * 1000:.1f} |")
    print(f"| GET /healthz p50 / p99 during import (ms) | "
          f"{statistics.median(pinger.samples['import']) * 1000:.1f} / "
          f"{p99(pinger.samples['import']) * 1000:.1f} |")
    if ducks:
        duck_median = statistics.median(d["seconds"] for d in ducks)
        print(f"| DuckDB read_xlsx → PostgreSQL, median [min–max] of {len(ducks)} (s) | "
              f"{duck_median:.2f} [{min(d['seconds'] for d in ducks):.2f}–"
              f"{max(d['seconds'] for d in ducks):.2f}], {ducks[0]['rows']:,} rows, "
              f"peak RSS {max(d['peak_rss_mib'] for d in ducks):.0f} MiB |")
        print(f"| nurseryd / DuckDB (medians, same run) | {median / duck_median:.2f} |")
    skip_pandas = args.no_baseline or args.no_pandas or args.rows > 200_000
    base = None if skip_pandas else baseline(path, server)
    if skip_pandas:
        print("| pandas baseline | skipped |")
    elif base is not None:
        print(f"| pandas read_excel + to_sql(method='multi', chunksize=1000) (s) | "
              f"{base['seconds']:.2f} (read {base['read_s']:.2f} + to_sql "
              f"{base['to_sql_s']:.2f}), {base['rows'] / base['seconds']:,.0f} rows/s, "
              f"peak RSS {base['peak_rss_mib']:.0f} MiB |")
        print(f"| speed-up vs pandas | {base['seconds'] / median:.1f}× |")
    print(json.dumps({"seconds": times, "rows": rows, "baseline": base, "duckdb": ducks,
                      "peak_rss_mib": [r[4] / mib for r in results]}))


if __name__ == "__main__":
    main()
