"""The one way nurseryd quotes SQL identifiers it did not write itself.

Table and column names come from configuration (targets, database sources), so
they are always quoted, never interpolated raw: ``"a""b"`` is the identifier
``a"b``. Values never go through here; they are always bind parameters.
"""

from __future__ import annotations


def quote_ident(name: str) -> str:
    """``name`` as a quoted PostgreSQL (and SQLite) identifier."""
    return '"' + name.replace('"', '""') + '"'


def quote_qualified(*parts: str) -> str:
    """``schema.table`` (or any dotted path), each part quoted."""
    return ".".join(quote_ident(part) for part in parts)
