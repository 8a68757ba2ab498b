"""Hostile feeds (issue 10): stacked Content-Encoding, bombs inside one chunk,
redirects to other origins or to plain http, API keys following redirects."""

from __future__ import annotations

import gzip
import tracemalloc
import zlib

import pytest
import trio

from nurseryd.backoff import RetryPolicy
from nurseryd.kinds.fetch.client import (
    BoundedDecoder,
    FetchError,
    Page,
    get_page,
    open_client,
    redirect_target,
)
from tests.fetch_servers import Reply, open_local_server

POLICY = RetryPolicy(max_attempts=1, base_s=0.01, cap_s=0.01)


async def fetch(url: str, *, headers: dict[str, str] | None = None,
                max_bytes: int = 1024 * 1024, cross_origin_redirects: bool = False) -> Page:
    async with open_client(concurrency=1, user_agent="test") as client:
        return await get_page(client, url, headers=headers or {}, max_bytes=max_bytes,
                              deadline=trio.current_time() + 30, policy=POLICY,
                              cross_origin_redirects=cross_origin_redirects)


async def test_stacked_encodings_are_refused_without_inflating() -> None:
    """The probe: ``gzip, gzip`` turned 660 bytes into +600 MB before the cap fired."""
    inner = gzip.compress(b" " * (200 * 1024 * 1024))
    bomb = gzip.compress(inner)
    async with open_local_server() as server:
        url = server.static("/bomb", Reply(body=bomb,
                                           headers=[("Content-Encoding", "gzip, gzip")]))
        with pytest.raises(FetchError, match="stacked Content-Encoding"):
            await fetch(url)


async def test_a_one_chunk_bomb_is_stopped_within_a_step() -> None:
    """One 200 KB gzip chunk inflating to 200 MB: decoded 64 KiB at a time, the cap
    stops it before the memory is spent."""
    bomb = gzip.compress(b"[" + b" " * (200 * 1024 * 1024) + b"]")
    async with open_local_server() as server:
        url = server.static("/bomb", Reply(body=bomb, headers=[("Content-Encoding", "gzip")]))
        tracemalloc.start()
        try:
            with pytest.raises(FetchError, match="exceeded the limit"):
                await fetch(url, max_bytes=1024 * 1024)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 32 * 1024 * 1024, peak


def test_the_decoder_decodes_gzip_deflate_and_raw_deflate() -> None:
    text = b"hello " * 1000
    raw = zlib.compressobj(wbits=-15)
    raw_deflate = raw.compress(text) + raw.flush()
    for encoding, data in (("gzip", gzip.compress(text)), ("deflate", zlib.compress(text)),
                           ("deflate", raw_deflate), (None, text), ("identity", text)):
        decoder = BoundedDecoder(encoding)
        assert b"".join(decoder.feed(data)) == text, encoding
    with pytest.raises(Exception, match="unsupported"):
        BoundedDecoder("br")


def test_redirect_rules() -> None:
    here = "https://feeds.example/jobs"
    assert redirect_target(here, "/page2", cross_origin=False) == "https://feeds.example/page2"
    assert redirect_target(here, "https://feeds.example:443/x", cross_origin=False)
    with pytest.raises(FetchError, match="another origin"):
        redirect_target(here, "https://elsewhere.example/x", cross_origin=False)
    assert redirect_target(here, "https://elsewhere.example/x", cross_origin=True)
    with pytest.raises(FetchError, match="plain http"):
        redirect_target(here, "http://feeds.example/x", cross_origin=True)
    with pytest.raises(FetchError, match="refused"):
        redirect_target(here, "file:///etc/passwd", cross_origin=True)


async def test_configured_headers_never_follow_a_redirect_to_another_origin() -> None:
    async with open_local_server() as home, open_local_server() as other:
        target = other.static("/feed", Reply(body=b"[]"))
        start = home.static("/feed", Reply(302, headers=[("Location", target)]))
        with pytest.raises(FetchError, match="another origin"):
            await fetch(start, headers={"X-Api-Key": "secret-key"})
        assert other.requests_to("/feed") == []
        page = await fetch(start, headers={"X-Api-Key": "secret-key"},
                           cross_origin_redirects=True)
        assert page.status == 200
        sent = other.requests_to("/feed")[0].headers
        assert "x-api-key" not in {name.lower() for name in sent}
        same = home.static("/moved", Reply(301, headers=[("Location", "/feed-2")]))
        home.static("/feed-2", Reply(body=b"[]"))
        await fetch(same, headers={"X-Api-Key": "secret-key"})
        assert {name.lower(): value for name, value in
                home.requests_to("/feed-2")[0].headers.items()}["x-api-key"] == "secret-key"
