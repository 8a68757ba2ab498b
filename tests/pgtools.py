"""A real PostgreSQL server for the test session, with per-test databases."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit


@dataclass
class PgServer:
    base_url: str  # URL of the maintenance database ("postgres")
    pgdata: Path | None  # set when this session started the server itself
    system_user: str | None

    def url(self, database: str) -> str:
        parts = urlsplit(self.base_url)
        return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, ""))

    def psql(self, sql: str, database: str = "postgres") -> str:
        from pgserver._commands import POSTGRES_BIN_PATH

        return subprocess.run(
            [str(POSTGRES_BIN_PATH / "psql"), "-v", "ON_ERROR_STOP=1", "-qAt", self.url(database),
             "-c", sql],
            check=True, capture_output=True, text=True,
        ).stdout

    def create_database(self, name: str) -> None:
        self.psql(f'CREATE DATABASE "{name}"')

    def drop_database(self, name: str) -> None:
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        if self.pgdata is None:
            return
        from pgserver import _commands

        _commands.pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=self.pgdata,
                         user=self.system_user, timeout=30)


def start_test_server(directory: Path) -> PgServer:
    external = os.environ.get("NURSERYD_TEST_DATABASE_URL")
    if external:
        return PgServer(base_url=external, pgdata=None, system_user=None)
    import pgserver

    server = pgserver.get_server(directory / "pgdata", cleanup_mode=None)
    return PgServer(base_url=server.get_uri(), pgdata=server.pgdata,
                    system_user=server.system_user)
