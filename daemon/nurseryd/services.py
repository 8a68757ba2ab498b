"""The handful of long-lived objects that HTTP handlers and background tasks share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Settings
    from .db import Database
    from .kinds.base import KindRegistry
    from .supervisor import Supervisor


@dataclass
class Services:
    settings: Settings
    db: Database
    kinds: KindRegistry
    supervisor: Supervisor
