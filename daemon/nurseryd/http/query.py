"""Reading query-string parameters with errors a client can act on."""

from __future__ import annotations

from typing import overload

from quart import request

from ..lifecycle import Status
from .problems import Problem


@overload
def int_arg(name: str, default: int, low: int, high: int) -> int: ...
@overload
def int_arg(name: str, default: None, low: int, high: int) -> int | None: ...
def int_arg(name: str, default: int | None, low: int, high: int) -> int | None:
    """``?name=N`` as an int within [low, high]; absent or empty gives ``default``."""
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise Problem(422, f"{name} must be a whole number, got {raw!r}", field=name) from None
    if not low <= value <= high:
        raise Problem(422, f"{name} must be between {low} and {high}", field=name)
    return value


def status_args() -> list[str]:
    """``?status=queued,running`` as the statuses it names (none: every status);
    a name that is no status is a 422 listing the ones there are."""
    statuses = [value for value in request.args.get("status", "").split(",") if value]
    allowed = {status.value for status in Status}
    for status in statuses:
        if status not in allowed:
            raise Problem(422, f"unknown status {status!r}; use one or more of "
                          f"{', '.join(sorted(allowed))}, comma-separated", field="status")
    return statuses
