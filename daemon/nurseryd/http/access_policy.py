"""The access decision as a pure function: request facts in, a verdict out.

Why pure: every rule about who may do what is in :func:`decide`, tested with
plain values (``tests/test_access_policy.py``), and ``access.py`` only gathers
the facts of a Quart request and acts on the verdict. The same function
decides for the dashboard's session cookie (HttpOnly, SameSite=Strict): the
middleware resolves the cookie to a :class:`~nurseryd.credentials.Principal` and
passes it as ``facts.session``; ambient credentials like a cookie are exactly
what cross-site request forgery abuses, so for them a write must also prove it
comes from this site (``Origin`` same-origin or allowed, or ``Sec-Fetch-Site:
same-origin``), while a bearer token, which no foreign page can attach, needs no
such proof.

The checks, in order, each with its answer:

1. public routes (``/healthz``, ``/readyz``): always served;
   sign-in routes (the dashboard's page, ``/session``) pass checks 2 and 3 only;
2. ``Host`` not a loopback name, an IP literal or in ``allowed_hosts``: 421
   (a DNS-rebinding page names its own host; an IP literal cannot be rebound);
3. ``Sec-Fetch-Site: cross-site``, or an ``Origin`` that is neither this
   request's own nor in ``allowed_origins``: 403;
4. credentials: a bearer token must match a configured one (401 otherwise); a
   session principal counts like a token; with no credential, protected mode
   (no token configured) serves loopback callers as :data:`~nurseryd.credentials.LOCAL`,
   anything else is 401;
5. a read principal on anything but GET/HEAD/OPTIONS: 403;
6. a body on a write to a JSON route with a ``Content-Type`` other than
   ``application/json``: 415 (upload routes check their own type, with a
   detail about form fields, in ``uploads.py``). Forms
   and ``text/plain`` are what a foreign page can send without a CORS preflight,
   so they are never taken as JSON. A body with no ``Content-Type`` at all is
   left to the handler's strict parser: no HTML form sends one, and the only way
   a page can (``fetch`` with a bare byte body) always carries an ``Origin``,
   which check 3 has already judged; scripts that omit the header keep working.

Authentication comes before the body check, so a caller without a token learns
nothing about routes, kinds or sources: every refusal reads the same.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..credentials import (
    LOCAL,
    AccessSettings,
    Principal,
    is_ip,
    normalize_host,
    normalize_origin,
)
from ..errors import (
    AccessRefused,
    BodyTypeRefused,
    CrossSiteRefused,
    HostNotAllowed,
    NotAuthenticated,
    NotPermitted,
)

JSON = "application/json"
MULTIPART = "multipart/form-data"
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class RouteAccess(enum.Enum):
    """What a route needs besides the Host and cross-site checks."""

    #: The API: a token (or protected-mode loopback).
    API = "api"
    #: Liveness and readiness: open to every caller (probes send no token).
    PUBLIC = "public"
    #: ``/metrics``: its own ``metrics_token`` when one is configured, else like API.
    METRICS = "metrics"
    #: The dashboard's page and its sign-in: the Host and cross-site checks, but no
    #: credential (they are where a browser gets one); the handler checks the body.
    SIGN_IN = "sign-in"


@dataclass(frozen=True)
class RequestFacts:
    """What the decision looks at, copied out of the request."""

    method: str
    host: str | None = None
    origin: str | None = None
    fetch_site: str | None = None
    authorization: str | None = None
    content_type: str | None = None
    has_body: bool = False
    #: The peer is a loopback address and no proxy header says it forwards someone else.
    from_loopback: bool = False
    #: The principal the dashboard's session cookie resolved to (``sessions.py``).
    session: Principal | None = None


@dataclass(frozen=True)
class RouteRules:
    access: RouteAccess = RouteAccess.API
    #: The media type of a body this route takes.
    body_type: str = JSON


@dataclass(frozen=True)
class Verdict:
    """``principal`` when served (``None`` on public routes), or ``refused``."""

    principal: Principal | None = None
    refused: AccessRefused | None = None


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def host_allowed(host: str | None, settings: AccessSettings) -> bool:
    """Loopback names, IP literals and ``allowed_hosts``; a request without a Host
    header (HTTP/1.0, not a browser) is not a rebinding attempt."""
    if host is None:
        return True
    name = normalize_host(host)
    if name is None:
        return False
    if name == "localhost" or name.endswith(".localhost") or name in settings.allowed_hosts:
        return True
    return is_ip(name)


def same_site(facts: RequestFacts, settings: AccessSettings) -> bool:
    """Is this not a cross-site request? A missing Origin is a non-browser client
    (browsers send one on every write)."""
    if (facts.fetch_site or "").strip().lower() == "cross-site":
        return False
    if facts.origin is None:
        return True
    return _origin_allowed(facts, settings)


def _origin_allowed(facts: RequestFacts, settings: AccessSettings) -> bool:
    origin = normalize_origin(facts.origin or "")
    if origin is None:  # "null", or garbage
        return False
    if origin in settings.allowed_origins:
        return True
    if facts.host is None:
        return False
    scheme, _, netloc = origin.partition("://")
    host = facts.host.strip().lower()
    default = {"http": ":80", "https": ":443"}[scheme]
    if host.endswith(default):
        host = host[: -len(default)]
    return netloc == host


def _bearer(header: str) -> str | None:
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _authenticate(facts: RequestFacts, settings: AccessSettings) -> Principal | AccessRefused:
    if facts.authorization is not None and not settings.protected_mode:
        token = _bearer(facts.authorization)
        found = settings.identify(token) if token is not None else None
        if found is None:
            return NotAuthenticated("the bearer token matches none configured; send "
                                    "'Authorization: Bearer <token>' with a valid token",
                                    wrong_token=True)
        return found.principal
    if facts.session is not None:
        if facts.method not in READ_METHODS and not _proven_same_origin(facts, settings):
            return CrossSiteRefused("a session may only write from this site: the request "
                                    "needs an Origin of this site or Sec-Fetch-Site: "
                                    "same-origin")
        return facts.session
    if settings.protected_mode and facts.from_loopback:
        return LOCAL
    if settings.protected_mode:
        return NotAuthenticated("no API token is configured, so only loopback callers are "
                                "served; configure a token and send 'Authorization: Bearer "
                                "<token>'")
    return NotAuthenticated("this endpoint needs 'Authorization: Bearer <token>'")


def _proven_same_origin(facts: RequestFacts, settings: AccessSettings) -> bool:
    """Stricter than :func:`same_site`: a missing Origin proves nothing."""
    if (facts.fetch_site or "").strip().lower() == "same-origin":
        return True
    return facts.origin is not None and _origin_allowed(facts, settings)


def decide(facts: RequestFacts, route: RouteRules, settings: AccessSettings, *,
           metrics_token_set: bool = False) -> Verdict:
    """Serve or refuse one request; see the module docstring for the order."""
    if route.access is RouteAccess.PUBLIC:
        return Verdict()
    if not host_allowed(facts.host, settings):
        return Verdict(refused=HostNotAllowed(
            "this daemon does not answer for that Host; use a loopback address or a name "
            "listed in [access] allowed_hosts"))
    if not same_site(facts, settings):
        return Verdict(refused=CrossSiteRefused(
            "cross-site requests are refused; call the API from a script or from an origin "
            "listed in [access] allowed_origins"))
    if route.access is RouteAccess.METRICS and metrics_token_set:
        return Verdict()  # /metrics checks its own token
    if route.access is RouteAccess.SIGN_IN:
        return Verdict()  # the page holds no data; POST /session checks the token itself
    who = _authenticate(facts, settings)
    if isinstance(who, AccessRefused):
        return Verdict(refused=who)
    if facts.method not in READ_METHODS and not who.is_admin:
        return Verdict(refused=NotPermitted(
            f"the token {who.name!r} has the role {who.role.value!r}, which may only read; "
            "this needs an admin token"))
    if route.body_type == JSON and facts.has_body and facts.method not in READ_METHODS \
            and facts.content_type is not None and media_type(facts.content_type) != JSON:
        return Verdict(refused=BodyTypeRefused(
            "send the body as Content-Type: application/json (curl: -H 'Content-Type: "
            "application/json')"))
    return Verdict(principal=who)
