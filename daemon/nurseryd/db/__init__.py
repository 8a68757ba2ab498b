"""The PostgreSQL boundary: the pool (asyncpg behind trio-asyncio), the embedded server,
schema migrations and named queries."""

from .database import Database, open_database

__all__ = ["Database", "open_database"]
