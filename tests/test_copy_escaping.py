"""Text columns survive a real COPY byte for byte, whatever type the source gave."""

from __future__ import annotations

from decimal import Decimal

from nurseryd.db import Database
from nurseryd.kinds.migrate.pipeline import run_pipeline
from nurseryd.kinds.migrate.sources.base import ListSource
from nurseryd.kinds.migrate.tables import ensure_target_table
from nurseryd.kinds.migrate.targets import CHATS_TARGET
from tests.test_migrate_pipeline import LocalContext, new_job
from tests.xlsx_factory import CHATS_HEADER, chat_row


class Path:
    """A non-str source value whose text holds every COPY special character."""

    def __str__(self) -> str:
        return "C:\\dir\\file\tname\nline2\\N"


async def test_non_text_values_in_text_columns_are_escaped_once(db: Database) -> None:
    await ensure_target_table(db, CHATS_TARGET)
    rows = [list(chat_row(i)) for i in range(1, 4)]
    # customer_name (a text column) receives a non-str value in each row, mixed with
    # str values in the same column, so the column-wise path handles mixed types.
    rows[0][2] = Path()
    rows[1][2] = Decimal("12.50")
    rows[2][2] = "plain \\ backslash"
    await run_pipeline(LocalContext(db, await new_job(db)), ListSource(CHATS_HEADER, rows),
                       CHATS_TARGET)
    names = [row["customer_name"] for row in
             await db.fetch("SELECT customer_name FROM chats ORDER BY chat_id")]
    assert names == ["C:\\dir\\file\tname\nline2\\N", "12.50", "plain \\ backslash"]
