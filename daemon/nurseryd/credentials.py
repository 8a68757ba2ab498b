"""Who may call the API: roles, named bearer tokens and the allow-lists of ``[access]``.

Why tokens are named: a job records the name of the token that submitted it
(``submitted_by``) and the one that cancelled it (``cancelled_by``), and log lines
say it, so "who did this?" has an answer without a secret ever being shown.

Why secrets never sit in the file: a TOML file is copied, diffed and pasted into
tickets. A token's secret comes from the environment (``secret = "env:NAME"``,
read at start) or is stored only as its SHA-256 (``sha256 = "…"``). Either way the
daemon keeps only the digest, and compares the digest of what a caller presents
against every configured one with :func:`hmac.compare_digest`, so neither the
answer nor its timing tells how much of a guess was right.

Example::

    [access]
    allowed_hosts = ["nurseryd.internal"]         # Host names besides loopback ones
    allowed_origins = ["https://ops.example.com"]  # browser origins besides same-origin

    [[access.tokens]]
    name = "deploy"
    role = "admin"
    secret = "env:NURSERYD_DEPLOY_TOKEN"

    [[access.tokens]]
    name = "grafana"
    role = "read"
    sha256 = "<64 hex digits: printf %s "$TOKEN" | sha256sum>"

``NURSERYD_API_TOKEN`` (an admin token named ``api``) and ``NURSERYD_READ_TOKEN``
(a read token named ``read``) add a token without a file.

Protected mode (as Redis has it): with no token configured, only loopback
callers are served, so a daemon bound to a non-loopback address without a token
is refused at start (:func:`parse_access` raises). Pure: no I/O besides reading
the environment it is handed.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import hmac
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError


class Role(enum.StrEnum):
    """``admin`` may do everything; ``read`` may only read (GET and HEAD)."""

    ADMIN = "admin"
    READ = "read"


@dataclass(frozen=True)
class Principal:
    """Who a request acts for, once access has been decided."""

    #: A token's configured name, or :data:`LOCAL_NAME` for protected mode.
    name: str
    role: Role
    #: ``token`` (Authorization header), ``cookie`` (a dashboard session, ``http/sessions.py``),
    #: ``loopback`` (protected mode: no token configured, a loopback caller).
    via: str = "token"

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN


#: The name recorded for what a loopback caller does while no token is configured.
LOCAL_NAME = "local"
LOCAL = Principal(LOCAL_NAME, Role.ADMIN, via="loopback")


@dataclass(frozen=True)
class ApiToken:
    """A configured token: its name, role and the SHA-256 of its secret (never the secret)."""

    name: str
    role: Role
    digest: bytes = field(repr=False)

    @property
    def principal(self) -> Principal:
        return Principal(self.name, self.role)


def digest_of(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


@dataclass(frozen=True)
class AccessSettings:
    """The parsed ``[access]`` table plus the environment shortcuts."""

    tokens: tuple[ApiToken, ...] = ()
    #: Host names (lower case, no port) accepted besides loopback names and IP literals.
    allowed_hosts: frozenset[str] = frozenset()
    #: Origins (``scheme://host[:port]``) accepted besides the request's own.
    allowed_origins: frozenset[str] = frozenset()

    @property
    def protected_mode(self) -> bool:
        """No token configured: only loopback callers are served."""
        return not self.tokens

    def identify(self, presented: str) -> ApiToken | None:
        """The token whose secret is ``presented``, compared in constant time.

        Every configured digest is compared (no early exit), so the time taken
        does not tell which token, or whether any, came close.
        """
        given = digest_of(presented)
        found: ApiToken | None = None
        for token in self.tokens:
            if hmac.compare_digest(given, token.digest):
                found = token
        return found


# -- parsing ---------------------------------------------------------------------------------

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ENV = re.compile(r"^env:([A-Za-z_][A-Za-z0-9_]*)$")
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_LABEL = r"[a-z0-9_][a-z0-9_-]{0,62}"
_HOST_NAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")
#: Shorter secrets are refused: a token is a password nobody types, so make it long.
MIN_SECRET_CHARS = 16
ENV_SHORTCUTS = (("NURSERYD_API_TOKEN", "api", Role.ADMIN),
                 ("NURSERYD_READ_TOKEN", "read", Role.READ))
_ACCESS_KEYS = {"tokens", "allowed_hosts", "allowed_origins"}
_TOKEN_KEYS = {"name", "role", "secret", "sha256"}


def _check_secret(key: str, secret: str) -> str:
    if secret != secret.strip() or any(not char.isprintable() or char.isspace()
                                       for char in secret):
        raise ConfigError(key, "the token must not contain spaces or control characters")
    if len(secret) < MIN_SECRET_CHARS:
        raise ConfigError(key, f"the token is shorter than {MIN_SECRET_CHARS} characters; "
                          "generate one with: python3 -c 'import secrets; "
                          "print(secrets.token_urlsafe(32))'")
    return secret


def _parse_token(where: str, raw: Any) -> ApiToken:
    if not isinstance(raw, dict):
        raise ConfigError(where, "expected a table with name, role and secret or sha256")
    _check_keys(where, raw, _TOKEN_KEYS)
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name) or name == LOCAL_NAME:
        raise ConfigError(f"{where}.name", "expected a name of letters, digits, '_', '.', '-' "
                          f"(at most 64; {LOCAL_NAME!r} is reserved)")
    role = raw.get("role")
    if role not in {r.value for r in Role}:
        raise ConfigError(f"{where}.role", f"expected \"admin\" or \"read\", got {role!r}")
    secret, hashed = raw.get("secret"), raw.get("sha256")
    if (secret is None) == (hashed is None):
        raise ConfigError(where, "set exactly one of secret = \"env:VARIABLE\" or "
                          "sha256 = \"<hex digest of the token>\"")
    if hashed is not None:
        if not isinstance(hashed, str) or not _SHA256.match(hashed):
            raise ConfigError(f"{where}.sha256", "expected 64 hex digits (sha256sum of the "
                              "token, without a newline)")
        return ApiToken(name, Role(role), bytes.fromhex(hashed))
    match = _ENV.match(secret) if isinstance(secret, str) else None
    if match is None:
        raise ConfigError(f"{where}.secret", "expected \"env:VARIABLE\": the secret itself "
                          "never goes into the file (or store its sha256 instead)")
    value = os.environ.get(match.group(1))  # like every env: reference, read at start
    if not value:
        raise ConfigError(f"{where}.secret", f"environment variable {match.group(1)} is not "
                          "set (the token is read from it at start)")
    return ApiToken(name, Role(role), digest_of(_check_secret(f"{where}.secret", value)))


def _check_keys(where: str, table: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}",
                          f"unknown key; allowed: {', '.join(sorted(allowed))}")


def _string_list(key: str, raw: Any) -> list[str]:
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
        raise ConfigError(key, "expected a list of strings")
    return raw


@functools.lru_cache(maxsize=512)  # pure, and every request asks it of the same few Hosts
def normalize_host(value: str) -> str | None:
    """The host name of a ``Host`` header or allow-list entry: lower case, without
    port, brackets or trailing dot; ``None`` if it is not one."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        host, rest = value[1:end], value[end + 1:]
        if rest and not re.fullmatch(r":\d{1,5}", rest):
            return None
        return host if is_ip(host) else None
    host, colon, port = value.rpartition(":")
    if not colon or ":" in host:  # no port, or a bare IPv6 address
        host = value
    elif not re.fullmatch(r"\d{1,5}", port):
        return None
    host = host.rstrip(".")
    if is_ip(host) or _HOST_NAME.match(host):
        return host
    return None


@functools.lru_cache(maxsize=512)
def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_loopback_host(host: str) -> bool:
    """``localhost``, ``*.localhost`` (RFC 6761) and loopback IP addresses."""
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@functools.lru_cache(maxsize=512)
def normalize_origin(value: str) -> str | None:
    """``scheme://host[:port]`` in lower case, default ports dropped; ``None`` if the
    value is not such an origin (``null``, a path, userinfo)."""
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path \
            or parts.query or parts.fragment or "@" in parts.netloc:
        return None
    try:
        port = parts.port
    except ValueError:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    default = {"http": 80, "https": 443}[parts.scheme]
    return f"{parts.scheme}://{host}" + (f":{port}" if port and port != default else "")


def parse_access(raw: Any, environ: Mapping[str, str], *, bind_host: str) -> AccessSettings:
    """``[access]`` plus ``NURSERYD_API_TOKEN`` / ``NURSERYD_READ_TOKEN``.

    Refuses (one line naming what to set) a non-loopback ``bind_host`` when no
    token is configured: protected mode serves loopback callers only, so such a
    daemon would either be open to the network or answer nobody.
    """
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError("access", "expected an [access] table")
    _check_keys("access", raw, _ACCESS_KEYS)
    tokens: list[ApiToken] = []
    tables = raw.get("tokens", [])
    if not isinstance(tables, list):
        raise ConfigError("access.tokens", "expected [[access.tokens]] tables")
    for index, table in enumerate(tables):
        tokens.append(_parse_token(f"access.tokens[{index}]", table))
    for variable, name, role in ENV_SHORTCUTS:
        if environ.get(variable):
            tokens.append(ApiToken(name, role, digest_of(_check_secret(variable,
                                                                       environ[variable]))))
    names = [token.name for token in tokens]
    duplicate = next((name for name in names if names.count(name) > 1), None)
    if duplicate is not None:
        raise ConfigError("access.tokens", f"two tokens are named {duplicate!r} (names are "
                          "what jobs record; NURSERYD_API_TOKEN is 'api', "
                          "NURSERYD_READ_TOKEN is 'read')")
    digests = [token.digest for token in tokens]
    if len(set(digests)) != len(digests):
        raise ConfigError("access.tokens", "two tokens have the same secret; give each "
                          "caller its own")
    hosts = set()
    for index, entry in enumerate(_string_list("access.allowed_hosts", raw.get("allowed_hosts"))):
        host = normalize_host(entry)
        if host is None:
            raise ConfigError(f"access.allowed_hosts[{index}]",
                              f"expected a host name such as nurseryd.internal, got {entry!r}")
        hosts.add(host)
    origins = set()
    for index, entry in enumerate(_string_list("access.allowed_origins",
                                               raw.get("allowed_origins"))):
        origin = normalize_origin(entry)
        if origin is None:
            raise ConfigError(f"access.allowed_origins[{index}]", "expected an origin such as "
                              f"https://ops.example.com (no path), got {entry!r}")
        origins.add(origin)
    if not tokens and not is_loopback_host(bind_host):
        raise ConfigError("bind", f"{bind_host} is not a loopback address and no API token "
                          "is configured: set NURSERYD_API_TOKEN (or [[access.tokens]]), or "
                          "bind 127.0.0.1")
    return AccessSettings(tuple(tokens), frozenset(hosts), frozenset(origins))
