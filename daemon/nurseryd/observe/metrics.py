"""Every metric object of one daemon, in a :class:`CollectorRegistry` of its own.

Not the process-wide default registry: several daemons may run in one process
(the tests do), and each must count only its own jobs. ``/metrics`` serves this
registry; :mod:`.state` adds the gauges computed at scrape time to it.

Events are counted here (a committed job change, a migrated batch, a fetched
source, an HTTP request); state is read at scrape time (:mod:`.state`). Every
label value is bounded: job kinds, statuses and outcomes from fixed lists,
configured source and target names, URL rule templates, never a job id, a raw
path or anything else a client chose.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable, Mapping
from importlib import metadata
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    disable_created_metrics,
)

from ..lifecycle import TERMINAL

# The ``*_created`` series (when a label set first appeared) double every counter's
# series and answer no operator's question. The switch is process-wide.
disable_created_metrics()

#: Jobs last from milliseconds (noop) to hours (a large import).
JOB_DURATION_BUCKETS = (0.01, 0.05, 0.25, 1, 5, 15, 60, 300, 900, 1800, 3600, 3 * 3600,
                        6 * 3600, 24 * 3600)
QUEUE_WAIT_BUCKETS = (0.001, 0.005, 0.025, 0.1, 0.5, 1, 5, 15, 60, 300, 1800, 3600)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

#: What became of a migrated row (the pipeline's counters; ``rejected`` is ``failed``).
ROW_OUTCOMES = {"inserted": "inserted", "updated": "updated", "unchanged": "unchanged",
                "rejected": "failed"}
#: What became of a fetched item.
ITEM_RESULTS = ("new", "updated", "unchanged", "filtered", "rejected")
#: A fetched source's outcome as a request outcome (errors are counted by class).
FETCH_REQUEST_OUTCOMES = {"ok": "new", "unchanged": "not_modified"}
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class FetchedSource(Protocol):
    """What the fetch kind knows about one source once it is done with it."""

    outcome: str
    new: int
    updated: int
    unchanged: int
    filtered: int
    errors: int


class Metrics:
    """The daemon's metrics; the methods are what kinds and the app call."""

    def __init__(self, kinds: Iterable[str] = ()) -> None:
        self.registry = registry = CollectorRegistry()
        self.jobs_submitted = Counter(
            "nurseryd_jobs_submitted", "Jobs recorded by this daemon (committed).", ["kind"],
            registry=registry)
        self.jobs_finished = Counter(
            "nurseryd_jobs_finished", "Jobs that reached a final status in this daemon.",
            ["kind", "status"], registry=registry)
        self.job_duration = Histogram(
            "nurseryd_job_duration_seconds",
            "Run time of finished jobs' last attempt (finished_at - started_at).",
            ["kind", "status"], buckets=JOB_DURATION_BUCKETS, registry=registry)
        self.job_queue_wait = Histogram(
            "nurseryd_job_queue_wait_seconds",
            "Time from recording to the first start (started_at - created_at).",
            ["kind"], buckets=QUEUE_WAIT_BUCKETS, registry=registry)
        self.job_retries = Counter(
            "nurseryd_job_retries", "Starts of a job that had been started before.",
            ["kind"], registry=registry)
        self.jobs_interrupted = Counter(
            "nurseryd_jobs_interrupted",
            "Running jobs sent back to queued by a shutdown (they resume later).",
            ["kind"], registry=registry)
        self.jobs_requeued = Counter(
            "nurseryd_jobs_requeued",
            "Attempts that failed on a transient error (the database went away) and went "
            "back to queued, to be tried again after a back-off.", ["kind"], registry=registry)
        self.jobs_adopted = Counter(
            "nurseryd_jobs_adopted",
            "Running jobs requeued because nothing ran them any more (their daemon died).",
            registry=registry)

        self.migration_rows = Counter(
            "nurseryd_migration_rows", "Migrated rows by what became of them (committed).",
            ["source_type", "target", "outcome"], registry=registry)

        self.fetch_requests = Counter(
            "nurseryd_fetch_requests",
            "Sources fetched, one per source and fetch: new, not_modified, or the error "
            "class.", ["source", "outcome"], registry=registry)
        self.fetch_items = Counter(
            "nurseryd_fetch_items", "Fetched items by what became of them.",
            ["source", "result"], registry=registry)

        self.http_requests = Counter(
            "nurseryd_http_requests", "HTTP requests answered, by route template.",
            ["route", "method", "status"], registry=registry)
        self.http_duration = Histogram(
            "nurseryd_http_request_duration_seconds", "Time to answer an HTTP request.",
            ["route"], buckets=HTTP_BUCKETS, registry=registry)

        self.build = Info("nurseryd_build", "The running nurseryd.", registry=registry)
        self.build.info({"version": _version(), "python": platform.python_version()})
        self.kinds = tuple(kinds)
        for kind in self.kinds:  # every series exists from the start: rate() needs a 0
            self.jobs_submitted.labels(kind)
            self.job_retries.labels(kind)
            self.jobs_interrupted.labels(kind)
            self.jobs_requeued.labels(kind)
            for status in sorted(TERMINAL):
                self.jobs_finished.labels(kind, status.value)

    # -- what kinds report (``ctx.metrics``) ----------------------------------------------

    def migration_batch(self, source_type: str, target: str, before: Mapping[str, int],
                        after: Mapping[str, int]) -> None:
        """One committed batch of a migration: the pipeline's counters before and after it."""
        for outcome, counter in ROW_OUTCOMES.items():
            delta = after.get(counter, 0) - before.get(counter, 0)
            if delta > 0:
                self.migration_rows.labels(source_type, target, outcome).inc(delta)

    def fetch_source_done(self, source: str, fetched: FetchedSource,
                          error_class: str | None) -> None:
        """One source of a fetch is done (``error_class`` is set when it failed)."""
        request_outcome = FETCH_REQUEST_OUTCOMES.get(fetched.outcome, error_class or "error")
        self.fetch_requests.labels(source, request_outcome).inc()
        counts = (fetched.new, fetched.updated, fetched.unchanged, fetched.filtered,
                  fetched.errors)
        for result, count in zip(ITEM_RESULTS, counts, strict=True):
            items = self.fetch_items.labels(source, result)  # present even when 0
            if count > 0:
                items.inc(count)

    # -- what the app reports ---------------------------------------------------------------

    def http_request(self, route: str, method: str, status: int, seconds: float) -> None:
        method = method if method in HTTP_METHODS else "other"
        self.http_requests.labels(route, method, str(status)).inc()
        self.http_duration.labels(route).observe(seconds)



def _version() -> str:
    try:
        return metadata.version("nurseryd")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"
