"""Every SQL statement about ``job_notes``: the lines a job's kind writes for its
operator (``JobContext.note``), read back by ``GET /jobs/{id}/log``."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from ..store.base import JobNote
from .database import Database

#: Notes kept per job, over all its attempts; later ones are dropped by the insert,
#: so a kind that notes in a loop cannot grow the table without bound.
MAX_NOTES_PER_JOB = 500


async def insert_notes(db: Database, notes: Sequence[JobNote]) -> list[None]:
    """Store many notes in one round trip (one result per note, for the group
    committer). Notes of jobs deleted meanwhile are skipped, not an error."""
    if notes:
        # row_number: the notes of one batch count against the bound among themselves.
        await db.execute(
            "INSERT INTO job_notes (job_id, attempt, at, level, message)"
            " SELECT n.job_id, n.attempt, n.at, n.level, n.message FROM ("
            "   SELECT u.*, row_number() OVER (PARTITION BY u.job_id ORDER BY u.ord) AS nth"
            "   FROM unnest($1::bigint[], $2::int[], $3::timestamptz[], $4::text[], $5::text[])"
            "     WITH ORDINALITY AS u(job_id, attempt, at, level, message, ord)) AS n"
            " WHERE EXISTS (SELECT 1 FROM jobs WHERE jobs.id = n.job_id)"
            " AND n.nth + (SELECT count(*) FROM job_notes j WHERE j.job_id = n.job_id) <= $6",
            [note.job_id for note in notes], [note.attempt for note in notes],
            [note.at for note in notes], [note.level for note in notes],
            [note.message for note in notes], MAX_NOTES_PER_JOB)
    return [None] * len(notes)


async def notes_of(db: Database, job_id: int, limit: int) -> list[asyncpg.Record]:
    """The newest ``limit`` notes of one job, oldest first."""
    rows = await db.fetch(
        "SELECT id, attempt, at, level, message FROM job_notes WHERE job_id = $1"
        " ORDER BY id DESC LIMIT $2", job_id, limit)
    return rows[::-1]
