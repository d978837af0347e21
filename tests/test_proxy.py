"""End to end through an in-process gateway to a real upstream on loopback: forwarding, framing, headers,
errors in the envelope, timeouts, retries and WebSocket."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from conftest import CATCH_ALL, MakeGateway, RunningGateway
from structlog.testing import capture_logs
from upstream_server import (
    FLAT_ERROR,
    GZIP_BODY,
    HEAD_LEN,
    WS_PING_PAYLOAD,
    MalformedUpstream,
    UpstreamServer,
    pattern_sha256,
    refused_url,
)
from yarl import URL

from gateway.envelope import gateway_error
from gateway.proxy.upstream import Resends, UpstreamFailure

CANONICAL_KEYS = {"status", "reason", "message", "request_id"}


def envelope(body: bytes) -> dict[str, Any]:
    data = json.loads(body)
    assert set(data) == {"error"}, data
    assert CANONICAL_KEYS <= set(data["error"]), data
    return data["error"]


async def raw_exchange(port: int, request: bytes, *, read_timeout: float = 5.0) -> bytes:
    """Send bytes as they are (for what aiohttp's client refuses to produce) and read until close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(read_timeout):
            return await reader.read(-1)
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def raw_connection(port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()


async def read_response(
    reader: asyncio.StreamReader, *, read_timeout: float = 5.0
) -> tuple[int, dict[str, str], bytes]:
    """One response with a Content-Length body, without waiting for the connection to close."""
    async with asyncio.timeout(read_timeout):
        status, headers, _ = split_response(await reader.readuntil(b"\r\n\r\n"))
        return status, headers, await reader.readexactly(int(headers.get("content-length", "0")))


async def eventually(condition: Callable[[], bool]) -> None:
    """Poll, for at most 5 s, a state the test cannot await (what the upstream has seen so far)."""
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition never held")


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


@pytest.fixture
async def gw(upstream: UpstreamServer, make_gateway: MakeGateway) -> RunningGateway:
    return await make_gateway(upstream.url)


# --- forwarding ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
async def test_every_method_is_forwarded_with_its_body(gw, upstream, client, method):
    async with client.request(
        method, f"{gw.url}/echo/x", data=b"payload" if method != "GET" else None
    ) as resp:
        assert resp.status == 200
        seen = await resp.json()
    assert seen["method"] == method
    if method != "GET":
        assert seen["body_size"] == 7
        assert seen["body_sha256"] == hashlib.sha256(b"payload").hexdigest()


async def test_head_keeps_content_length_without_body(gw, client):
    async with client.head(f"{gw.url}/head-len") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(HEAD_LEN)
        assert await resp.read() == b""


@pytest.mark.parametrize(
    "target",
    [
        "/echo/a%2Fb?x=%2f&y=1+2",
        "/echo/%7Euser/caf%C3%A9?q=%E2%9C%93&empty=&flag",
        "/echo/UPPER%2a?a=b&a=c&page_token=2022-06-17%2006%3A06%3A14.948432",
        "/echo/comma,list?x=a%26b%3Dc;y=1",
    ],
)
async def test_path_and_query_reach_the_upstream_byte_exact(gw, client, target):
    async with client.get(URL(gw.url + target, encoded=True)) as resp:
        assert (await resp.json())["raw_path"] == target


async def test_host_is_rewritten_to_the_upstreams(gw, upstream, client):
    async with client.get(f"{gw.url}/echo/h", headers={"Host": "client.example"}) as resp:
        await resp.read()
    assert upstream.last.header("Host") == upstream.host_header
    assert upstream.last.header("X-Forwarded-Host") == "client.example"


async def test_route_can_preserve_the_clients_host(upstream, make_gateway, client):
    gw = await make_gateway(
        upstream.url, routes=[{"name": "all", "prefix": "/", "preserve_host": True, "auth": "none"}]
    )
    async with client.get(f"{gw.url}/echo/h", headers={"Host": "client.example"}) as resp:
        await resp.read()
    assert upstream.last.header("Host") == "client.example"


async def test_hop_by_hop_request_headers_are_removed(gw, upstream, client):
    headers = {
        "Connection": "keep-alive, X-Drop-Me",
        "X-Drop-Me": "secret",
        "Keep-Alive": "timeout=5",
        "Proxy-Authorization": "Basic Zm9vOmJhcg==",
        "Proxy-Connection": "keep-alive",
        "TE": "trailers",
        "Trailer": "X-T",
        "Upgrade": "h2c",
        "X-Kept": "yes",
        "Transfer_Encoding": "chunked",  # look-alikes that upstreams folding "_" into "-" read as framing
        "Content_Length": "5",
        "Keep_Alive": "timeout=5",
    }
    async with client.get(f"{gw.url}/echo/hop", headers=headers) as resp:
        await resp.read()
    seen = upstream.last
    for name in (
        "X-Drop-Me",
        "Keep-Alive",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Upgrade",
        "Transfer_Encoding",
        "Content_Length",
        "Keep_Alive",
    ):
        assert seen.header(name) is None, name
    assert seen.header("X-Kept") == "yes"


async def test_hop_by_hop_response_headers_are_removed(gw, client):
    async with client.get(f"{gw.url}/hop") as resp:
        assert await resp.read() == b"hop"
        for name in ("X-Hop-Secret", "Keep-Alive", "Proxy-Authenticate", "Trailer", "Upgrade"):
            assert name not in resp.headers, name


async def test_every_response_names_the_gateway_without_versions(upstream, make_gateway, client):
    gw = await make_gateway(upstream.url)
    async with client.get(f"{gw.url}/hop") as resp:  # the upstream (aiohttp) sends a versioned Server
        assert resp.status == 200 and resp.headers.getall("Server") == ["voipbin-gateway"]
    async with client.get(f"{gw.url}/status/503?shape=text") as resp:  # an upstream error, rewritten
        assert resp.status == 503 and resp.headers.getall("Server") == ["voipbin-gateway"]
    status, headers, _ = split_response(await raw_exchange(gw.port, b"GARBAGE\r\n\r\n"))  # parser error
    assert status == 400 and headers["server"] == "voipbin-gateway"
    async with client.get(f"{gw.admin_url}/healthz") as resp:
        assert resp.headers.getall("Server") == ["voipbin-gateway"]

    named = await make_gateway(await refused_url(), server={"server_header": "edge-1"})
    async with client.get(f"{named.url}/x") as resp:  # the gateway's own 502
        assert resp.status == 502 and resp.headers.getall("Server") == ["edge-1"]


async def test_no_client_headers_are_invented(gw, upstream):
    # A raw request with only Host: whatever the upstream sees beyond that, the gateway added on purpose.
    raw = await raw_exchange(gw.port, b"GET /echo/bare HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert split_response(raw)[0] == 200
    names = {name.lower() for name, _ in upstream.last.headers}
    # traceparent: the trace the gateway started (tracing.propagate is on by default).
    expected = {
        "host",
        "x-request-id",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "traceparent",
    }
    assert names == expected


async def test_compressed_bodies_pass_through_untouched(gw, client):
    async with client.get(f"{gw.url}/gzip", headers={"Accept-Encoding": "gzip"}) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        assert await resp.read() == GZIP_BODY


@pytest.mark.parametrize("chunked", [False, True])
async def test_compressed_request_bodies_reach_the_upstream_byte_exact(gw, upstream, client, chunked):
    """The gateway never decodes a Content-Encoding: the upstream gets the bytes the client sent."""

    async def body() -> AsyncIterator[bytes]:
        yield GZIP_BODY

    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    async with client.post(
        f"{gw.url}/echo/gz", data=body() if chunked else GZIP_BODY, headers=headers
    ) as resp:
        seen = await resp.json()
    assert (seen["body_size"], seen["body_sha256"]) == (len(GZIP_BODY), hashlib.sha256(GZIP_BODY).hexdigest())
    assert upstream.last.header("Content-Encoding") == "gzip"


async def test_redirects_are_returned_not_followed(gw, upstream, client):
    async with client.get(f"{gw.url}/redirect", allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == "/echo/redirected"
    assert not any(seen.raw_path == "/echo/redirected" for seen in upstream.requests)


async def test_cookies_are_not_shared_between_clients(gw, client):
    async with client.get(f"{gw.url}/set-cookie") as resp:
        assert "session=abc" in resp.headers["Set-Cookie"]
    async with aiohttp.ClientSession() as other, other.get(f"{gw.url}/cookies") as resp:
        assert (await resp.json())["cookie"] is None


async def test_upstream_connections_are_pooled(gw, upstream, client):
    async with client.get(f"{gw.url}/echo/pool") as resp:
        await resp.read()
    opened = upstream.connections_opened  # the first request's, plus perhaps the readiness probe's
    for _ in range(5):
        async with client.get(f"{gw.url}/echo/pool") as resp:
            await resp.read()
    assert upstream.connections_opened == opened


@pytest.mark.parametrize("retries", [0, 1])
@pytest.mark.parametrize(
    ("method", "body"),
    [("GET", None), ("HEAD", None), ("OPTIONS", None), ("DELETE", None), ("PUT", b"x" * 5000)],
)
async def test_a_stale_pooled_connection_never_fails_an_idempotent_request(
    upstream, make_gateway, client, method, body, retries
):
    # /stale answers the first request on a connection and drops the connection when the next arrives, so
    # every request after the first meets a pooled connection the upstream has just closed.
    gw = await make_gateway(upstream.url, upstream={"retries": retries})
    for i in range(3):
        async with client.request(method, f"{gw.url}/stale/{i}", data=body) as resp:
            assert resp.status == 200
            if body is not None:  # sent again in full, from the copy the gateway kept
                assert (await resp.json())["body_sha256"] == hashlib.sha256(body).hexdigest()
    paths = [seen.raw_path for seen in upstream.requests]
    assert paths == ["/stale/0", "/stale/1", "/stale/1", "/stale/2", "/stale/2"]


async def test_a_body_over_the_replay_limit_is_not_sent_twice(upstream, make_gateway, client):
    gw = await make_gateway(upstream.url, upstream={"retries": 3})
    async with client.put(f"{gw.url}/stale/0", data=b"x") as resp:
        assert resp.status == 200
    big = b"y" * (100 * 1024)  # over the 64 KiB the gateway keeps for a re-send
    async with client.put(f"{gw.url}/stale/1", data=big) as resp:
        assert resp.status == 502
    assert [seen.raw_path for seen in upstream.requests] == ["/stale/0", "/stale/1"]


@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_a_non_idempotent_request_on_a_stale_connection_is_not_sent_twice(
    upstream, make_gateway, client, method
):
    # The upstream may have applied it before the connection dropped (RFC 9110 §9.2.2).
    gw = await make_gateway(upstream.url, upstream={"retries": 3})
    async with client.request(method, f"{gw.url}/stale/0", data=b"order") as resp:
        assert resp.status == 200
    async with client.request(method, f"{gw.url}/stale/1", data=b"order") as resp:
        assert resp.status == 502
        assert envelope(await resp.read())["reason"] == "UPSTREAM_UNAVAILABLE"
    assert [seen.raw_path for seen in upstream.requests] == ["/stale/0", "/stale/1"]


# --- framing --------------------------------------------------------------------------------------------


async def test_content_length_response_keeps_its_length(gw):
    raw = await raw_exchange(gw.port, b"GET /bytes/1000 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    status, headers, body = split_response(raw)
    assert status == 200
    assert headers["content-length"] == "1000"
    assert "transfer-encoding" not in headers
    assert len(body) == 1000


async def test_chunked_response_stays_chunked(gw):
    raw = await raw_exchange(
        gw.port, b"GET /bytes/1000?chunked=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    status, headers, body = split_response(raw)
    assert status == 200
    assert headers["transfer-encoding"] == "chunked"
    assert "content-length" not in headers
    assert body.endswith(b"0\r\n\r\n")


async def test_chunked_request_body_is_streamed(gw, upstream, client):
    async def chunks():
        for i in range(16):
            yield bytes([i]) * 65536

    async with client.post(f"{gw.url}/sink", data=chunks()) as resp:
        seen = await resp.json()
    expected = b"".join(bytes([i]) * 65536 for i in range(16))
    assert seen == {"size": len(expected), "sha256": hashlib.sha256(expected).hexdigest()}
    assert upstream.last.header("Transfer-Encoding") == "chunked"
    assert upstream.last.header("Content-Length") is None


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
async def test_a_bodiless_request_reaches_the_upstream_without_invented_framing(gw, upstream, method):
    request = f"{method} /echo/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    assert split_response(await raw_exchange(gw.port, request))[0] == 200
    assert upstream.last.header("Content-Length") is None
    assert upstream.last.header("Transfer-Encoding") is None
    # A length the client did send is kept.
    request = f"{method} /echo/x HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    assert split_response(await raw_exchange(gw.port, request.encode()))[0] == 200
    assert upstream.last.header_all("Content-Length") == ["0"]


async def test_content_length_request_body_keeps_its_length(gw, upstream, client):
    async with client.put(f"{gw.url}/sink", data=b"x" * 5000) as resp:
        assert (await resp.json())["size"] == 5000
    assert upstream.last.header("Content-Length") == "5000"
    assert upstream.last.header("Transfer-Encoding") is None


async def test_large_download_arrives_intact(gw, client):
    size = 8 * 1024 * 1024
    digest = hashlib.sha256()
    async with client.get(f"{gw.url}/bytes/{size}") as resp:
        async for chunk in resp.content.iter_any():
            digest.update(chunk)
    assert digest.hexdigest() == pattern_sha256(size)


async def test_no_content_has_no_body(gw, client):
    async with client.get(f"{gw.url}/no-content") as resp:
        assert resp.status == 204
        assert await resp.read() == b""


# --- request id and forwarded headers --------------------------------------------------------------------


async def test_sane_request_id_is_kept_forwarded_and_returned(gw, upstream, client):
    async with client.get(f"{gw.url}/echo/rid", headers={"X-Request-ID": "abc-123.x:y"}) as resp:
        assert resp.headers["X-Request-ID"] == "abc-123.x:y"
    assert upstream.last.header("X-Request-ID") == "abc-123.x:y"


@pytest.mark.parametrize("bad", ["", "a" * 129, "has space", 'quote"d', "ünï"])
async def test_insane_request_id_is_replaced(gw, upstream, client, bad):
    async with client.get(f"{gw.url}/echo/rid", headers={"X-Request-ID": bad}) as resp:
        rid = resp.headers["X-Request-ID"]
    assert rid != bad and rid.startswith("req_")
    assert upstream.last.header("X-Request-ID") == rid


async def test_request_id_is_on_error_responses_and_in_the_envelope(gw, client):
    async with client.get(f"{gw.url}/status/404?shape=html", headers={"X-Request-ID": "trace-1"}) as resp:
        assert resp.headers["X-Request-ID"] == "trace-1"
        assert envelope(await resp.read())["request_id"] == "trace-1"


async def test_forwarded_headers_from_an_untrusted_peer_are_replaced(gw, upstream, client):
    spoofed = {"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil"}
    async with client.get(f"{gw.url}/echo/xff", headers=spoofed) as resp:
        await resp.read()
    seen = upstream.last
    assert seen.header("X-Forwarded-For") == "127.0.0.1"
    assert seen.header("X-Forwarded-Proto") == "http"
    assert seen.header("X-Forwarded-Host") != "evil"


OVERRIDES = {
    "X-Original-URL": "/auth/unregister",
    "X-Rewrite-URL": "/auth/unregister",
    "X_Original_URI": "/auth/unregister",
    "X-Forwarded-Prefix": "/admin",
    "X-HTTP-Method-Override": "DELETE",
    "X-Method-Override": "DELETE",
}
CLIENT_CLAIMS = {
    "Client-IP": "6.6.6.6",
    "Fastly-Client-IP": "6.6.6.6",
    "X-Forwarded-Ssl": "on",
    "Front-End-Https": "on",
    "X-Forwarded-Port": "443",
}


async def test_path_method_and_client_overrides_from_an_untrusted_peer_are_dropped(gw, upstream, client):
    """Frameworks read these as the request's real path, method, client or scheme: from a client, they
    would take a request somewhere the route table never matched it."""
    headers = {**OVERRIDES, **CLIENT_CLAIMS, "X-Kept": "yes"}
    async with client.get(f"{gw.url}/echo/open", headers=headers) as resp:
        await resp.read()
    seen = upstream.last
    assert [name for name, _ in seen.headers if name in headers] == ["X-Kept"]


async def test_path_and_method_overrides_are_dropped_even_from_a_trusted_proxy(
    upstream, make_gateway, client
):
    """A trusted proxy passes its client's headers on: only who the client is may come from it."""
    gw = await make_gateway(upstream.url, server={"trusted_proxies": ["127.0.0.0/8"]})
    async with client.get(f"{gw.url}/echo/open", headers={**OVERRIDES, **CLIENT_CLAIMS}) as resp:
        await resp.read()
    assert {name for name, _ in upstream.last.headers} & {*OVERRIDES, *CLIENT_CLAIMS} == set(CLIENT_CLAIMS)


async def test_forwarded_headers_from_a_trusted_peer_are_appended(upstream, make_gateway, client):
    gw = await make_gateway(upstream.url, server={"trusted_proxies": ["127.0.0.0/8"]})
    inbound = {
        "X-Forwarded-For": "203.0.113.9",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "api.example",
    }
    async with client.get(f"{gw.url}/echo/xff", headers=inbound) as resp:
        await resp.read()
    seen = upstream.last
    assert seen.header("X-Forwarded-For") == "203.0.113.9, 127.0.0.1"
    assert seen.header("X-Forwarded-Proto") == "https"
    assert seen.header("X-Forwarded-Host") == "api.example"


# --- routes --------------------------------------------------------------------------------------------


async def test_unmatched_route_is_404_route_not_found(upstream, make_gateway, client):
    gw = await make_gateway(
        upstream.url,
        routes=[
            {"name": "echo", "prefix": "/echo", "auth": "none"},
            {"name": "sink", "prefix": "/sink", "methods": ["POST"], "auth": "none"},
        ],
    )
    for method, path in (("GET", "/nowhere"), ("GET", "/echoes"), ("GET", "/sink")):
        async with client.request(method, gw.url + path) as resp:
            assert resp.status == 404
            assert resp.headers["Content-Type"] == "application/json"
            error = envelope(await resp.read())
            assert (error["status"], error["reason"]) == ("NOT_FOUND", "ROUTE_NOT_FOUND")
    assert upstream.requests == []


async def test_route_upstream_override(upstream, make_gateway, client):
    async with UpstreamServer() as other:
        gw = await make_gateway(
            upstream.url,
            routes=[
                {"name": "other", "prefix": "/echo/other", "upstream": other.url, "auth": "none"},
                *CATCH_ALL,
            ],
        )
        async with client.get(f"{gw.url}/echo/other/x") as resp:
            await resp.read()
        async with client.get(f"{gw.url}/echo/main") as resp:
            await resp.read()
        assert [s.raw_path for s in other.requests] == ["/echo/other/x"]
        assert [s.raw_path for s in upstream.requests] == ["/echo/main"]


@pytest.mark.parametrize(
    "target",
    [
        "/public/../echo/x",
        "/public/%2e%2e/echo/x",
        "/public%2F..%2Fecho/x",
        "/a\\b",
        "/echo//x",
        "/echo;p=1/x",
    ],
)
async def test_paths_that_could_route_differently_upstream_are_refused(gw, upstream, client, target):
    async with client.get(URL(gw.url + target, encoded=True)) as resp:
        assert resp.status == 400
        assert envelope(await resp.read())["status"] == "INVALID_ARGUMENT"
    assert upstream.requests == []


# --- limits ---------------------------------------------------------------------------------------------


async def test_declared_body_over_the_limit_is_413_before_the_upstream(upstream, make_gateway, client):
    gw = await make_gateway(upstream.url, limits={"max_body_bytes": 1000})
    async with client.post(f"{gw.url}/sink", data=b"x" * 1001) as resp:
        assert resp.status == 413
        assert envelope(await resp.read())["reason"] == "REQUEST_TOO_LARGE"
    assert upstream.requests == []


async def test_chunked_body_over_the_limit_is_413(upstream, make_gateway, client):
    gw = await make_gateway(upstream.url, limits={"max_body_bytes": 100_000})

    async def chunks():
        for _ in range(10):
            yield b"x" * 65536

    async with client.post(f"{gw.url}/sink", data=chunks()) as resp:
        assert resp.status == 413
        assert envelope(await resp.read())["reason"] == "REQUEST_TOO_LARGE"


STALLED_UPLOAD = b"POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 10


async def test_stalled_uploads_get_408_and_give_back_their_upstream_connections(
    upstream, make_gateway, client
):
    gw = await make_gateway(
        upstream.url,
        upstream={
            "pool": {"max_connections": 2},
            "timeouts": {"connect": 1, "request_body_idle": 0.3},
            "request_buffer_bytes": 0,  # streamed from the first byte: the upload holds its connection
        },
    )
    async with raw_connection(gw.port) as first, raw_connection(gw.port) as second:
        for _, writer in (first, second):
            writer.write(STALLED_UPLOAD)
        await eventually(lambda: len(upstream.requests) == 2)  # each upload holds an upstream connection
        async with client.get(f"{gw.url}/echo/x") as resp:  # waits for one to be given back
            assert resp.status == 200
        for reader, _ in (first, second):
            status, headers, body = await read_response(reader)
            assert (status, headers["content-type"]) == (408, "application/json")
            error = envelope(body)
            assert (error["status"], error["reason"]) == ("UNAVAILABLE", "REQUEST_TIMEOUT")
    assert [seen.body_size for seen in upstream.requests[:2]] == [None, None]  # aborted, never completed


async def test_an_upload_that_never_starts_is_408_and_never_reaches_the_upstream(upstream, make_gateway):
    gw = await make_gateway(upstream.url, upstream={"timeouts": {"request_body_idle": 0.2}})
    async with raw_connection(gw.port) as (reader, writer):
        writer.write(b"PUT /sink HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
        status, _, body = await read_response(reader)
    assert status == 408 and envelope(body)["reason"] == "REQUEST_TIMEOUT"
    assert upstream.requests == []


async def test_an_upload_stalling_after_the_response_started_cuts_the_connection(upstream, make_gateway):
    # /hang-body answers without reading the upload: 200, 10 of 100 promised bytes, then nothing.
    gw = await make_gateway(
        upstream.url,
        upstream={"timeouts": {"request_body_idle": 0.2, "idle_read": 60}, "request_buffer_bytes": 0},
    )
    async with raw_connection(gw.port) as (reader, writer):
        writer.write(STALLED_UPLOAD.replace(b"/sink", b"/hang-body"))
        async with asyncio.timeout(5):
            status, headers, body = split_response(await reader.read(-1))  # until the gateway hangs up
    assert (status, headers["content-length"]) == (200, "100")
    assert len(body) < 100


async def test_route_body_limit_overrides_the_default(upstream, make_gateway, client):
    gw = await make_gateway(
        upstream.url, routes=[{"name": "all", "prefix": "/", "max_body_bytes": 10, "auth": "none"}]
    )
    async with client.post(f"{gw.url}/sink", data=b"x" * 11) as resp:
        assert resp.status == 413


async def test_too_many_headers_is_431(upstream, make_gateway):
    gw = await make_gateway(upstream.url, limits={"max_header_count": 10})
    extra = b"".join(b"X-H%d: v\r\n" % i for i in range(12))
    raw = await raw_exchange(gw.port, b"GET /echo/h HTTP/1.1\r\nHost: x\r\n" + extra + b"\r\n")
    status, headers, body = split_response(raw)
    assert status == 431
    assert headers["content-type"] == "application/json"
    assert envelope(body)["reason"] == "HEADERS_TOO_LARGE"
    assert upstream.requests == []


async def test_headers_too_large_in_total_is_431(upstream, make_gateway, client):
    gw = await make_gateway(upstream.url, limits={"max_header_bytes": 2048})
    headers = {f"X-Pad-{i}": "v" * 200 for i in range(12)}  # each field fits, the total does not
    async with client.get(f"{gw.url}/echo/h", headers=headers) as resp:
        assert resp.status == 431
        assert envelope(await resp.read())["reason"] == "HEADERS_TOO_LARGE"


async def test_one_oversized_header_is_431_and_not_echoed(upstream, make_gateway):
    gw = await make_gateway(upstream.url, limits={"max_header_bytes": 1024})
    secret = b"Bearer " + b"s3cr3t" * 400
    raw = await raw_exchange(
        gw.port, b"GET /echo/h HTTP/1.1\r\nHost: x\r\nAuthorization: " + secret + b"\r\n\r\n"
    )
    status, _, body = split_response(raw)
    assert status == 431
    assert b"s3cr3t" not in body


@pytest.mark.parametrize("limit", [1024, 2048])  # 2048: equal to max_header_bytes, still told apart
async def test_a_target_over_max_uri_bytes_is_414_and_at_it_passes(upstream, make_gateway, limit):
    gw = await make_gateway(upstream.url, limits={"max_uri_bytes": limit, "max_header_bytes": 2048})
    base = b"/echo/u?q="
    at_limit = base + b"a" * (limit - len(base))
    status, _, _ = split_response(
        await raw_exchange(gw.port, b"GET " + at_limit + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    )
    assert status == 200 and len(upstream.requests) == 1
    status, headers, body = split_response(
        await raw_exchange(
            gw.port, b"GET " + at_limit + b"a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
    )
    assert status == 414 and headers["content-type"] == "application/json"
    assert envelope(body)["reason"] == "URI_TOO_LONG"
    assert len(upstream.requests) == 1
    # A header line as long as that target is still a header problem.
    long_header = b"X-Pad: " + b"v" * 2100 + b"\r\n"
    status, _, body = split_response(
        await raw_exchange(
            gw.port, b"GET /echo/u HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + long_header + b"\r\n"
        )
    )
    assert status == 431 and envelope(body)["reason"] == "HEADERS_TOO_LARGE"


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ],
)
async def test_malformed_http_is_answered_in_the_envelope(gw, upstream, request_bytes):
    status, headers, body = split_response(await raw_exchange(gw.port, request_bytes))
    assert 400 <= status < 500
    assert headers["content-type"] == "application/json"
    error = envelope(body)
    assert error["request_id"] == headers["x-request-id"]
    assert upstream.requests == []


async def test_overload_is_503(upstream, make_gateway, client):
    gw = await make_gateway(upstream.url, server={"max_in_flight": 1})
    slow = asyncio.create_task(client.get(f"{gw.url}/slow?delay=1"))
    for _ in range(200):  # wait until the upstream holds the first request
        if upstream.requests:
            break
        await asyncio.sleep(0.01)
    async with client.get(f"{gw.url}/echo/x") as resp:
        assert resp.status == 503
        assert envelope(await resp.read())["reason"] == "SERVICE_UNAVAILABLE"
    async with await slow as resp:
        assert resp.status == 200


# --- upstream errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "shape", "status", "reason", "message"),
    [
        (403, "canonical", "PERMISSION_DENIED", "BILLING_ACCESS_DENIED", None),
        (404, "flat", "NOT_FOUND", "CALL_NOT_FOUND", FLAT_ERROR["message"]),
        (400, "lowercode", "INVALID_ARGUMENT", "INVALID_REQUEST", None),
        (429, "code", "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED", None),
        (404, "problem", "NOT_FOUND", "RESOURCE_NOT_FOUND", None),
        (409, "detail", "FAILED_PRECONDITION", "STATE_INVALID", "Some detail"),
        (400, "empty", "INVALID_ARGUMENT", "INVALID_ARGUMENT", "The request is not valid."),
        (500, "html", "INTERNAL", "INTERNAL", "An internal error occurred."),
        (503, "text", "UNAVAILABLE", "SERVICE_UNAVAILABLE", None),
        (401, "badjson", "UNAUTHENTICATED", "INVALID_CREDENTIALS", None),
        (
            422,
            "longmessage",
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
            "The request is well-formed but not valid.",
        ),
        (404, "gzip", "NOT_FOUND", "CALL_NOT_FOUND", FLAT_ERROR["message"]),
        (502, "huge", "UNAVAILABLE", "SERVICE_UNAVAILABLE", "The upstream service is unavailable."),
    ],
)
async def test_upstream_errors_arrive_in_the_envelope(gw, client, code, shape, status, reason, message):
    async with client.get(f"{gw.url}/status/{code}?shape={shape}", headers={"X-Request-ID": "rid-1"}) as resp:
        assert resp.status == code
        assert resp.headers["Content-Type"] == "application/json"
        assert "Content-Encoding" not in resp.headers
        body = await resp.read()
        assert resp.headers["Content-Length"] == str(len(body))
    error = envelope(body)
    assert (error["status"], error["reason"]) == (status, reason)
    assert error["message"]
    if message is not None:
        assert error["message"] == message
    expected_rid = "req_upstream" if shape == "canonical" else "rid-1"
    assert error["request_id"] == expected_rid


async def test_canonical_envelope_without_request_id_gets_ours(gw, client):
    async with client.get(
        f"{gw.url}/status/403?shape=canonical-noid", headers={"X-Request-ID": "mine"}
    ) as resp:
        error = envelope(await resp.read())
    assert error["request_id"] == "mine"
    assert error["reason"] == "BILLING_ACCESS_DENIED"


async def test_upstream_error_headers_survive_the_rewrite(gw, client):
    url = f"{gw.url}/status/401?shape=empty&header=WWW-Authenticate:Bearer&header=Retry-After:7"
    async with client.get(url) as resp:
        assert resp.headers["WWW-Authenticate"] == "Bearer"
        assert resp.headers["Retry-After"] == "7"


async def test_flat_format_renders_the_older_shape(upstream, make_gateway, client):
    gw = await make_gateway(upstream.url, errors={"format": "flat"})
    async with client.get(f"{gw.url}/status/403?shape=canonical") as resp:
        assert await resp.json() == {
            "error": "BILLING_ACCESS_DENIED",
            "message": "Billing access denied.",
            "request_id": "req_upstream",
        }
    async with client.get(f"{gw.url}/status/404?shape=html", headers={"X-Request-ID": "r"}) as resp:
        assert await resp.json() == {
            "error": "RESOURCE_NOT_FOUND",
            "message": "The resource was not found.",
            "request_id": "r",
        }


async def test_success_bodies_are_never_touched(gw, client):
    async with client.get(f"{gw.url}/echo/ok") as resp:
        assert resp.headers["Content-Type"].startswith("application/json")
        assert "error" not in await resp.json()


# --- upstream failures -----------------------------------------------------------------------------------


async def test_connection_refused_is_502(make_gateway, client):
    gw = await make_gateway(await refused_url())
    async with client.get(f"{gw.url}/echo/x") as resp:
        assert resp.status == 502
        error = envelope(await resp.read())
    assert (error["status"], error["reason"]) == ("UNAVAILABLE", "UPSTREAM_UNAVAILABLE")


async def test_reset_is_502(gw, client):
    async with client.post(f"{gw.url}/reset") as resp:
        assert resp.status == 502
        assert envelope(await resp.read())["reason"] == "UPSTREAM_UNAVAILABLE"


@pytest.mark.parametrize("mode", ["garbage", "bad-status", "bad-header", "close"])
async def test_invalid_upstream_responses_are_502(make_gateway, client, mode):
    async with MalformedUpstream(mode) as bad:
        gw = await make_gateway(bad.url)
        async with client.post(f"{gw.url}/x") as resp:
            assert resp.status == 502
            assert envelope(await resp.read())["reason"] == "UPSTREAM_UNAVAILABLE"


async def test_slow_response_headers_are_504(upstream, make_gateway, client):
    gw = await make_gateway(upstream.url, upstream={"timeouts": {"response_headers": 0.2}})
    async with client.get(f"{gw.url}/hang") as resp:
        assert resp.status == 504
        error = envelope(await resp.read())
    assert (error["status"], error["reason"]) == ("UNAVAILABLE", "REQUEST_TIMEOUT")


async def test_route_timeout_overrides_the_default(upstream, make_gateway, client):
    routes = [
        {"name": "slow", "prefix": "/slow", "timeouts": {"response_headers": 0.2}, "auth": "none"},
        *CATCH_ALL,
    ]
    gw = await make_gateway(upstream.url, routes=routes)
    async with client.get(f"{gw.url}/slow?delay=1") as resp:
        assert resp.status == 504
    async with client.get(f"{gw.url}/echo/fast") as resp:
        assert resp.status == 200


async def test_idle_body_is_cut_not_completed(upstream, make_gateway, client):
    gw = await make_gateway(upstream.url, upstream={"timeouts": {"idle_read": 0.2}})
    async with client.get(f"{gw.url}/hang-body") as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


async def test_upstream_closing_mid_body_cuts_the_client_response(gw, client):
    async with client.get(f"{gw.url}/close-early") as resp:
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


@pytest.mark.parametrize(("retries", "attempts"), [(0, 1), (1, 2)])
async def test_idempotent_requests_are_retried_as_configured(
    upstream, make_gateway, client, retries, attempts
):
    gw = await make_gateway(upstream.url, upstream={"retries": retries})
    async with client.get(f"{gw.url}/reset") as resp:
        assert resp.status == 502
    assert len([s for s in upstream.requests if s.raw_path == "/reset"]) == attempts


def test_resend_rules() -> None:
    reset = UpstreamFailure("reset", gateway_error(502))
    timeout = UpstreamFailure("timeout", gateway_error(504))

    stale_then_none = Resends(0, idempotent=True)
    assert stale_then_none.allow(reset, reused=True, replayable=True) == "stale"
    assert stale_then_none.allow(reset, reused=True, replayable=True) is None  # one stale re-send only

    retries = Resends(2, idempotent=True)
    assert retries.allow(reset, reused=False, replayable=True) == "retry"
    assert retries.allow(reset, reused=True, replayable=True) == "stale"  # not a retry used up
    assert retries.allow(reset, reused=False, replayable=True) == "retry"
    assert retries.allow(reset, reused=False, replayable=True) is None

    assert Resends(3, idempotent=True).allow(reset, reused=True, replayable=False) is None
    assert Resends(3, idempotent=True).allow(timeout, reused=True, replayable=True) is None
    assert Resends(3, idempotent=False).allow(reset, reused=True, replayable=True) is None


async def test_non_idempotent_requests_are_never_retried(upstream, make_gateway, client):
    gw = await make_gateway(upstream.url, upstream={"retries": 3})
    async with client.post(f"{gw.url}/reset") as resp:
        assert resp.status == 502
    assert len([s for s in upstream.requests if s.raw_path == "/reset"]) == 1


# --- websocket ---------------------------------------------------------------------------------------------


async def test_websocket_frames_pings_and_close_codes_are_relayed(gw, upstream, client):
    async with client.ws_connect(f"{gw.url}/ws", protocols=("v2.events",), autoping=False) as ws:
        assert ws.protocol == "v2.events"
        await ws.send_str("hello")
        assert (await ws.receive(timeout=5)).data == "hello"
        await ws.send_bytes(b"\x00\x01")
        assert (await ws.receive(timeout=5)).data == b"\x00\x01"

        await ws.ping(b"from-client")
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.PONG, b"from-client")

        await ws.send_str("ping-me")
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.PING, WS_PING_PAYLOAD)
        await ws.pong(msg.data)

        await ws.send_str("close:4001")
        msg = await ws.receive(timeout=5)
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert msg.data == 4001
    for _ in range(100):
        if upstream.ws_pongs:
            break
        await asyncio.sleep(0.01)
    assert upstream.ws_pongs == [WS_PING_PAYLOAD]
    assert dict(upstream.ws_headers).get("X-Request-ID")


async def test_client_close_code_reaches_the_upstream(gw, upstream, client):
    async with client.ws_connect(f"{gw.url}/ws") as ws:
        await ws.send_str("hi")
        await ws.receive(timeout=5)
        await ws.close(code=4002)
        assert ws.close_code == 4002
    for _ in range(100):
        if upstream.ws_close_codes:
            break
        await asyncio.sleep(0.01)
    assert upstream.ws_close_codes == [4002]


_WS_KEY = b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
_WS_UPGRADE = b"Upgrade: websocket\r\nConnection: Upgrade\r\n"


@pytest.mark.parametrize(
    "handshake",
    [
        pytest.param(
            b"Upgrade: websocket\r\n" + _WS_KEY + b"Sec-WebSocket-Version: 13\r\n", id="no-connection"
        ),
        pytest.param(
            b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n", id="no-key"
        ),
        pytest.param(
            b"Upgrade: websocket\r\nConnection: Upgrade\r\n" + _WS_KEY + b"Sec-WebSocket-Version: 99\r\n",
            id="version-99",
        ),
        *(  # the drafts before RFC 6455, which aiohttp's own check lets through
            pytest.param(_WS_UPGRADE + _WS_KEY + b"Sec-WebSocket-Version: %d\r\n" % v, id=f"draft-{v}")
            for v in (7, 8)
        ),
    ],
)
async def test_a_bad_websocket_handshake_is_400_and_never_reaches_the_upstream(gw, upstream, handshake):
    async with raw_connection(gw.port) as (reader, writer):
        writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\n" + handshake + b"\r\n")
        status, headers, body = await read_response(reader)
    assert (status, headers["content-type"]) == (400, "application/json")
    assert envelope(body)["status"] == "INVALID_ARGUMENT"
    assert headers["sec-websocket-version"] == "13"
    assert upstream.requests == []


@pytest.mark.parametrize("request_line", [b"POST /ws HTTP/1.1", b"GET /ws HTTP/1.0"])
async def test_a_websocket_handshake_is_get_over_http_1_1_only(gw, upstream, request_line):
    """RFC 6455 §4.1; aiohttp's own check takes any method (the upstream would be sent a GET) and 1.0."""
    handshake = _WS_UPGRADE + _WS_KEY + b"Sec-WebSocket-Version: 13\r\n"
    async with raw_connection(gw.port) as (reader, writer):
        writer.write(request_line + b"\r\nHost: x\r\nContent-Length: 0\r\n" + handshake + b"\r\n")
        status, _, body = await read_response(reader)
    assert (status, envelope(body)["status"]) == (400, "INVALID_ARGUMENT")
    assert upstream.requests == []


async def test_open_websockets_do_not_take_connections_from_http_requests(upstream, make_gateway, client):
    gw = await make_gateway(
        upstream.url, upstream={"pool": {"max_connections": 2}, "timeouts": {"connect": 0.5}}
    )
    async with client.ws_connect(f"{gw.url}/ws") as one, client.ws_connect(f"{gw.url}/ws") as two:
        for ws in (one, two):
            await ws.send_str("open")
            assert await ws.receive_str(timeout=5) == "open"
        for _ in range(3):
            async with client.get(f"{gw.url}/echo/x") as resp:
                assert resp.status == 200


async def test_websockets_have_a_connection_cap_of_their_own(upstream, make_gateway, client):
    gw = await make_gateway(upstream.url, upstream={"pool": {"max_websockets": 1}})
    async with client.ws_connect(f"{gw.url}/ws") as first:
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await client.ws_connect(f"{gw.url}/ws")
        assert info.value.status == 503  # at once, not after the connect timeout
        await first.send_str("still open")
        assert await first.receive_str(timeout=5) == "still open"
        async with client.get(f"{gw.url}/echo/x") as resp:
            assert resp.status == 200


async def test_websocket_is_refused_on_routes_that_do_not_allow_it(upstream, make_gateway, client):
    gw = await make_gateway(upstream.url, routes=[{"name": "all", "prefix": "/", "auth": "none"}])
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect(f"{gw.url}/ws")
    assert info.value.status == 400


# --- the drain ---------------------------------------------------------------------------------------------


async def test_the_stop_closes_idle_kept_alive_connections_at_once(upstream, make_gateway):
    gw = await make_gateway(upstream.url, server={"drain_timeout": 30})
    async with raw_connection(gw.port) as (idle, idle_writer), raw_connection(gw.port) as (busy, busy_writer):
        idle_writer.write(b"GET /echo/first HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(idle))[0] == 200  # now idle, kept alive
        busy_writer.write(b"GET /slow?delay=3 HTTP/1.1\r\nHost: x\r\n\r\n")
        await eventually(lambda: any(s.raw_path == "/slow?delay=3" for s in upstream.requests))
        stopping = asyncio.create_task(gw.server.stop())
        assert await asyncio.wait_for(idle.read(), timeout=10) == b""  # closed, not left deaf
        assert not stopping.done()  # while the busy one still drains
        status, _, body = await read_response(busy, read_timeout=30)
        assert (status, body) == (200, b"ok")
        assert await asyncio.wait_for(busy.read(), timeout=10) == b""  # answered, then closed
        await asyncio.wait_for(stopping, timeout=30)


async def test_an_upload_under_way_at_the_stop_completes(upstream, make_gateway):
    gw = await make_gateway(upstream.url, server={"drain_timeout": 30})
    body = b"u" * (2 * 1024 * 1024)
    async with raw_connection(gw.port) as (reader, writer):
        writer.write(b"POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body))
        writer.write(body[: len(body) // 2])
        await writer.drain()
        await eventually(lambda: any(s.raw_path == "/sink" for s in upstream.requests))
        stopping = asyncio.create_task(gw.server.stop())
        await asyncio.sleep(0)  # the stop is under way: its first steps take no time to wait for
        writer.write(body[len(body) // 2 :])
        status, _, answer = await read_response(reader, read_timeout=30)
        assert await asyncio.wait_for(reader.read(), timeout=10) == b""  # then closed
    assert status == 200
    assert json.loads(answer) == {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    await asyncio.wait_for(stopping, timeout=30)


# --- the gateway's own failures ------------------------------------------------------------------------


async def test_waiting_for_a_pooled_connection_counts_as_connect_timeout(upstream, make_gateway, client):
    gw = await make_gateway(
        upstream.url, upstream={"pool": {"max_connections": 1}, "timeouts": {"connect": 0.2}}
    )
    hanging = asyncio.create_task(client.get(f"{gw.url}/hang"))
    try:
        for _ in range(200):
            if any(s.raw_path == "/hang" for s in upstream.requests):
                break
            await asyncio.sleep(0.01)
        async with client.get(f"{gw.url}/echo/x") as resp:
            assert resp.status == 504
            assert envelope(await resp.read())["reason"] == "REQUEST_TIMEOUT"
    finally:
        hanging.cancel()


async def test_unresponsive_host_is_a_connect_timeout(make_gateway, client):
    # A listener whose accept queue is full: the kernel drops further SYNs, so connecting just hangs.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            try:
                filler.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            fillers.append(filler)
        gw = await make_gateway(
            f"http://127.0.0.1:{port}", upstream={"timeouts": {"connect": 0.3}, "retries": 0}
        )
        async with client.get(f"{gw.url}/x") as resp:
            assert resp.status == 504
            assert envelope(await resp.read())["reason"] == "REQUEST_TIMEOUT"
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


async def test_a_bug_is_a_bare_500_with_the_traceback_only_in_the_log(gw, client):
    async def broken(request, ctx):
        raise RuntimeError("internal detail: db password hunter2")

    gw.server.gateway._http = broken
    with capture_logs() as logs:
        async with client.get(f"{gw.url}/echo/x", headers={"X-Request-ID": "bug-1"}) as resp:
            assert resp.status == 500
            body = await resp.read()
    error = envelope(body)
    assert (error["status"], error["reason"], error["request_id"]) == ("INTERNAL", "INTERNAL", "bug-1")
    assert b"hunter2" not in body and b"Traceback" not in body and b"RuntimeError" not in body
    [entry] = [e for e in logs if e["event"] == "unhandled_error"]
    assert entry["request_id"] == "bug-1"
    assert entry["exc_info"] is True


async def test_websocket_handshake_to_a_silent_upstream_times_out(make_gateway, client):
    async with MalformedUpstream("close") as silent:  # accepts, reads, never answers an upgrade
        gw = await make_gateway(silent.url, upstream={"timeouts": {"connect": 0.2, "response_headers": 0.3}})
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            async with asyncio.timeout(5):
                await client.ws_connect(f"{gw.url}/ws")
        assert info.value.status in (502, 504)
