"""The quart-trio application: the core ``/jobs`` routes, the features' blueprints,
and one error mapping for the whole API.

Handlers raise; this module decides what the client sees. Every error is
``application/problem+json``, including the ones Quart raises itself (unknown
route, wrong method, body too large), so no client ever has to parse HTML.

The features are handed in (``root`` passes them): this package never imports
``features.py``, which imports it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Protocol

from quart import Blueprint, Response
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from ..errors import (
    Draining,
    JobAlreadyFinished,
    JobConflict,
    JobNotFound,
    ParamError,
    QueueFull,
    UnknownKind,
)
from ..services import Services
from .context import EXTENSION_KEY
from .jobs import blueprint as jobs_blueprint
from .problems import Problem

log = logging.getLogger(__name__)


class HasBlueprints(Protocol):
    """What the app factory needs of a feature."""

    @property
    def blueprints(self) -> tuple[Blueprint, ...]: ...


def create_app(services: Services, features: Iterable[HasBlueprints]) -> QuartTrio:
    app = QuartTrio("nurseryd")
    # No global cap: Quart's would refuse uploads by their Content-Length before
    # any handler runs. Bodies are capped where they are read (jobs.read_body for
    # JSON, uploads.py for files).
    app.config["MAX_CONTENT_LENGTH"] = None
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = True
    app.extensions[EXTENSION_KEY] = services
    app.register_blueprint(jobs_blueprint)
    for feature in features:
        for blueprint in feature.blueprints:
            app.register_blueprint(blueprint)
    _register_error_handlers(app)
    return app


def _register_error_handlers(app: QuartTrio) -> None:
    @app.errorhandler(Problem)
    async def _problem(error: Problem) -> Response:
        return error.to_response()

    @app.errorhandler(ParamError)
    async def _param(error: ParamError) -> Response:
        return Problem(
            422, f"invalid parameter {error.field!r}: {error.message}",
            title="Invalid parameter", field=error.field,
            invalid_params=[{"name": error.field, "reason": error.message}],
        ).to_response()

    @app.errorhandler(UnknownKind)
    async def _unknown_kind(error: UnknownKind) -> Response:
        return Problem(404, str(error), known_kinds=error.known).to_response()

    @app.errorhandler(JobNotFound)
    async def _not_found(error: JobNotFound) -> Response:
        return Problem(404, f"{error}; list jobs with GET /jobs").to_response()

    @app.errorhandler(JobAlreadyFinished)
    async def _finished(error: JobAlreadyFinished) -> Response:
        return Problem(409, f"{error}; only queued or running jobs can be cancelled",
                       job=error.job).to_response()

    @app.errorhandler(JobConflict)
    async def _conflict(error: JobConflict) -> Response:
        return Problem(409, str(error)).to_response()

    @app.errorhandler(Draining)
    async def _draining(error: Draining) -> Response:
        return Problem(503, str(error), headers={"Retry-After": "5"}).to_response()

    @app.errorhandler(QueueFull)
    async def _full(error: QueueFull) -> Response:
        return Problem(503, str(error), headers={"Retry-After": "1"}).to_response()

    @app.errorhandler(HTTPException)
    async def _http(error: HTTPException) -> Response:
        status = error.code or 500
        detail = {
            404: "no such endpoint; see docs/api.md for the routes",
            405: "method not allowed on this endpoint; see docs/api.md",
            413: "request body too large",
        }.get(status, error.description or "")
        headers = {}
        if status == 405 and getattr(error, "valid_methods", None):
            headers["Allow"] = ", ".join(error.valid_methods)
        return Problem(status, detail, headers=headers).to_response()

    @app.errorhandler(Exception)
    async def _unexpected(error: Exception) -> Response:
        log.exception("unhandled error in a request", exc_info=error)
        return Problem(500, f"internal error: {type(error).__name__}: {error}").to_response()
