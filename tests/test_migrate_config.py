"""[targets.NAME] and [migration]: parsed, validated with dotted keys, defaults built in."""

from __future__ import annotations

from pathlib import Path

import pytest

from nurseryd.config import ConfigError, load_settings
from nurseryd.kinds.migrate.targets import (
    CHATS_TARGET,
    MIGRATION_SECTION,
    TARGETS_SECTION,
    MigrationSettings,
)


def settings_from(tmp_path: Path, text: str):
    path = tmp_path / "nurseryd.toml"
    path.write_text(text)
    return load_settings(path, environ={})


def test_defaults_without_a_config_file() -> None:
    settings = load_settings(None, environ={})
    assert settings.section(TARGETS_SECTION)["chats"] == CHATS_TARGET
    migration = settings.section(MIGRATION_SECTION)
    assert migration == MigrationSettings()
    assert migration.max_upload_bytes == 200 * 1024**2 and migration.default_target == "chats"


def test_a_configured_target_with_aliases(tmp_path: Path) -> None:
    settings = settings_from(tmp_path, """
[migration]
default_target = "orders"
timezone = "Europe/Moscow"
memory_budget_mb = 512
max_compression_ratio = 100

[targets.orders]
table = "sales.orders"
key = "order_id"
columns = [
  { name = "order_id", type = "int8", aliases = ["Номер заказа"] },
  { name = "amount", type = "numeric(12,2)", nullable = false },
]
""")
    orders = settings.section(TARGETS_SECTION)["orders"]
    assert orders.schema_and_table == ("sales", "orders") and orders.key == ("order_id",)
    assert orders.columns[0].key and not orders.columns[0].nullable  # keys are NOT NULL
    assert orders.columns[0].aliases == ("Номер заказа",)
    migration = settings.section(MIGRATION_SECTION)
    assert migration.memory_budget_bytes == 512 * 1024**2 and migration.caps.max_ratio == 100
    assert "chats" in settings.section(TARGETS_SECTION)  # built-ins stay


@pytest.mark.parametrize("text,key,says", [
    ('[targets.t]\ntable = "t"\nkey = ["id"]\ncolumns = [{ name = "id", type = "jsonb" }]',
     "targets.t.columns[0].type", "supported"),
    ('[targets.t]\nkey = ["nope"]\ncolumns = [{ name = "id", type = "bigint" }]',
     "targets.t.key", "not among the columns"),
    ('[targets.t]\nkey = ["id"]\ncolumns = [{ name = "id", type = "bigint", colour = 1 }]',
     "targets.t.columns[0].colour", "unknown key"),
    ('[targets.t]\ntable = "drop table"\nkey = ["id"]\ncolumns = [{ name = "id", type = "int" }]',
     "targets.t.table", "table name"),
    ('[targets.t]\ntable = "chats"\nkey = ["id"]\ncolumns = [{ name = "id", type = "int" }]',
     "targets.t.table", "already used by target 'chats'"),
    ('[migration]\ntimezone = "Mars/Base"', "migration.timezone", "IANA"),
    ('[migration]\ndefault_target = "nope"', "migration.default_target", "known: chats"),
    ('[migration]\nreader = "pandas"', "migration.reader", "calamine"),
    ('[migration]\nbatch_rows = 0', "migration.batch_rows", ">= 1"),
    ('[migration]\nmax_upload = 5', "migration.max_upload", "unknown key"),
])
def test_bad_values_name_the_key_and_what_is_allowed(tmp_path: Path, text: str, key: str,
                                                      says: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from(tmp_path, text)
    assert info.value.key == key and says in str(info.value)
