"""The supervisor package: see :mod:`.core` for the picture.

``Supervisor`` composes :mod:`.intake`, :mod:`.runner`, :mod:`.drain` and
:mod:`.watchers`; :mod:`.handle` is what a held job looks like; :mod:`.stats`
the snapshot it reports.
"""

from ..errors import (
    Draining,
    JobAlreadyFinished,
    JobConflict,
    JobNotFound,
    QueueFull,
    SupervisorError,
    UnknownKind,
)
from .core import BACKLOG_PAGE, PROGRESS_INTERVAL_S, REMOTE_CANCEL_POLL_S, Supervisor
from .handle import JobHandle, RunningJob
from .runner import STATUS_WRITE_TIMEOUT_S
from .stats import SupervisorStatistics

__all__ = [
    "BACKLOG_PAGE", "PROGRESS_INTERVAL_S", "REMOTE_CANCEL_POLL_S", "STATUS_WRITE_TIMEOUT_S",
    "Draining", "JobAlreadyFinished", "JobConflict", "JobHandle", "JobNotFound", "QueueFull",
    "RunningJob", "Supervisor", "SupervisorError", "SupervisorStatistics", "UnknownKind",
]
