"""Shared fixtures: one real PostgreSQL server per test session, a fresh
database per test, and the trio-asyncio loop the daemon's database code needs.

The server is the same embedded ``pgserver`` build the daemon uses, started in a
temporary directory (or the server at ``NURSERYD_TEST_DATABASE_URL`` if set), so
``make test`` needs nothing installed by hand.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio_asyncio

from nurseryd.db import Database, open_database
from nurseryd.db.migrate import apply_migrations
from tests.pgtools import PgServer, start_test_server


def pg_traversable_dir(prefix: str) -> Path:
    """A directory the unprivileged ``pgserver`` user can always reach.

    Not under pytest's ``/tmp/pytest-of-<user>``: every pytest session that starts
    resets that directory to mode 0700, which would lock the server out of its own
    data directory whenever two test sessions share the machine.
    """
    return Path(tempfile.mkdtemp(prefix=prefix))


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    directory = pg_traversable_dir("nurseryd-test-pg-")
    server = start_test_server(directory)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def database_url(pg_server: PgServer) -> Iterator[str]:
    """A new, empty database for this test; dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    pg_server.create_database(name)
    try:
        yield pg_server.url(name)
    finally:
        pg_server.drop_database(name)


@pytest.fixture
async def aio_loop() -> AsyncIterator[trio_asyncio.TrioEventLoop]:
    async with trio_asyncio.open_loop() as loop:
        yield loop


@pytest.fixture
async def db(database_url: str, aio_loop: object) -> AsyncIterator[Database]:
    """A pool on this test's database, with the daemon's schema applied."""
    async with open_database(database_url, min_size=1, max_size=8) as database:
        await apply_migrations(database)
        yield database


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    return path

