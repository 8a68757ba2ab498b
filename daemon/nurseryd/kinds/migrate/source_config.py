"""The ``[sources.NAME]`` and ``[google_sheets]`` config sections (issue 5).

Why database sources live only in the config file: a connection string carries
a secret and reaches into the network the daemon runs in; accepting one over
HTTP would make the daemon an open proxy to every database it can route to.
So an HTTP request names a source (``source_identifier``) and the operator's
file says what it is. Secrets may stay out of the file: ``url = "env:VAR"`` and
``api_key = "env:VAR"`` are read from the environment when a job starts, so a
rotated secret needs no restart and never sits in the parsed settings.

Example::

    [sources.legacy]
    url = "env:LEGACY_DATABASE_URL"   # or "postgresql://..." or "sqlite:////var/lib/x.db"
    table = "chats"                    # or: query = "SELECT ... FROM ..."
    key = ["chat_id"]                  # stable, unique, non-null order for keyset resume

    [google_sheets]
    api_base = "https://sheets.googleapis.com"
    api_key = "env:GOOGLE_API_KEY"     # or: credentials_file = "/etc/nurseryd/sa.json"
    window_rows = 5000

    [google_sheets.spreadsheets]       # the only spreadsheets the daemon may read
    chats = "1BxiMVs0XRA5nFMdKvBdBZjgmUUqptlbs74OgvE2upms"

Why spreadsheets are named in the file too: a service account can read every
sheet shared with it (often far more than this daemon's business), and an API
key every public one; a caller who could name any id would read them through
the daemon. So a request names a configured spreadsheet (``spreadsheet``) or
gives an id the file lists, and nothing else is read.

Pure parsing, no I/O beyond checking that a credentials file exists.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ...config import (
    ConfigError,
    ConfigSection,
    check_keys,
    parse_duration,
    parse_positive_int,
)

if TYPE_CHECKING:
    from ...config import Settings

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$")
_ENV = re.compile(r"^env:([A-Za-z_][A-Za-z0-9_]*)$")
#: Spreadsheet ids are URL-safe base64-ish; refusing anything else keeps the
#: id from smuggling a path or query into the request URL.
SPREADSHEET_ID = re.compile(r"^[A-Za-z0-9_-]{10,200}$")
URL_SCHEMES = ("postgresql://", "postgres://", "sqlite:///")


class SecretMissing(LookupError):
    """An ``env:VAR`` secret is not set in the daemon's environment."""


@dataclass(frozen=True)
class Secret:
    """A literal value or the name of an environment variable read when used."""

    literal: str | None = None
    env: str | None = None

    def resolve(self, what: str) -> str:
        if self.env is None:
            return self.literal or ""
        value = os.environ.get(self.env)
        if not value:
            raise SecretMissing(f"environment variable {self.env} ({what}) is not set in the "
                                "daemon's environment")
        return value

    def __repr__(self) -> str:  # never print a secret in a log of the settings
        return f"Secret(env={self.env!r})" if self.env else "Secret(<literal>)"


def _secret(key: str, value: Any, *, what: str) -> Secret:
    if not isinstance(value, str) or not value:
        raise ConfigError(key, f"expected {what} or \"env:VARIABLE\"")
    match = _ENV.match(value)
    if match:
        return Secret(env=match.group(1))
    if value.startswith("env:"):
        raise ConfigError(key, f"{value!r}: after env: put an environment variable name "
                          "(letters, digits, _)")
    return Secret(literal=value)


@dataclass(frozen=True)
class DatabaseSourceConfig:
    name: str
    url: Secret
    key: tuple[str, ...]
    table: str | None = None
    query: str | None = None
    #: Rows per keyset page (= per pipeline batch).
    batch_rows: int = 5000
    connect_timeout_s: float = 10.0
    #: Connection attempts before an unreachable source fails the job.
    connect_attempts: int = 5
    retry_backoff_s: float = 0.5
    retry_backoff_max_s: float = 15.0
    #: Reader processes, each on its own key range (1: one reader, the key order).
    readers: int = 2

    def resolve_url(self) -> str:
        """The URL now (env read at job start); raises SecretMissing or ValueError."""
        url = self.url.resolve(f"url of source {self.name!r}")
        if not url.startswith(URL_SCHEMES):
            raise ValueError(f"source {self.name!r}: the URL from {self.url.env or 'the config'} "
                             "is not a postgresql:// or sqlite:/// URL")
        return url

    def describe(self) -> dict[str, Any]:
        """Safe to show (no URL: it may carry a password)."""
        return {"source": self.name, "table": self.table, "query": self.query is not None,
                "key": list(self.key)}


def sqlite_path(url: str) -> Path:
    """``sqlite:///rel/x.db`` is relative to the daemon's working directory,
    ``sqlite:////abs/x.db`` is absolute (SQLAlchemy's convention)."""
    rest = url[len("sqlite:///"):]
    rest = rest.split("?", 1)[0]
    if not rest:
        raise ValueError("a sqlite:/// URL needs a file path after the three slashes")
    return Path(rest)


_SOURCE_KEYS = {"url", "table", "query", "key", "batch_rows", "connect_timeout_s",
                "connect_attempts", "retry_backoff_s", "retry_backoff_max_s", "readers"}
#: More readers than this only add processes: the daemon's relay and PostgreSQL's
#: COPY are then the bottleneck (see docs/benchmarks.md).
MAX_READERS = 8


def _parse_source(name: str, raw: Any) -> DatabaseSourceConfig:
    where = f"sources.{name}"
    if not _NAME.match(name):
        raise ConfigError(where, "source names are letters, digits, '_', '.', '-' (at most 64)")
    if not isinstance(raw, dict):
        raise ConfigError(where, "expected a table with url, table or query, and key")
    check_keys(where, raw, _SOURCE_KEYS)
    if "url" not in raw:
        raise ConfigError(f"{where}.url", "missing; expected \"env:VARIABLE\" or a "
                          "postgresql:// or sqlite:/// URL")
    url = _secret(f"{where}.url", raw["url"], what="a postgresql:// or sqlite:/// URL")
    if url.literal is not None and not url.literal.startswith(URL_SCHEMES):
        raise ConfigError(f"{where}.url", "expected \"env:VARIABLE\" or a URL starting with "
                          "postgresql://, postgres:// or sqlite:///")
    if url.literal is not None and url.literal.startswith("sqlite:///"):
        try:
            sqlite_path(url.literal)
        except ValueError as error:
            raise ConfigError(f"{where}.url", str(error)) from None
    table, query = raw.get("table"), raw.get("query")
    if (table is None) == (query is None):
        raise ConfigError(where, "set exactly one of table = \"name\" or query = \"SELECT ...\"")
    if table is not None and (not isinstance(table, str) or table.count(".") > 1
                              or not all(_IDENT.match(p) for p in table.split("."))):
        raise ConfigError(f"{where}.table", f"expected a table name like 'chats' or "
                          f"'schema.chats' (letters, digits, _), got {table!r}")
    if query is not None:
        if not isinstance(query, str) or not query.strip():
            raise ConfigError(f"{where}.query", "expected a SELECT statement")
        stripped = query.strip().rstrip(";").strip()
        if not re.match(r"(?is)^(select|with|values|table)\b", stripped) or ";" in stripped:
            raise ConfigError(f"{where}.query", "expected one SELECT (or WITH ... SELECT) "
                              "statement; it is wrapped as a subquery for keyset paging")
        query = stripped
    key = raw.get("key")
    if isinstance(key, str):
        key = [key]
    if not isinstance(key, list) or not key or not all(
            isinstance(k, str) and k.strip() and '"' not in k and "\x00" not in k
            and len(k) <= 63 for k in key):
        raise ConfigError(f"{where}.key", "expected the column(s) giving a stable, unique, "
                          "non-null order, e.g. key = [\"chat_id\"]")
    if len(set(key)) != len(key):
        raise ConfigError(f"{where}.key", "a column is listed twice")
    base = DatabaseSourceConfig(name=name, url=url, key=tuple(key))
    backoff = parse_duration(f"{where}.retry_backoff_s",
                             raw.get("retry_backoff_s", base.retry_backoff_s))
    backoff_max = parse_duration(f"{where}.retry_backoff_max_s",
                                 raw.get("retry_backoff_max_s", base.retry_backoff_max_s))
    if backoff_max < backoff:
        raise ConfigError(f"{where}.retry_backoff_max_s", "must be >= retry_backoff_s")
    connect_timeout = parse_duration(f"{where}.connect_timeout_s",
                                     raw.get("connect_timeout_s", base.connect_timeout_s))
    if connect_timeout <= 0:
        raise ConfigError(f"{where}.connect_timeout_s", "must be > 0")
    return DatabaseSourceConfig(
        name=name, url=url, key=tuple(key), table=table, query=query,
        batch_rows=parse_positive_int(f"{where}.batch_rows",
                                      raw.get("batch_rows", base.batch_rows)),
        connect_timeout_s=connect_timeout,
        connect_attempts=parse_positive_int(f"{where}.connect_attempts",
                                            raw.get("connect_attempts", base.connect_attempts)),
        retry_backoff_s=backoff, retry_backoff_max_s=backoff_max,
        readers=_parse_readers(f"{where}.readers", raw.get("readers", base.readers)),
    )


def _parse_readers(where: str, value: Any) -> int:
    readers = parse_positive_int(where, value)
    if readers > MAX_READERS:
        raise ConfigError(where, f"at most {MAX_READERS} reader processes")
    return readers


def parse_sources(raw: Any, whole: Mapping[str, Any]) -> dict[str, DatabaseSourceConfig]:
    """``[sources.NAME]`` tables: databases a migration may read from."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError("sources", "expected [sources.NAME] tables")
    return {name: _parse_source(name, table) for name, table in raw.items()}


SHEETS_API_BASE = "https://sheets.googleapis.com"
SHEETS_SCOPE = "https://www.googleapis.com/auth/spreadsheets.readonly"


@dataclass(frozen=True)
class SheetsConfig:
    api_base: str = SHEETS_API_BASE
    api_key: Secret | None = None
    credentials_file: Path | None = None
    window_rows: int = 5000
    #: One HTTP request (connect + send + read), enforced by a cancel scope.
    request_timeout_s: float = 30.0
    #: Attempts per request on 429/5xx/network errors before the job fails.
    max_attempts: int = 8
    backoff_s: float = 1.0
    backoff_max_s: float = 64.0
    #: Requests sent in any 60 s (Google: 60 read requests per minute per user).
    requests_per_minute: int = 60
    #: name -> spreadsheet id: the only spreadsheets a job may read.
    spreadsheets: Mapping[str, str] = field(default_factory=dict)

    @property
    def configured(self) -> bool:
        return self.api_key is not None or self.credentials_file is not None

    def allows(self, spreadsheet_id: str) -> bool:
        return spreadsheet_id in self.spreadsheets.values()


_SHEETS_KEYS = {"api_base", "api_key", "credentials_file", "window_rows", "request_timeout_s",
                "max_attempts", "backoff_s", "backoff_max_s", "requests_per_minute",
                "spreadsheets"}


def _parse_spreadsheets(raw: Any) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError("google_sheets.spreadsheets", "expected a table of NAME = "
                          "\"<spreadsheet id>\"")
    for name, spreadsheet_id in raw.items():
        where = f"google_sheets.spreadsheets.{name}"
        if not _NAME.match(name):
            raise ConfigError(where, "names are letters, digits, '_', '.', '-' (at most 64)")
        if not isinstance(spreadsheet_id, str) or not SPREADSHEET_ID.match(spreadsheet_id):
            raise ConfigError(where, "expected the id in the sheet's URL "
                              "(https://docs.google.com/spreadsheets/d/<id>/edit)")
    return dict(raw)


def parse_google_sheets(raw: Any, whole: Mapping[str, Any]) -> SheetsConfig:
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError("google_sheets", "expected a [google_sheets] table")
    check_keys("google_sheets", raw, _SHEETS_KEYS)
    base = SheetsConfig()
    api_base = raw.get("api_base", base.api_base)
    parts = urlsplit(api_base) if isinstance(api_base, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError("google_sheets.api_base", f"expected an http(s) URL such as "
                          f"{SHEETS_API_BASE}, got {api_base!r}")
    api_key = None
    if "api_key" in raw:
        api_key = _secret("google_sheets.api_key", raw["api_key"], what="an API key")
    credentials = raw.get("credentials_file")
    if credentials is not None:
        if not isinstance(credentials, str) or not credentials:
            raise ConfigError("google_sheets.credentials_file", "expected the path of a "
                              "service-account JSON key file")
        if not Path(credentials).is_file():
            raise ConfigError("google_sheets.credentials_file",
                              f"{credentials} does not exist or is not a file")
    if api_key is not None and credentials is not None:
        raise ConfigError("google_sheets", "set api_key or credentials_file, not both")
    timeout = parse_duration("google_sheets.request_timeout_s",
                             raw.get("request_timeout_s", base.request_timeout_s))
    if timeout <= 0:
        raise ConfigError("google_sheets.request_timeout_s", "must be > 0")
    backoff = parse_duration("google_sheets.backoff_s", raw.get("backoff_s", base.backoff_s))
    backoff_max = parse_duration("google_sheets.backoff_max_s",
                                 raw.get("backoff_max_s", base.backoff_max_s))
    if backoff_max < backoff:
        raise ConfigError("google_sheets.backoff_max_s", "must be >= backoff_s")
    return SheetsConfig(
        api_base=api_base.rstrip("/"), api_key=api_key,
        credentials_file=Path(credentials) if credentials else None,
        window_rows=parse_positive_int("google_sheets.window_rows",
                                       raw.get("window_rows", base.window_rows)),
        request_timeout_s=timeout,
        max_attempts=parse_positive_int("google_sheets.max_attempts",
                                        raw.get("max_attempts", base.max_attempts)),
        backoff_s=backoff, backoff_max_s=backoff_max,
        requests_per_minute=parse_positive_int(
            "google_sheets.requests_per_minute",
            raw.get("requests_per_minute", base.requests_per_minute)),
        spreadsheets=_parse_spreadsheets(raw.get("spreadsheets")),
    )


#: ``[sources.NAME]`` tables.
SOURCES_SECTION: ConfigSection[dict[str, DatabaseSourceConfig]] = ConfigSection(
    "sources", parse_sources, dict)
#: The ``[google_sheets]`` table.
GOOGLE_SHEETS_SECTION: ConfigSection[SheetsConfig] = ConfigSection(
    "google_sheets", parse_google_sheets, SheetsConfig)


def database_sources(settings: Settings) -> dict[str, DatabaseSourceConfig]:
    return settings.section(SOURCES_SECTION)


def sheets_config(settings: Settings) -> SheetsConfig:
    return settings.section(GOOGLE_SHEETS_SECTION)
