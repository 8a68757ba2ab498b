"""Where uploaded workbooks wait for their job, and the sweep of abandoned ones.

An upload is kept while its job may still read it: until the job completes,
or for ``[migration] keep_ended_uploads`` after it ended failed, cancelled or
timed out (a restarted daemon, or an operator's retry, resumes from it).
Files named ``*.part`` are uploads still being received; ``*.xlsx`` belong to a
job (its ``params.upload``). A file no job may still read is an orphan once it
is older than GRACE_S, at start too: daemons sharing a state directory may be
receiving an upload while another one starts.
"""

from __future__ import annotations

import logging
import secrets
import time
from pathlib import Path

from ...db import Database
from ...db import jobs as jobsdb

log = logging.getLogger(__name__)

UPLOADS = "uploads"
#: An upload becomes a job within milliseconds of being renamed, and a ``.part``
#: file that arrives slower than 16 KiB/s is refused (408): a sweep leaves younger
#: files alone, whichever daemon received them.
GRACE_S = 600.0


def uploads_dir(state_dir: Path) -> Path:
    return Path(state_dir) / UPLOADS


def new_upload_paths(state_dir: Path) -> tuple[Path, Path]:
    """(file to stream into, final name once accepted): random, never the client's name."""
    directory = uploads_dir(state_dir)
    directory.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(16)
    return directory / f"{token}.part", directory / f"{token}.xlsx"


def upload_path(state_dir: Path, name: str) -> Path:
    """The stored upload for a job's ``params.upload`` (a bare file name)."""
    if "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"not an upload name: {name!r}")
    return uploads_dir(state_dir) / name


async def sweep_uploads(db: Database, state_dir: Path, *,
                        keep_ended_s: float = 0.0) -> list[str]:
    """Delete uploads no job may still read; returns the names removed."""
    directory = uploads_dir(state_dir)
    if not directory.is_dir():
        return []
    needed = await jobsdb.uploads_in_use(db, "migration", keep_ended_s)
    now = time.time()
    removed = []
    for path in directory.iterdir():
        if path.name in needed or not path.is_file():
            continue
        if now - path.stat().st_mtime < GRACE_S:
            continue
        try:
            path.unlink()
            removed.append(path.name)
        except FileNotFoundError:
            pass
    if removed:
        log.info("removed %d abandoned upload(s) from %s", len(removed), directory)
    return removed
