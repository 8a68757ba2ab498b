"""Which errors requeue a job and which fail it: the rule, with plain values.

The chaos tests (tests/test_chaos.py) show the rule at work against a restarted
PostgreSQL; this file pins down each case, including the ones a restart produces
only now and then.
"""

from __future__ import annotations

import asyncpg
import pytest
import trio

from nurseryd.db.transient import CONNECTION_ERRORS, is_transient
from nurseryd.errors import DatabaseUnavailable, JobFailed, describe_failure


def _raised_while_handling(first: BaseException, second: BaseException) -> BaseException:
    try:
        try:
            raise first
        except BaseException:
            raise second  # noqa: B904 - the implicit context is what is tested
    except BaseException as error:
        return error


@pytest.mark.parametrize("error", [
    ConnectionResetError("connection reset by peer"),
    FileNotFoundError(2, "No such file or directory"),  # the server's socket is gone
    TimeoutError(),
    trio.TooSlowError(),
    asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    asyncpg.AdminShutdownError("terminating connection due to administrator command"),
    asyncpg.CannotConnectNowError("the database system is shutting down"),
    asyncpg.TooManyConnectionsError("sorry, too many clients already"),
    asyncpg.SerializationError("could not serialize access"),
    asyncpg.DeadlockDetectedError("deadlock detected"),
    asyncpg.InternalClientError("cannot switch to state 15; another operation (2) is in "
                                "progress"),
    asyncpg.InterfaceError("connection is closed"),
    DatabaseUnavailable("no free connection within 5 s"),
])
def test_transient(error: BaseException) -> None:
    assert is_transient(error)


@pytest.mark.parametrize("error", [
    asyncpg.UndefinedColumnError('column "x" does not exist'),
    asyncpg.UniqueViolationError("duplicate key"),
    asyncpg.QueryCanceledError("canceling statement due to user request"),
    asyncpg.InterfaceError("cannot perform operation: another operation is in progress"),
    ValueError("bad data"),
    JobFailed("the source ended without a header row"),
])
def test_permanent(error: BaseException) -> None:
    assert not is_transient(error)


def test_the_cause_and_the_context_count_but_a_kinds_verdict_wins() -> None:
    lost = ConnectionResetError("reset")
    wrapped = RuntimeError("batch failed")
    wrapped.__cause__ = lost
    assert is_transient(wrapped)
    assert is_transient(_raised_while_handling(lost, RuntimeError("rollback failed")))
    verdict = JobFailed("target is no longer configured")
    verdict.__cause__ = lost
    assert not is_transient(verdict)


def test_a_group_is_transient_when_everything_in_it_is() -> None:
    reset = ConnectionResetError("reset")
    assert is_transient(ExceptionGroup("nursery", [reset, TimeoutError()]))
    assert not is_transient(ExceptionGroup("nursery", [reset, ValueError("bad")]))
    assert describe_failure(ExceptionGroup("nursery", [reset, ValueError("bad")])) == \
        "reset; bad"


def test_a_probe_treats_every_connection_error_as_no() -> None:
    for error in (asyncpg.InternalClientError("x"), asyncpg.InvalidPasswordError("x"),
                  ConnectionRefusedError(), asyncpg.InterfaceError("x")):
        assert isinstance(error, CONNECTION_ERRORS)
