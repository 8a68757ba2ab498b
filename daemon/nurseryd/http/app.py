"""The quart-trio application: the core ``/jobs`` routes, the features' blueprints,
and one error mapping for the whole API.

Handlers raise; ``errors.py`` decides what the client sees. Every error is
``application/problem+json``, including the ones Quart raises itself (unknown
route, wrong method, body too large), so no client ever has to parse HTML.

The features are handed in (``root`` passes them): this package never imports
``features.py``, which imports it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from quart import Blueprint
from quart_trio import QuartTrio

from ..services import Services
from .access import install_access, streamed_paths
from .bodies import bounded_request_class
from .context import EXTENSION_KEY
from .dashboard import blueprint as dashboard_blueprint
from .errors import install_error_handlers
from .jobs import blueprint as jobs_blueprint
from .metrics import blueprint as metrics_blueprint
from .metrics import install_request_metrics
from .openapi import blueprint as openapi_blueprint


class HasBlueprints(Protocol):
    """What the app factory needs of a feature."""

    @property
    def blueprints(self) -> tuple[Blueprint, ...]: ...


def create_app(services: Services, features: Iterable[HasBlueprints]) -> QuartTrio:
    app = QuartTrio("nurseryd", static_folder=None)  # no /static route: nothing to serve
    # No global cap: Quart's would refuse uploads by their Content-Length before
    # any handler runs. Bodies are capped where they are read (jobs.read_body for
    # JSON, uploads.py for files), and what a request may buffer unread is capped
    # by its route (bodies.py).
    app.config["MAX_CONTENT_LENGTH"] = None
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = True
    app.extensions[EXTENSION_KEY] = services
    app.register_blueprint(jobs_blueprint)
    app.register_blueprint(metrics_blueprint)
    app.register_blueprint(openapi_blueprint)
    app.register_blueprint(dashboard_blueprint)
    for feature in features:
        for blueprint in feature.blueprints:
            app.register_blueprint(blueprint)
    app.request_class = bounded_request_class(streamed_paths(app))
    install_error_handlers(app)
    install_request_metrics(app, services.observability.metrics)
    # After the metrics hook: refused requests are counted and timed too.
    install_access(app, services.settings)
    return app
