"""``nurseryd submit|import|jobs|show|watch|cancel|...``: the daemon from a terminal.

Each command is one or two API calls (:mod:`.client`) and a rendering
(:mod:`.render`). Exit status: 0 completed (or, without ``--wait``, accepted), 1
failed, 3 cancelled or timed out, 2 a usage or connection error, always with one
line on stderr saying what is wrong.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from . import render
from .client import ApiClient, ClientError

#: How often ``watch`` asks for the job when the daemon has no event stream.
POLL_INTERVAL_S = 0.5

Handler = Callable[[argparse.Namespace, ApiClient, TextIO], int]
COMMANDS: dict[str, Handler] = {}


def command(name: str) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        COMMANDS[name] = handler
        return handler
    return register


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The client's subcommands, beside ``serve`` and ``check-config``."""

    def client(name: str, help_text: str) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=help_text)
        parser.add_argument("--url", help="the daemon (default: $NURSERYD_URL, else "
                            "http://127.0.0.1:8084)")
        parser.add_argument("--token", help="API token (default: $NURSERYD_API_TOKEN)")
        parser.add_argument("--json", action="store_true", help="machine-readable output")
        return parser

    submit = client("submit", "start a job of KIND: key=value parameters (values are JSON "
                    "where they parse as JSON)")
    submit.add_argument("kind")
    submit.add_argument("params", nargs="*", metavar="key=value")
    submit.add_argument("--timeout", type=float, metavar="S")
    submit.add_argument("--wait", action="store_true", help="follow it until it ends")

    excel = client("import", "import an Excel workbook (upload)")
    excel.add_argument("file", type=Path)
    excel.add_argument("--target")
    excel.add_argument("--sheet")
    excel.add_argument("--wait", action="store_true")

    database = client("import-db", "import from a configured database source")
    database.add_argument("name")
    database.add_argument("--target")
    database.add_argument("--wait", action="store_true")

    sheet = client("import-sheet", "import a configured Google spreadsheet")
    sheet.add_argument("spreadsheet_id")
    sheet.add_argument("--range")
    sheet.add_argument("--target")
    sheet.add_argument("--wait", action="store_true")

    jobs = client("jobs", "list jobs, newest first")
    jobs.add_argument("--kind")
    jobs.add_argument("--status")
    jobs.add_argument("--limit", type=int, default=20)

    log = client("log", "the job's log: each attempt, its notes, how it ended")
    log.add_argument("id", type=int)
    log.add_argument("--limit", type=int, default=200, help="the newest N lines (at most 1000)")

    for name, help_text in (("show", "one job, every field"),
                            ("watch", "follow a job with a progress bar until it ends"),
                            ("cancel", "cancel a queued or running job"),
                            ("retry", "run a failed, cancelled or timed-out job again")):
        client(name, help_text).add_argument("id", type=int)

    fetch = client("fetch", "run the fetch aggregator now")
    fetch.add_argument("--replace", action="store_true",
                       help="cancel the active fetch first")
    fetch.add_argument("--wait", action="store_true")
    client("fetch-cancel", "cancel the active fetch")

    rejects = client("rejects", "the rows a migration rejected")
    rejects.add_argument("id", type=int)
    rejects.add_argument("--csv", action="store_true", help="as CSV")


def run(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Run the client command ``args.command``; returns the exit status."""
    try:
        with ApiClient(args.url, args.token) as api:
            return COMMANDS[args.command](args, api, out)
    except ClientError as error:
        print(f"nurseryd: {error}", file=err)
        return render.EXIT_USAGE
    except KeyboardInterrupt:
        return 130


# -- starting jobs ---------------------------------------------------------------------------


def parse_params(pairs: Sequence[str]) -> dict[str, Any]:
    """``["seconds=5", "name=x"]`` → ``{"seconds": 5, "name": "x"}``."""
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ClientError(f"expected key=value, got {pair!r}")
        try:
            params[key] = json.loads(text)
        except ValueError:
            params[key] = text
    return params


@command("submit")
def _submit(args: argparse.Namespace, api: ApiClient, out: TextIO) -> int:
    params = parse_params(args.params)
    job = api.post(f"/jobs/{args.kind}", params,
                   timeout_s=None if args.timeout is None else f"{args.timeout:g}")
    return _accepted(args, api, out, job)


@command("import")
def _import(args: argparse.Namespace, api: ApiClient, out: TextIO) -> int:
    job = api.upload("/migration/excel", args.file, target=args.target, sheet=args.sheet)
    return _accepted(args, api, out, job)


@command("import-db")
def _import_db(args: argparse.Namespace, api: ApiClient, out: TextIO) -> int:
    body = {"source_identifier": args.name, **({"target": args.target} if args.target else {})}
    return _accepted(args, api, out, api.post("/migration/database", body))


@command("import-sheet")
def _import_sheet(args: argparse.Namespace, api: ApiClient, out: TextIO) -> int:
    body: dict[str, Any] = {"spreadsheet_id": args.spreadsheet_id}
    if args.range:
        body["range"] = args.range
    if args.target:
        body["target"] = args.target
    return _accepted(args, api, out, api.post("/migration/google-sheets", body))


@command("fetch")
def _fetch(args: argparse.Namespace, api: ApiClient, out: TextIO) -> int:
    job = api.post("/fetch", None, replace="true" if args.replace else None)
    return _accepted(args, api, out, job)


def _accepted(args: argparse.Namespace, api: ApiClient, out: TextIO, job: dict[str, Any]) -> int:
    if getattr(args, "wait", False):
        return _follow(api, job, out, as_json=args.json)
    if args.json:
        print(json.dumps(job), file=out)
    else:
        print(f"job {job['id']} {job['kind']} {job['status']} (follow it: nurseryd watch "
              f"{job['id']})", file=out)
    return render.EXIT_COMPLETED


# -- looking at jobs -------------------------------------------------------------------------


@command("jobs")
def _jobs(args: argparse.Namespace, api: ApiClient, out: TextIO) -> int:
    page = api.get("/jobs", kind=args.kind, status=args.status, limit=args.limit)
    if args.json:
        print(json.dumps(page["jobs"]), file=out)
    elif page["jobs"]:
        print(render.job_table(page["jobs"]), file=out)
    else:
        print("no jobs", file=out)
    return render.EXIT_COMPLETED


@command("show")
def _show(args: argparse.Namespace, api: ApiClient, out: TextIO) -> int:
    job = api.get(f"/jobs/{args.id}")
    return _print(args, out, job, render.job_details(job))


@command("watch")
def _watch(args: argparse.Namespace, api: ApiClient, out: TextIO) -> int:
    return _follow(api, api.get(f"/jobs/{args.id}"), out, as_json=args.json)


@command("log")
def _log(args: argparse.Namespace, api: ApiClient, out: TextIO) -> int:
    body = api.get(f"/jobs/{args.id}/log", limit=args.limit)
    return _print(args, out, body, render.log_text(body))


@command("rejects")
def _rejects(args: argparse.Namespace, api: ApiClient, out: TextIO) -> int:
    rejects: list[dict[str, Any]] = []
    path: str | None = f"/jobs/{args.id}/rejects"
    while path:
        page = api.get(path)
        rejects += page["rejects"]
        path = page.get("next")
    if args.csv:
        out.write(render.rejects_csv(rejects))
    elif args.json:
        print(json.dumps(rejects), file=out)
    else:
        for reject in rejects:
            print(f"row {reject['row']}: {reject['column']}: {reject['reason']}", file=out)
        print(f"{len(rejects)} rejected row(s)", file=out)
    return render.EXIT_COMPLETED


# -- acting on jobs --------------------------------------------------------------------------


@command("cancel")
def _cancel(args: argparse.Namespace, api: ApiClient, out: TextIO) -> int:
    job = api.post(f"/jobs/{args.id}/cancel")
    return _print(args, out, job, render.ending_line(job))


@command("retry")
def _retry(args: argparse.Namespace, api: ApiClient, out: TextIO) -> int:
    job = api.post(f"/jobs/{args.id}/retry")
    return _print(args, out, job, f"job {job['id']} {job['status']} again")


@command("fetch-cancel")
def _fetch_cancel(args: argparse.Namespace, api: ApiClient, out: TextIO) -> int:
    job = api.post("/fetch/cancel")
    return _print(args, out, job, render.ending_line(job))


def _print(args: argparse.Namespace, out: TextIO, value: Any, text: str) -> int:
    """The answer as one JSON document with ``--json``, else as ``text``."""
    print(json.dumps(value) if args.json else text, file=out)
    return render.EXIT_COMPLETED


# -- following a job -------------------------------------------------------------------------


def _updates(api: ApiClient, job: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The job as it changes, until it ends: from its event stream, or by asking."""
    yield job
    if job["status"] in render.TERMINAL:
        return
    try:
        for update in api.events(f"/jobs/{job['id']}/events"):
            yield update
            if update.get("status") in render.TERMINAL:
                return
    except ClientError as error:
        if error.status not in (404, 405):
            raise
    while True:  # a daemon without the stream (or one that ended it early): ask
        time.sleep(POLL_INTERVAL_S)
        current = api.get(f"/jobs/{job['id']}")
        yield current
        if current["status"] in render.TERMINAL:
            return


def _follow(api: ApiClient, job: dict[str, Any], out: TextIO, *, as_json: bool) -> int:
    """Show the job's progress until it ends; the exit status says how it ended."""
    redraw = not as_json and out.isatty()
    last_line = ""
    last = job
    for last in _updates(api, job):
        if as_json:
            print(json.dumps(last), file=out, flush=True)
            continue
        line = render.progress_line(last)
        if redraw:
            out.write("\r" + line.ljust(len(last_line)))
            out.flush()
        elif _changed(line, last_line):
            print(line, file=out, flush=True)
        last_line = line
    if not as_json:
        if redraw:
            out.write("\n")
        print(render.ending_line(last), file=out)
    return render.exit_status(last)


def _changed(line: str, before: str) -> bool:
    """A plain (non-TTY) output prints a line when status or whole ten percents change."""
    def key(text: str) -> str:
        head, _, rest = text.partition("[")
        share = rest.split("]")[1].strip().split("%")[0] if "]" in rest else ""
        return head + (share[:-1] if share.strip().isdigit() else share)
    return key(line) != key(before)
