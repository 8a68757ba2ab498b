"""How jobs read in a terminal: pure functions from job JSON to text.

No I/O here, so every layout is tested with plain values; the commands decide
where the text goes and whether the terminal can take a redrawn progress line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

TERMINAL = ("completed", "failed", "cancelled", "timed_out")

#: The exit status a job's ending maps to (see ``docs/console.md``).
EXIT_COMPLETED, EXIT_FAILED, EXIT_USAGE, EXIT_STOPPED = 0, 1, 2, 3


def exit_status(job: Mapping[str, Any]) -> int:
    """0 completed, 1 failed, 3 cancelled or timed out (2 is for usage errors)."""
    status = job.get("status")
    if status == "completed":
        return EXIT_COMPLETED
    if status == "failed":
        return EXIT_FAILED
    return EXIT_STOPPED


def counters(job: Mapping[str, Any]) -> str:
    processed, failed, total = job.get("processed") or 0, job.get("failed") or 0, job.get("total")
    done = f"{processed}" if total is None else f"{processed + failed}/{total}"
    return done + (f" ({failed} failed)" if failed else "")


def percent(job: Mapping[str, Any]) -> float | None:
    total = job.get("total")
    if not total:
        return None
    done = (job.get("processed") or 0) + (job.get("failed") or 0)
    return max(0.0, min(1.0, done / total))


def progress_line(job: Mapping[str, Any], width: int = 30) -> str:
    """``job 7 migration running [#######.......]  45% 4500/10000 1200/s eta 5 s``."""
    share = percent(job)
    if share is None:
        bar = " " * width
        shown = "   "
    else:
        filled = int(share * width)
        bar = "#" * filled + "." * (width - filled)
        shown = f"{share * 100:3.0f}%"
    parts = [f"job {job.get('id')} {job.get('kind')} {job.get('status')}", f"[{bar}]", shown,
             counters(job)]
    rate = job.get("rate")
    if isinstance(rate, int | float) and rate > 0:
        parts.append(f"{rate:,.0f}/s")
    eta = job.get("eta_s")
    if isinstance(eta, int | float) and job.get("status") == "running":
        parts.append(f"eta {human_seconds(eta)}")
    return " ".join(parts)


def human_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min {seconds % 60:.0f} s"
    return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:.0f} min"


def ending_line(job: Mapping[str, Any]) -> str:
    """One line for a finished job: status, counters and, if any, the error."""
    line = f"job {job.get('id')} {job.get('kind')} {job.get('status')}: {counters(job)}"
    if job.get("error") and job.get("status") != "completed":
        line += f": {job['error']}"
    return line


def job_table(jobs: Sequence[Mapping[str, Any]]) -> str:
    """The ``jobs`` listing: aligned columns, newest first as the API gives them."""
    header = ("ID", "KIND", "STATUS", "PROGRESS", "ATTEMPTS", "CREATED")
    rows = [(str(job.get("id")), str(job.get("kind")), str(job.get("status")), counters(job),
             str(job.get("attempts", "")), str(job.get("created_at") or "")[:19])
            for job in jobs]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths,
                                                                         strict=True)).rstrip()
                     for row in [header, *rows])


def job_details(job: Mapping[str, Any]) -> str:
    """``show``: every field of the job, one per line, params and result as JSON."""
    import json

    lines = []
    for key, value in job.items():
        shown = json.dumps(value, ensure_ascii=False) if isinstance(value, dict | list) \
            else ("" if value is None else str(value))
        lines.append(f"{key + ':':<22}{shown}")
    return "\n".join(lines)


def rejects_csv(rejects: Sequence[Mapping[str, Any]]) -> str:
    """``rejects --csv``: row, column, reason, then the raw values as JSON."""
    import csv
    import io
    import json

    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["row", "column", "reason", "values"])
    for reject in rejects:
        writer.writerow([reject.get("row"), reject.get("column"), reject.get("reason"),
                         json.dumps(reject.get("values"), ensure_ascii=False)])
    return out.getvalue()


def log_text(body: Mapping[str, Any]) -> str:
    """A job's log (``GET /jobs/{id}/log``) as lines: time, level, what happened."""
    lines = [f"{line['at'][:23].replace('T', ' ')}  {line['level']:<7}  {line['message']}"
             for line in body["lines"]]
    if body.get("truncated"):
        lines.insert(0, "(older lines left out; --limit shows more)")
    return "\n".join(lines) if lines else "no lines"
