"""Every error nurseryd raises on purpose, in one hierarchy.

Why one hierarchy: the HTTP layer maps errors to status codes in one table
(``http/errors.py``), the CLI prints start-up errors as one line, and a kind's
failure is told apart from a bug by its class, not by its message. A module
raises the most specific class here; nothing outside this module defines an
error that callers are expected to catch across a layer.

``str()`` of each is the sentence shown to the user: what is wrong and how to
fix it. None of them carries a secret.
"""

from __future__ import annotations

from typing import Any


class NurserydError(Exception):
    """Base of every error raised on purpose."""


# -- configuration and start-up --------------------------------------------------------


class ConfigError(NurserydError, ValueError):
    """A configuration value is wrong. ``str()`` is the one line shown to the operator."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config error: {key}: {message}")
        self.key = key


class StartupError(NurserydError, RuntimeError):
    """A start-up check failed; ``str()`` is the one line shown to the operator."""


# -- job input and outcome --------------------------------------------------------------


class ParamError(NurserydError, ValueError):
    """A job parameter is invalid; the HTTP layer answers 422 naming ``field``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class JobFailed(NurserydError):
    """Raised by a kind to fail its job with a clear, user-facing reason."""


class LostClaim(NurserydError):
    """A write of a running job matched no row: this attempt no longer owns the job.

    Raised inside a kind's own transaction (which then rolls back), so a writer
    that lost its claim changes nothing; the supervisor stops the attempt.
    """

    def __init__(self, job_id: int) -> None:
        super().__init__(f"job {job_id}: this attempt no longer holds the job")
        self.job_id = job_id


# -- supervisor: intake and cancellation -------------------------------------------------


class SupervisorError(NurserydError):
    """Base of the errors ``submit`` and ``cancel`` raise for the HTTP layer to map."""


class UnknownKind(SupervisorError):
    def __init__(self, kind: str, known: list[str]) -> None:
        super().__init__(f"unknown job kind {kind!r}; known kinds: {', '.join(known)}")
        self.kind = kind
        self.known = known


class Draining(SupervisorError):
    def __init__(self) -> None:
        super().__init__("the daemon is shutting down and accepts no new jobs; retry shortly")


class QueueFull(SupervisorError):
    def __init__(self, size: int) -> None:
        super().__init__(f"{size} jobs are already waiting to start; retry shortly")
        self.size = size


class JobConflict(SupervisorError):
    def __init__(self, kind: str) -> None:
        super().__init__(f"a {kind} job is already active")
        self.kind = kind


class JobNotFound(SupervisorError):
    def __init__(self, job_id: int) -> None:
        super().__init__(f"no job with id {job_id}")
        self.job_id = job_id


class JobAlreadyFinished(SupervisorError):
    def __init__(self, job: dict[str, Any]) -> None:
        super().__init__(f"job {job['id']} already ended with status {job['status']!r}")
        self.job = job


class JobNotRetryable(SupervisorError):
    """``POST /jobs/{id}/retry`` for a job that cannot run again (409): it is not
    failed, cancelled or timed out, or what it needs is gone (its upload)."""

    def __init__(self, job: dict[str, Any], reason: str) -> None:
        super().__init__(f"job {job['id']} cannot be retried: {reason}")
        self.job = job
        self.reason = reason


class DatabaseUnavailable(SupervisorError):
    """PostgreSQL did not answer in time; the request may be retried (503)."""

    def __init__(self, what: str) -> None:
        super().__init__(f"the database did not answer in time ({what}); retry shortly")
        self.what = what


# -- access: who may call, from where, with what body ------------------------------------


class AccessRefused(NurserydError):
    """A request refused before any handler ran (``http/access.py``).

    ``str()`` says what to send instead; it never names a configured token, source
    or kind, because the caller may not have proven who it is yet.
    """


class NotAuthenticated(AccessRefused):
    """No token, or one that matches none configured (401 with ``WWW-Authenticate``)."""

    def __init__(self, message: str, *, wrong_token: bool = False) -> None:
        super().__init__(message)
        self.wrong_token = wrong_token


class NotPermitted(AccessRefused):
    """The caller is known but its role does not allow this (403)."""


class CrossSiteRefused(AccessRefused):
    """A browser request from another site (``Origin``, ``Sec-Fetch-Site``): 403."""


class HostNotAllowed(AccessRefused):
    """The ``Host`` header names a host this daemon does not answer for (421)."""


class BodyTypeRefused(AccessRefused):
    """A body whose ``Content-Type`` the endpoint does not take (415)."""


def describe_failure(error: BaseException) -> str:
    """The text a job's ``error`` shows for what its kind raised.

    A kind that runs tasks raises through their nursery, which wraps the error
    in an exception group whose own text ("Exceptions from Trio nursery (1
    sub-exception)") says nothing: the leaves' texts are what the operator needs.
    """
    if isinstance(error, BaseExceptionGroup):
        return "; ".join(describe_failure(each) for each in error.exceptions)
    return str(error) or type(error).__name__
