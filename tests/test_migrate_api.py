"""POST /migration/excel end to end: real HTTP, the whole daemon in this Trio run,
real PostgreSQL, real workbook files."""

from __future__ import annotations

import dataclasses
import os
import secrets
import time
from pathlib import Path

import httpx
import pytest
import trio

from nurseryd.kinds.migrate.uploads_dir import uploads_dir
from tests import xlsx_factory as xf
from tests.daemon_process import InProcessDaemon, make_settings, run_daemon

ROWS = [xf.chat_row(i) for i in range(1, 301)]


@pytest.fixture
async def daemon(database_url: str, state_dir: Path):
    settings = make_settings(database_url, state_dir)
    migration = dataclasses.replace(settings.section("migration"),
                                    max_upload_bytes=2 * 1024**2, batch_rows=100)
    settings = dataclasses.replace(settings,
                                   sections={**settings.sections, "migration": migration})
    async with run_daemon(settings) as running:
        yield running


async def upload(daemon: InProcessDaemon, path: Path, **fields: str) -> httpx.Response:
    content = await trio.Path(path).read_bytes()
    return await daemon.client.post(
        "/migration/excel", files={"file": (path.name, content)}, data=fields)


async def finished(daemon: InProcessDaemon, job_id: int) -> dict:
    await daemon.wait_for_status(job_id, "completed", "failed", "cancelled", timeout=30)
    return (await daemon.client.get(f"/migration/jobs/{job_id}")).json()


def stored_uploads(daemon: InProcessDaemon) -> list[str]:
    directory = uploads_dir(daemon.services.settings.state_dir)
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


async def test_upload_imports_and_reports_exact_counts(daemon: InProcessDaemon,
                                                       tmp_path: Path) -> None:
    rows = [list(r) for r in ROWS]
    rows[10][9] = "many"  # message_count: a reject
    path = xf.write_xlsxwriter(tmp_path / "chats.xlsx", rows)
    response = await upload(daemon, path)
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/migration/jobs/{job['id']}"
    assert job["source_type"] == "excel" and job["kind"] == "migration"
    assert job["params"]["upload"] != "chats.xlsx" and job["params"]["filename"] == "chats.xlsx"
    done = await finished(daemon, job["id"])
    assert (done["status"], done["total"], done["processed"], done["failed"]) == \
        ("completed", 300, 299, 1), done
    assert done["source_type"] == "excel" and done["result"]["reader"] == "arrow-stream"
    same = (await daemon.client.get(f"/jobs/{job['id']}")).json()
    assert same["status"] == "completed" and same["processed"] == 299
    db = daemon.services.db
    assert await db.fetchval("SELECT count(*) FROM chats") == 299
    assert stored_uploads(daemon) == []  # deleted once the job ended

    page = (await daemon.client.get(f"/jobs/{job['id']}/rejects")).json()
    assert page["rejects"] == [{"row": 12, "column": "message_count",
                                "reason": "not a number: 'many'",
                                "values": page["rejects"][0]["values"]}]
    assert page["rejects"][0]["values"]["message_count"] == "many" and page["next"] is None

    again = (await upload(daemon, path)).json()  # idempotent re-import
    done = await finished(daemon, again["id"])
    assert done["processed"] == 299 and done["result"]["unchanged"] == 299
    assert await db.fetchval("SELECT count(*) FROM chats") == 299


async def test_target_sheet_and_russian_headers(daemon: InProcessDaemon, tmp_path: Path) -> None:
    header = ["ID чата", "Внешний ID", "Канал", "Статус", "Дата создания",
              "Количество сообщений", "VIP"]
    rows = [[i, f"E{i}", "web", "open", f"2024-03-0{i} 10:00", i, "да"] for i in range(1, 5)]

    def second_sheet(workbook, worksheet) -> None:
        other = workbook.create_sheet("Выгрузка")
        other.append(header)
        for row in rows:
            other.append(row)

    path = xf.write_openpyxl(tmp_path / "ru.xlsx", [], header=["junk"], extra=second_sheet)
    job = (await upload(daemon, path, target="chats", sheet="Выгрузка")).json()
    done = await finished(daemon, job["id"])
    assert done["status"] == "completed" and done["processed"] == 4, done
    assert done["result"]["sheet"] == "Выгрузка"


async def test_rejects_are_paginated(daemon: InProcessDaemon, tmp_path: Path) -> None:
    rows = [list(r) for r in ROWS[:30]]
    for row in rows[:25]:
        row[12] = "maybe"
    job = (await upload(daemon, xf.write_openpyxl(tmp_path / "r.xlsx", rows))).json()
    await finished(daemon, job["id"])
    seen, url = [], f"/jobs/{job['id']}/rejects?limit=10"
    while url:
        page = (await daemon.client.get(url)).json()
        seen += [r["row"] for r in page["rejects"]]
        url = page["next"]
    assert seen == list(range(2, 27))
    bad = await daemon.client.get(f"/jobs/{job['id']}/rejects?limit=0")
    assert bad.status_code == 422


@pytest.mark.parametrize("build,status,says", [
    (lambda p: p.write_bytes(b"chat_id,status\n1,open\n") and p, 415, "CSV"),
    (xf.legacy_xls, 415, ".xls"),
    (xf.encrypted_xlsx, 422, "password-protected"),
    (xf.docx_like, 415, "Word document"),
])
async def test_bad_files_are_refused_at_upload(daemon: InProcessDaemon, tmp_path: Path, build,
                                               status: int, says: str) -> None:
    path = tmp_path / "upload.xlsx"
    build(path)
    response = await upload(daemon, path)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert says in response.json()["detail"] and ".xlsx" in response.json()["detail"]
    assert stored_uploads(daemon) == []


async def test_malformed_requests_get_clear_4xx(daemon: InProcessDaemon, tmp_path: Path) -> None:
    path = xf.write_openpyxl(tmp_path / "ok.xlsx", ROWS[:2])
    no_file = await daemon.client.post("/migration/excel", data={"target": "chats"})
    assert no_file.status_code in (415, 422) and "file" in no_file.json()["detail"]
    raw = await daemon.client.post("/migration/excel", content=path.read_bytes(),
                                   headers={"Content-Type": "application/octet-stream"})
    assert raw.status_code == 415 and "multipart/form-data" in raw.json()["detail"]
    target = await upload(daemon, path, target="nope")
    assert target.status_code == 422 and "chats" in target.json()["detail"]
    unknown = await upload(daemon, path, colour="red")
    assert unknown.status_code == 422 and "colour" in unknown.json()["detail"]
    assert (await daemon.client.get("/migration/jobs/999")).status_code == 404
    assert stored_uploads(daemon) == []


async def test_upload_cap_holds_with_and_without_content_length(daemon: InProcessDaemon) -> None:
    big = secrets.token_bytes(3 * 1024**2)  # the fixture's cap is 2 MiB
    boundary = "nurserydtest"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"big.xlsx\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    sized = await daemon.client.post("/migration/excel", content=head + big + tail,
                                     headers=headers)
    assert sized.status_code == 413 and "limit" in sized.json()["detail"]

    sent = 0

    async def chunked():
        nonlocal sent
        yield head
        for start in range(0, len(big), 64 * 1024):
            sent += 64 * 1024
            yield big[start:start + 64 * 1024]
        yield tail

    try:
        response = await daemon.client.post("/migration/excel", content=chunked(),
                                            headers=headers)
        assert response.status_code == 413
    except httpx.HTTPError as e:
        print(repr(e))  # the server may close the connection while we are still sending
    assert stored_uploads(daemon) == []  # the partial file is gone
    health = await daemon.client.get("/healthz")
    assert health.status_code == 200


async def test_hostile_upload_fails_the_job_and_the_daemon_stays_up(
        daemon: InProcessDaemon, tmp_path: Path) -> None:
    job = (await upload(daemon, xf.sparse_dimension(tmp_path / "sparse.xlsx"))).json()
    with trio.fail_after(2):
        done = await finished(daemon, job["id"])
    assert done["status"] == "failed" and "column 16384" in done["error"]
    assert (await daemon.client.get("/readyz")).status_code == 200
    # Kept for [migration] keep_ended_uploads, so a retry could read it again.
    assert stored_uploads(daemon) == [job["params"]["upload"]]


async def test_cancel_mid_import_keeps_committed_rows_and_rerun_completes(
        daemon: InProcessDaemon, tmp_path: Path) -> None:
    rows = [xf.chat_row(i) for i in range(1, 2001)]
    path = xf.write_xlsxwriter(tmp_path / "c.xlsx", rows)
    job = (await upload(daemon, path)).json()

    async def some_rows() -> dict | None:
        current = (await daemon.client.get(f"/migration/jobs/{job['id']}")).json()
        return current if current["processed"] >= 100 else None

    from tests.polling import eventually

    await eventually(some_rows, timeout=20, interval=0.005)
    cancel = await daemon.client.post(f"/jobs/{job['id']}/cancel")
    assert cancel.status_code in (200, 202)
    done = await finished(daemon, job["id"])
    db = daemon.services.db
    kept = await db.fetchval("SELECT count(*) FROM chats")
    if done["status"] == "cancelled":
        assert kept == done["processed"] < 2000  # committed batches stay, nothing more
    again = (await upload(daemon, path)).json()
    done = await finished(daemon, again["id"])
    assert done["status"] == "completed" and done["processed"] == 2000
    assert await db.fetchval("SELECT count(*) FROM chats") == 2000


async def test_a_cancelled_import_retries_from_its_checkpoint_with_its_kept_upload(
        daemon: InProcessDaemon, tmp_path: Path) -> None:
    from tests.polling import eventually

    rows = [xf.chat_row(i) for i in range(1, 3001)]
    rows[2500][9] = "many"  # message_count: one reject, after the cancel point
    job = (await upload(daemon, xf.write_xlsxwriter(tmp_path / "c.xlsx", rows))).json()

    async def some_rows() -> dict | None:
        current = (await daemon.client.get(f"/migration/jobs/{job['id']}")).json()
        return current if current["processed"] >= 100 else None

    await eventually(some_rows, timeout=20, interval=0.005)
    await daemon.client.post(f"/jobs/{job['id']}/cancel")
    cancelled = await finished(daemon, job["id"])
    if cancelled["status"] != "cancelled":
        pytest.skip("the import completed before the cancel reached it")
    assert stored_uploads(daemon) == [job["params"]["upload"]]  # kept for a retry
    checkpoint = await daemon.services.db.fetchval(
        "SELECT checkpoint FROM jobs WHERE id = $1", job["id"])
    assert checkpoint is not None

    retried = await daemon.client.post(f"/jobs/{job['id']}/retry")
    assert retried.status_code == 202, retried.text
    done = await finished(daemon, job["id"])
    assert (done["status"], done["total"], done["processed"], done["failed"]) == \
        ("completed", 3000, 2999, 1)
    assert done["attempts"] == cancelled["attempts"] + 1
    db = daemon.services.db
    assert await db.fetchval("SELECT count(*) FROM chats") == 2999
    rejects = (await daemon.client.get(f"/jobs/{job['id']}/rejects")).json()["rejects"]
    assert [reject["row"] for reject in rejects] == [2502]  # header is row 1
    assert stored_uploads(daemon) == []  # completed: the file goes at once
    lines = (await daemon.client.get(f"/jobs/{job['id']}/log")).json()["lines"]
    assert [line["event"] for line in lines][-3:] == ["started", "note", "finished"]
    assert lines[-2]["level"] == "warning"
    assert lines[-2]["message"].startswith("attempt 2: 1 row(s) rejected")


def _age(path: Path, seconds: float = 3600) -> None:
    """Make ``path`` look ``seconds`` old, past the sweep's grace for young files."""
    old = time.time() - seconds
    os.utime(path, (old, old))


async def test_uploads_of_ended_imports_go_once_their_keep_window_passed(
        daemon: InProcessDaemon, tmp_path: Path) -> None:
    from nurseryd.kinds.migrate.uploads_dir import sweep_uploads, upload_path

    job = (await upload(daemon, xf.sparse_dimension(tmp_path / "sparse.xlsx"))).json()
    await finished(daemon, job["id"])
    state_dir = daemon.services.settings.state_dir
    db = daemon.services.db
    _age(upload_path(state_dir, job["params"]["upload"]))
    assert await sweep_uploads(db, state_dir, keep_ended_s=3600) == []
    assert await sweep_uploads(db, state_dir, keep_ended_s=0) == [job["params"]["upload"]]
    refused = await daemon.client.post(f"/jobs/{job['id']}/retry")
    assert refused.status_code == 409
    assert "keep_ended_uploads" in refused.json()["detail"]


async def test_orphan_uploads_are_removed_but_not_young_ones_nor_those_of_queued_jobs(
        database_url: str, state_dir: Path, aio_loop: object) -> None:
    from nurseryd.db import open_database
    from nurseryd.db.migrate import apply_migrations
    from nurseryd.kinds.migrate.uploads_dir import sweep_uploads

    directory = uploads_dir(state_dir)
    directory.mkdir(parents=True)
    for name in ("crashed-request.part", "finished-job.xlsx", "queued-job.xlsx"):
        (directory / name).write_bytes(b"PK")
    async with open_database(database_url, min_size=1, max_size=1) as db:
        await apply_migrations(db)
        await db.execute(
            "INSERT INTO jobs (kind, status, params, timeout_s) VALUES"
            " ('migration', 'queued', $1, 60), ('migration', 'completed', $2, 60)",
            {"source_type": "excel", "upload": "queued-job.xlsx", "target": "nope"},
            {"source_type": "excel", "upload": "finished-job.xlsx", "target": "chats"})
        # Young files are left alone, at start too: an upload may be between its
        # rename and its job's insert, or still arriving at a daemon that shares
        # this state directory.
        assert await sweep_uploads(db, state_dir) == []
        for path in directory.iterdir():
            _age(path)
        removed = await sweep_uploads(db, state_dir)
    assert sorted(removed) == ["crashed-request.part", "finished-job.xlsx"]
    assert (directory / "queued-job.xlsx").exists()

    (directory / "another-orphan.part").write_bytes(b"PK")
    _age(directory / "another-orphan.part")
    (directory / "a-peer-is-receiving.part").write_bytes(b"PK")
    async with run_daemon(make_settings(database_url, state_dir)):
        assert not (directory / "another-orphan.part").exists()  # the start-up sweep
        assert (directory / "a-peer-is-receiving.part").exists()


async def test_client_gone_mid_upload_leaves_no_file(daemon: InProcessDaemon) -> None:
    from tests.polling import eventually

    host, port = daemon.base_url.removeprefix("http://").split(":")
    boundary = "gone"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"x.xlsx\"\r\n\r\n").encode() + b"PK\x03\x04" + b"x" * 200_000
    stream = await trio.open_tcp_stream(host, int(port))
    await stream.send_all(
        b"POST /migration/excel HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; "
        b"boundary=gone\r\nContent-Length: 1000000\r\n\r\n" + head)

    async def receiving() -> bool:
        return any(name.endswith(".part") for name in stored_uploads(daemon))

    await eventually(receiving, timeout=5, interval=0.01)  # the handler is streaming it
    await stream.aclose()  # the client vanishes mid-body

    async def cleaned() -> bool:
        return stored_uploads(daemon) == []

    await eventually(cleaned, timeout=10, interval=0.02)
    assert (await daemon.client.get("/healthz")).status_code == 200
