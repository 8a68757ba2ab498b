"""The handful of long-lived objects that HTTP handlers and background tasks share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Settings
    from .db import Database
    from .kinds.base import KindRegistry
    from .observe.events import EventHub
    from .observe.hub import Observability
    from .supervisor import Supervisor


@dataclass
class Services:
    settings: Settings
    db: Database
    kinds: KindRegistry
    supervisor: Supervisor
    #: Metrics, the job observer and the state gauges (``/metrics``).
    observability: Observability
    #: Where HTTP listens (``http://127.0.0.1:8084``), known once hypercorn is up.
    binds: list[str] = field(default_factory=list)
    #: The event hub behind ``GET /events``, set while it runs (a background task).
    events: EventHub | None = None
