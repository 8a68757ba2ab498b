"""The access decision and the [access] parsing, with plain values (no daemon, no I/O)."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from nurseryd.config import load_settings
from nurseryd.credentials import (
    LOCAL,
    AccessSettings,
    Role,
    is_loopback_host,
    normalize_host,
    normalize_origin,
    parse_access,
)
from nurseryd.errors import (
    BodyTypeRefused,
    ConfigError,
    CrossSiteRefused,
    HostNotAllowed,
    NotAuthenticated,
    NotPermitted,
)
from nurseryd.features import FEATURES
from nurseryd.http.access_policy import (
    MULTIPART,
    RequestFacts,
    RouteAccess,
    RouteRules,
    Verdict,
    decide,
)

ADMIN_SECRET = "admin-secret-0123456789"
READ_SECRET = "read-secret-0123456789"
API = RouteRules()
UPLOAD = RouteRules(body_type=MULTIPART)


def tokens() -> AccessSettings:
    return parse_access({"tokens": [
        {"name": "ops", "role": "admin", "secret": "env:T_ADMIN"},
        {"name": "grafana", "role": "read",
         "sha256": hashlib.sha256(READ_SECRET.encode()).hexdigest()},
    ], "allowed_hosts": ["nurseryd.internal"], "allowed_origins": ["https://ops.example.com"]},
        {}, bind_host="0.0.0.0")


@pytest.fixture
def configured(monkeypatch: pytest.MonkeyPatch) -> AccessSettings:
    monkeypatch.setenv("T_ADMIN", ADMIN_SECRET)
    return tokens()


PROTECTED = AccessSettings()


def facts(method: str = "GET", **more: Any) -> RequestFacts:
    more.setdefault("host", "127.0.0.1:8084")
    return RequestFacts(method=method, **more)


def refused(verdict: Verdict) -> type | None:
    return None if verdict.refused is None else type(verdict.refused)


# -- protected mode ------------------------------------------------------------------------


def test_protected_mode_serves_loopback_as_local_and_nobody_else() -> None:
    assert decide(facts(from_loopback=True), API, PROTECTED).principal is LOCAL
    assert refused(decide(facts(from_loopback=False), API, PROTECTED)) is NotAuthenticated
    # A token sent while none is configured changes nothing for a loopback caller.
    sent = facts("POST", from_loopback=True, authorization="Bearer whatever")
    assert decide(sent, API, PROTECTED).principal is LOCAL


def test_the_checks_still_apply_in_protected_mode() -> None:
    local = {"from_loopback": True}
    assert refused(decide(facts("POST", host="evil.example", **local), API, PROTECTED)) \
        is HostNotAllowed
    assert refused(decide(facts("POST", origin="https://evil.example", **local), API,
                          PROTECTED)) is CrossSiteRefused
    assert refused(decide(facts("POST", fetch_site="cross-site", **local), API, PROTECTED)) \
        is CrossSiteRefused
    text = facts("POST", content_type="text/plain", has_body=True, **local)
    assert refused(decide(text, API, PROTECTED)) is BodyTypeRefused
    form = facts("POST", content_type="application/x-www-form-urlencoded", has_body=True,
                 **local)
    assert refused(decide(form, API, PROTECTED)) is BodyTypeRefused
    json_body = facts("POST", content_type="application/json; charset=utf-8", has_body=True,
                      **local)
    assert decide(json_body, API, PROTECTED).principal is LOCAL


# -- tokens ---------------------------------------------------------------------------------


def test_tokens_are_required_from_every_caller_once_configured(
        configured: AccessSettings) -> None:
    verdict = decide(facts(from_loopback=True), API, configured)
    assert refused(verdict) is NotAuthenticated
    assert isinstance(verdict.refused, NotAuthenticated) and not verdict.refused.wrong_token
    wrong = decide(facts(authorization="Bearer nope-nope-nope-nope"), API, configured)
    assert isinstance(wrong.refused, NotAuthenticated) and wrong.refused.wrong_token
    basic = decide(facts(authorization=f"Basic {ADMIN_SECRET}"), API, configured)
    assert refused(basic) is NotAuthenticated
    admin = decide(facts("POST", authorization=f"Bearer {ADMIN_SECRET}"), API, configured)
    assert admin.principal is not None and (admin.principal.name, admin.principal.role) == (
        "ops", Role.ADMIN)
    read = decide(facts(authorization=f"bearer {READ_SECRET}"), API, configured)
    assert read.principal is not None and read.principal.name == "grafana"


def test_a_read_token_may_only_read(configured: AccessSettings) -> None:
    bearer = f"Bearer {READ_SECRET}"
    for method in ("GET", "HEAD", "OPTIONS"):
        assert decide(facts(method, authorization=bearer), API, configured).principal
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        assert refused(decide(facts(method, authorization=bearer), API, configured)) \
            is NotPermitted


def test_public_routes_need_nothing_and_metrics_its_own_token(
        configured: AccessSettings) -> None:
    public = RouteRules(RouteAccess.PUBLIC)
    anyone = facts(host="10.0.0.7:8084", origin="https://evil.example")
    assert decide(anyone, public, configured) == Verdict()
    metrics = RouteRules(RouteAccess.METRICS)
    assert decide(facts(), metrics, configured, metrics_token_set=True) == Verdict()
    assert refused(decide(facts(), metrics, configured)) is NotAuthenticated
    assert decide(facts(authorization=f"Bearer {READ_SECRET}"), metrics, configured).principal


# -- Host and cross-site ----------------------------------------------------------------------


@pytest.mark.parametrize(("host", "allowed"), [
    ("127.0.0.1:8084", True), ("localhost:8084", True), ("LOCALHOST", True),
    ("app.localhost:1", True), ("[::1]:8084", True), ("10.1.2.3:8084", True),
    ("nurseryd.internal", True), ("nurseryd.internal.:8084", True),
    ("evil.example", False), ("x", False), ("nurseryd.internal.evil.example", False),
    ("127.0.0.1.nip.io", False), ("", False), ("a b", False), ("[zz]:1", False),
])
def test_host_allow_list(configured: AccessSettings, host: str, allowed: bool) -> None:
    verdict = decide(facts(host=host, authorization=f"Bearer {ADMIN_SECRET}"), API, configured)
    assert (refused(verdict) is None) is allowed, verdict


@pytest.mark.parametrize(("origin", "host", "allowed"), [
    (None, "127.0.0.1:8084", True),
    ("http://127.0.0.1:8084", "127.0.0.1:8084", True),  # same origin
    ("http://localhost", "localhost:80", True),
    ("https://ops.example.com", "127.0.0.1:8084", True),  # allowed_origins
    ("https://ops.example.com:443", "127.0.0.1:8084", True),
    ("http://127.0.0.1:9999", "127.0.0.1:8084", False),  # another port is another origin
    ("https://evil.example", "127.0.0.1:8084", False),
    ("null", "127.0.0.1:8084", False),
    ("http://127.0.0.1:8084", None, False),
])
def test_origin_check(configured: AccessSettings, origin: str | None, host: str | None,
                      allowed: bool) -> None:
    verdict = decide(facts("POST", origin=origin, host=host,
                           authorization=f"Bearer {ADMIN_SECRET}"), API, configured)
    assert (refused(verdict) is None) is allowed, verdict


def test_bodies_without_a_content_type_and_uploads_are_left_to_their_handlers() -> None:
    bare = facts("POST", has_body=True, from_loopback=True)
    assert decide(bare, API, PROTECTED).principal is LOCAL
    upload = facts("POST", has_body=True, content_type="multipart/form-data; boundary=x",
                   from_loopback=True)
    assert decide(upload, UPLOAD, PROTECTED).principal is LOCAL
    assert refused(decide(upload, API, PROTECTED)) is BodyTypeRefused


def test_a_session_must_prove_a_write_comes_from_this_site(configured: AccessSettings) -> None:
    """The dashboard's cookie session, decided by the same function: reads are fine,
    a write needs a same-origin Origin or Sec-Fetch-Site, never just a missing Origin."""
    session = tokens().tokens[0].principal
    assert decide(facts(session=session), API, configured).principal == session
    assert refused(decide(facts("POST", session=session), API, configured)) is CrossSiteRefused
    same = facts("POST", session=session, origin="http://127.0.0.1:8084")
    assert decide(same, API, configured).principal == session
    fetch_site = facts("POST", session=session, fetch_site="same-origin")
    assert decide(fetch_site, API, configured).principal == session


SIGN_IN = RouteRules(RouteAccess.SIGN_IN)


def test_sign_in_routes_need_no_credential_but_keep_the_host_and_origin_checks(
        configured: AccessSettings) -> None:
    """The dashboard's page and ``POST /session`` are how a browser gets a session,
    so they cannot ask for one; a rebinding Host or a foreign page still gets nothing
    (not even a session planted with the attacker's own token)."""
    served = decide(facts("POST", content_type="application/x-www-form-urlencoded",
                          has_body=True), SIGN_IN, configured)
    assert served.refused is None and served.principal is None
    assert refused(decide(facts(host="evil.example"), SIGN_IN, configured)) is HostNotAllowed
    foreign = facts("POST", origin="https://evil.example")
    assert refused(decide(foreign, SIGN_IN, configured)) is CrossSiteRefused
    linked = facts(fetch_site="cross-site")
    assert refused(decide(linked, SIGN_IN, PROTECTED)) is CrossSiteRefused


# -- parsing ------------------------------------------------------------------------------------


def test_environment_shortcuts_name_their_tokens() -> None:
    access = parse_access(None, {"NURSERYD_API_TOKEN": ADMIN_SECRET,
                                 "NURSERYD_READ_TOKEN": READ_SECRET}, bind_host="0.0.0.0")
    assert [(t.name, t.role) for t in access.tokens] == [("api", Role.ADMIN),
                                                         ("read", Role.READ)]
    assert access.identify(ADMIN_SECRET) is access.tokens[0]
    assert access.identify(ADMIN_SECRET + "x") is None
    assert ADMIN_SECRET not in repr(access)


@pytest.mark.parametrize(("raw", "key"), [
    ({"tokens": [{"name": "a", "role": "admin", "secret": "literal-secret-in-file"}]},
     "access.tokens[0].secret"),
    ({"tokens": [{"name": "a", "role": "admin", "secret": "env:T_UNSET_FOR_TEST"}]},
     "access.tokens[0].secret"),
    ({"tokens": [{"name": "a", "role": "root", "sha256": "0" * 64}]}, "access.tokens[0].role"),
    ({"tokens": [{"name": "local", "role": "read", "sha256": "0" * 64}]},
     "access.tokens[0].name"),
    ({"tokens": [{"name": "a", "role": "read", "sha256": "abc"}]}, "access.tokens[0].sha256"),
    ({"tokens": [{"name": "a", "role": "read"}]}, "access.tokens[0]"),
    ({"tokens": [{"name": "a", "role": "read", "sha256": "0" * 64},
                 {"name": "a", "role": "read", "sha256": "1" * 64}]}, "access.tokens"),
    ({"allowed_hosts": ["http://x.example/"]}, "access.allowed_hosts[0]"),
    ({"allowed_origins": ["https://x.example/path"]}, "access.allowed_origins[0]"),
    ({"allowd_hosts": []}, "access.allowd_hosts"),
])
def test_bad_access_tables_are_refused_naming_the_key(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_access(raw, {}, bind_host="127.0.0.1")
    assert error.value.key == key


def test_a_short_token_is_refused() -> None:
    with pytest.raises(ConfigError, match="shorter than"):
        parse_access(None, {"NURSERYD_API_TOKEN": "short"}, bind_host="127.0.0.1")


@pytest.mark.parametrize("bind", ["0.0.0.0:8084", "[::]:8084", "10.0.0.5:8084",
                                  "nurseryd.internal:8084"])
def test_a_public_bind_without_a_token_is_refused_in_one_line(bind: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(None, environ={"NURSERYD_BIND": bind}, features=FEATURES)
    message = str(error.value)
    assert "\n" not in message and "NURSERYD_API_TOKEN" in message and error.value.key == "bind"
    ok = load_settings(None, environ={"NURSERYD_BIND": bind, "NURSERYD_API_TOKEN": ADMIN_SECRET},
                       features=FEATURES)
    assert not ok.access.protected_mode


@pytest.mark.parametrize("bind", ["127.0.0.1:8084", "127.0.0.2:1", "[::1]:8084",
                                  "localhost:8084"])
def test_a_loopback_bind_needs_no_token(bind: str) -> None:
    assert load_settings(None, environ={"NURSERYD_BIND": bind},
                         features=FEATURES).access.protected_mode


def test_helpers() -> None:
    assert normalize_host("Example.COM.:80") == "example.com"
    assert normalize_host("[::1]") == "::1"
    assert normalize_origin("HTTPS://Ops.Example.com:443") == "https://ops.example.com"
    assert normalize_origin("http://user@x.example") is None
    assert is_loopback_host("127.9.9.9") and not is_loopback_host("0.0.0.0")
