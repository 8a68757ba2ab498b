"""Hostile bodies are bounded (issue 10): unread bodies, slow bodies, multipart tricks,
too many uploads at once. Real daemon, raw sockets where a client library would
be too polite."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio

from nurseryd.http import jobs as jobs_http
from nurseryd.http import uploads
from nurseryd.http.bodies import BUFFER_CAP
from nurseryd.http.uploads import valid_boundary
from tests.daemon_process import InProcessDaemon, make_settings, run_daemon


@pytest.fixture
async def daemon(database_url: str, state_dir: Path):
    async with run_daemon(make_settings(database_url, state_dir)) as running:
        yield running


async def connect(daemon: InProcessDaemon) -> trio.SocketStream:
    host, port = daemon.base_url.removeprefix("http://").rsplit(":", 1)
    return await trio.open_tcp_stream(host, int(port))


def head(path: str, content_type: str, length: int | None = None) -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"{framing}\r\n\r\n").encode()


async def answer(stream: trio.SocketStream, timeout: float = 10) -> bytes:
    with trio.fail_after(timeout):
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            data += chunk
        return data


async def test_a_body_no_handler_reads_is_not_kept(daemon: InProcessDaemon) -> None:
    """The probe: 1.35 GB sent to POST /jobs/{id}/cancel took the daemon from 184 MB
    to 1.57 GB, as Quart buffers what no handler reads. The app's request class
    caps that buffer by route: fed 8 MiB, a cancel request keeps at most the cap,
    while the upload route (which streams to disk) is not capped here."""
    app_request = daemon_app_request_class(daemon)
    cancel = make_request(app_request, "/jobs/1/cancel")
    for _ in range(8):
        cancel.body.append(b"x" * (1024 * 1024))
    assert len(cancel.body._data) <= BUFFER_CAP + 1024 * 1024  # the cap, plus the chunk past it
    upload = make_request(app_request, "/migration/excel")
    assert upload.body._max_content_length is None


def daemon_app_request_class(daemon: InProcessDaemon) -> type:
    from nurseryd.features import FEATURES
    from nurseryd.http.app import create_app

    return create_app(daemon.services, FEATURES).request_class


def make_request(cls: type, path: str):  # noqa: ANN201 - a quart request
    from werkzeug.datastructures import Headers

    return cls("POST", "http", path, b"", Headers(), "", "1.1",
               {"type": "http", "path": path}, max_content_length=None,
               send_push_promise=None)


async def test_a_slow_json_body_gets_408(daemon: InProcessDaemon,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs_http, "JSON_BODY_DEADLINE_S", 1.0)
    stream = await connect(daemon)
    await stream.send_all(head("/jobs/sleep", "application/json", 100) + b"{")
    started = time.monotonic()
    response = await answer(stream, timeout=10)
    assert response.startswith(b"HTTP/1.1 408"), response
    assert time.monotonic() - started < 5
    await stream.aclose()


async def test_whitespace_after_a_boundary_is_bounded_and_linear(
        daemon: InProcessDaemon) -> None:
    """16 MiB of spaces after a boundary took 5.8 s of event loop (quadratic)."""
    stream = await connect(daemon)
    padding = b" " * (16 * 1024 * 1024)
    body = b"--B" + padding
    await stream.send_all(head("/migration/excel", "multipart/form-data; boundary=B",
                               len(body)))
    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        async def send() -> None:
            try:
                await stream.send_all(body)
            except trio.BrokenResourceError:
                pass

        nursery.start_soon(send)
        response = await answer(stream)
        nursery.cancel_scope.cancel()
    assert response.startswith(b"HTTP/1.1 400"), response
    assert time.monotonic() - started < 2
    await stream.aclose()


def test_boundaries_follow_rfc_2046() -> None:
    assert valid_boundary("----WebKitFormBoundary7MA4YWxkTrZu0gW")
    assert valid_boundary("a'()+_,-./:=? b")
    assert not valid_boundary("")
    assert not valid_boundary("x" * 71)
    assert not valid_boundary("trailing ")
    assert not valid_boundary("semi;colon")
    assert not valid_boundary("ünïcode")


async def test_an_invalid_boundary_is_refused(daemon: InProcessDaemon) -> None:
    response = await daemon.client.post(
        "/migration/excel", content=b"--x\r\n",
        headers={"Content-Type": 'multipart/form-data; boundary="' + "b" * 80 + '"'})
    assert response.status_code == 400 and "boundary" in response.json()["detail"]


async def test_a_trickling_upload_is_dropped(daemon: InProcessDaemon,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uploads, "MIN_RATE_GRACE_S", 0.5)
    stream = await connect(daemon)
    await stream.send_all(head("/migration/excel", "multipart/form-data; boundary=B", 10_000))
    await stream.send_all(b"-")
    await trio.sleep(1.0)
    await stream.send_all(b"-")
    response = await answer(stream)
    assert response.startswith(b"HTTP/1.1 408"), response
    await stream.aclose()


async def test_uploads_at_once_are_bounded(daemon: InProcessDaemon) -> None:
    streams = []
    for _ in range(uploads.MAX_CONCURRENT_UPLOADS):
        stream = await connect(daemon)
        await stream.send_all(head("/migration/excel", "multipart/form-data; boundary=B",
                                   1_000_000) + b"--B\r\n")
        streams.append(stream)
    await trio.sleep(0.3)  # every one of them is inside its handler now
    refused = await daemon.client.post(
        "/migration/excel", files={"file": ("x.xlsx", b"PK")})
    assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
    for stream in streams:
        await stream.aclose()
    await trio.sleep(0.3)
    accepted = await daemon.client.post("/migration/excel", files={"file": ("x.xlsx", b"PK")})
    assert accepted.status_code != 503  # a place is free again (the file itself is no xlsx)


# -- the zip directory ------------------------------------------------------------------


def _many_entries(path: Path, entries: int) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("[Content_Types].xml", "<Types/>")
        archive.writestr("xl/workbook.xml", "<workbook/>")
        for index in range(entries):
            archive.writestr(f"x/{index}", b"")
    return path


def test_the_entry_count_is_checked_before_the_directory_is_read(tmp_path: Path) -> None:
    """A 45 MB zip of 500,000 entries cost +264 MB in the daemon: zipfile builds
    every entry first. The count is now read from the end record, and the walk
    over the directory keeps nothing but the few names it looks for."""
    import tracemalloc

    from nurseryd.kinds.migrate.xlsx_checks import UploadRejected, sniff_upload

    path = _many_entries(tmp_path / "many.xlsx", 60_000)
    tracemalloc.start()
    try:
        with pytest.raises(UploadRejected) as refused:
            sniff_upload(path, max_entries=10_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert refused.value.status == 422 and "60,002 zip entries" in refused.value.detail
    assert peak < 1024 * 1024, peak
    sniff_upload(path, max_entries=100_000)  # allowed: a workbook by its names
    tracemalloc.start()
    try:
        sniff_upload(path, max_entries=100_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024, peak  # the walk keeps no entry


def test_a_damaged_directory_is_a_clear_422(tmp_path: Path) -> None:
    from nurseryd.kinds.migrate.xlsx_checks import UploadRejected, sniff_upload

    path = _many_entries(tmp_path / "cut.xlsx", 10)
    data = path.read_bytes()
    path.write_bytes(data[:-30])  # the end record cut off
    with pytest.raises(UploadRejected) as refused:
        sniff_upload(path)
    assert refused.value.status == 422 and "cannot be read" in refused.value.detail


async def test_a_connection_whose_body_was_not_read_is_closed_not_wedged(
        database_url: str, state_dir: Path) -> None:
    """Answered before its body arrived (a refusal, a cancel), a keep-alive
    connection used to hang its next request forever: hypercorn had stopped
    reading it. Such answers now close the connection."""
    import dataclasses

    from nurseryd.credentials import parse_access

    settings = make_settings(database_url, state_dir)
    settings = dataclasses.replace(settings, access=parse_access(
        None, {"NURSERYD_API_TOKEN": "keepalive-token-0123456789"}, bind_host="127.0.0.1"))
    async with run_daemon(settings) as daemon:
        stream = await connect(daemon)
        body = b" " * 300_000
        await stream.send_all(head("/fetch", "application/json", len(body)))
        async with trio.open_nursery() as nursery:
            async def send() -> None:
                try:
                    await stream.send_all(body)
                    await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
                except trio.BrokenResourceError:
                    pass

            nursery.start_soon(send)
            first = await answer(stream)
        assert first.startswith(b"HTTP/1.1 401"), first
        assert b"connection: close" in first.lower()
        await stream.aclose()
        ok = await daemon.client.get("/healthz")
        assert ok.status_code == 200


# -- amplification ------------------------------------------------------------------------


async def test_stored_rejects_are_capped_and_the_rest_counted(
        database_url: str, state_dir: Path, tmp_path: Path) -> None:
    """A small upload could store millions of rejects with their raw values; now at
    most migration.max_stored_rejects per job are kept, the rest only counted."""
    import dataclasses

    from tests import xlsx_factory as xf

    settings = make_settings(database_url, state_dir)
    migration = dataclasses.replace(settings.section("migration"), max_stored_rejects=3,
                                    batch_rows=4)
    settings = dataclasses.replace(settings, sections={**settings.sections,
                                                       "migration": migration})
    rows = [list(xf.chat_row(i)) for i in range(1, 21)]
    for row in rows[::2]:
        row[9] = "many"  # message_count: 10 rejects
    path = xf.write_openpyxl(tmp_path / "bad.xlsx", rows)
    async with run_daemon(settings) as daemon:
        response = await daemon.client.post(
            "/migration/excel", files={"file": ("bad.xlsx", path.read_bytes())})
        assert response.status_code == 202, response.text
        job = await daemon.wait_for_status(response.json()["id"], "completed", "failed",
                                           timeout=30)
        assert (job["status"], job["processed"], job["failed"]) == ("completed", 10, 10)
        page = (await daemon.client.get(f"/jobs/{job['id']}/rejects")).json()
        assert len(page["rejects"]) == 3 and page["not_stored"] == 7
        stored = await daemon.services.db.fetchval(
            "SELECT count(*) FROM migration_rejects WHERE job_id = $1", job["id"])
        assert stored == 3


async def test_a_page_of_jobs_is_bounded_in_bytes(daemon: InProcessDaemon,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """GET /jobs?limit=500 with large params answered 31 MB; a page now stops at
    MAX_PAGE_BYTES and its next link continues after the last job sent."""
    monkeypatch.setattr(jobs_http, "MAX_PAGE_BYTES", 40_000)
    for _ in range(12):
        response = await daemon.client.post("/jobs/noop", json={"blob": "x" * 10_000})
        assert response.status_code == 202
    first = (await daemon.client.get("/jobs?limit=500")).json()
    assert 1 <= len(first["jobs"]) < 12 and first["next"] is not None
    seen = [job["id"] for job in first["jobs"]]
    url = first["next"]
    while url:
        page = (await daemon.client.get(url)).json()
        seen += [job["id"] for job in page["jobs"]]
        url = page["next"]
    assert sorted(seen, reverse=True) == seen and len(set(seen)) == 12
