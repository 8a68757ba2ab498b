"""Settings: defaults < TOML < environment, and one clear line for every bad value."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nurseryd.config import (
    ConfigError,
    ConfigSection,
    SectionNotLoaded,
    Settings,
    load_settings,
    parse_duration,
)
from nurseryd.features import FEATURES
from nurseryd.kinds.fetch.config import FETCH_SECTION, FetchConfig


def test_defaults_need_no_file_and_no_database() -> None:
    settings = load_settings(None, environ={})
    assert settings.bind == "127.0.0.1:8084"
    assert settings.state_dir == Path("./var")
    assert settings.database_url is None  # embedded PostgreSQL
    assert settings.shutdown_grace == 20
    assert settings.limits("fetch").concurrency == 1


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    config = tmp_path / "n.toml"
    config.write_text('bind = "0.0.0.0:9000"\nshutdown_grace = "1m"\n'
                      '[kinds.sleep]\nconcurrency = 3\nmax_timeout_s = "2h"\n')
    settings = load_settings(config, environ={"NURSERYD_BIND": "127.0.0.1:9001",
                                              "NURSERYD_DATABASE_URL": "postgresql://x/y"})
    assert settings.bind == "127.0.0.1:9001"
    assert settings.shutdown_grace == 60
    assert settings.database_url == "postgresql://x/y"
    assert settings.limits("sleep").concurrency == 3
    assert settings.limits("sleep").max_timeout_s == 7200


def test_config_file_from_environment(tmp_path: Path) -> None:
    config = tmp_path / "n.toml"
    config.write_text("queue_size = 7\n")
    assert load_settings(None, environ={"NURSERYD_CONFIG": str(config)}).queue_size == 7


@pytest.mark.parametrize(
    ("text", "environ", "key", "needle"),
    [
        ("", {"NURSERYD_BIND": "8084"}, "bind", "HOST:PORT"),
        ("", {"NURSERYD_BIND": "x:99999"}, "bind", "0-65535"),
        ("", {"NURSERYD_SHUTDOWN_GRACE": "-1"}, "shutdown_grace", "duration"),
        ("", {"NURSERYD_QUEUE_SIZE": "0"}, "queue_size", ">= 1"),
        ("", {"NURSERYD_DATABASE_URL": "mysql://x"}, "database_url", "postgresql://"),
        ("", {"NURSERYD_LOG_LEVEL": "LOUD"}, "log_level", "DEBUG"),
        ("colour = 1\n", {}, "colour", "unknown key"),
        ("[kinds.sleep]\nconcurency = 2\n", {}, "kinds.sleep.concurency", "unknown key"),
        ("[kinds.sleep]\ndefault_timeout_s = 10\nmax_timeout_s = 5\n", {},
         "kinds.sleep.default_timeout_s", "must not exceed"),
        ("bind = [\n", {}, "--config", "not valid TOML"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text, environ, key, needle) -> None:
    config = tmp_path / "n.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_settings(config, environ=environ)
    assert caught.value.key == key
    assert needle in str(caught.value)
    assert "\n" not in str(caught.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_settings(tmp_path / "absent.toml", environ={})


@pytest.mark.parametrize(("value", "seconds"), [
    (30, 30), (1.5, 1.5), ("90s", 90), ("15m", 900), ("2h", 7200), ("1d", 86400),
    ("250ms", 0.25), ("0", 0),
])
def test_durations(value, seconds) -> None:
    assert parse_duration("k", value) == seconds


@dataclass(frozen=True)
class _Only:
    """A feature of nothing but config sections."""

    config_sections: tuple[ConfigSection[Any], ...] = ()


def test_every_section_of_the_features_is_parsed_even_when_absent() -> None:
    settings = load_settings(None, environ={}, features=FEATURES)
    owned = {section.name for feature in FEATURES for section in feature.config_sections}
    assert set(settings.sections) == owned
    fetch = settings.section(FETCH_SECTION)  # typed: FetchConfig
    assert fetch == FetchConfig() and fetch.sources == ()


def test_a_section_that_was_not_loaded_is_an_error_not_a_default(tmp_path: Path) -> None:
    settings = load_settings(None, environ={}, features=())
    assert settings.sections == {}
    with pytest.raises(SectionNotLoaded, match=r"\[fetch\] was not loaded"):
        settings.section(FETCH_SECTION)
    with pytest.raises(LookupError):
        Settings().section("fetch")


def test_only_the_features_own_top_level_tables(tmp_path: Path) -> None:
    config = tmp_path / "n.toml"
    config.write_text("[fetch]\ninterval = 0\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(config, environ={}, features=())
    assert caught.value.key == "fetch" and "unknown key" in str(caught.value)

    seen: list[Any] = []

    def parse(raw: Any, whole: Any) -> str:
        seen.append(raw)
        return "parsed" if raw is not None else "default"

    colour: ConfigSection[str] = ConfigSection("colour", parse, str)
    config.write_text("[colour]\nhue = 1\n")
    assert load_settings(config, environ={}, features=[_Only((colour,))]).section(colour) \
        == "parsed"
    assert load_settings(None, environ={}, features=[_Only((colour,))]).section(colour) \
        == "default"
    assert seen == [{"hue": 1}, None]


def test_two_features_may_not_own_one_section() -> None:
    twice = _Only((FETCH_SECTION,))
    with pytest.raises(ValueError, match="owned twice"):
        load_settings(None, environ={}, features=[*FEATURES, twice])
