"""One settings model: built-in defaults, then a TOML file, then environment.

Why validate everything at start: a daemon that starts with a bad value fails
later, at 3 a.m., inside a job. Here a wrong value stops ``serve`` (and
``check-config``) with one line naming the key and what is allowed.

Feature sections (``[fetch]``, ``[targets.*]``, ``[sources.*]``, ...) are parsed
by their own modules: each feature lists its :class:`ConfigSection` records and
:func:`load_settings` is handed the features, so this module does not grow with
every feature, yet every section is checked before the daemon starts. Parsed
settings hold every section of the features they were loaded with (an absent
table gets its section's defaults); asking for any other section raises
:class:`SectionNotLoaded` rather than quietly answering with defaults.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar, overload

from .credentials import AccessSettings, parse_access
from .errors import ConfigError


@dataclass(frozen=True)
class KindLimits:
    """Per-kind timeouts, concurrency and retries."""

    default_timeout_s: float
    max_timeout_s: float
    concurrency: int
    #: Attempts in all before a transient failure (the database went away) fails
    #: the job for good; each attempt is counted in the job's ``attempts``.
    max_attempts: int = 5
    #: At most this many jobs of the kind run (or are claimed to run) across every
    #: daemon sharing the database, enforced by the claim statement; ``None``: no
    #: cluster-wide limit (``concurrency`` still bounds each daemon).
    cluster_concurrency: int | None = None


@dataclass(frozen=True)
class ClusterSettings:
    """The ``[cluster]`` table: several daemons on one database (docs/operations.md)."""

    #: A job this daemon has no free slot for (its kind's ``concurrency``) waits in
    #: the table, where any daemon with a free slot claims it; off: it waits in this
    #: daemon's memory for this daemon's slot (bounded by ``queue_size``).
    shared_queue: bool = False
    #: Jobs waiting in the table for any daemon, at most (past it, 503); cluster-wide.
    backlog: int = 100_000
    #: How often the table is asked for claimable jobs when no notification came
    #: (five times less often while notifications arrive).
    claim_poll_s: float = 1.0


DEFAULT_KIND_LIMITS = KindLimits(default_timeout_s=3600, max_timeout_s=86400, concurrency=64)
BUILTIN_KIND_LIMITS: dict[str, KindLimits] = {
    "sleep": KindLimits(default_timeout_s=3600, max_timeout_s=86400, concurrency=10_000),
    # Each running sql_sleep holds a connection of the work pool for its whole run.
    "sql_sleep": KindLimits(default_timeout_s=60, max_timeout_s=600, concurrency=4),
    "noop": KindLimits(default_timeout_s=60, max_timeout_s=3600, concurrency=10_000),
    "fetch": KindLimits(default_timeout_s=300, max_timeout_s=3600, concurrency=1),
    "migration": KindLimits(default_timeout_s=6 * 3600, max_timeout_s=48 * 3600, concurrency=2),
}


T = TypeVar("T")


@dataclass(frozen=True)
class ConfigSection(Generic[T]):
    """A top-level TOML table that a feature owns, and how it becomes a ``T``.

    ``parse(raw, whole)`` gets the table (``None`` when the file has none: it then
    returns the defaults) and the whole raw file (for checks across sections);
    it raises :class:`ConfigError` naming the dotted key.
    """

    name: str
    parse: Callable[[Any, Mapping[str, Any]], T]
    type: type[T]


class HasConfigSections(Protocol):
    """What :func:`load_settings` needs of a feature."""

    @property
    def config_sections(self) -> tuple[ConfigSection[Any], ...]: ...


class SectionNotLoaded(LookupError):
    """Settings were asked for a section that the features they were loaded with
    do not own: a wiring mistake, never a configuration one."""

    def __init__(self, name: str, loaded: Iterable[str]) -> None:
        loaded = sorted(loaded)
        super().__init__(f"config section [{name}] was not loaded; loaded: "
                         f"{', '.join(loaded) or 'none'} (is its feature passed to "
                         "load_settings?)")
        self.name = name


@dataclass(frozen=True)
class Settings:
    """Everything the daemon is configured with."""

    bind_host: str = "127.0.0.1"
    bind_port: int = 8084
    state_dir: Path = Path("./var")
    #: ``None`` means: run the embedded PostgreSQL in ``state_dir/pgdata``.
    database_url: str | None = None
    shutdown_grace: float = 20.0
    #: How many accepted jobs may wait for a worker slot before triggers get 503.
    queue_size: int = 10_000
    log_level: str = "INFO"
    #: ``text`` (one human line per event) or ``json`` (one object per line).
    log_format: str = "text"
    #: Log every HTTP request (hypercorn's access log, redacted like every line).
    access_log: bool = False
    #: When set, ``GET /metrics`` requires ``Authorization: Bearer <token>``.
    metrics_token: str | None = field(default=None, repr=False)
    #: API tokens and the Host/Origin allow-lists (``[access]``, see credentials.py).
    access: AccessSettings = field(default_factory=AccessSettings)
    kinds: Mapping[str, KindLimits] = field(default_factory=lambda: dict(BUILTIN_KIND_LIMITS))
    #: The diagnostic job kinds (``sleep``, ``sql_sleep``, ``noop``) are served:
    #: off by default, since anyone allowed to submit could tie up slots with them.
    diagnostics: bool = False
    #: ``[cluster]``: sharing work with other daemons on the same database.
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    #: Parsed feature sections, by section name (see :class:`ConfigSection`).
    sections: Mapping[str, Any] = field(default_factory=dict)

    @property
    def bind(self) -> str:
        return f"{self.bind_host}:{self.bind_port}"

    def limits(self, kind: str) -> KindLimits:
        return self.kinds.get(kind, DEFAULT_KIND_LIMITS)

    @overload
    def section(self, which: ConfigSection[T]) -> T: ...

    @overload
    def section(self, which: str) -> Any: ...

    def section(self, which: ConfigSection[Any] | str) -> Any:
        """The parsed section; raises :class:`SectionNotLoaded` if it was not loaded.

        Prefer passing the :class:`ConfigSection` (the result is typed); a name is
        accepted for callers that only have the name.
        """
        name = which if isinstance(which, str) else which.name
        try:
            return self.sections[name]
        except KeyError:
            raise SectionNotLoaded(name, self.sections) from None


def check_keys(key: str, table: Mapping[str, Any], allowed: set[str] | frozenset[str]) -> None:
    """Refuse the first key of ``table`` not in ``allowed``, naming it and the allowed ones.

    Every section validates its tables through here, so a typo anywhere in the
    file reads the same: ``config error: fetch.sources[0].intervall: unknown key; ...``.
    """
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}",
                          f"unknown key; allowed: {', '.join(sorted(allowed))}")


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(key: str, value: Any) -> float:
    """Seconds from ``30``, ``1.5``, ``"90s"``, ``"15m"``, ``"2h"``; ``"0"`` is 0."""
    if isinstance(value, bool):
        raise ConfigError(key, f"expected seconds or a duration like '15m', got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        raise ConfigError(key, f"expected seconds or a duration like '15m', got {value!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(key, f"must be a finite number >= 0, got {value!r}")
    return seconds


def parse_positive_int(key: str, value: Any, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(key, f"expected a whole number >= {minimum}, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(key, f"expected a whole number >= {minimum}, got {value!r}") from None
    if number < minimum:
        raise ConfigError(key, f"expected a whole number >= {minimum}, got {value!r}")
    return number


def parse_bind(key: str, value: Any) -> tuple[str, int]:
    if not isinstance(value, str) or ":" not in value:
        raise ConfigError(key, f"expected HOST:PORT such as 127.0.0.1:8084, got {value!r}")
    host, _, port_text = value.rpartition(":")
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(key, f"port must be a number 0-65535, got {port_text!r}") from None
    if not host or not 0 <= port <= 65535:
        raise ConfigError(key, f"expected HOST:PORT with a port 0-65535, got {value!r}")
    return host, port


_ENV_KEYS = {
    "NURSERYD_BIND": "bind",
    "NURSERYD_STATE_DIR": "state_dir",
    "NURSERYD_DATABASE_URL": "database_url",
    "NURSERYD_SHUTDOWN_GRACE": "shutdown_grace",
    "NURSERYD_QUEUE_SIZE": "queue_size",
    "NURSERYD_LOG_LEVEL": "log_level",
    "NURSERYD_LOG_FORMAT": "log_format",
    "NURSERYD_ACCESS_LOG": "access_log",
    "NURSERYD_METRICS_TOKEN": "metrics_token",
    "NURSERYD_DIAGNOSTICS": "diagnostics",
}
_TOP_LEVEL_KEYS = {"bind", "state_dir", "database_url", "shutdown_grace", "queue_size",
                   "log_level", "log_format", "access_log", "metrics_token", "kinds",
                   "diagnostics", "cluster"}
_TOP_LEVEL_KEYS.add("access")  # [access]: parsed by credentials.parse_access
_LOG_LEVELS = {"DEBUG", "INFO", "WARNING", "ERROR"}
_LOG_FORMATS = ("text", "json")
_ENV_REFERENCE = re.compile(r"^env:([A-Za-z_][A-Za-z0-9_]*)$")
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


def parse_bool(key: str, value: Any) -> bool:
    """``true``/``false`` in TOML; ``1``/``0``, ``true``/``false``, ``yes``/``no``,
    ``on``/``off`` from the environment."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigError(key, f"expected true or false, got {value!r}")


def _parse_token(key: str, value: Any) -> str | None:
    """A literal token, or ``env:NAME`` (read now); unset or empty: no token."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError(key, "expected a token string or \"env:VARIABLE\"")
    match = _ENV_REFERENCE.match(value)
    if match:
        token = os.environ.get(match.group(1))
        if not token:
            raise ConfigError(key, f"environment variable {match.group(1)} is not set (the "
                              "token is read from it)")
        value = token
    elif value.startswith("env:"):
        raise ConfigError(key, f"{value!r}: after env: put an environment variable name")
    if value != value.strip() or any(not char.isprintable() for char in value):
        raise ConfigError(key, "the token must not contain spaces at its ends or control "
                          "characters")
    return value


def load_raw(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError("--config", f"file not found: {path}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError("--config", f"{path} is not valid TOML: {error}") from None


def _parse_kind_limits(raw: Any) -> dict[str, KindLimits]:
    limits = dict(BUILTIN_KIND_LIMITS)
    if raw is None:
        return limits
    if not isinstance(raw, dict):
        raise ConfigError("kinds", "expected a table of [kinds.NAME] sections")
    for name, table in raw.items():
        if not isinstance(table, dict):
            raise ConfigError(f"kinds.{name}", "expected a table")
        base = limits.get(name, DEFAULT_KIND_LIMITS)
        check_keys(f"kinds.{name}", table, {"default_timeout_s", "max_timeout_s",
                                            "concurrency", "max_attempts",
                                            "cluster_concurrency"})
        default = parse_duration(f"kinds.{name}.default_timeout_s",
                                 table.get("default_timeout_s", base.default_timeout_s))
        maximum = parse_duration(f"kinds.{name}.max_timeout_s",
                                 table.get("max_timeout_s", base.max_timeout_s))
        if default <= 0 or maximum <= 0:
            raise ConfigError(f"kinds.{name}", "timeouts must be > 0")
        if default > maximum:
            raise ConfigError(f"kinds.{name}.default_timeout_s",
                              f"must not exceed max_timeout_s ({maximum:g})")
        concurrency = parse_positive_int(f"kinds.{name}.concurrency",
                                         table.get("concurrency", base.concurrency))
        max_attempts = parse_positive_int(f"kinds.{name}.max_attempts",
                                          table.get("max_attempts", base.max_attempts))
        cluster_concurrency = base.cluster_concurrency
        if "cluster_concurrency" in table:
            cluster_concurrency = parse_positive_int(f"kinds.{name}.cluster_concurrency",
                                                     table["cluster_concurrency"])
        limits[name] = KindLimits(default, maximum, concurrency, max_attempts,
                                  cluster_concurrency)
    return limits


def _parse_cluster(raw: Any) -> ClusterSettings:
    if raw is None:
        return ClusterSettings()
    if not isinstance(raw, dict):
        raise ConfigError("cluster", "expected a table: [cluster] shared_queue = true")
    check_keys("cluster", raw, {"shared_queue", "backlog", "claim_poll"})
    base = ClusterSettings()
    poll = parse_duration("cluster.claim_poll", raw.get("claim_poll", base.claim_poll_s))
    if not 0.05 <= poll <= 60:
        raise ConfigError("cluster.claim_poll", f"must be between 50ms and 60s, got {poll:g} s")
    return ClusterSettings(
        shared_queue=parse_bool("cluster.shared_queue",
                                raw.get("shared_queue", base.shared_queue)),
        backlog=parse_positive_int("cluster.backlog", raw.get("backlog", base.backlog)),
        claim_poll_s=poll,
    )


def _parse_diagnostics(raw: Any) -> bool:
    """``[diagnostics] enabled = true`` in the file; ``NURSERYD_DIAGNOSTICS=1`` from
    the environment (which arrives here as the bare value)."""
    if isinstance(raw, dict):
        check_keys("diagnostics", raw, {"enabled"})
        return parse_bool("diagnostics.enabled", raw.get("enabled", False))
    if raw is None:
        return False
    if isinstance(raw, str):
        return parse_bool("NURSERYD_DIAGNOSTICS", raw)
    raise ConfigError("diagnostics", "expected a table: [diagnostics] enabled = true")


def _standard_features() -> Iterable[HasConfigSections]:
    # The only import from above this module: a default for callers (tests, tools)
    # that load settings for the standard daemon without naming its features.
    from .features import FEATURES

    return FEATURES


def sections_of(features: Iterable[HasConfigSections]) -> dict[str, ConfigSection[Any]]:
    """The features' sections by name; two features may not own one name."""
    found: dict[str, ConfigSection[Any]] = {}
    for feature in features:
        for section in feature.config_sections:
            if section.name in found or section.name in _TOP_LEVEL_KEYS:
                raise ValueError(f"config section [{section.name}] is owned twice")
            found[section.name] = section
    return found


def load_settings(
    path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    features: Iterable[HasConfigSections] | None = None,
) -> Settings:
    """Defaults < TOML file < environment. Raises :class:`ConfigError`.

    ``features`` own the feature sections (default: the standard ones); every
    one of their sections is parsed, present in the file or not.
    """
    sections_by_name = sections_of(_standard_features() if features is None else features)
    environ = os.environ if environ is None else environ
    if path is None and environ.get("NURSERYD_CONFIG"):
        path = Path(environ["NURSERYD_CONFIG"])
    raw = load_raw(path)
    core = {key: raw[key] for key in raw if key in _TOP_LEVEL_KEYS}
    for env_name, key in _ENV_KEYS.items():
        if env_name in environ:
            core[key] = environ[env_name]

    unknown = [key for key in raw if key not in _TOP_LEVEL_KEYS and key not in sections_by_name]
    if unknown:
        allowed = sorted(_TOP_LEVEL_KEYS | set(sections_by_name))
        raise ConfigError(unknown[0], f"unknown key; allowed top-level keys: {', '.join(allowed)}")

    host, port = parse_bind("bind", core.get("bind", "127.0.0.1:8084"))
    state_dir = core.get("state_dir", "./var")
    if not isinstance(state_dir, str) or not state_dir:
        raise ConfigError("state_dir", f"expected a directory path, got {state_dir!r}")
    database_url = core.get("database_url") or None
    if database_url is not None and (
        not isinstance(database_url, str)
        or not database_url.startswith(("postgresql://", "postgres://"))
    ):
        raise ConfigError("database_url", "expected a postgresql:// URL, or unset for the "
                          "embedded server")
    grace = parse_duration("shutdown_grace", core.get("shutdown_grace", 20))
    queue_size = parse_positive_int("queue_size", core.get("queue_size", 10_000))
    log_level = str(core.get("log_level", "INFO")).upper()
    if log_level not in _LOG_LEVELS:
        raise ConfigError("log_level", f"expected one of {', '.join(sorted(_LOG_LEVELS))}")
    log_format = core.get("log_format", "text")
    if not isinstance(log_format, str) or log_format.strip().lower() not in _LOG_FORMATS:
        raise ConfigError("log_format", f"expected one of {', '.join(_LOG_FORMATS)} (text: "
                          f"one line per event, json: one object per line), got {log_format!r}")
    access_log = parse_bool("access_log", core.get("access_log", False))
    metrics_token = _parse_token("metrics_token", core.get("metrics_token"))

    sections: dict[str, Any] = {}
    for name, section in sections_by_name.items():
        value = section.parse(raw.get(name), raw)
        if not isinstance(value, section.type):
            raise TypeError(f"the parser of [{name}] returned {type(value).__name__}, "
                            f"not {section.type.__name__}")
        sections[name] = value
    return Settings(
        bind_host=host,
        bind_port=port,
        state_dir=Path(state_dir),
        database_url=database_url,
        shutdown_grace=grace,
        queue_size=queue_size,
        log_level=log_level,
        log_format=log_format.strip().lower(),
        access_log=access_log,
        metrics_token=metrics_token,
        access=parse_access(raw.get("access"), environ, bind_host=host),
        kinds=_parse_kind_limits(core.get("kinds")),
        diagnostics=_parse_diagnostics(core.get("diagnostics")),
        cluster=_parse_cluster(core.get("cluster")),
        sections=sections,
    )
