"""Running the fetch kind without the supervisor: a JobContext over the real database.

Not a mock of the supervisor: the kind's contract *is* the JobContext protocol,
and this is a plain implementation of it that remembers what the kind reported,
so the kind's own behaviour (outcomes, counters, cancel) is tested at unit level.
"""

from __future__ import annotations

from typing import Any

from nurseryd.config import Settings
from nurseryd.db import Database
from nurseryd.kinds.fetch.config import parse_fetch_section
from tests.job_context import RecordingContext


class LocalJobContext(RecordingContext):
    """A fetch job's context: the recording context plus a look at one source's outcome."""

    def source(self, name: str) -> dict[str, Any]:
        return self.result["sources"][name]


def fetch_settings(sources: list[dict[str, Any]], **fetch: Any) -> Settings:
    """Settings whose [fetch] section is parsed by the real validator."""
    raw = {"retries": 3, "backoff_s": 0.01, "backoff_max_s": 0.05, **fetch, "sources": sources}
    return Settings(sections={"fetch": parse_fetch_section(raw, {"fetch": raw})})


def context(db: Database, sources: list[dict[str, Any]], **fetch: Any) -> LocalJobContext:
    return LocalJobContext(db=db, settings=fetch_settings(sources, **fetch), kind="fetch",
                           params={"trigger": "api"})
