"""The ``[fetch]`` section: schedule, limits and the sources, validated at start.

Why sources live only here: a fetch requests URLs, so the URLs must come from the
operator's file, never from an HTTP request (that would make the daemon an open
proxy into the network it runs in). Every mistake is reported as one
:class:`ConfigError` naming the dotted key (``fetch.sources[1].format``) and what
is allowed, before the daemon starts.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ...config import (
    BUILTIN_KIND_LIMITS,
    ConfigError,
    ConfigSection,
    check_keys,
    parse_duration,
    parse_positive_int,
)

FORMATS = ("json", "rss", "atom")
#: Normalised item fields a JSON source may map (``company`` is an alias of ``author``).
NORMALISED_FIELDS = ("title", "url", "published_at", "author", "summary")
FIELD_ALIASES = {"company": "author"}

_TOP_KEYS = {"interval", "run_at_start", "timeout_s", "concurrency", "retries", "backoff_s",
             "backoff_max_s", "max_bytes", "batch_size", "max_pages", "user_agent", "sources"}
_COMMON_SOURCE_KEYS = {"name", "url", "format", "timeout_s", "headers", "max_bytes",
                       "include", "exclude", "cross_origin_redirects"}
_JSON_SOURCE_KEYS = {"items", "id", "next", "max_pages", "fields"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KB": 1000, "KiB": 1024, "MB": 1000**2, "MiB": 1024**2,
               "GB": 1000**3, "GiB": 1024**3}

DEFAULT_TIMEOUT_S = 300.0
DEFAULT_SOURCE_TIMEOUT_S = 30.0
DEFAULT_MAX_BYTES = 10 * 1024**2
USER_AGENT = "nurseryd-fetch/0.1 (+https://github.com/nurseryd)"


@dataclass(frozen=True)
class HeaderValue:
    """A request header; ``env`` names an environment variable read at request time,
    so an API key never sits in the parsed settings (nor in a log of them)."""

    name: str
    literal: str | None = None
    env: str | None = None

    def resolve(self) -> str:
        if self.env is None:
            return self.literal or ""
        value = os.environ.get(self.env)
        if value is None:
            raise LookupError(f"environment variable {self.env} (header {self.name}) is not set")
        return value


@dataclass(frozen=True)
class SourceConfig:
    name: str
    url: str
    format: str
    timeout_s: float = DEFAULT_SOURCE_TIMEOUT_S
    max_bytes: int = DEFAULT_MAX_BYTES
    headers: tuple[HeaderValue, ...] = ()
    #: JSON only: dotted paths as tuples of segments (``()`` is the document itself).
    items: tuple[str, ...] = ()
    id: tuple[str, ...] = ("id",)
    next: tuple[str, ...] | None = None
    max_pages: int = 10
    fields: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: Lower-cased keywords matched against title and summary.
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    #: Follow redirects to other origins (without the configured headers); never
    #: https -> http either way.
    cross_origin_redirects: bool = False


@dataclass(frozen=True)
class FetchConfig:
    #: Seconds between scheduled fetches; 0 disables the schedule.
    interval_s: float = 0.0
    run_at_start: bool = False
    #: Budget of the whole fetch job (the job's cancel-scope deadline).
    timeout_s: float = DEFAULT_TIMEOUT_S
    #: Sources fetched at once; also what bounds memory.
    concurrency: int = 8
    #: Attempts per request (1 = no retry).
    retries: int = 3
    backoff_s: float = 0.5
    backoff_max_s: float = 30.0
    batch_size: int = 500
    user_agent: str = USER_AGENT
    sources: tuple[SourceConfig, ...] = ()


def parse_size(key: str, value: Any) -> int:
    """Bytes from ``1048576``, ``"512KiB"``, ``"10MB"``."""
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a size like 10485760 or '10MiB', got {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (match := _SIZE.match(value)):
        size = int(match.group(1)) * _SIZE_UNITS[match.group(2)]
    else:
        raise ConfigError(key, f"expected a size like 10485760 or '10MiB', got {value!r}")
    if size < 1024:
        raise ConfigError(key, f"must be at least 1024 bytes, got {value!r}")
    return size


def parse_dotted(key: str, value: Any, *, allow_root: bool = False) -> tuple[str, ...]:
    """``"data.jobs"`` -> ``("data", "jobs")``; ``""`` is the document root if allowed."""
    if not isinstance(value, str):
        raise ConfigError(key, f"expected a dotted path like 'data.items', got {value!r}")
    if value.strip() in ("", "."):
        if allow_root:
            return ()
        raise ConfigError(key, "expected a dotted path like 'data.items', got an empty one")
    parts = tuple(value.split("."))
    if any(not part for part in parts):
        raise ConfigError(key, f"empty segment in dotted path {value!r}")
    return parts


def _parse_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"expected true or false, got {value!r}")
    return value


def _parse_url(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, f"expected an http:// or https:// URL, got {value!r}")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(key, f"expected an http:// or https:// URL with a host, got {value!r}")
    return value


def _parse_keywords(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(key, "expected a list of non-empty keywords, e.g. ['python', 'remote']")
    return tuple(v.strip().lower() for v in value)


def _parse_headers(key: str, value: Any) -> tuple[HeaderValue, ...]:
    if not isinstance(value, dict):
        raise ConfigError(key, "expected a table such as { Authorization = \"env:TOKEN\" }")
    headers = []
    for name, raw in value.items():
        if not _HEADER_NAME.match(name):
            raise ConfigError(f"{key}.{name}", "not a valid HTTP header name")
        if not isinstance(raw, str) or "\r" in raw or "\n" in raw:
            raise ConfigError(f"{key}.{name}", "expected a one-line string, or 'env:VARIABLE'")
        if raw.startswith("env:"):
            env = raw[4:]
            if not _ENV_NAME.match(env):
                raise ConfigError(f"{key}.{name}", f"'env:' must name a variable, got {raw!r}")
            if env not in os.environ:
                raise ConfigError(f"{key}.{name}",
                                  f"environment variable {env} is not set (the header reads it)")
            headers.append(HeaderValue(name, env=env))
        else:
            headers.append(HeaderValue(name, literal=raw))
    return tuple(headers)


def _parse_fields(key: str, value: Any) -> dict[str, tuple[str, ...]]:
    if not isinstance(value, dict):
        raise ConfigError(key, "expected a table: normalised field = item field (dotted)")
    allowed = set(NORMALISED_FIELDS) | set(FIELD_ALIASES)
    fields: dict[str, tuple[str, ...]] = {}
    name: str  # TOML keys are strings
    for name, path in value.items():
        if name not in allowed:
            raise ConfigError(f"{key}.{name}",
                              f"unknown field; allowed: {', '.join(sorted(allowed))}")
        target = FIELD_ALIASES.get(name, name)
        if target in fields:
            raise ConfigError(f"{key}.{name}", f"maps {target!r} a second time (company = author)")
        fields[target] = parse_dotted(f"{key}.{name}", path)
    return fields


def parse_source(
    key: str, raw: Any, *, default_max_bytes: int = DEFAULT_MAX_BYTES, default_max_pages: int = 10
) -> SourceConfig:
    if not isinstance(raw, dict):
        raise ConfigError(key, "expected a table ([[fetch.sources]])")
    for required in ("name", "url", "format"):
        if required not in raw:
            raise ConfigError(f"{key}.{required}", "missing; every source needs name, url, format")
    name = raw["name"]
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{key}.name", "expected 1-64 letters, digits, '_', '-', '.'")
    fmt = raw["format"]
    if fmt not in FORMATS:
        raise ConfigError(f"{key}.format", f"expected one of {', '.join(FORMATS)}, got {fmt!r}")
    allowed = _COMMON_SOURCE_KEYS | (_JSON_SOURCE_KEYS if fmt == "json" else set())
    for json_only in sorted(_JSON_SOURCE_KEYS & set(raw)):
        if fmt != "json":
            raise ConfigError(f"{key}.{json_only}", "only for format = \"json\"; rss and atom "
                              "need no mapping")
    check_keys(key, raw, allowed)
    timeout = parse_duration(f"{key}.timeout_s", raw.get("timeout_s", DEFAULT_SOURCE_TIMEOUT_S))
    if timeout <= 0:
        raise ConfigError(f"{key}.timeout_s", "must be > 0")
    fields: dict[str, tuple[str, ...]] = {name: (name,) for name in NORMALISED_FIELDS}
    if "fields" in raw:
        fields.update(_parse_fields(f"{key}.fields", raw["fields"]))
    return SourceConfig(
        name=name,
        url=_parse_url(f"{key}.url", raw["url"]),
        format=fmt,
        timeout_s=timeout,
        max_bytes=parse_size(f"{key}.max_bytes", raw.get("max_bytes", default_max_bytes)),
        headers=_parse_headers(f"{key}.headers", raw.get("headers", {})),
        items=parse_dotted(f"{key}.items", raw.get("items", ""), allow_root=True),
        id=parse_dotted(f"{key}.id", raw.get("id", "id")),
        next=parse_dotted(f"{key}.next", raw["next"]) if "next" in raw else None,
        max_pages=parse_positive_int(f"{key}.max_pages", raw.get("max_pages", default_max_pages)),
        fields=fields,
        include=_parse_keywords(f"{key}.include", raw["include"]) if "include" in raw else (),
        exclude=_parse_keywords(f"{key}.exclude", raw["exclude"]) if "exclude" in raw else (),
        cross_origin_redirects=_parse_bool(f"{key}.cross_origin_redirects",
                                           raw.get("cross_origin_redirects", False)),
    )


def _max_fetch_timeout(whole: Mapping[str, Any]) -> float:
    """The supervisor refuses a job timeout above ``[kinds.fetch] max_timeout_s``;
    say so at start rather than at the first fetch."""
    kinds = whole.get("kinds")
    table = kinds.get("fetch") if isinstance(kinds, dict) else None
    if isinstance(table, dict) and "max_timeout_s" in table:
        return parse_duration("kinds.fetch.max_timeout_s", table["max_timeout_s"])
    return BUILTIN_KIND_LIMITS["fetch"].max_timeout_s


def parse_fetch_section(raw: Any, whole: Mapping[str, Any] | None = None) -> FetchConfig:
    """Validate ``[fetch]``; an absent section means no sources and no schedule."""
    if raw is None:
        return FetchConfig()
    if not isinstance(raw, dict):
        raise ConfigError("fetch", "expected a table ([fetch])")
    check_keys("fetch", raw, _TOP_KEYS)
    interval = parse_duration("fetch.interval", raw.get("interval", 0))
    if 0 < interval < 1:
        raise ConfigError("fetch.interval", "must be 0 (disabled) or at least 1 second")
    timeout = parse_duration("fetch.timeout_s", raw.get("timeout_s", DEFAULT_TIMEOUT_S))
    if timeout <= 0:
        raise ConfigError("fetch.timeout_s", "must be > 0")
    limit = _max_fetch_timeout(whole or {})
    if timeout > limit:
        raise ConfigError("fetch.timeout_s", f"must not exceed kinds.fetch.max_timeout_s "
                          f"({limit:g} s); raise that too if a fetch really needs longer")
    backoff = parse_duration("fetch.backoff_s", raw.get("backoff_s", 0.5))
    backoff_max = parse_duration("fetch.backoff_max_s", raw.get("backoff_max_s", 30))
    if backoff_max < backoff:
        raise ConfigError("fetch.backoff_max_s", f"must be >= fetch.backoff_s ({backoff:g})")
    user_agent = raw.get("user_agent", USER_AGENT)
    if not isinstance(user_agent, str) or not user_agent or "\n" in user_agent:
        raise ConfigError("fetch.user_agent", "expected a one-line string")
    base = FetchConfig(
        interval_s=interval,
        run_at_start=_parse_bool("fetch.run_at_start", raw.get("run_at_start", False)),
        timeout_s=timeout,
        concurrency=parse_positive_int("fetch.concurrency", raw.get("concurrency", 8)),
        retries=parse_positive_int("fetch.retries", raw.get("retries", 3)),
        backoff_s=backoff,
        backoff_max_s=backoff_max,
        batch_size=parse_positive_int("fetch.batch_size", raw.get("batch_size", 500)),
        user_agent=user_agent,
    )
    default_max_bytes = parse_size("fetch.max_bytes", raw.get("max_bytes", DEFAULT_MAX_BYTES))
    default_max_pages = parse_positive_int("fetch.max_pages", raw.get("max_pages", 10))
    raw_sources = raw.get("sources", [])
    if not isinstance(raw_sources, list):
        raise ConfigError("fetch.sources", "expected an array of tables ([[fetch.sources]])")
    sources: list[SourceConfig] = []
    seen: set[str] = set()
    for index, raw_source in enumerate(raw_sources):
        key = f"fetch.sources[{index}]"
        source = parse_source(key, raw_source, default_max_bytes=default_max_bytes,
                              default_max_pages=default_max_pages)
        if source.name in seen:
            raise ConfigError(f"{key}.name", f"duplicate source name {source.name!r}")
        seen.add(source.name)
        sources.append(source)
    return FetchConfig(**{**base.__dict__, "sources": tuple(sources)})


#: ``settings.section(FETCH_SECTION)`` is the parsed ``[fetch]`` table.
FETCH_SECTION: ConfigSection[FetchConfig] = ConfigSection("fetch", parse_fetch_section,
                                                          FetchConfig)
