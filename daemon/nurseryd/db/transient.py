"""Which database errors say "not now" rather than "never": the one home of that rule.

A job whose connection dropped, whose server restarted or refused connections for
a moment, or whose transaction lost a serialization race would succeed if run
again; a job whose SQL is wrong, or whose data violates a constraint, would fail
the same way every time. The supervisor requeues the first kind (with back-off, up
to the kind's ``max_attempts``) and fails the second; the database migration
source reconnects on the first kind. Both ask :func:`is_transient`.
"""

from __future__ import annotations

import asyncpg
import trio

from ..errors import DatabaseUnavailable, JobFailed

#: Connection loss (class 08, which includes asyncpg's ConnectionDoesNotExistError),
#: the server going down or not yet up (57P01-57P03), too many connections (53300),
#: and a transaction a concurrent one made fail (class 40: serialization, deadlock).
_TRANSIENT: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.TransactionRollbackError,
    # The connection's protocol is in a broken state: seen when the pool hands out
    # a connection whose server just sent "terminating connection" and whose loss
    # asyncpg has not processed yet ("cannot switch to state 15; another operation
    # (2) is in progress"). A fresh connection on the next attempt is the cure.
    asyncpg.InternalClientError,
    DatabaseUnavailable,  # no free pooled connection in time
    OSError,  # sockets, and TimeoutError (an asyncpg connect or command timeout)
    trio.TooSlowError,
)


#: Everything talking to a server can raise that is about the server or the
#: connection, not about our code: what a probe (is the lock's connection alive?
#: can we connect?) treats as "no". Includes the permanent ones (a wrong password
#: is still a "no" for a probe).
CONNECTION_ERRORS: tuple[type[Exception], ...] = (
    OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError,
)


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` (or the error it was raised from or while handling) is worth
    another attempt.

    A :class:`~nurseryd.errors.JobFailed` is a kind's own verdict and never
    transient, whatever caused it. A group (a kind's nursery) is transient when
    everything in it is. A cancelled statement (57014) is not transient
    either: someone meant it.
    """
    if isinstance(error, BaseExceptionGroup):  # a kind's nursery wraps what it raised
        return all(is_transient(each) for each in error.exceptions)
    seen = 0
    current: BaseException | None = error
    while current is not None and seen < 5:
        if isinstance(current, JobFailed):
            return False
        if isinstance(current, _TRANSIENT):
            return True
        if isinstance(current, asyncpg.InterfaceError) and "closed" in str(current):
            return True  # "connection is closed", "... was closed in the middle of operation"
        # The error it was raised from, or, failing that, the one being handled when
        # it was raised: a transaction's rollback on a connection that just died
        # raises "cannot switch to state ...; another operation is in progress",
        # whose context is the connection loss.
        current = current.__cause__ or current.__context__
        seen += 1
    return False

