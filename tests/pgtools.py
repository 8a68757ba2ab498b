"""A real PostgreSQL server for the test session, with per-test databases."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit, urlunsplit


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

    def stop(self, mode: str = "immediate") -> None:
        """Stop the server (``immediate``: as a crash would; ``fast``: as an
        administrator's restart does, terminating every session)."""
        if self.pgdata is None:
            return
        from pgserver import _commands

        _commands.pg_ctl(["-w", "-m", mode, "stop"], pgdata=self.pgdata,
                         user=self.system_user, timeout=30)

    def start(self) -> None:
        """Start a stopped server again, on the same socket (``pgserver``'s own flags)."""
        assert self.pgdata is not None, "only a server this session started can be restarted"
        from pgserver import _commands

        socket_dir = parse_qs(urlsplit(self.base_url).query)["host"][0]
        _commands.pg_ctl(["-w", "-o", '-h ""', "-o", f"-k {socket_dir}",
                          "-l", str(self.pgdata / "restart.log"), "start"],
                         pgdata=self.pgdata, user=self.system_user, timeout=30)


def start_test_server(directory: Path) -> PgServer:
    external = os.environ.get("NURSERYD_TEST_DATABASE_URL")
    if external:
        return PgServer(base_url=external, pgdata=None, system_user=None)
    import pgserver

    server = pgserver.get_server(directory / "pgdata", cleanup_mode=None)
    return PgServer(base_url=server.get_uri(), pgdata=server.pgdata,
                    system_user=server.system_user)
