"""One home for SQL: the daemon's own tables are queried only under ``nurseryd/db/``.

Kinds and HTTP handlers call functions (``db/jobs.py``, ``db/items.py``,
``db/fetch_sources.py``, ``db/rejects.py``); a statement about those tables
anywhere else is a second place to keep in step with the schema. This scans the
source text, so it also catches SQL assembled in f-strings.
"""

from __future__ import annotations

import re
from pathlib import Path

import nurseryd

PACKAGE = Path(nurseryd.__file__).resolve().parent
OWN_TABLES = ("jobs", "migration_rejects", "items", "fetch_sources", "job_events")
SQL_ON_OWN_TABLE = re.compile(
    r"\b(FROM|INTO|UPDATE|JOIN|TABLE)\s+(" + "|".join(OWN_TABLES) + r")\b", re.IGNORECASE)


def _offenders() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] == "db":
            continue
        text = path.read_text(encoding="utf-8")
        for match in SQL_ON_OWN_TABLE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found.append(f"{relative}:{line}: {match.group(0)!r}")
    return found


def test_the_package_is_where_the_scan_looks() -> None:
    assert (PACKAGE / "db" / "jobs.py").is_file()
    assert (PACKAGE / "kinds").is_dir() and (PACKAGE / "http").is_dir()


def test_sql_on_the_daemons_own_tables_lives_under_db() -> None:
    offenders = _offenders()
    assert not offenders, (
        "SQL on the daemon's own tables outside nurseryd/db/ (move it into the table's "
        "module under db/ and call a function):\n  " + "\n  ".join(offenders))


def test_the_pattern_catches_what_it_is_for() -> None:
    caught = [
        "SELECT max(id) FROM jobs WHERE kind = 'fetch'",
        "insert into migration_rejects (job_id) values ($1)",
        "UPDATE fetch_sources SET url = $2",
        "WITH x AS (SELECT 1) SELECT * FROM x JOIN\n    items USING (source)",
    ]
    missed = [
        "for name, table in raw.items():",
        "SELECT id FROM jobs_archive",
        "jobs = await supervisor.list_jobs()",
        "into the items table",  # prose, not a statement
    ]
    assert all(SQL_ON_OWN_TABLE.search(text) for text in caught)
    assert not any(SQL_ON_OWN_TABLE.search(text) for text in missed)
