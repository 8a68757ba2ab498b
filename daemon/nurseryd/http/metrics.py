"""``GET /metrics`` (Prometheus text format) and the HTTP request metrics.

Every answered request is counted by its URL rule template (``/jobs/<job_id>``,
never the raw path) or ``unmatched`` (404 and 405 for no route), its method
(``other`` for anything non-standard) and status; its duration goes into a
histogram by route. The hooks are the app's ``before_request`` /
``after_request``, which also see the answers of the error handlers.

``/metrics`` is open unless ``metrics_token`` is configured; then it wants
``Authorization: Bearer <token>`` (compared in constant time) and answers 401
otherwise.
"""

from __future__ import annotations

import hmac

import trio
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4
from quart import Blueprint, Response, g, request
from quart_trio import QuartTrio

from ..observe.metrics import Metrics
from .access import route_rules
from .access_policy import RouteAccess
from .context import get_services
from .problems import Problem

blueprint = Blueprint("metrics", __name__)

UNMATCHED = "unmatched"


@blueprint.get("/metrics")
@route_rules(RouteAccess.METRICS)
async def metrics() -> Response:
    services = get_services()
    token = services.settings.metrics_token
    if token is not None and not _bearer_matches(request.headers.get("Authorization"), token):
        raise Problem(401, "GET /metrics needs 'Authorization: Bearer <metrics_token>' (the "
                      "token is configured as metrics_token / NURSERYD_METRICS_TOKEN)",
                      headers={"WWW-Authenticate": 'Bearer realm="nurseryd metrics"'})
    body = await services.observability.render(services)
    return Response(body, content_type=CONTENT_TYPE_PLAIN_0_0_4)


def _bearer_matches(header: str | None, token: str) -> bool:
    scheme, _, given = (header or "").partition(" ")
    if scheme.lower() != "bearer":
        given = ""
    return hmac.compare_digest(given.strip().encode(), token.encode())


def install_request_metrics(app: QuartTrio, metrics: Metrics) -> None:
    """Count and time every request the app answers."""

    @app.before_request
    async def _started() -> None:
        g.nurseryd_started = trio.current_time()

    @app.after_request
    async def _answered(response: Response) -> Response:
        started = g.get("nurseryd_started")
        rule = request.url_rule
        route = rule.rule if rule is not None else UNMATCHED
        elapsed = 0.0 if started is None else trio.current_time() - started
        metrics.http_request(route, request.method, response.status_code, elapsed)
        return response
