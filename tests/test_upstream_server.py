"""Self-test of the fake upstreams in upstream_server.py, hit directly with aiohttp's client."""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import WSMsgType
from upstream_server import (
    FLAT_ERROR,
    GZIP_BODY,
    GZIP_JSON,
    HEAD_LEN,
    HUGE_SIZE,
    WS_PING_PAYLOAD,
    MalformedMode,
    MalformedUpstream,
    UpstreamServer,
    pattern_bytes,
    pattern_sha256,
    refused_url,
)
from yarl import URL

FAST = aiohttp.ClientTimeout(total=0.3)


@pytest.fixture
async def up() -> AsyncIterator[UpstreamServer]:
    async with UpstreamServer() as server:
        yield server


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    # Raw bytes on the wire are the point of most checks here.
    async with aiohttp.ClientSession(auto_decompress=False) as client:
        yield client


def test_pattern_bytes_is_continuous() -> None:
    whole = pattern_bytes(0, 1000)
    assert whole[:256] == bytes(range(256))
    assert pattern_bytes(300, 500) == whole[300:800]
    assert pattern_sha256(1000) == hashlib.sha256(whole).hexdigest()


async def test_echo_reports_request_verbatim(up: UpstreamServer, session: aiohttp.ClientSession) -> None:
    body = b"hello" * 1000
    headers = [("X-Dup", "1"), ("X-Dup", "2"), ("Content-Type", "text/plain")]
    raw = "/echo/a%2Fb/../c?x=1&x=2&e=%20"
    # encoded=True stops yarl from normalising the path before it leaves the client.
    async with session.post(URL(f"{up.url}{raw}", encoded=True), data=body, headers=headers) as resp:
        assert resp.status == 200
        echoed = await resp.json()
    digest = hashlib.sha256(body).hexdigest()
    assert echoed["method"] == "POST"
    assert echoed["raw_path"] == raw
    assert echoed["body_size"] == len(body)
    assert echoed["body_sha256"] == digest
    assert ["X-Dup", "1"] in echoed["headers"] and ["X-Dup", "2"] in echoed["headers"]
    seen = up.last
    assert (seen.method, seen.raw_path, seen.body_size, seen.body_sha256) == ("POST", raw, len(body), digest)
    assert seen.header("host") == up.host_header
    assert seen.header_all("x-dup") == ["1", "2"]


async def test_gzip_request_body_is_not_decoded(up: UpstreamServer, session: aiohttp.ClientSession) -> None:
    compressed = gzip.compress(b"{}" * 1000)
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    async with session.put(f"{up.url}/echo", data=compressed, headers=headers) as resp:
        echoed = await resp.json()
    assert echoed["body_size"] == len(compressed)
    assert echoed["body_sha256"] == hashlib.sha256(compressed).hexdigest()


async def test_connections_opened_counts_tcp_connections(up: UpstreamServer) -> None:
    async with aiohttp.ClientSession() as pooled:
        for _ in range(3):
            async with pooled.get(f"{up.url}/echo") as resp:
                await resp.read()
    assert up.connections_opened == 1
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as unpooled:
        for _ in range(2):
            async with unpooled.get(f"{up.url}/echo") as resp:
                await resp.read()
    assert up.connections_opened == 3
    assert len(up.requests) == 5


@pytest.mark.parametrize("chunked", [False, True])
async def test_bytes_streams_the_pattern(
    up: UpstreamServer, session: aiohttp.ClientSession, chunked: bool
) -> None:
    n = 3 * 64 * 1024 + 7
    digest, size = hashlib.sha256(), 0
    async with session.get(f"{up.url}/bytes/{n}", params={"chunked": "1"} if chunked else {}) as resp:
        if chunked:
            assert resp.headers["Transfer-Encoding"] == "chunked" and "Content-Length" not in resp.headers
        else:
            assert resp.content_length == n
        async for chunk in resp.content.iter_any():
            size += len(chunk)
            digest.update(chunk)
    assert (size, digest.hexdigest()) == (n, pattern_sha256(n))


async def test_sink_hashes_a_streamed_upload(up: UpstreamServer, session: aiohttp.ClientSession) -> None:
    n = 2 * 1024 * 1024 + 1

    async def upload() -> AsyncIterator[bytes]:
        for offset in range(0, n, 100_000):
            yield pattern_bytes(offset, min(100_000, n - offset))

    async with session.post(f"{up.url}/sink", data=upload()) as resp:
        assert await resp.json() == {"size": n, "sha256": pattern_sha256(n)}
    assert up.last.header("Transfer-Encoding") == "chunked"


@pytest.mark.parametrize(
    ("shape", "content_type", "expected"),
    [
        ("problem", "application/problem+json", {"title", "type", "status", "detail"}),
        ("canonical", "application/json", {"error"}),
        ("flat", "application/json", {"error", "message"}),
        ("lowercode", "application/json", {"error", "message"}),
        ("detail", "application/json", {"detail"}),
        ("code", "application/json", {"code", "message"}),
        ("longmessage", "application/json", {"message"}),
    ],
)
async def test_status_json_shapes(
    up: UpstreamServer, session: aiohttp.ClientSession, shape: str, content_type: str, expected: set[str]
) -> None:
    async with session.get(f"{up.url}/status/403", params={"shape": shape}) as resp:
        assert resp.status == 403
        assert resp.content_type == content_type
        body = json.loads(await resp.read())
    assert set(body) == expected


async def test_status_canonical_details(up: UpstreamServer, session: aiohttp.ClientSession) -> None:
    async with session.get(f"{up.url}/status/402?shape=canonical") as resp:
        error = (await resp.json())["error"]
    assert error == {
        "status": "PAYMENT_REQUIRED",
        "reason": "BILLING_ACCESS_DENIED",
        "message": "Billing access denied.",
        "request_id": "req_upstream",
    }
    async with session.get(f"{up.url}/status/503?shape=canonical-noid") as resp:
        error = (await resp.json())["error"]
    assert error["status"] == "UNAVAILABLE" and "request_id" not in error


@pytest.mark.parametrize(
    ("shape", "content_type", "body"),
    [
        ("empty", "application/octet-stream", b""),
        ("html", "text/html", None),
        ("text", "text/plain", b"upstream says no"),
        ("badjson", "application/json", b"{not json"),
    ],
)
async def test_status_non_json_shapes(
    up: UpstreamServer, session: aiohttp.ClientSession, shape: str, content_type: str, body: bytes | None
) -> None:
    async with session.get(f"{up.url}/status/502", params={"shape": shape}) as resp:
        assert resp.status == 502
        assert resp.content_type == content_type  # aiohttp reports octet-stream when the header is absent
        raw = await resp.read()
    if shape == "empty":
        assert "Content-Type" not in resp.headers
    if body is not None:
        assert raw == body
    else:
        assert raw.startswith(b"<html>")


async def test_status_gzip_shape_and_extra_header(up: UpstreamServer, session: aiohttp.ClientSession) -> None:
    params = {"shape": "gzip", "header": "Retry-After:7"}
    async with session.get(f"{up.url}/status/429", params=params) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        assert resp.headers["Retry-After"] == "7"
        assert json.loads(gzip.decompress(await resp.read())) == FLAT_ERROR


@pytest.mark.parametrize("chunked", [False, True])
async def test_status_huge_shape_streams(
    up: UpstreamServer, session: aiohttp.ClientSession, chunked: bool
) -> None:
    params = {"shape": "huge", "header": "WWW-Authenticate:Bearer", **({"chunked": "1"} if chunked else {})}
    size = 0
    async with session.get(f"{up.url}/status/500", params=params) as resp:
        assert resp.content_type == "application/json"
        assert resp.headers["WWW-Authenticate"] == "Bearer"
        assert resp.content_length == (None if chunked else HUGE_SIZE)
        first = await resp.content.read(16)
        size = len(first)
        async for chunk in resp.content.iter_any():
            size += len(chunk)
    assert first.startswith(b'{"error":"HUGE"')
    assert size == HUGE_SIZE


async def test_slow_answers_after_delay_and_times_out_before(
    up: UpstreamServer, session: aiohttp.ClientSession
) -> None:
    async with session.get(f"{up.url}/slow?delay=0.05") as resp:
        assert await resp.text() == "ok"
    with pytest.raises(TimeoutError):
        async with session.get(f"{up.url}/slow?delay=5", timeout=FAST):
            pass


async def test_hang_never_answers(up: UpstreamServer, session: aiohttp.ClientSession) -> None:
    with pytest.raises(TimeoutError):
        async with session.get(f"{up.url}/hang", timeout=FAST):
            pass
    assert up.last.raw_path == "/hang"


async def test_hang_body_sends_headers_then_stalls(
    up: UpstreamServer, session: aiohttp.ClientSession
) -> None:
    async with session.get(f"{up.url}/hang-body", timeout=FAST) as resp:
        assert resp.content_length == 100
        assert await resp.content.readexactly(10) == pattern_bytes(0, 10)
        with pytest.raises(TimeoutError):
            await resp.read()


async def test_reset_aborts_without_response(up: UpstreamServer, session: aiohttp.ClientSession) -> None:
    # RST surfaces as ClientOSError (ECONNRESET) or ServerDisconnectedError depending on timing.
    with pytest.raises((aiohttp.ClientOSError, aiohttp.ServerDisconnectedError)):
        async with session.get(f"{up.url}/reset"):
            pass


async def test_close_early_truncates_body(up: UpstreamServer, session: aiohttp.ClientSession) -> None:
    async with session.get(f"{up.url}/close-early") as resp:
        assert resp.content_length == 1000
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


async def test_redirect_and_cookies(up: UpstreamServer, session: aiohttp.ClientSession) -> None:
    async with session.get(f"{up.url}/redirect", allow_redirects=False) as resp:
        assert (resp.status, resp.headers["Location"]) == (302, "/echo/redirected")
    async with session.get(f"{up.url}/set-cookie") as resp:
        assert resp.headers["Set-Cookie"] == "session=abc; Path=/"
    async with session.get(f"{up.url}/cookies", headers={"Cookie": "a=1; b=2"}) as resp:
        assert await resp.json() == {"cookie": "a=1; b=2"}


async def test_gzip_endpoint_serves_compressed_bytes(
    up: UpstreamServer, session: aiohttp.ClientSession
) -> None:
    async with session.get(f"{up.url}/gzip") as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        raw = await resp.read()
    assert raw == GZIP_BODY
    assert json.loads(gzip.decompress(raw)) == GZIP_JSON


async def test_head_len_and_no_content(up: UpstreamServer, session: aiohttp.ClientSession) -> None:
    async with session.head(f"{up.url}/head-len") as resp:
        assert resp.headers["Content-Length"] == str(HEAD_LEN)
        assert await resp.read() == b""
    async with session.get(f"{up.url}/head-len") as resp:
        assert await resp.read() == pattern_bytes(0, HEAD_LEN)
    async with session.delete(f"{up.url}/no-content") as resp:
        assert resp.status == 204
        assert await resp.read() == b""


async def test_hop_sends_hop_by_hop_headers(up: UpstreamServer, session: aiohttp.ClientSession) -> None:
    async with session.get(f"{up.url}/hop") as resp:
        assert await resp.text() == "hop"
        headers = resp.headers
    assert headers["Connection"] == "keep-alive, X-Hop-Secret"
    assert headers["X-Hop-Secret"] == "hop-secret"
    for name, value in [("Keep-Alive", "timeout=5"), ("Proxy-Authenticate", "Basic"), ("Trailer", "X-T")]:
        assert headers[name] == value
    assert headers["Upgrade"] == "h2c"


async def test_websocket_echo_ping_pong_and_close(up: UpstreamServer, session: aiohttp.ClientSession) -> None:
    async with session.ws_connect(
        f"{up.url}/ws", protocols=("v2.events",), headers={"X-Trace": "t1"}, autoping=False
    ) as ws:
        assert ws.protocol == "v2.events"
        await ws.send_str("hi")
        assert await ws.receive_str() == "hi"
        await ws.send_bytes(b"\x00\x01")
        assert await ws.receive_bytes() == b"\x00\x01"

        await ws.send_str("ping-me")
        ping = await ws.receive()
        assert (ping.type, ping.data) == (WSMsgType.PING, WS_PING_PAYLOAD)
        await ws.pong(ping.data)
        await ws.ping(b"from-client")
        pong = await ws.receive()  # the upstream answers our ping in frame order, after seeing our pong
        assert (pong.type, pong.data) == (WSMsgType.PONG, b"from-client")
        assert up.ws_pongs == [WS_PING_PAYLOAD]

        await ws.send_str("close:4001")
        closing = await ws.receive()
        assert (closing.type, closing.data) == (WSMsgType.CLOSE, 4001)
    assert ("X-Trace", "t1") in up.ws_headers


@pytest.mark.parametrize("mode", ["garbage", "bad-status", "bad-header", "close"])
async def test_malformed_upstream(session: aiohttp.ClientSession, mode: MalformedMode) -> None:
    async with MalformedUpstream(mode) as bad:
        error = aiohttp.ServerDisconnectedError if mode == "close" else aiohttp.ClientResponseError
        with pytest.raises(error):
            # POST, because aiohttp silently retries idempotent methods once (see the test below).
            async with session.post(f"{bad.url}/x", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                await resp.read()
        assert bad.connections_opened == 1


async def test_aiohttp_client_retries_idempotent_requests_once(session: aiohttp.ClientSession) -> None:
    # Documents a client behaviour a proxy must switch off: even on a brand-new connection, aiohttp
    # resends GET/HEAD/OPTIONS/TRACE/PUT/DELETE once after ServerDisconnected/ClientOSError.
    async with MalformedUpstream("close") as bad:
        with pytest.raises(aiohttp.ServerDisconnectedError):
            async with session.get(bad.url):
                pass
        assert bad.connections_opened == 2


async def test_stale_answers_once_per_connection(up: UpstreamServer, session: aiohttp.ClientSession) -> None:
    # POST, because aiohttp would silently re-send an idempotent request on a new connection.
    async with session.post(f"{up.url}/stale/a", data=b"x") as resp:
        assert (await resp.json())["raw_path"] == "/stale/a"
    with pytest.raises(aiohttp.ClientConnectionError):  # the kept-alive connection, dropped unanswered
        async with session.post(f"{up.url}/stale/b", data=b"x") as resp:
            await resp.read()
    async with session.post(f"{up.url}/stale/c", data=b"x") as resp:  # a new connection is answered
        assert resp.status == 200
    assert [seen.raw_path for seen in up.requests] == ["/stale/a", "/stale/b", "/stale/c"]


async def test_refused_url(session: aiohttp.ClientSession) -> None:
    with pytest.raises(aiohttp.ClientConnectorError):
        async with session.get(await refused_url()):
            pass
