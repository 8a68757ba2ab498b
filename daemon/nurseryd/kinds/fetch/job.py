"""The fetch job: every configured source, a few at a time, into the items table.

Shape: one task per source in the job's nursery, gated by a
:class:`trio.CapacityLimiter` (``fetch.concurrency``). A source holds at most one
response body and one parsed page at a time, and only while it holds the limiter,
so memory is bounded by the concurrency, not by the number of sources.

Outcomes: a source that fails does not fail the job; its error is in the result
and in ``fetch_sources``. Only when *every* source fails is the job failed. The
per-source timeout is a cancel scope around the HTTP work of that source (its
retries and pages); the whole-fetch timeout is the supervisor's scope around this
job. On cancel or timeout the result still lists every source: the ones that were
in flight say ``interrupted``, and the batches already upserted stay.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio

from ...db.fetch_sources import Validators, load_validators, save_source_state
from ...db.items import UpsertCounts, upsert_items
from ..base import JobContext, JobFailed, ParamError, parser, refuse_unknown
from .client import FetchError, RetryPolicy, get_page, open_client
from .config import FetchConfig, SourceConfig
from .parse import MAX_NOTES, ParseError, parse_page

log = logging.getLogger("nurseryd.fetch")

TRIGGERS = ("api", "schedule")
#: How long a finished source may take to record its state once the job is cancelled.
STATE_WRITE_GRACE_S = 2.0


@dataclass(frozen=True)
class FetchParams:
    """A fetch takes no URLs, only who asked for it (shown in job listings)."""

    trigger: str = "api"

    @classmethod
    def parse(cls, params: Mapping[str, Any]) -> FetchParams:
        refuse_unknown(params, {"trigger"}, "a fetch takes only 'trigger' (sources are "
                       "configured in the [fetch] section of the config file)")
        trigger = params.get("trigger", "api")
        if trigger not in TRIGGERS:
            raise ParamError("trigger", f"expected one of {', '.join(TRIGGERS)}, got {trigger!r}")
        return cls(trigger)

    def to_json(self) -> dict[str, Any]:
        return {"trigger": self.trigger}


parse_fetch_params = parser(FetchParams)


@dataclass
class SourceOutcome:
    """What happened to one source in this fetch (one entry of the job result)."""

    name: str
    outcome: str = "pending"  # pending, running, ok, unchanged, error, interrupted
    seen: int = 0
    new: int = 0
    updated: int = 0
    unchanged: int = 0
    filtered: int = 0
    errors: int = 0
    pages: int = 0
    attempts: int = 0
    http_status: int | None = None
    duration_s: float | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    def add_counts(self, counts: UpsertCounts) -> None:
        self.new += counts.new
        self.updated += counts.updated
        self.unchanged += counts.unchanged

    def note(self, notes: Sequence[str]) -> None:
        self.notes.extend(notes[: MAX_NOTES - len(self.notes)])

    def as_json(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome, "new": self.new, "updated": self.updated,
            "unchanged": self.unchanged, "filtered": self.filtered, "errors": self.errors,
            "seen": self.seen, "pages": self.pages, "attempts": self.attempts,
            "http_status": self.http_status,
            "duration_s": None if self.duration_s is None else round(self.duration_s, 3),
            "error": self.error, "notes": self.notes,
        }


def build_result(outcomes: Mapping[str, SourceOutcome]) -> dict[str, Any]:
    summary: dict[str, int] = {}
    for outcome in outcomes.values():
        summary[outcome.outcome] = summary.get(outcome.outcome, 0) + 1
    return {"sources": {name: outcome.as_json() for name, outcome in outcomes.items()},
            "summary": summary}


#: The counters are summed over every source and reported at most this often
#: (plus once at the end). ``ctx.report`` itself never blocks and the supervisor
#: coalesces what reaches the jobs table; this only spares re-summing all sources
#: after every batch of every source.
REPORT_EVERY_S = 0.25


@dataclass
class Progress:
    """The job's counters, summed over its sources: total = items seen (filtered
    ones included, so a finished source has total = processed + filtered + failed),
    processed = items upserted (new, updated or re-seen unchanged), failed = items
    rejected (no id, duplicate, not an object)."""

    ctx: JobContext
    outcomes: Mapping[str, SourceOutcome]
    last_report: float = float("-inf")

    def report(self, *, force: bool = False) -> None:
        now = trio.current_time()
        if not force and now - self.last_report < REPORT_EVERY_S:
            return
        self.last_report = now
        values = self.outcomes.values()
        self.ctx.report(
            total=sum(o.seen for o in values),
            processed=sum(o.new + o.updated + o.unchanged for o in values),
            failed=sum(o.errors for o in values),
        )


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def request_headers(source: SourceConfig, validators: Validators | None) -> dict[str, str]:
    """The source's configured headers (env values read now) plus conditional-GET ones."""
    headers: dict[str, str] = {}
    for header in source.headers:
        try:
            headers[header.name] = header.resolve()
        except LookupError as error:
            raise FetchError(str(error), cause="config") from None
    if validators is not None:
        if validators.etag:
            headers["If-None-Match"] = validators.etag
        if validators.last_modified:
            headers["If-Modified-Since"] = validators.last_modified
    return headers


@dataclass
class FetchRun:
    """Everything the source tasks of one fetch job share."""

    ctx: JobContext
    config: FetchConfig
    client: httpx.AsyncClient
    limiter: trio.CapacityLimiter
    outcomes: dict[str, SourceOutcome]
    progress: Progress

    @property
    def policy(self) -> RetryPolicy:
        return RetryPolicy(self.config.retries, self.config.backoff_s, self.config.backoff_max_s)

    async def fetch_source(self, source: SourceConfig) -> None:
        outcome = self.outcomes[source.name]
        async with self.limiter:
            outcome.outcome = "running"
            started = trio.current_time()
            validators: Validators | None = None
            failure: str | None = None  # the error class, for metrics
            try:
                validators = await self._fetch_pages(source, outcome)
            except (FetchError, ParseError) as error:
                failure = error.cause if isinstance(error, FetchError) else "parse"
                outcome.outcome, outcome.error = "error", str(error)
                if isinstance(error, FetchError) and error.status is not None:
                    outcome.http_status = error.status
            except Exception as error:  # a database error, say: this source only
                failure = "internal"
                log.exception("fetch source %s failed", source.name)
                outcome.outcome, outcome.error = "error", f"{type(error).__name__}: {error}"
            finally:
                outcome.duration_s = trio.current_time() - started
            if outcome.outcome == "error":
                self.ctx.note(f"source {source.name} failed, the others go on: {outcome.error}")
            self.progress.report()
            self.ctx.set_result(build_result(self.outcomes))
            self.ctx.metrics.fetch_source_done(source.name, outcome, failure)
            await self._save_state(source, outcome, validators)

    async def _fetch_pages(self, source: SourceConfig, outcome: SourceOutcome) -> Validators:
        """Fetch, parse and upsert page after page; returns the validators to keep."""
        db, batch_size = self.ctx.db, self.config.batch_size
        saved = await load_validators(db, source.name, source.url)
        fresh = Validators(None, None)
        deadline = trio.current_time() + source.timeout_s
        url: str | None = source.url
        visited: set[str] = set()
        while url is not None:
            first = not visited
            visited.add(url)
            headers = request_headers(source, saved if first else None)
            with trio.move_on_at(deadline) as budget:
                page = await get_page(self.client, url, headers=headers,
                                      max_bytes=source.max_bytes, deadline=deadline,
                                      policy=self.policy,
                                      cross_origin_redirects=source.cross_origin_redirects)
            if budget.cancelled_caught:
                raise FetchError(f"timed out after {source.timeout_s:g} s "
                                 f"(page {outcome.pages + 1}, per-source timeout_s)",
                                 cause="timeout")
            outcome.pages += 1
            outcome.attempts += page.attempts
            outcome.http_status = page.status
            if page.not_modified:
                outcome.outcome = "unchanged"
                # A 304 may refresh the validators; keep the old ones where it does not.
                return Validators(page.etag or saved.etag,
                                  page.last_modified or saved.last_modified)
            if first:
                fresh = Validators(page.etag, page.last_modified)
            parsed = await parse_page(page.body, page.content_type, source, page.url)
            del page  # the body is not needed any more; only one page is held at a time
            outcome.seen += parsed.seen
            outcome.filtered += parsed.filtered
            outcome.errors += parsed.rejected
            outcome.note(parsed.notes)
            self.progress.report()
            for batch in chunks(parsed.items, batch_size):
                rows = [item.row_json for item in batch]
                outcome.add_counts(await upsert_items(db, source.name, rows))
                self.progress.report()
            url = parsed.next_url
            if url in visited:
                outcome.note([f"next-page link loops back to {url}; stopped"])
                url = None
            elif url is not None and outcome.pages >= source.max_pages:
                outcome.note([f"stopped after max_pages = {source.max_pages}"])
                url = None
        outcome.outcome = "ok"
        return fresh

    async def _save_state(self, source: SourceConfig, outcome: SourceOutcome,
                          validators: Validators | None) -> None:
        """Record the verdict even if the job is being cancelled right now: it is
        what ``GET /fetch`` shows, and losing validators costs a full re-download."""
        success = outcome.outcome in ("ok", "unchanged")
        with trio.CancelScope(shield=True), trio.move_on_after(STATE_WRITE_GRACE_S):
            try:
                await save_source_state(
                    self.ctx.db, name=source.name, url=source.url, outcome=outcome.outcome,
                    status=outcome.http_status, job_id=self.ctx.job_id, success=success,
                    validators=validators if success else None, error=outcome.error,
                )
            except Exception:
                log.exception("could not record the state of fetch source %s", source.name)


async def run_fetch(ctx: JobContext) -> None:
    """The ``fetch`` kind's run function."""
    params = FetchParams.parse(ctx.params)
    config: FetchConfig | None = ctx.settings.section("fetch")
    if config is None or not config.sources:
        raise JobFailed("no fetch sources are configured: add [[fetch.sources]] to the "
                        "config file")
    log.debug("fetch job %d (trigger %s): %d sources", ctx.job_id, params.trigger,
              len(config.sources))
    outcomes = {source.name: SourceOutcome(source.name) for source in config.sources}
    progress = Progress(ctx, outcomes)
    ctx.set_result(build_result(outcomes))
    try:
        async with open_client(concurrency=config.concurrency,
                               user_agent=config.user_agent) as client:
            run = FetchRun(ctx, config, client, trio.CapacityLimiter(config.concurrency),
                           outcomes, progress)
            async with trio.open_nursery() as nursery:
                for source in config.sources:
                    nursery.start_soon(run.fetch_source, source, name=f"fetch:{source.name}")
    finally:
        # Runs on cancel and timeout too (no await here): the result must say which
        # sources finished and which were cut off.
        for outcome in outcomes.values():
            if outcome.outcome in ("pending", "running"):
                outcome.outcome = "interrupted"
        ctx.set_result(build_result(outcomes))
        progress.report(force=True)
    failed = [outcome for outcome in outcomes.values() if outcome.outcome == "error"]
    if len(failed) == len(outcomes):
        reasons = "; ".join(f"{outcome.name}: {outcome.error}" for outcome in failed[:5])
        more = f" (and {len(failed) - 5} more)" if len(failed) > 5 else ""
        raise JobFailed(f"all {len(failed)} sources failed: {reasons}{more}")
